"""PNGs and the offline ``report.html`` of one run (``spectra analyze``) or of several (``spectra compare``).

The report is one HTML file with plotly's JavaScript embedded: it opens from disk, offline, and fetches
nothing. Its header holds the run's configuration; each mechanism figure follows with a caption.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from spectra.figures import PALETTE, FigureSpec, RunView, all_figures, default_k, eval_series
from spectra.h5io import atomic_path
from spectra.pipeline import Analysis
from spectra.render import save_png, to_plotly


def run_view(analysis: Analysis, label: str | None = None, color: str = PALETTE[0]) -> RunView:
    """What the figures need of an analysed run, from the analysis in memory."""
    return RunView(
        label or analysis.name, color, analysis.per_step, analysis.table, analysis.spectra, analysis.logs,
        analysis.evals, analysis.engine.ks, analysis.rule.e1_min,
    )  # fmt: skip


def write_figures(
    figures: Sequence[FigureSpec], folder: Path, title: str, header_html: str
) -> tuple[list[Path], Path]:
    """``folder/plots/<name>.png`` for each figure and ``folder/report.html``; returns their paths."""
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    pngs = [save_png(f, plots / f"{f.name}.png") for f in figures]
    for stale in set(plots.glob("*.png")) - set(pngs):  # a figure an earlier report had and this one lacks
        stale.unlink()
    return pngs, write_html(figures, folder / "report.html", title, header_html)


def write_html(figures: Sequence[FigureSpec], path: Path, title: str, header_html: str) -> Path:
    """One self-contained HTML file: plotly.js inline, one section per figure."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    sections = []
    for f in figures:
        div = pio.to_html(
            to_plotly(f), full_html=False, include_plotlyjs=False, div_id=f"fig-{f.name}",
            config={"displaylogo": False, "responsive": True},
        )  # fmt: skip
        sections.append(
            f'<section id="{f.name}"><h2>{html.escape(f.title)}</h2>'
            f'<p class="caption">{html.escape(f.caption)}</p>{div}</section>'
        )
    nav = " · ".join(f'<a href="#{f.name}">{html.escape(f.title)}</a>' for f in figures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }} th {{ background: #f5f5f5; }}
.caption {{ color: #555; font-size: 0.9em; }} .warn {{ color: #a40; }} nav {{ font-size: 0.85em; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{header_html}
<nav>{nav}</nav>
{"".join(sections)}
<p class="caption">Written by spectra. Every number here is in the analysis folder next to this file
(metrics.csv, summary.json, spectra.csv).</p>
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def _table_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_header(analysis: Analysis) -> str:
    """The report's header: configuration, what was analysed, collapse flags and problems."""
    s = analysis.summary
    cfg = [{"setting": k, "value": v} for k, v in s["run"].items()]
    steps = [e["step"] for e in s["steps"]]
    if not steps:  # LayerNorm tuning: vector parameters only, norms in metrics.csv
        return _table_html(cfg) + "<p>No matrix modules in this run: only norms (metrics.csv).</p>"
    parts = [
        _table_html(cfg),
        f"<p>{len(steps)} recorded steps analysed ({steps[0]}–{steps[-1]}), "
        f"{s['steps'][-1]['modules']} modules per step; "
        f"engine options {html.escape(json.dumps(s['engine']))}.</p>",
    ]
    if s["collapsed_steps"]:
        reason = next(e["collapse_reason"] for e in s["steps"] if e["collapsed"])
        flagged = ", ".join(map(str, s["collapsed_steps"]))
        parts.append(f'<p class="warn">Rank collapse flagged at steps {flagged} ({html.escape(reason)}).</p>')
    else:
        parts.append("<p>No checkpoint flagged by the rank-collapse rule.</p>")
    if s["problems"]:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in s["problems"][:20])
        parts.append(f'<p class="warn">{len(s["problems"])} problem(s):</p><ul>{items}</ul>')
    return "\n".join(parts)


def write_run_report(analysis: Analysis, k: int | None = None, heat_step: int | None = None) -> list[Path]:
    """analysis/plots/*.png and analysis/report.html of one analysed run; returns the files written."""
    figures = all_figures([run_view(analysis)], k, heat_step)
    pngs, page = write_figures(figures, analysis.folder, f"spectra — {analysis.name}", run_header(analysis))
    return [*pngs, page]


def final_row(view: RunView, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of the comparison table: final accuracy and final geometry of a run."""
    k = default_k(view.ks)
    last = summary["steps"][-1] if summary["steps"] else {"step": None, "median": {}}
    med = last["median"]
    row: dict[str, Any] = {
        "run": view.label,
        "method": summary["run"].get("method"),
        "last step": last["step"],
    }
    if {"step", "reward"} <= set(view.logs.columns):
        r = view.logs[["step", "reward"]].dropna().sort_values("step")
        row["reward (last 5 steps)"] = float(r["reward"].tail(5).mean()) if len(r) else None
    for bench, e, avg, passes in eval_series(view.evals):
        for col in [avg, *(c for c in passes if c != "pass@1")]:
            if e[col].notna().any():
                row[f"{bench} {col}"] = float(e[col].dropna().iloc[-1])
    row |= {
        "erank": med.get("erank"),
        "E_1": med.get("E_1"),
        f"rho_{k}": med.get(f"rho_{k}"),
        f"off_principal_{k}": med.get(f"off_principal_{k}"),
        "relative_size": med.get("relative_size"),
        "collapse flagged at": ", ".join(map(str, summary["collapsed_steps"])) or "never",
    }
    return row


def write_comparison(
    analyses: Sequence[Analysis], out: Path, labels: Sequence[str] | None = None, k: int | None = None
) -> tuple[pd.DataFrame, list[Path]]:
    """Runs side by side: out/compare.csv (final accuracy and geometry), out/plots/*.png, out/report.html."""
    names = list(labels) if labels else [a.name for a in analyses]
    if len(set(names)) < len(names):  # two runs of the same name: tell them apart by their folders
        names = [f"{n} ({a.run_dir})" for n, a in zip(names, analyses, strict=True)]
    views = [
        run_view(a, n, PALETTE[i % len(PALETTE)])
        for i, (n, a) in enumerate(zip(names, analyses, strict=True))
    ]
    table = pd.DataFrame([final_row(v, a.summary) for v, a in zip(views, analyses, strict=True)])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.csv") as tmp:
        table.to_csv(tmp, index=False)
    header = (
        "<p>Final accuracy and final geometry (medians over modules at each run's last analysed step):</p>"
    )
    header += _table_html(table.to_dict("records"))
    header += (
        "<p>Runs: "
        + ", ".join(
            f"{html.escape(n)} ({html.escape(str(a.run_dir))})" for n, a in zip(names, analyses, strict=True)
        )
        + "</p>"
    )
    pngs, page = write_figures(all_figures(views, k), out, "spectra — " + " vs ".join(names), header)
    return table, [out / "compare.csv", *pngs, page]
