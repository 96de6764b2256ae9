"""Draw a :class:`spectra.figspec.FigureSpec`: as a matplotlib figure (PNG) or a plotly figure (report).

Matplotlib is used through :class:`matplotlib.figure.Figure` directly, without pyplot, so drawing needs
no display, does not change the user's backend and is safe in notebooks.

Both draw the same legend, one per figure (:class:`Legend`): where the curves are coloured by run (or
configuration), one entry per run, a grey key for each line style a panel tells quantities apart by,
and one entry per reference curve, threshold and kind of cross, however many runs and panels draw it;
otherwise one entry per distinct curve. A log axis is labelled with numbers that read alone
(:func:`log_ticks`, :func:`tick_label`: 0.01, 0.02, 0.05, never a bare "2, 5" between decades); a panel's
``xticks`` (a sweep's ranks, on a log axis) are its only x ticks. In the report, rows are spaced in
pixels so that a subplot's title clears the axis labels of the plot above, and a figure with colour
bars has its legend below the plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from spectra.figspec import COLLAPSE_COLOR, REFERENCE_COLOR, FigureSpec, HeatPanel, Line, Marks, Panel
from spectra.h5io import atomic_path

_MPL_DASH = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}
KEY_COLOR = "#444444"  # the legend's keys of line styles
THRESHOLD_DASH = "dot"


@dataclass(frozen=True)
class Entry:
    """One legend entry, as drawn: a line (``symbol`` "") or a cross (``symbol`` "x")."""

    label: str
    color: str
    dash: str = "solid"
    symbol: str = ""
    width: float = 1.8


class Legend:
    """The one legend of a figure (``entries``, in order: runs, style keys, references and thresholds,
    crosses) and the entry each curve or cross belongs to (:meth:`of`; clicking it in the report hides
    them)."""

    def __init__(self, spec: FigureSpec):
        panels = [p for p in spec.panels if isinstance(p, Panel)]
        self.runs = _run_colors(panels)
        lines = [Entry(g, c) for g, c in self.runs.items()]
        keys: list[Entry] = []
        refs: list[Entry] = []
        marks = [Entry(p.marks_name, COLLAPSE_COLOR, symbol="x")
                 for p in spec.panels if isinstance(p, HeatPanel) and p.marks and p.marks_name]  # fmt: skip
        for p in panels:
            kinds = {(ln.kind, ln.dash) for ln in p.lines if ln.kind and not ln.reference}
            for ln in p.lines:
                if ln.reference:
                    refs.append(self.of(ln))
                elif self.runs and len(kinds) > 1 and ln.kind:  # what each line style means
                    keys.append(Entry(ln.kind, KEY_COLOR, ln.dash, width=1.4))
                elif not self.runs and ln.legend:
                    lines.append(self.of(ln))
            refs += [Entry(label, REFERENCE_COLOR, THRESHOLD_DASH, width=1.2) for _, label in p.hlines]
            marks += [self.of(m) for m in p.marks]
        self.entries = list(dict.fromkeys(lines + keys + refs + marks))

    def of(self, item: Line | Marks) -> Entry:
        if isinstance(item, Marks):
            return Entry(item.kind or item.name, item.color, symbol="x")
        if item.reference:
            return Entry(item.kind or item.name, item.color, item.dash, width=1.2)
        if self.runs:
            return Entry(item.group, self.runs[item.group])
        return Entry(item.name, item.color, item.dash, width=item.width)

    @staticmethod
    def group(entry: Entry) -> str:
        """The plotly legend group of an entry's traces."""
        return f"{entry.label}|{entry.color}|{entry.dash}|{entry.symbol}"


def _run_colors(panels: list[Panel]) -> dict[str, str]:
    """Run (``group``) → colour where the curves are coloured by run: two runs or more, each drawn in one
    colour of its own; else empty."""
    colors: dict[str, set[str]] = {}
    for p in panels:
        for ln in p.lines:
            if not ln.reference:
                colors.setdefault(ln.group, set()).add(ln.color)
    one = {g: next(iter(c)) for g, c in colors.items() if len(c) == 1}
    if len(colors) < 2 or "" in colors or len(one) < len(colors) or len(set(one.values())) < len(one):
        return {}
    return one


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def tick_label(v: float) -> str:
    """A tick's number as written: ``0.002``, ``150``; ``10⁻⁵`` or ``2×10⁻⁵`` below 10⁻³ and from 10⁵."""
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.6g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    power = "10" + str(int(exponent)).translate(_SUPERSCRIPT)
    return power if float(mantissa) == 1 else f"{float(mantissa):g}×{power}"


def log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Ticks of a log axis over [lo, hi] (0 < lo ≤ hi): the powers of ten (every n-th where there are more
    than ``most``), else 1-2-5 in each decade, else 1-2-3-5, else 1…9: the first with three ticks inside (else
    two); else round numbers evenly spaced."""
    if not (0 < lo <= hi and math.isfinite(hi)):
        return []
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def inside(mantissas: tuple[int, ...], every: int = 1) -> list[float]:
        values = [float(f"{m}e{e}") for e in range(a, b + 1) if (e - a) % every == 0 for m in mantissas]
        return [v for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

    every = max(1, math.ceil(len(inside((1,))) / most))
    options = [inside((1,), every), inside((1, 2, 5)), inside((1, 2, 3, 5)), inside(tuple(range(1, 10)))]
    for least in (3, 2):
        for ticks in options:
            if least <= len(ticks) <= most:
                return ticks
    return [float(v) for v in MaxNLocator(nbins=4).tick_values(lo, hi) if lo <= v <= hi and v > 0]


def _positive_extent(panel: Panel, axis: str) -> tuple[float, float] | None:
    """The smallest and largest positive value drawn along ``axis`` ("x" or "y") in a panel."""
    series: list[Any] = []
    for ln in panel.lines:
        series += [ln.x] if axis == "x" else [ln.y, *(ln.band or ())]
    series += [m.x if axis == "x" else m.y for m in panel.marks]
    if axis == "y":
        series.append([y for y, _ in panel.hlines])
    values = [float(v) for s in series for v in s if v is not None and v == v and float(v) > 0]
    return (min(values), max(values)) if values else None


def _ticks(panel: Panel, axis: str) -> list[float]:
    """The ticks of a panel's axis where the spec or a log scale sets them (else empty: automatic)."""
    if axis == "x" and panel.xticks is not None:
        return [float(v) for v in panel.xticks]
    if (panel.logx if axis == "x" else panel.logy) and (extent := _positive_extent(panel, axis)):
        return log_ticks(*extent)
    return []


def _grid(spec: FigureSpec) -> tuple[int, int]:
    cols = max(1, min(spec.columns, len(spec.panels)))
    return math.ceil(len(spec.panels) / cols), cols


def _has_heat(spec: FigureSpec) -> bool:
    return any(isinstance(p, HeatPanel) for p in spec.panels)


# ------------------------------------------------------------------------------------------ matplotlib


def to_matplotlib(spec: FigureSpec) -> Figure:
    """The spec as a matplotlib Figure, its legend beside the plots (below them beside colour bars)."""
    rows, cols = _grid(spec)
    legend = Legend(spec)
    heat = _has_heat(spec)
    wide = 1.9 if legend.entries and not heat else 0.0
    fig = Figure(figsize=(6.4 * cols + wide, 0.6 + 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=spec.sharex and cols == 1)
    for i, panel in enumerate(spec.panels):
        ax = axes[i // cols][i % cols]
        if isinstance(panel, HeatPanel):
            _mpl_heat(fig, ax, panel)
        else:
            _mpl_panel(ax, panel, show_xlabel=not (spec.sharex and cols == 1) or i // cols == rows - 1)
    for j in range(len(spec.panels), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(spec.title, fontsize=12)
    if legend.entries:
        handles = [
            Line2D([], [], ls="none", marker="X", ms=8, color=e.color) if e.symbol
            else Line2D([], [], ls=_MPL_DASH.get(e.dash, "-"), lw=e.width, color=e.color)
            for e in legend.entries
        ]  # fmt: skip
        fig.legend(handles, [e.label for e in legend.entries], fontsize=8,
                   loc="outside lower center" if heat else "outside right upper",
                   ncols=min(len(handles), 4) if heat else 1)  # fmt: skip
    return fig


def _mpl_panel(ax: Any, p: Panel, show_xlabel: bool) -> None:
    for ln in _once(p.lines):
        ax.plot(
            list(ln.x), list(ln.y), _MPL_DASH.get(ln.dash, "-"), color=ln.color, lw=ln.width,
            marker="o" if ln.markers else None, ms=3,
        )  # fmt: skip
        if ln.band is not None:
            ax.fill_between(list(ln.x), list(ln.band[0]), list(ln.band[1]), color=ln.color, alpha=0.15, lw=0)
    for m in p.marks:
        ax.scatter(list(m.x), list(m.y), marker="X", s=70, color=m.color, zorder=5)
    for y, _ in p.hlines:
        ax.axhline(y, color=REFERENCE_COLOR, ls=_MPL_DASH[THRESHOLD_DASH], lw=1.2)
    for axis, log, scale, set_ticks, along in (
        ("y", p.logy, ax.set_yscale, ax.set_yticks, ax.yaxis),
        ("x", p.logx, ax.set_xscale, ax.set_xticks, ax.xaxis),
    ):
        if log and _positive_extent(p, axis):
            scale("log", base=2 if axis == "x" and p.xticks is not None else 10)
        ticks = _ticks(p, axis)
        if ticks:
            set_ticks(ticks, [tick_label(v) for v in ticks])
            along.set_minor_formatter(NullFormatter())
    ax.set_title(p.title, fontsize=10)
    ax.set_ylabel(p.ylabel)
    if show_xlabel:
        ax.set_xlabel(p.xlabel)
    ax.grid(alpha=0.3)


def _once(lines: list[Line]) -> list[Line]:
    """A panel's curves, each reference curve once where several runs draw the same points (runs of the
    same shapes share a random update's baseline)."""
    seen: set[tuple] = set()
    out = []
    for ln in lines:
        same = (tuple(map(float, ln.x)), tuple(round(float(y), 12) for y in ln.y)) if ln.reference else None
        if same is None or same not in seen:
            out.append(ln)
            seen.add(same)
    return out


def _mpl_heat(fig: Figure, ax: Any, p: HeatPanel) -> None:
    z = [[math.nan if v is None else v for v in row] for row in p.z]
    lo, hi = p.zrange or (None, None)
    im = ax.imshow(z, aspect="auto", cmap="viridis", origin="lower", vmin=lo, vmax=hi)
    if p.annotate:
        for i, row in enumerate(z):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(p.x)), p.x, rotation=30, fontsize=8)
    ax.set_yticks(range(len(p.y)), p.y, fontsize=8)
    ax.set_title(p.title, fontsize=10)
    ax.set_xlabel(p.xlabel)
    ax.set_ylabel(p.ylabel)
    fig.colorbar(im, ax=ax, label=p.colorbar)
    if p.marks:
        ax.scatter([p.x.index(x) for x, _ in p.marks], [p.y.index(y) for _, y in p.marks], marker="X", s=90,
                   color=COLLAPSE_COLOR, zorder=5)  # fmt: skip


def save_png(spec: FigureSpec, path: Path, dpi: int = 110) -> Path:
    """Draw ``spec`` with matplotlib and write it atomically as a PNG."""
    fig = to_matplotlib(spec)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


# ---------------------------------------------------------------------------------------------- plotly

PANEL_PX = 250  # a plot's height
GAP_PX = {True: 50, False: 100}  # between rows: the x axes shared (no tick labels above) or not
MARGIN_PX = {"t": 50, "l": 60, "r": 30, "b": 60}
LEGEND_BELOW_PX = 80  # from the plots' bottom edge to a legend below them, past tick labels and x title


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def to_plotly(spec: FigureSpec) -> Any:
    """The spec as a plotly Figure (interactive; hover shows the values)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(spec)
    legend = Legend(spec)
    shared = spec.sharex and cols == 1
    heat = _has_heat(spec)
    gap = GAP_PX[shared]
    plot_px = rows * PANEL_PX + (rows - 1) * gap
    fig = make_subplots(
        rows=rows, cols=cols, shared_xaxes=shared, subplot_titles=[p.title for p in spec.panels],
        vertical_spacing=gap / plot_px, horizontal_spacing=0.2 if heat else 0.12,
    )  # fmt: skip
    for e in legend.entries:  # first, so that the legend lists them in this order
        fig.add_trace(go.Scatter(
            x=[None], y=[None], name=e.label, legendgroup=legend.group(e), showlegend=True, hoverinfo="skip",
            mode="markers" if e.symbol else "lines", marker={"symbol": "x", "size": 11, "color": e.color},
            line={"color": e.color, "dash": e.dash, "width": e.width},
        ), row=1, col=1)  # fmt: skip
    for i, panel in enumerate(spec.panels):
        row, col = i // cols + 1, i % cols + 1
        if isinstance(panel, HeatPanel):
            _plotly_heat(fig, go, panel, row, col, legend)
            continue
        for ln in _once(panel.lines):
            x, y = list(ln.x), list(ln.y)
            group = legend.group(legend.of(ln))
            if ln.band is not None:
                lo, hi = list(ln.band[0]), list(ln.band[1])
                fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", mode="lines",
                                         line={"width": 0}, fillcolor=_rgba(ln.color, 0.15), hoverinfo="skip",
                                         showlegend=False, legendgroup=group), row=row, col=col)  # fmt: skip
            fig.add_trace(
                go.Scatter(
                    x=x, y=y, name=ln.name, legendgroup=group, showlegend=False,
                    mode="lines+markers" if ln.markers else "lines",
                    line={"color": ln.color, "dash": ln.dash, "width": ln.width}, marker={"size": 5},
                ),
                row=row, col=col,
            )  # fmt: skip
        for m in panel.marks:
            fig.add_trace(
                go.Scatter(x=list(m.x), y=list(m.y), name=m.name, mode="markers", showlegend=False,
                           legendgroup=legend.group(legend.of(m)),
                           marker={"symbol": "x", "size": 11, "color": m.color}),
                row=row, col=col,
            )  # fmt: skip
        for y, _ in panel.hlines:
            fig.add_hline(y=y, line={"color": REFERENCE_COLOR, "dash": THRESHOLD_DASH, "width": 1.2}, row=row,
                          col=col)  # fmt: skip
        if panel.logy and _positive_extent(panel, "y"):  # as matplotlib: no log scale of nothing
            fig.update_yaxes(type="log", row=row, col=col)
        if panel.logx and _positive_extent(panel, "x"):
            fig.update_xaxes(type="log", row=row, col=col)
        for axis, update in (("x", fig.update_xaxes), ("y", fig.update_yaxes)):
            ticks = _ticks(panel, axis)
            if ticks:
                labels = [tick_label(v) for v in ticks]
                update(tickmode="array", tickvals=ticks, ticktext=labels, row=row, col=col)
        fig.update_yaxes(title_text=panel.ylabel, row=row, col=col)
        if not shared or row == rows:
            fig.update_xaxes(title_text=panel.xlabel, row=row, col=col)
    margin = dict(MARGIN_PX)
    where: dict[str, Any] = {}
    if heat and legend.entries:  # the colour bars take the right-hand side: the legend goes below
        margin["b"] = LEGEND_BELOW_PX + 30
        where = {"orientation": "h", "x": 0, "xanchor": "left", "y": -LEGEND_BELOW_PX / plot_px}
        where["yanchor"] = "top"
    fig.update_layout(
        height=margin["t"] + margin["b"] + plot_px, template="plotly_white", margin=margin,
        showlegend=bool(legend.entries), hovermode="closest",
        legend={"font": {"size": 10}, "traceorder": "normal", "tracegroupgap": 0, **where},
    )  # fmt: skip
    fig.update_annotations(font_size=12)
    return fig


def _plotly_heat(fig: Any, go: Any, panel: HeatPanel, row: int, col: int, legend: Legend) -> None:
    dom_x = fig.get_subplot(row, col).xaxis.domain
    dom_y = fig.get_subplot(row, col).yaxis.domain
    fig.add_trace(
        go.Heatmap(
            z=panel.z, x=panel.x, y=panel.y, colorscale="Viridis",
            zmin=panel.zrange[0] if panel.zrange else None, zmax=panel.zrange[1] if panel.zrange else None,
            texttemplate="%{z:.2f}" if panel.annotate else None,
            colorbar={"title": {"text": panel.colorbar, "side": "right"}, "x": dom_x[1] + 0.01,
                      "y": sum(dom_y) / 2, "len": dom_y[1] - dom_y[0], "thickness": 12},
            hovertemplate=f"{panel.ylabel} %{{y}}, {panel.xlabel} %{{x}}: %{{z:.4g}}<extra></extra>",
        ),
        row=row, col=col,
    )  # fmt: skip
    if panel.marks:
        entry = Entry(panel.marks_name, COLLAPSE_COLOR, symbol="x")
        fig.add_trace(go.Scatter(x=[x for x, _ in panel.marks], y=[y for _, y in panel.marks], mode="markers",
                                 name=panel.marks_name, showlegend=False,
                                 legendgroup=legend.group(entry),
                                 marker={"symbol": "x", "size": 13, "color": COLLAPSE_COLOR}),
                      row=row, col=col)  # fmt: skip
    # categories, in the spec's order: ranks 2, 8, 64 or layers 0…23 are labels of cells, not positions
    fig.update_xaxes(title_text=panel.xlabel, type="category", row=row, col=col)
    fig.update_yaxes(title_text=panel.ylabel, type="category", row=row, col=col)
