"""spectra/render.py without a browser: one legend per figure (an entry per run, per line style and per
reference line), log ticks that read as numbers, a sweep's ranks as the only ticks of a log axis, heatmap
axes as categories — the same in the plotly figure and the matplotlib one."""

from __future__ import annotations

import pytest

from spectra.figspec import REFERENCE_COLOR, FigureSpec, HeatPanel, Line, Marks, Panel
from spectra.render import Legend, log_ticks, tick_label, to_matplotlib, to_plotly

RUNS = {"lora": "#1f77b4", "dora": "#d62728", "full": "#2ca02c"}


@pytest.mark.parametrize(
    ("lo", "hi", "ticks"),
    [
        (1e-5, 1.0, [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0]),  # decades
        (8e-4, 0.012, [0.001, 0.002, 0.005, 0.01]),  # 1-2-5: plotly wrote 0.001, 2, 5, 0.01
        (0.012, 0.075, [0.02, 0.03, 0.05]),  # 1-2-3-5
        (0.65, 1.0, [0.7, 0.8, 0.9, 1.0]),  # 1…9
        (2.0, 64.0, [2.0, 5.0, 10.0, 20.0, 50.0]),
    ],
)
def test_log_ticks_are_round_numbers_inside_the_range(lo, hi, ticks):
    assert log_ticks(lo, hi) == pytest.approx(ticks)


def test_log_ticks_thin_out_decades_and_fall_back_to_even_steps():
    many = log_ticks(1e-12, 1e3)
    assert len(many) <= 8 and all(f"{v:e}".startswith("1.") for v in many)
    narrow = log_ticks(3.84, 3.94)  # no round number of a log scale inside: evenly spaced ones
    assert len(narrow) >= 3 and all(3.84 <= v <= 3.94 for v in narrow)
    assert log_ticks(0.0, 1.0) == []


def test_tick_labels_are_numbers_that_read_alone():
    labels = [tick_label(v) for v in (0.02, 0.001, 64.0, 1e-5, 2e-5, 2.5e-4, 1e6)]
    assert labels == ["0.02", "0.001", "64", "10⁻⁵", "2×10⁻⁵", "2.5×10⁻⁴", "10⁶"]


def _comparison_spec() -> FigureSpec:
    """Three runs in two panels: ΔW against a random update's baseline (the same for lora and dora, its
    own for full) and a threshold; E_1 (solid) and E_8 (dashed), with crosses of two runs."""
    steps = [0, 5, 10]
    top, bottom = [], []
    for run, color in RUNS.items():
        base = [0.02, 0.02, 0.02] if run != "full" else [0.01, 0.01, 0.01]
        top.append(Line(steps, [0.03, 0.05, 0.08], f"{run}: ΔW", color, group=run, kind="ΔW"))
        top.append(Line(steps, base, f"{run}: random baseline", REFERENCE_COLOR, "dash", group=run,
                        kind="random baseline", reference=True))  # fmt: skip
        bottom.append(Line(steps, [0.2, 0.3, 0.5], f"{run}: E_1", color, group=run, kind="E_1"))
        bottom.append(Line(steps, [0.6, 0.7, 0.9], f"{run}: E_8", color, "dash", group=run, kind="E_8"))
    marks = [Marks([10], [0.5], f"{r}: collapse flagged", kind="collapse flagged") for r in ("lora", "full")]
    panels: list[Panel | HeatPanel] = [
        Panel("alignment", "share", top, hlines=[(0.04, "threshold")], logy=True),
        Panel("concentration", "E_k", bottom, marks=marks),
    ]
    return FigureSpec("cmp", "a comparison", "", panels)


EXPECTED = [*RUNS, "E_1", "E_8", "random baseline", "threshold", "collapse flagged"]


def test_one_legend_entry_per_run_per_line_style_and_per_reference():
    spec = _comparison_spec()
    assert [e.label for e in Legend(spec).entries] == EXPECTED
    fig = to_plotly(spec)
    assert [t.name for t in fig.data if t.showlegend] == EXPECTED
    drawn = [t.name for t in fig.data if t.showlegend is False and t.fill is None]
    assert "dora: ΔW" in drawn  # hover still names the run and the quantity
    # lora's and dora's baselines are one curve; full's differs and is drawn too, under the same entry
    assert [n for n in drawn if "baseline" in n] == ["lora: random baseline", "full: random baseline"]
    groups = {t.legendgroup for t in fig.data if t.name and t.name.startswith("dora: ")}
    assert groups == {next(t.legendgroup for t in fig.data if t.showlegend and t.name == "dora")}
    mpl = to_matplotlib(spec)
    assert [t.get_text() for t in mpl.legends[0].get_texts()] == EXPECTED and len(mpl.legends) == 1
    assert all(ax.get_legend() is None for ax in mpl.axes)


def test_log_axes_carry_their_ticks_in_both_renderers():
    spec = _comparison_spec()
    fig = to_plotly(spec)
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.ticktext) == ["0.01", "0.02", "0.05"]
    ax = to_matplotlib(spec).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.01", "0.02", "0.05"]


def test_one_run_keeps_a_legend_entry_per_curve():
    steps = [0, 5]
    lines = [Line(steps, [1, 2], "ΔW", "#1f77b4", group="r", kind="ΔW"),
             Line(steps, [1, 1], "random baseline", REFERENCE_COLOR, "dash", group="r", reference=True),
             Line(steps, [3, 4], "median", "#1f77b4", group="r", kind="median")]  # fmt: skip
    spec = FigureSpec("one", "", "", [Panel("a", "y", lines[:2]), Panel("b", "y", lines[2:])])
    assert [e.label for e in Legend(spec).entries] == ["ΔW", "median", "random baseline"]


def test_a_sweeps_ranks_are_the_ticks_of_a_log_axis():
    lines = [Line([2, 8, 64], [0.6, 0.3, 0.1], "batch_size 4", "#1f77b4", group="batch_size 4")]
    spec = FigureSpec("g", "", "", [Panel("E_1", "E_1", lines, xlabel="rank", logx=True, xticks=[2, 8, 64])])
    x = to_plotly(spec).layout.xaxis
    assert x.type == "log" and list(x.tickvals) == [2, 8, 64] and list(x.ticktext) == ["2", "8", "64"]
    ax = to_matplotlib(spec).axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "64"]


def test_heatmaps_have_category_axes_and_their_legend_below():
    heat = HeatPanel("accuracy", [[0.8, 0.7, 0.2]], ["2", "8", "64"], ["4"], "avg@4", xlabel="rank",
                     ylabel="batch_size", marks=[("64", "4")], marks_name="collapsed (any seed)")  # fmt: skip
    fig = to_plotly(FigureSpec("cliff", "", "", [heat]))
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # the colour bar is on the right
    assert fig.data[-2].colorbar.title.side == "right"
    assert [t.name for t in fig.data if t.showlegend] == ["collapsed (any seed)"]
