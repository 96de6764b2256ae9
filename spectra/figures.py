"""The mechanism plots, as data: each builder turns analysed runs into a :class:`FigureSpec`.

A spec (:mod:`spectra.figspec`) says what to draw (panels of lines with quartile bands, reference lines,
collapse marks, or layer × projection heatmaps) and nothing about how; :mod:`spectra.render` draws the
same spec as a PNG (matplotlib) and as an interactive figure (plotly), so the report and the PNGs can
never disagree. A line's ``kind`` says what it shows, the same for every run; a random update's baseline
is a reference line, grey, with one legend entry however many runs are drawn.

Every builder takes a list of :class:`RunView` (one for ``spectra analyze``, several for ``spectra
compare``); a run keeps its colour across all figures. Curves are medians over a run's analysed matrix
modules at each recorded step, with the band between the 25th and 75th percentiles. Runs that differ
only by seed are drawn as one (:func:`spectra.report.seed_view`): the mean over the seeds, its band the
range of the seeds (:mod:`spectra.stats`; not a confidence interval). One module holds every builder so
that they share their helpers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from spectra.figspec import REFERENCE_COLOR, FigureSpec, HeatPanel, Line, Marks, Panel
from spectra.metrics.registry import heatmap_columns
from spectra.names import PROJECTIONS

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f",
)  # fmt: skip
STEP_PALETTE = ("#c6dbef", "#6baed6", "#2171b5", "#08306b", "#000000")


@dataclass
class RunView:
    """What the figures need of one analysed run.

    steps: per-step aggregates (:func:`spectra.tables.per_step`) with a ``collapsed`` column; table:
    the step × module table (metrics.csv); spectra: spectra.csv; logs: metrics.jsonl; evals: eval.jsonl.
    """

    label: str
    color: str
    steps: pd.DataFrame
    table: pd.DataFrame
    spectra: pd.DataFrame
    logs: pd.DataFrame
    evals: pd.DataFrame
    ks: tuple[int, ...]
    e1_min: float | None = None  # the collapse early warning's threshold on median E_1 (unset: none drawn)


def _median_line(
    v: RunView, metric: str, kind: str, views: Sequence[RunView], dash: str = "solid", band: bool = True,
    reference: bool = False,
) -> Line | None:  # fmt: skip
    """A run's median of ``metric`` over steps; a ``reference`` (a random update's baseline) is grey."""
    s = v.steps
    if metric not in s.columns or s[metric].isna().all():
        return None
    return Line(s["step"], s[metric], _name(v, kind, views), REFERENCE_COLOR if reference else v.color,
                "dash" if reference else dash, series_band(s, metric) if band else None, group=v.label,
                kind=kind, reference=reference)  # fmt: skip


def series_band(frame: pd.DataFrame, col: str) -> tuple[pd.Series, pd.Series] | None:
    """The shaded band of a column: the seeds' range (``_lo``/``_hi``, zero width where one
    seed has a value) when the view averages seeds, else the quartiles over modules, else none."""
    if f"{col}_lo" in frame.columns:
        return frame[f"{col}_lo"].fillna(frame[col]), frame[f"{col}_hi"].fillna(frame[col])
    if f"{col}_q25" in frame.columns:
        return frame[f"{col}_q25"], frame[f"{col}_q75"]
    return None


def _warning_line(v: RunView) -> list[tuple[float, str]]:
    """The early warning's E_1 threshold as a reference line, where the rule sets one."""
    return [] if v.e1_min is None else [(v.e1_min, "early-warning threshold on median E_1")]


def _collapse_marks(v: RunView, metric: str) -> list[Marks]:
    s = v.steps
    if "collapsed" not in s.columns or metric not in s.columns or not s["collapsed"].any():
        return []
    c = s[s["collapsed"]]
    return [Marks(c["step"], c[metric], f"{v.label}: collapse flagged", kind="collapse flagged")]


def _panel(title: str, ylabel: str, lines: list[Line | None], **kw) -> Panel | None:
    drawn = [ln for ln in lines if ln is not None]
    return Panel(title, ylabel, drawn, **kw) if drawn else None


def default_k(ks: Sequence[int]) -> int:
    """The k plotted when none is asked for: 8 if analysed, else the middle one."""
    return 8 if 8 in ks else ks[len(ks) // 2]


def _k(views: Sequence[RunView], k: int | None) -> int:
    ks = views[0].ks
    if k is not None and k not in ks:
        raise ValueError(f"--k {k}: the analysis has k in {list(ks)}; choose one of them")
    return default_k(ks) if k is None else k


def _many(views: Sequence[RunView]) -> bool:
    return len(views) > 1


def _name(v: RunView, what: str, views: Sequence[RunView]) -> str:
    return f"{v.label}: {what}" if _many(views) else what


def _off_principal(v: RunView, k: int, views: Sequence[RunView]) -> list[Line | None]:
    """1 − ρ_k of ΔW and of a random update of the same shapes (1 − k²/(mn), grey dashed)."""
    line = _median_line(v, f"off_principal_{k}", "ΔW", views)
    base = _median_line(v, f"rho_baseline_{k}", "random baseline", views, band=False, reference=True)
    if base is not None:
        base.y = 1 - pd.Series(base.y)
    return [line, base]


#: What makes two evaluations of a benchmark comparable: one curve per distinct combination.
EVAL_SETTINGS = ("n", "problems", "temperature", "max_tokens")
SCORE = re.compile(r"(avg|pass)@\d+")  # a score column of eval.jsonl (not its _lo/_hi seed bands)


def eval_series(evals: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, str, list[str]]]:
    """``(label, rows, "avg@n", ["pass@k", …])``: one series per benchmark and evaluation settings
    (:data:`EVAL_SETTINGS`) in eval.jsonl.

    The label is the benchmark's name, with the settings added where a benchmark has several series.
    Rows are sorted by step; a step evaluated again with the same settings is taken from its last row.
    Pass columns are those with a value, by increasing k."""
    if not {"step", "benchmark"} <= set(evals.columns):
        return
    for bench, e in evals.groupby("benchmark", sort=True):
        keys = [c for c in EVAL_SETTINGS if c in e.columns]
        groups = list(e.groupby([e[c].fillna(-1) for c in keys], sort=True)) if keys else [((), e)]
        for _, rows in groups:
            avgs = sorted((c for c in rows.columns if SCORE.fullmatch(c) and c.startswith("avg@")
                           and rows[c].notna().any()), key=lambda c: int(c[4:]))  # fmt: skip
            if not avgs:
                continue
            rows = rows[rows[avgs[-1]].notna()].drop_duplicates("step", keep="last").sort_values("step")
            passes = [c for c in rows.columns
                      if SCORE.fullmatch(c) and c.startswith("pass@") and rows[c].notna().any()]  # fmt: skip
            label = str(bench)
            if len(groups) > 1:
                first = rows.iloc[-1]
                parts = [f"{int(first['problems'])} problems" if "problems" in rows else ""]
                if "temperature" in rows and pd.notna(first["temperature"]):
                    parts.append(f"T={first['temperature']:g}")
                label += f" ({', '.join(p for p in parts if p)})"
            yield label, rows, avgs[-1], sorted(passes, key=lambda c: int(c[5:]))


def accuracy_lines(v: RunView, views: Sequence[RunView]) -> list[Line]:
    """Training reward (mean over each step's rollouts) and held-out Avg@n / Pass@n per benchmark."""
    lines: list[Line] = []
    if {"step", "reward"} <= set(v.logs.columns):
        r = v.logs.dropna(subset=["step", "reward"])
        band = series_band(r, "reward") if "reward_lo" in r else None
        lines.append(Line(r["step"], r["reward"], _name(v, "reward", views), v.color, "dot", markers=False,
                          width=1.2, group=v.label, band=band, kind="reward"))  # fmt: skip
    for i, (bench, e, avg, passes) in enumerate(eval_series(v.evals)):
        for col, dash in ((avg, "solid" if i == 0 else "dashdot"), (passes[-1] if passes else None, "dash")):
            if col is not None:
                kind = f"{bench} {col.replace('avg', 'Avg').replace('pass', 'Pass')}"
                band = series_band(e, col) if f"{col}_lo" in e else None
                name = _name(v, kind, views)
                lines.append(Line(e["step"], e[col], name, v.color, dash, band, group=v.label, kind=kind))
    return lines


def overview(views: Sequence[RunView], k: int | None = None) -> FigureSpec:
    """Accuracy and geometry on one step axis: does a collapse in one come with a collapse in the other?"""
    k = _k(views, k)
    acc = Panel("Reward and held-out accuracy", "reward / accuracy",
                [ln for v in views for ln in accuracy_lines(v, views)])  # fmt: skip
    panels: list[Panel | None] = [
        acc if acc.lines else None,
        _panel(f"Off-principal energy 1 − ρ_{k}", "share of ‖ΔW‖²",
               [ln for v in views for ln in _off_principal(v, k, views)]),
        _panel("Effective rank of ΔW", "exp(entropy of σᵢ/Σσ)",
               [_median_line(v, "erank", "median", views) for v in views],
               marks=[m for v in views for m in _collapse_marks(v, "erank")]),
        _panel("Spectral concentration E_1 = σ₁²/‖ΔW‖²", "E_1",
               [_median_line(v, "E_1", "median", views) for v in views],
               marks=[m for v in views for m in _collapse_marks(v, "E_1")],
               hlines=_warning_line(views[0])),
    ]  # fmt: skip
    return FigureSpec(
        "overview",
        "Accuracy and update geometry over training",
        "Top: training reward (dotted) and held-out accuracy (Avg@n solid, Pass@n dashed). Below: medians "
        f"over adapted modules (band: 25th–75th percentile) of the off-principal energy at k = {k}, the "
        "effective rank and E_1 of ΔW. Red crosses: checkpoints at or after a collapse (a performance "
        "fall beyond the reward's noise, not a geometry threshold).",
        [p for p in panels if p is not None],
    )


def alignment(views: Sequence[RunView], k: int | None = None) -> FigureSpec:
    """ρ_k with W0's principal and minor subspaces, and the off-principal energy, against the baseline."""
    k = _k(views, k)
    lines_p: list[Line | None] = []
    lines_m: list[Line | None] = []
    for v in views:
        base = _median_line(v, f"rho_baseline_{k}", "random baseline", views, reference=True)
        lines_p += [_median_line(v, f"rho_{k}", "ΔW", views), base]
        lines_m += [_median_line(v, f"rho_minor_{k}", "ΔW", views), base]
    panels = [
        _panel(f"Principal alignment ρ_{k} = ‖U_kᵀ ΔW V_k‖²/‖ΔW‖²", "share of ‖ΔW‖²", lines_p, logy=True),
        _panel(f"Off-principal energy 1 − ρ_{k}", "share of ‖ΔW‖²",
               [ln for v in views for ln in _off_principal(v, k, views)]),
        _panel(f"Minor alignment: ρ_{k} with W0's bottom-{k} singular vectors", "share of ‖ΔW‖²", lines_m,
               logy=True),
    ]  # fmt: skip
    return FigureSpec(
        "alignment",
        f"Alignment of ΔW with W0's principal and minor directions (k = {k})",
        f"How much of the update's energy lies in the span of W0's top-{k} (principal) or bottom-{k} "
        "(minor) singular vector pairs. A random update of the same shape has ρ_k = k²/(mn) on average "
        "(grey, dashed). Medians over modules, band 25th–75th percentile; log scale.",
        [p for p in panels if p is not None],
    )


def rank(views: Sequence[RunView], k: int | None = None) -> FigureSpec:
    """Effective rank, spectral concentration E_1 / E_k and relative size of ΔW over training."""
    k = _k(views, k)
    conc: list[Line | None] = []
    for v in views:
        conc.append(_median_line(v, "E_1", "E_1", views))
        conc.append(_median_line(v, f"E_{k}", f"E_{k}", views, "dash"))
    marks_e = [m for v in views for m in _collapse_marks(v, "E_1")]
    panels = [
        _panel("Effective rank of ΔW", "exp(entropy of σᵢ/Σσ)",
               [_median_line(v, "erank", "median", views) for v in views],
               marks=[m for v in views for m in _collapse_marks(v, "erank")]),
        _panel(f"Spectral concentration E_k = Σ_{{i≤k}} σᵢ²/‖ΔW‖² (k = 1, {k})", "share of ‖ΔW‖²", conc,
               marks=marks_e, hlines=_warning_line(views[0])),
        _panel("Relative update size ‖ΔW‖_F / ‖W0‖_F", "ratio",
               [_median_line(v, "relative_size", "median", views) for v in views], logy=True),
    ]  # fmt: skip
    return FigureSpec(
        "rank",
        "Effective rank and spectral concentration of ΔW",
        "Medians over modules (band: 25th–75th percentile). A collapsing update folds its energy into a "
        "few directions: E_1 rises and the effective rank falls. Red crosses: checkpoints at or after a "
        "collapse (the performance verdict; the geometry is its mechanism, not its test).",
        [p for p in panels if p is not None],
    )


def spectrum(views: Sequence[RunView]) -> FigureSpec:
    """Normalised singular values σ_i/σ_1 of ΔW at the plotted steps, one panel per run."""
    panels: list[Panel | HeatPanel] = []
    for v in views:
        sp = v.spectra
        if not len(sp):
            continue
        sp = sp.assign(rel=sp["sigma"] / sp.groupby(["step", "module"])["sigma"].transform("max"))
        sp = sp[sp["rel"] > 0]
        steps = sorted(sp["step"].unique())
        colors = STEP_PALETTE[-len(steps) :] if len(steps) <= len(STEP_PALETTE) else STEP_PALETTE
        lines = []
        for step, color in zip(steps, colors, strict=False):
            g = sp[sp["step"] == step].groupby("i")["rel"]
            med, lo, hi = g.median(), g.quantile(0.25), g.quantile(0.75)
            lines.append(
                Line(med.index, med, f"step {step}", color, band=(lo, hi), markers=False, group=v.label)
            )
        panels.append(Panel(f"{v.label}: σᵢ/σ₁ of ΔW" if _many(views) else "σᵢ/σ₁ of ΔW", "σᵢ / σ₁",
                            lines, xlabel="singular value index i", logy=True))  # fmt: skip
    return FigureSpec(
        "spectrum",
        "Singular value spectra of ΔW",
        "Each module's singular values divided by its largest, median over modules (band: 25th–75th "
        "percentile), at steps spread over training. A steep drop means a low-rank, concentrated update.",
        panels,
        columns=min(len(panels), 2) or 1,
        sharex=False,
    )


def angles(views: Sequence[RunView], k: int | None = None) -> FigureSpec:
    """Principal angles between W0's and W_t's top-k subspaces, and intruder dimensions."""
    k = _k(views, k)
    ang: list[Line | None] = []
    intr: list[Line | None] = []
    for v in views:
        ang.append(_median_line(v, f"angle_left_{k}", "left (output) space", views))
        ang.append(_median_line(v, f"angle_right_{k}", "right (input) space", views, "dash"))
        s = v.steps
        if "intruders_mean" in s.columns and s["intruders_mean"].notna().any():
            intr.append(Line(s["step"], s["intruders_mean"], _name(v, "mean over modules", views), v.color,
                             group=v.label, kind="mean over modules"))  # fmt: skip
    panels = [
        _panel(f"Largest principal angle between top-{k} singular subspaces of W0 and W_t", "degrees", ang),
        _panel("Intruder dimensions among W_t's top singular vectors", "count per module", intr),
    ]
    return FigureSpec(
        "angles",
        "Rotation of the principal subspaces and intruder dimensions",
        f"How far the fine-tuned weight's top-{k} singular subspaces have turned away from W0's (median "
        "over modules), and how many of W_t's top singular vectors have no counterpart among W0's "
        "(|cos| < ε with every kept W0 vector: intruder dimensions, Shuttleworth et al. 2024).",
        [p for p in panels if p is not None],
    )


def esd_alpha(views: Sequence[RunView]) -> FigureSpec:
    """The power-law exponent α of W_t's eigenvalue spectrum over training, against W0's."""
    lines: list[Line | None] = []
    for v in views:
        lines.append(_median_line(v, "alpha", "W_t = W0 + ΔW", views))
        lines.append(_median_line(v, "alpha_base", "W0", views, "dash", band=False))
    panel = _panel("ESD power-law exponent α (median over modules)", "α", lines)
    return FigureSpec(
        "esd_alpha",
        "Heavy-tailed spectral density of the weights over training",
        "The exponent α of the power-law tail of the eigenvalues σ_i² of each weight matrix (the fit "
        "WeightWatcher uses: Clauset–Shalizi–Newman, x_min at the minimum KS distance), median over modules "
        "(band: 25th–75th percentile), for the fine-tuned W_t and, dashed, for W0. WeightWatcher reads "
        "α of 2–6 as typical of well-trained layers, below 2 as very heavy-tailed (over-trained) and above "
        "6 as under-trained, and a falling α as training adding correlations. Each α has a standard error "
        "(α − 1)/√n_tail (metrics.csv: alpha_stderr, alpha_num_tail). Modules with fewer than 50 "
        "eigenvalues, or whose fitted tail holds fewer than 10, have no α.",
        [panel] if panel is not None else [],
    )


def heatmaps(view: RunView, step: int | None = None, k: int | None = None) -> FigureSpec | None:
    """Layer × projection heatmaps of the main metrics at one step (default: the last analysed)."""
    k = _k([view], k)
    t = view.table
    ok = t[(t["status"] == "ok") & t["layer"].notna() & t["proj"].notna()]
    if not len(ok):
        return None
    analysed = sorted(set(ok["step"].astype(int)))
    if step is not None and step not in analysed:
        raise ValueError(f"--heatmap-step {step}: not an analysed step; analysed steps: {analysed}")
    step = analysed[-1] if step is None else step
    ok = ok[ok["step"] == step]
    projs = [p for p in PROJECTIONS if p in set(ok["proj"])] + sorted(set(ok["proj"]) - set(PROJECTIONS))
    layers = sorted(ok["layer"].astype(int).unique())
    panels: list[Panel | HeatPanel] = []
    for metric, label in heatmap_columns(k):
        if metric not in ok.columns or ok[metric].isna().all():
            continue
        grid = ok.pivot_table(index=ok["layer"].astype(int), columns="proj", values=metric, aggfunc="median")
        grid = grid.reindex(index=layers, columns=projs)
        z = [[None if np.isnan(x) else float(x) for x in row] for row in grid.to_numpy()]
        panels.append(HeatPanel(label, z, projs, [str(layer) for layer in layers], label))  # type: ignore[arg-type]
    return FigureSpec(
        "heatmaps",
        f"Layer × projection at step {step}",
        f"Each cell is one adapted module at step {step} (the median where a layer has several of a kind).",
        panels,
        columns=2,
        sharex=False,
    )


def accuracy(views: Sequence[RunView]) -> FigureSpec:
    """Reward and held-out accuracy alone, on the training-step axis."""
    lines = [ln for v in views for ln in accuracy_lines(v, views)]
    return FigureSpec(
        "accuracy",
        "Reward and held-out accuracy",
        "Training reward (dotted, mean over each step's rollouts) and held-out accuracy per benchmark: "
        "Avg@n (solid, mean over n samples per problem) and Pass@n (dashed, unbiased estimator).",
        [Panel("Reward and held-out accuracy", "reward / accuracy", lines)] if lines else [],
    )


def all_figures(
    views: Sequence[RunView], k: int | None = None, heat_step: int | None = None
) -> list[FigureSpec]:
    """The figures of a report, in order; empty figures (no data) are left out."""
    figs = [
        overview(views, k), alignment(views, k), rank(views, k), spectrum(views), angles(views, k),
        esd_alpha(views),
    ]  # fmt: skip
    if len(views) == 1:
        heat = heatmaps(views[0], heat_step, k)
        if heat is not None:
            figs.append(heat)
    figs.append(accuracy(views))
    return [f for f in figs if f.panels]
