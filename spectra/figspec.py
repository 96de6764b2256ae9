"""What a figure is, as data: a :class:`FigureSpec` of panels of lines, crosses and reference lines, or of
heatmaps. The builders (:mod:`spectra.figures`, the probes' reports) make specs; :mod:`spectra.render`
draws one as a PNG and as a plotly figure, with one legend and one rule for ticks shared by both.

A line's ``group`` is its run (or configuration): where a figure colours its curves by run, the legend
has one entry per run, keys the line styles by ``kind`` (what a curve shows: ΔW, E_1, reward) and has one
entry for each reference (a random update's baseline, a threshold), however many runs draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

COLLAPSE_COLOR = "#d62728"
REFERENCE_COLOR = "#888888"  # reference curves and thresholds: the same for every run


@dataclass
class Line:
    """One curve. ``band`` (lower, upper) is shaded; ``group`` ties a run's traces together; ``kind`` is
    what the curve shows, the same for every run; a ``reference`` curve (drawn grey) is not a run's
    result but what to read it against, and has one legend entry per figure."""

    x: Sequence[float]
    y: Sequence[float]
    name: str
    color: str
    dash: str = "solid"  # solid | dash | dot | dashdot
    band: tuple[Sequence[float], Sequence[float]] | None = None
    markers: bool = True
    width: float = 1.8
    group: str = ""
    legend: bool = True
    kind: str = ""
    reference: bool = False


@dataclass
class Marks:
    """Points drawn as crosses (collapsed checkpoints); ``kind`` is their legend entry, shared by runs."""

    x: Sequence[float]
    y: Sequence[float]
    name: str
    color: str = COLLAPSE_COLOR
    kind: str = ""


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    marks: list[Marks] = field(default_factory=list)
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label): thresholds
    xlabel: str = "training step"
    logy: bool = False
    logx: bool = False
    xticks: Sequence[float] | None = None  # ticks at these values only (e.g. the ranks of a sweep)


@dataclass
class HeatPanel:
    title: str
    z: list[list[float]]  # rows = y labels, columns = x labels
    x: list[str]
    y: list[str]
    colorbar: str
    xlabel: str = "projection"
    ylabel: str = "layer"
    marks: list[tuple[str, str]] = field(default_factory=list)  # (x, y) cells drawn with a cross
    marks_name: str = ""  # the legend of the crosses
    zrange: tuple[float, float] | None = None  # the colour scale's ends (default: the data's)
    annotate: bool = False  # write each cell's value in it


@dataclass
class FigureSpec:
    name: str  # file stem of the PNG, id in the report
    title: str
    caption: str
    panels: list[Panel | HeatPanel]
    columns: int = 1
    sharex: bool = True
