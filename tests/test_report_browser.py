"""report.html in headless Chromium, offline: every figure drew and the console shows no error."""

from __future__ import annotations

import re

from browser import render

from spectra.pipeline import analyze_run
from spectra.report import write_comparison, write_run_report
from spectra.synthetic import write_synthetic_run
from spectra.writer import RunWriter


def _run_with_logs(path, shapes, rank):
    write_synthetic_run(path, shapes, steps=(0, 5, 10), rank=rank)
    w = RunWriter(path)
    for step in range(1, 11):
        w.append_metrics({"step": step, "reward": step / 20})
    for step in (0, 5, 10):
        w.append_metrics({"step": step, "benchmark": "organism", "avg@4": 0.3, "pass@4": 0.6}, "eval.jsonl")
    return analyze_run(path)


def _drawn(page) -> dict[str, int]:
    """For each figure div of the report, how many plotly SVG roots were drawn inside it."""
    ids = re.findall(r'<div id="(fig-[a-z]+)" class="plotly-graph-div', page)
    return {i: page.split(f'id="{i}"', 1)[1].split("</section>", 1)[0].count('class="main-svg"') for i in ids}


def test_run_report_draws_every_figure_offline(browser, tmp_path, small_shapes):
    analysis = _run_with_logs(tmp_path / "lora", small_shapes, rank=4)
    page = write_run_report(analysis)[-1]
    rendered = render(page)
    assert rendered.errors == []
    drawn = _drawn(rendered.dom)
    assert set(drawn) == {f"fig-{n}" for n in ("overview", "alignment", "rank", "spectrum", "angles",
                                                 "heatmaps", "accuracy")}  # fmt: skip
    assert all(n >= 1 for n in drawn.values()), drawn
    assert rendered.dom.count('class="hm"') == 4 and rendered.dom.count('class="scatterlayer') >= 6


def test_comparison_report_draws_offline(browser, tmp_path, small_shapes):
    a = _run_with_logs(tmp_path / "a", small_shapes, rank=4)
    b = _run_with_logs(tmp_path / "b", small_shapes, rank=None)
    _, files = write_comparison([a, b], tmp_path / "cmp")
    rendered = render(files[-1])
    assert rendered.errors == []
    drawn = _drawn(rendered.dom)
    assert len(drawn) == 6 and all(n >= 1 for n in drawn.values()), drawn
