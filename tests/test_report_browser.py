"""report.html in headless Chromium, offline: every figure drew and the console shows no error; in a
comparison of the demo's methods and in a sweep report, no two texts of a figure (titles, axis titles and
tick labels, legend, colour bars) overlap, each run has one legend entry and each reference line one, and
the tick labels of log and rank axes read as numbers."""

from __future__ import annotations

import itertools
import json
import re

from browser import PLOTLY_TEXT_BOXES, render

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


# ------------------------------------------------------------------------------------------------ layout


def overlapping(figure: dict, slack: float = 0.5) -> list[str]:
    """The pairs of a figure's text boxes (PLOTLY_TEXT_BOXES) that intersect; two tick labels may touch."""
    found = []
    for a, b in itertools.combinations(figure["boxes"], 2):
        if a["kind"] == b["kind"] == "tick":
            continue
        (l1, t1, r1, b1), (l2, t2, r2, b2) = a["box"], b["box"]
        if min(r1, r2) - max(l1, l2) > slack and min(b1, b2) - max(t1, t2) > slack:
            found.append(f"{a['kind']} {a['text']!r} × {b['kind']} {b['text']!r}")
    return found


_SUPERSCRIPTS = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")


def number(label: str) -> float:
    """A tick label as a number: ``0.02``, ``150``, ``10⁻⁵``, ``2×10⁻⁵``; ValueError for anything else,
    such as plotly's ``10<sup>−5</sup>`` or ``20μ``."""
    m = re.fullmatch(r"(?:([0-9.]+)×)?10([⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)", label)
    if m:
        return float(m.group(1) or 1) * 10.0 ** int(m.group(2).translate(_SUPERSCRIPTS))
    return float(label)


def unreadable_log_ticks(figure: dict) -> list[str]:
    """Log axes whose tick labels are not numbers that increase along the axis (plotly's own labels of a
    narrow log axis repeat bare digits: 0.01, 2, 5, 0.1, 2, 5)."""
    bad = []
    for ax in figure["axes"]:
        if ax["type"] != "log" or not ax["ticks"]:
            continue
        try:
            values = [number(t) for t in ax["ticks"]]
        except ValueError:
            values = []
        if len(values) < 2 or any(b <= a for a, b in itertools.pairwise(values)):
            bad.append(f"{ax['subplot']} {ax['axis']}: {ax['ticks']}")
    return bad


def _check_layout(figure: dict) -> None:
    assert overlapping(figure) == [], figure["id"]
    assert unreadable_log_ticks(figure) == [], figure["id"]
    assert len(figure["legend"]) == len(set(figure["legend"])), (figure["id"], figure["legend"])


DEMO = ("lora", "dora", "pissa", "full")  # the demo's methods, in its order (train/config.py DEMO_METHODS)


def _demo_like_run(path, shapes, method):
    """A run as the demo leaves it, synthetic: reward and held-out accuracy logged, the early warning's
    E_1 threshold set; pissa's reward and accuracy fall half-way, so that its last checkpoint is flagged."""
    rank = {"lora": 4, "dora": 8, "pissa": 2, "full": None}[method]
    write_synthetic_run(path, shapes, steps=(0, 10, 20), rank=rank)
    config = json.loads((path / "run.json").read_text())
    w = RunWriter(path)
    w.write_config({**config, "method": method, "collapse_e1": 0.5})
    for step in range(1, 21):
        w.append_metrics({"step": step, "reward": 0.1 if method == "pissa" and step > 10 else 0.8})
    for step in (0, 10, 20):
        avg = 0.0 if method == "pissa" and step > 10 else 0.3
        w.append_metrics({"step": step, "benchmark": "organism", "avg@4": avg, "pass@4": 0.6}, "eval.jsonl")
    return analyze_run(path)


def test_comparison_of_the_demos_methods_has_one_legend_entry_per_run_and_no_overlaps(
    browser, tmp_path, small_shapes
):
    analyses = [_demo_like_run(tmp_path / m, small_shapes, m) for m in DEMO]
    _, files = write_comparison(analyses, tmp_path / "comparison")
    rendered = render(files[-1], evaluate=PLOTLY_TEXT_BOXES)
    assert rendered.errors == []
    figures = {f["id"].removeprefix("fig-"): f for f in rendered.value}
    assert set(figures) == {"overview", "alignment", "rank", "spectrum", "angles", "accuracy"}
    for name, figure in figures.items():
        _check_layout(figure)
        assert not any(": " in entry for entry in figure["legend"]), (name, figure["legend"])  # no "lora: ΔW"
        if name != "spectrum":  # coloured by step there, one panel per run
            assert [e for e in figure["legend"] if e in DEMO] == list(DEMO), (name, figure["legend"])
    keys = ["reward", "organism Avg@4", "organism Pass@4"]  # the line styles: the same in every run
    references = ["random baseline", "early-warning threshold on median E_1"]
    assert figures["overview"]["legend"] == [*DEMO, *keys, *references, "collapse flagged"]
    assert figures["alignment"]["legend"] == [*DEMO, "random baseline"]
    assert figures["spectrum"]["legend"] == ["step 10", "step 20"]  # the plotted steps, once for four panels
    logs = [ax for f in figures.values() for ax in f["axes"] if ax["type"] == "log" and ax["ticks"]]
    assert len(logs) >= 6


def test_sweep_report_puts_ranks_on_their_own_ticks_and_nothing_overlaps(browser, tmp_path, small_shapes):
    from spectra.probes.sweep import plan_sweep
    from spectra.probes.sweep_report import write_sweep_report

    out = tmp_path / "sweep"
    plan = plan_sweep(out, {"method": ("lora", "dora"), "rank": (2, 8, 64), "batch_size": (4, 8)})
    plan.save()
    for cell in plan.cells:
        c = cell.config
        writer = write_synthetic_run(cell.run_dir, small_shapes, steps=(1, 4), rank=c.rank)
        falls = (c.method, c.rank, c.batch_size) == ("dora", 64, 8)
        for step in range(1, 5):
            writer.append_metrics({"step": step, "reward": 0.1 if falls and step > 2 else 0.8})
        writer.append_metrics({"step": 4, "benchmark": "organism", "n": 4, "avg@4": 0.2 if falls else 0.8},
                              "eval.jsonl")  # fmt: skip
        summary = {"step": 4, "collapse_step": 3 if falls else None}  # as the live alarm records it
        summary["collapse_reason"] = "median E_1 0.90 ≥ 0.5; reward fell" if falls else None
        (cell.run_dir / "train_summary.json").write_text(json.dumps(summary))
    table, files = write_sweep_report(out, log=lambda _: None)
    assert (table["collapsed"] == "yes").sum() == 1
    rendered = render(files[-1], evaluate=PLOTLY_TEXT_BOXES)
    assert rendered.errors == []
    figures = {f["id"].removeprefix("fig-"): f for f in rendered.value}
    assert set(figures) == {"cliff", "geometry_vs_rank", "curves"}
    for figure in figures.values():
        _check_layout(figure)
    ranks = [ax for f in figures.values() for ax in f["axes"] if ax["title"] == "rank"]
    assert len(ranks) == 4  # two heatmaps (one per method), E_1 and effective rank against the rank
    for ax in ranks:  # categories in the heatmaps, a log axis of the lines: at the ranks, as integers
        assert ax["type"] in ("category", "log") and ax["ticks"] == ["2", "8", "64"], ax
    assert figures["cliff"]["legend"] == ["collapsed (any seed)"]
    assert len([b for b in figures["cliff"]["boxes"] if b["kind"] == "colorbar"]) == 2
    configurations = [f"method {m}, batch_size {b}" for m in ("lora", "dora") for b in (4, 8)]
    assert sorted(figures["geometry_vs_rank"]["legend"]) == sorted(configurations)
    assert figures["curves"]["legend"] == [c.name for c in plan.cells]  # 12: colours repeat, dashes differ


def test_run_report_with_its_heatmaps_lays_out_cleanly(browser, tmp_path, small_shapes):
    rendered = render(write_run_report(_run_with_logs(tmp_path / "lora", small_shapes, 4))[-1],
                      evaluate=PLOTLY_TEXT_BOXES)  # fmt: skip
    figures = {f["id"].removeprefix("fig-"): f for f in rendered.value}
    for figure in figures.values():
        _check_layout(figure)
    assert len([b for b in figures["heatmaps"]["boxes"] if b["kind"] == "colorbar"]) == 4
    assert [ax["type"] for ax in figures["heatmaps"]["axes"]] == ["category"] * 8
    assert figures["alignment"]["legend"] == ["ΔW", "random baseline"]
