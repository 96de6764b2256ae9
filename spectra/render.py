"""Draw a :class:`spectra.figures.FigureSpec`: as a matplotlib figure (PNG) or a plotly figure (report).

Matplotlib is used through :class:`matplotlib.figure.Figure` directly, without pyplot, so drawing needs
no display, does not change the user's backend and is safe in notebooks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from spectra.figures import FigureSpec, HeatPanel, Panel
from spectra.h5io import atomic_path

_MPL_DASH = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}


def _grid(spec: FigureSpec) -> tuple[int, int]:
    cols = max(1, min(spec.columns, len(spec.panels)))
    return math.ceil(len(spec.panels) / cols), cols


def to_matplotlib(spec: FigureSpec) -> Figure:
    """The spec as a matplotlib Figure."""
    rows, cols = _grid(spec)
    fig = Figure(figsize=(6.4 * cols, 0.6 + 2.9 * rows), layout="constrained")
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
    return fig


def _mpl_panel(ax: Any, p: Panel, show_xlabel: bool) -> None:
    for ln in p.lines:
        ax.plot(
            list(ln.x), list(ln.y), _MPL_DASH.get(ln.dash, "-"), color=ln.color, lw=ln.width,
            marker="o" if ln.markers else None, ms=3, label=ln.name if ln.legend else None,
        )  # fmt: skip
        if ln.band is not None:
            ax.fill_between(list(ln.x), list(ln.band[0]), list(ln.band[1]), color=ln.color, alpha=0.15, lw=0)
    for m in p.marks:
        ax.scatter(list(m.x), list(m.y), marker="X", s=70, color=m.color, zorder=5, label=m.name)
    for y, label in p.hlines:
        ax.axhline(y, color="0.45", ls="--", lw=1, label=label)
    if p.logy and any(y > 0 for ln in p.lines for y in ln.y if y == y):
        ax.set_yscale("log")
    if p.logx:
        ax.set_xscale("log")
    ax.set_title(p.title, fontsize=10)
    ax.set_ylabel(p.ylabel)
    if show_xlabel:
        ax.set_xlabel(p.xlabel)
    ax.grid(alpha=0.3)
    labels = ax.get_legend_handles_labels()[1]
    if len(labels) > 6:  # several runs: beside the plot, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif labels:
        ax.legend(fontsize=7, loc="best")


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
                   color="#d62728", label=p.marks_name or None, zorder=5)  # fmt: skip
        if p.marks_name:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12))


def save_png(spec: FigureSpec, path: Path, dpi: int = 110) -> Path:
    """Draw ``spec`` with matplotlib and write it atomically as a PNG."""
    fig = to_matplotlib(spec)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def to_plotly(spec: FigureSpec) -> Any:
    """The spec as a plotly Figure (interactive; hover shows the values)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, cols = _grid(spec)
    fig = make_subplots(
        rows=rows, cols=cols, shared_xaxes=spec.sharex and cols == 1,
        subplot_titles=[p.title for p in spec.panels], vertical_spacing=0.09 if rows < 4 else 0.06,
        horizontal_spacing=0.12,
    )  # fmt: skip
    seen: set[str] = set()
    for i, panel in enumerate(spec.panels):
        row, col = i // cols + 1, i % cols + 1
        if isinstance(panel, HeatPanel):
            dom_x = fig.get_subplot(row, col).xaxis.domain
            dom_y = fig.get_subplot(row, col).yaxis.domain
            fig.add_trace(
                go.Heatmap(
                    z=panel.z, x=panel.x, y=panel.y, colorscale="Viridis",
                    zmin=panel.zrange[0] if panel.zrange else None,
                    zmax=panel.zrange[1] if panel.zrange else None,
                    texttemplate="%{z:.2f}" if panel.annotate else None,
                    colorbar={"title": {"text": panel.colorbar}, "x": dom_x[1] + 0.01, "y": sum(dom_y) / 2,
                              "len": dom_y[1] - dom_y[0], "thickness": 12},
                    hovertemplate=f"{panel.ylabel} %{{y}}, {panel.xlabel} %{{x}}: %{{z:.4g}}<extra></extra>",
                ),
                row=row, col=col,
            )  # fmt: skip
            if panel.marks:
                fig.add_trace(go.Scatter(x=[x for x, _ in panel.marks], y=[y for _, y in panel.marks],
                                         mode="markers", name=panel.marks_name,
                                         showlegend=bool(panel.marks_name),
                                         marker={"symbol": "x", "size": 13, "color": "#d62728"}),
                              row=row, col=col)  # fmt: skip
            fig.update_xaxes(title_text=panel.xlabel, row=row, col=col)
            fig.update_yaxes(title_text=panel.ylabel, row=row, col=col)
            continue
        for ln in panel.lines:
            x, y = list(ln.x), list(ln.y)
            key = f"{ln.group}|{ln.name}"
            show = ln.legend and key not in seen
            seen.add(key)
            if ln.band is not None:
                lo, hi = list(ln.band[0]), list(ln.band[1])
                fig.add_trace(go.Scatter(x=x + x[::-1], y=hi + lo[::-1], fill="toself", mode="lines",
                                         line={"width": 0}, fillcolor=_rgba(ln.color, 0.15), hoverinfo="skip",
                                         showlegend=False, legendgroup=key), row=row, col=col)  # fmt: skip
            fig.add_trace(
                go.Scatter(
                    x=x, y=y, name=ln.name, legendgroup=key, showlegend=show,
                    mode="lines+markers" if ln.markers else "lines",
                    line={"color": ln.color, "dash": ln.dash, "width": ln.width}, marker={"size": 5},
                ),
                row=row, col=col,
            )  # fmt: skip
        for m in panel.marks:
            key = f"marks|{m.name}"
            fig.add_trace(
                go.Scatter(x=list(m.x), y=list(m.y), name=m.name, mode="markers", showlegend=key not in seen,
                           legendgroup=key, marker={"symbol": "x", "size": 11, "color": m.color}),
                row=row, col=col,
            )  # fmt: skip
            seen.add(key)
        for y, label in panel.hlines:
            fig.add_hline(y=y, line={"color": "#777", "dash": "dash", "width": 1}, row=row, col=col,
                          annotation_text=label, annotation_font_size=9)  # fmt: skip
        if panel.logy:
            fig.update_yaxes(type="log", row=row, col=col)
        if panel.logx:
            fig.update_xaxes(type="log", row=row, col=col)
        fig.update_yaxes(title_text=panel.ylabel, row=row, col=col)
        if not (spec.sharex and cols == 1) or row == rows:
            fig.update_xaxes(title_text=panel.xlabel, row=row, col=col)
    fig.update_layout(
        height=120 + 290 * rows, template="plotly_white", margin={"t": 60, "l": 60, "r": 30, "b": 50},
        legend={"font": {"size": 10}}, hovermode="closest",
    )  # fmt: skip
    fig.update_annotations(font_size=12)
    return fig
