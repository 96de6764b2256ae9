"""Render a local HTML file in headless Chromium, offline, and report what the page's console saw.

A test helper, not part of the package: a test file imports it as a plain module, ``from browser import
find_browser, render`` (pytest's default "prepend" import mode puts ``tests/`` on ``sys.path``, since
``tests/`` is not a package).

The browser is driven over the DevTools protocol on ``--remote-debugging-pipe`` (fd 3 in, fd 4 out,
JSON messages ending in NUL), with the standard library only. Chromium's ``--enable-logging=stderr``
console lines were not enough: they print every console level as ``INFO:CONSOLE`` (``console.error``
cannot be told from ``console.log``) and a script that fails to load prints nothing at all.

All network traffic is blocked (a dead proxy for every scheme, loopback included, and a host resolver
that resolves nothing), so anything the page tries to fetch from the network fails and lands in
``errors``: a page that renders with ``errors == []`` is self-contained. ``file:`` and ``data:`` URLs
still load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BROWSER_NAMES", "PLOTLY_TEXT_BOXES", "BrowserError", "Rendered", "find_browser", "render"]

# Looked up on PATH in this order, then the known Debian locations.
BROWSER_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "chrome-headless-shell",
    "headless_shell",
)
_KNOWN_PATHS = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
# Debian's /usr/bin/chromium is a shell wrapper that adds flags of its own (extensions, GPU
# rasterization); the binary behind it is used instead where present.
_DEBIAN_BINARY = "/usr/lib/chromium/chromium"

# Waits, after the load event, for two animation frames and then this long, so that work the page
# queued on load (plotly draws some parts asynchronously) has run before the DOM is read.
_SETTLE_JS = """new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(
    () => setTimeout(resolve, %d))))"""

# For ``render(..., evaluate=PLOTLY_TEXT_BOXES)``: for each plotly figure of the page, the bounding
# rectangles ([left, top, right, bottom], CSS pixels) of its text: ``kind`` is title (the figure's),
# annotation (subplot titles are annotations), xtitle / ytitle (axis titles), legend (its whole box),
# colorbar (bar, ticks and title) or tick (a tick label); ``legend`` the text of each legend entry;
# ``axes`` each cartesian axis with its type (linear, log, category), title and tick labels as written
# (plotly's ``data-unformatted``: ``10<sup>−3</sup>`` stays markup); ``figure`` the box of the whole figure.
PLOTLY_TEXT_BOXES = r"""(() => {
  const rect = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const label = el => el.getAttribute("data-unformatted") ?? (el.textContent || "").trim();
  return Array.from(document.querySelectorAll(".js-plotly-plot")).map(gd => {
    const out = {id: gd.id, figure: rect(gd), boxes: [], legend: [], axes: []};
    const add = (kind, el, text) => {
      const b = rect(el);
      if (b[2] - b[0] > 0 && b[3] - b[1] > 0) out.boxes.push({kind, text: text ?? label(el), box: b});
    };
    gd.querySelectorAll("text.gtitle").forEach(el => add("title", el));
    gd.querySelectorAll("g.annotation").forEach(
      el => add("annotation", el.querySelector(".annotation-text-g") || el));
    gd.querySelectorAll("g[class^='g-x'][class$='title'] > text").forEach(el => add("xtitle", el));
    gd.querySelectorAll("g[class^='g-y'][class$='title'] > text").forEach(el => add("ytitle", el));
    gd.querySelectorAll("g.legend").forEach(el => {
      const entries = Array.from(el.querySelectorAll("g.traces text.legendtext")).map(label);
      out.legend.push(...entries);
      add("legend", el.querySelector("rect.bg") || el, entries.join(" | "));
    });
    gd.querySelectorAll("g.colorbar").forEach(el => {
      const title = el.querySelector(".cbtitle text");
      add("colorbar", el, title ? label(title) : "");
    });
    for (const sp of gd._fullLayout._subplots.cartesian || []) {
      const g = gd.querySelector("g.subplot." + sp);
      const names = sp.match(/^(x\d*)(y\d*)$/);
      if (!g || !names) continue;
      for (const [letter, id] of [["x", names[1]], ["y", names[2]]]) {
        const ax = gd._fullLayout[letter + "axis" + id.slice(1)];
        const ticks = Array.from(g.querySelectorAll(`.${letter}axislayer-above .${id}tick > text`));
        ticks.forEach(el => add("tick", el));
        const title = (ax.title && ax.title.text) || "";
        out.axes.push({subplot: sp, axis: id, type: ax.type, title, ticks: ticks.map(label)});
      }
    }
    return out;
  });
})()"""


class BrowserError(RuntimeError):
    """The browser could not render the page: it did not start, crashed, or ran out of time."""


@dataclass
class Rendered:
    """What the page became and what its console showed.

    dom: the serialized DOM (``<!DOCTYPE html>`` plus ``document.documentElement.outerHTML``) after
        the load event, two animation frames and ``settle_s``.
    console: every console message in arrival order, each ``"<level>: <text>"``: ``console.*`` calls
        (level = the method: log, info, warning, error, debug, assert, ...), browser messages such as
        failed loads (level from the browser: verbose, info, warning, error) and uncaught exceptions
        (level ``error``).
    errors: the subset that are errors, without the level prefix: ``console.error``/``console.assert``
        failures, uncaught exceptions and unhandled promise rejections, browser error messages, and
        resources that failed to load (``Failed to load resource: net::ERR_... (<url>)``).
    value: what ``render(..., evaluate=EXPRESSION)`` returned, as JSON (None without one).
    """

    dom: str
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    value: Any = None


def _is_shell_script(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"#!"
    except OSError:
        return False


def find_browser() -> str | None:
    """The path of a headless-capable Chromium/Chrome, or None.

    ``$SPECTRA_BROWSER`` (an executable path) wins; then the names in ``BROWSER_NAMES`` on PATH; then
    /usr/bin/chromium and /usr/lib/chromium/chromium. Debian's /usr/bin/chromium wrapper script is
    replaced by the binary it runs.
    """
    override = os.environ.get("SPECTRA_BROWSER")
    if override:
        return override if os.access(override, os.X_OK) else None
    candidates = [shutil.which(name) for name in BROWSER_NAMES]
    candidates += [p for p in _KNOWN_PATHS if os.access(p, os.X_OK)]
    for path in candidates:
        if not path:
            continue
        if _is_shell_script(path) and os.access(_DEBIAN_BINARY, os.X_OK):
            resolved = os.path.realpath(path)
            if resolved in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
                return _DEBIAN_BINARY
        return path
    return None


def _browser_args(binary: str, profile: str) -> list[str]:
    return [
        binary,
        "--headless=new",
        "--remote-debugging-pipe",
        f"--user-data-dir={profile}",
        # The page is our own output with the network blocked; a sandbox needs user namespaces,
        # which containers (and root) usually lack.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        "--mute-audio",
        "--hide-scrollbars",
        "--window-size=1280,900",
        # Offline: every request goes to a proxy nobody listens on (loopback too), and no host name
        # resolves, so a fetch fails with net::ERR_PROXY_CONNECTION_FAILED or ERR_NAME_NOT_RESOLVED.
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "about:blank",
    ]


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of fd numbered 10 or above (so that dup2 to 3 and 4 cannot collide)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class _Session:
    """The DevTools protocol over the pipe: commands, and the page's events gathered as they come."""

    def __init__(self, pid: int, to_browser: int, from_browser: int, deadline: float, stderr_path: str):
        self.pid = pid
        self.wfd = to_browser
        self.rfd = from_browser
        self.deadline = deadline
        self.stderr_path = stderr_path
        self.buffer = b""
        self.next_id = 0
        self.session_id: str | None = None
        self.console: list[str] = []
        self.errors: list[str] = []
        self.loaded = False

    # -- transport --
    def _fail(self, why: str) -> BrowserError:
        tail = ""
        with contextlib.suppress(OSError):
            lines = Path(self.stderr_path).read_text(errors="replace").strip().splitlines()
            if lines:
                tail = "\nbrowser stderr (last lines):\n" + "\n".join(lines[-15:])
        return BrowserError(why + tail)

    def send(self, method: str, params: dict | None = None, *, page: bool = True) -> int:
        self.next_id += 1
        message: dict = {"id": self.next_id, "method": method, "params": params or {}}
        if page and self.session_id:
            message["sessionId"] = self.session_id
        data = json.dumps(message).encode() + b"\0"
        while data:
            try:
                written = os.write(self.wfd, data)
            except BrokenPipeError:
                why = f"the browser exited unexpectedly (DevTools pipe closed, sending {method})"
                raise self._fail(why) from None
            data = data[written:]
        return self.next_id

    def _read_message(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._fail("timed out waiting for the browser")
            ready, _, _ = select.select([self.rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rfd, 1 << 20)
            if not chunk:
                raise self._fail("the browser exited unexpectedly (DevTools pipe closed)")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, page: bool = True) -> dict:
        """Send a command and return its result, handling the events that arrive meanwhile."""
        wanted = self.send(method, params, page=page)
        while True:
            message = self._read_message()
            if message.get("id") == wanted:
                if "error" in message:
                    raise self._fail(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self._event(message)

    def wait_for_load(self) -> None:
        while not self.loaded:
            message = self._read_message()
            if "method" in message:
                self._event(message)

    # -- events --
    def _record(self, level: str, text: str) -> None:
        self.console.append(f"{level}: {text}")
        if level in ("error", "assert"):
            self.errors.append(text)

    def _event(self, message: dict) -> None:
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_object_text(arg) for arg in params.get("args", []))
            if params["type"] == "assert" and not text:
                text = "console.assert failed"
            self._record(params["type"], text)
        elif method == "Runtime.exceptionThrown":
            self._record("error", _exception_text(params["exceptionDetails"]))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            text = entry.get("text", "")
            if entry.get("url") and entry["url"] not in text:
                text += f" ({entry['url']})"
            self._record(entry.get("level", "info"), text)
        elif method == "Page.loadEventFired":
            self.loaded = True
        elif method == "Inspector.targetCrashed":
            raise self._fail("the page crashed")
        elif method == "Target.detachedFromTarget" and params.get("sessionId") == self.session_id:
            raise self._fail("the browser detached from the page")


def _remote_object_text(obj: dict) -> str:
    if "value" in obj:
        value = obj["value"]
        return value if isinstance(value, str) else json.dumps(value)
    if "unserializableValue" in obj:
        return obj["unserializableValue"]
    return obj.get("description") or obj.get("type", "?")


def _exception_text(details: dict) -> str:
    exception = details.get("exception") or {}
    description = (exception.get("description") or _remote_object_text(exception)) if exception else ""
    head = details.get("text", "Uncaught")
    text = f"{head} {description}".strip() if description else head
    where = details.get("url")
    if where and where not in text:
        text += f" ({where}:{details.get('lineNumber', 0) + 1})"
    return text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap(pid: int, wait_s: float) -> bool:
    """Wait up to wait_s for the browser process to exit; True when it did."""
    end = time.monotonic() + wait_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


def render(
    html_path: str | os.PathLike[str],
    timeout_s: float = 60,
    *,
    browser: str | None = None,
    settle_s: float = 0.5,
    evaluate: str | None = None,
) -> Rendered:
    """Open html_path in headless Chromium with the network blocked and return the DOM and console.

    browser: a path or a name on PATH; default find_browser(). Waits for the load event, then two
    animation frames and settle_s seconds, then reads the DOM (later timers are not waited for).
    evaluate: a JavaScript expression run in the page after that (awaited if it is a promise); its
    result, JSON-serialised, is ``Rendered.value`` (e.g. :data:`PLOTLY_TEXT_BOXES`). An exception it
    throws raises BrowserError.
    Raises FileNotFoundError for a missing file, BrowserError when no browser is found, the browser
    does not start or crashes, or the whole render takes longer than timeout_s.
    """
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    binary = browser or find_browser()
    if binary is None:
        raise BrowserError("no headless Chromium found (see tests/browser.py: find_browser)")
    binary = shutil.which(binary) or binary  # a bare name is looked up on PATH
    deadline = time.monotonic() + timeout_s

    profile = tempfile.mkdtemp(prefix="spectra-chromium-")
    stderr_path = os.path.join(profile, "stderr.log")
    # Pipes: we write to_browser_w, the browser reads it as fd 3; the browser writes fd 4, we read.
    to_browser_r, to_browser_w = (_high_fd(fd) for fd in os.pipe())
    from_browser_r, from_browser_w = (_high_fd(fd) for fd in os.pipe())
    stderr_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    pid = None
    closed = False
    try:
        try:
            pid = os.posix_spawn(
                binary,
                _browser_args(binary, os.path.join(profile, "profile")),
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, devnull, 1),
                    (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
                    (os.POSIX_SPAWN_DUP2, to_browser_r, 3),
                    (os.POSIX_SPAWN_DUP2, from_browser_w, 4),
                ],
                setsid=True,  # its own process group, so that its helpers die with it
            )
        except OSError as exc:
            raise BrowserError(f"could not start {binary}: {exc}") from exc
        finally:
            for fd in (to_browser_r, from_browser_w, stderr_fd, devnull):
                os.close(fd)
        cdp = _Session(pid, to_browser_w, from_browser_r, deadline, stderr_path)

        target = cdp.call("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        attached = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True}, page=False)
        cdp.session_id = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Inspector"):
            cdp.call(f"{domain}.enable")
        navigation = cdp.call("Page.navigate", {"url": path.as_uri()})
        if navigation.get("errorText"):
            cdp.errors.append(f"failed to load {path.as_uri()}: {navigation['errorText']}")
            cdp.console.append(f"error: {cdp.errors[-1]}")
        else:
            cdp.wait_for_load()
        cdp.call(
            "Runtime.evaluate",
            {"expression": _SETTLE_JS % round(settle_s * 1000), "awaitPromise": True},
        )
        value = None
        if evaluate is not None:
            got = cdp.call(
                "Runtime.evaluate",
                {"expression": evaluate, "awaitPromise": True, "returnByValue": True},
            )
            if "exceptionDetails" in got:
                raise cdp._fail(f"evaluate failed: {_exception_text(got['exceptionDetails'])}")
            value = got["result"].get("value")
        dom = cdp.call(
            "Runtime.evaluate",
            {
                "expression": "(document.doctype ? '<!DOCTYPE html>\\n' : '')"
                " + document.documentElement.outerHTML",
                "returnByValue": True,
            },
        )["result"].get("value", "")
        with contextlib.suppress(BrowserError):
            cdp.call("Browser.close", page=False)
        closed = True
        return Rendered(dom=dom, console=cdp.console, errors=cdp.errors, value=value)
    finally:
        for fd in (to_browser_w, from_browser_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if pid is not None:
            # After Browser.close it exits by itself; otherwise (an error, a timeout) it is asked to
            # (SIGTERM: it then ends and reaps its helper processes), and killed if it does not.
            exited = closed and _reap(pid, 5.0)
            if not exited:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                exited = _reap(pid, 5.0)
            _kill_group(pid)  # the browser, if still there, and any helper left in its group
            if not exited:
                _reap(pid, 5.0)
        shutil.rmtree(profile, ignore_errors=True)
