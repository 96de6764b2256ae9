"""The headless-browser harness (tests/browser.py) that the report test renders report.html with."""

from __future__ import annotations

import functools
import http.server
import re
import threading

import plotly.graph_objects as go
import plotly.io as pio
import pytest
from browser import BrowserError, render

X = [1, 2, 3, 4, 5, 6, 7]
Y = [3, 1, 4, 1, 5, 9, 2]


def _figure_html(include_plotlyjs: bool | str) -> str:
    fig = go.Figure(go.Scatter(x=X, y=Y, mode="markers", name="probe"))
    fig.update_layout(title="harness probe")
    return pio.to_html(fig, include_plotlyjs=include_plotlyjs, full_html=True)


def _page(tmp_path, body: str, name: str = "page.html"):
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>")
    return path


def test_offline_plotly_page_draws_without_errors(tmp_path, browser):
    html = _figure_html(include_plotlyjs=True)
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js is inline: nothing to fetch
    path = tmp_path / "plot.html"
    path.write_text(html, encoding="utf-8")

    page = render(path, browser=browser)

    assert page.errors == []
    assert 'class="main-svg"' in page.dom
    assert 'class="scatterlayer' in page.dom
    # One drawn marker per data point, and the title text: the figure was drawn, not just the div.
    assert len(re.findall(r'<path class="point"', page.dom)) == len(X)
    assert "harness probe" in page.dom


def test_plot_check_fails_without_plotlyjs(tmp_path, browser):
    """The negative control of the test above: the same figure without plotly.js draws nothing."""
    path = tmp_path / "noplotly.html"
    path.write_text(_figure_html(include_plotlyjs=False), encoding="utf-8")

    page = render(path, browser=browser)

    assert 'class="main-svg"' not in page.dom
    assert any("Plotly is not defined" in e for e in page.errors), page.errors


def test_uncaught_exception_is_an_error(tmp_path, browser):
    page = render(_page(tmp_path, '<script>throw new Error("boom");</script>'), browser=browser)
    assert any("boom" in e for e in page.errors), page.console
    assert any(line.startswith("error: ") and "boom" in line for line in page.console)


def test_console_levels_are_told_apart(tmp_path, browser):
    body = (
        "<div id='out'>before</div><script>"
        "console.log('fine'); console.warn('careful'); console.error('bad');"
        "document.getElementById('out').textContent = 'after';"
        "</script>"
    )
    page = render(_page(tmp_path, body), browser=browser)

    assert page.errors == ["bad"]
    assert page.console == ["log: fine", "warning: careful", "error: bad"]
    assert '<div id="out">after</div>' in page.dom  # the DOM is read after the scripts ran


def test_unhandled_rejection_is_an_error(tmp_path, browser):
    page = render(_page(tmp_path, '<script>Promise.reject(new Error("later"));</script>'), browser=browser)
    assert any("later" in e for e in page.errors), page.console


@pytest.mark.parametrize("source", ["script-tag", "plotly-cdn"])
def test_network_is_blocked(tmp_path, browser, source):
    if source == "script-tag":
        url = "https://cdn.plot.ly/plotly-2.35.2.min.js"
        path = _page(tmp_path, f'<script src="{url}"></script><script>console.log(typeof Plotly)</script>')
    else:  # the page plotly writes with include_plotlyjs="cdn"
        html = _figure_html(include_plotlyjs="cdn")
        url = re.search(r'<script[^>]*\bsrc="([^"]+)"', html).group(1)
        path = tmp_path / "cdn.html"
        path.write_text(html, encoding="utf-8")

    page = render(path, browser=browser)

    assert any(url in e and "net::ERR_" in e for e in page.errors), page.errors
    assert 'class="main-svg"' not in page.dom
    if source == "script-tag":
        assert "log: undefined" in page.console  # the script did not load


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on loopback serving tmp_path/site: reachable, unless the harness blocks it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ok.js").write_text("console.log('loaded from the network');")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_loopback_is_blocked_too(tmp_path, browser, local_server):
    """A server that is up and reachable still cannot be fetched from: the harness blocks it, not luck."""
    urls = [f"http://127.0.0.1:{local_server}/ok.js", f"http://localhost:{local_server}/ok.js"]
    path = _page(tmp_path, "".join(f'<script src="{url}"></script>' for url in urls))

    page = render(path, browser=browser)

    assert not any("loaded from the network" in line for line in page.console), page.console
    for url in urls:
        assert any(url in e and "net::ERR_" in e for e in page.errors), page.errors


def test_timeout_raises(tmp_path, browser):
    path = _page(tmp_path, "<script>while (true) {}</script>")
    with pytest.raises(BrowserError, match="timed out"):
        render(path, timeout_s=3, browser=browser)


def test_browser_that_dies_raises(tmp_path):
    path = _page(tmp_path, "<p>hi</p>")
    with pytest.raises(BrowserError, match="exited unexpectedly"):
        render(path, browser="/bin/false")
    with pytest.raises(BrowserError, match="could not start"):
        render(path, browser=str(tmp_path / "no-such-browser"))


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        render(tmp_path / "absent.html", browser="/bin/false")
