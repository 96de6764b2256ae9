"""PNGs and the offline ``report.html`` of one run (``spectra analyze``) or of several (``spectra compare``).

The report is one HTML file with plotly's JavaScript embedded: it opens from disk, offline, and fetches
nothing. Its header holds the run's configuration; each mechanism figure follows with a caption.

Runs given to a comparison that differ only by seed (:func:`spectra.stats.seed_groups`) are drawn as one
curve per configuration, the mean over seeds with the seeds' range as its band (:func:`seed_view`), and
tabled as the mean with its Student-t 95 % interval (``compare_seeds.csv``, :func:`seed_table`), which
also says whether each configuration's main score lies within the seed noise of the best one (Welch's
interval of the difference, Bonferroni over the comparisons).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from spectra.figspec import FigureSpec
from spectra.figures import (
    EVAL_SETTINGS,
    PALETTE,
    SCORE,
    RunView,
    all_figures,
    default_k,
    eval_series,
)
from spectra.h5io import atomic_path
from spectra.pipeline import Analysis
from spectra.render import save_png, to_plotly
from spectra.stats import (
    CONFIDENCE,
    difference_ci,
    distinguishing_keys,
    mean_over_seeds,
    seed_groups,
    t_interval,
)
from spectra.tables import against_healthy, collapse_columns


def run_view(analysis: Analysis, label: str | None = None, color: str = PALETTE[0]) -> RunView:
    """What the figures need of an analysed run, from the analysis in memory."""
    return RunView(
        label or analysis.name, color, analysis.per_step, analysis.table, analysis.spectra, analysis.logs,
        analysis.evals, analysis.engine.ks, analysis.rule.e1_min,
    )  # fmt: skip


#: Appended to a figure's caption when some of its curves average several seeds.
SEED_NOTE = (
    " Where runs differ only by seed, a curve is the mean over the seeds and its band the range of the "
    "seeds (not a confidence interval); crosses mark steps flagged in any seed."
)


def seed_view(views: Sequence[RunView], label: str, color: str) -> RunView:
    """Runs that differ only by seed as one :class:`RunView`: per step, the mean over the seeds of each
    median (band ``<metric>_lo``/``_hi``: the seeds' range, :func:`spectra.stats.mean_over_seeds`),
    of the reward and of each held-out score; ``collapsed`` where any seed was flagged. The module
    tables and spectra are pooled (each seed's modules kept apart). One view is returned relabelled."""
    if len(views) == 1:
        return replace(views[0], label=label, color=color)
    first = views[0]
    metrics = [
        c for c in first.steps.columns
        if c not in ("step", "modules", "collapsed") and not c.endswith(("_q25", "_q75", "_mean"))
    ]  # fmt: skip
    steps = mean_over_seeds([v.steps for v in views], "step", metrics, interval="range")
    flags = [v.steps[["step", "collapsed"]] for v in views if "collapsed" in v.steps.columns]
    if flags:
        any_seed = pd.concat(flags).groupby("step")["collapsed"].any()
        steps["collapsed"] = steps["step"].map(any_seed).fillna(False).astype(bool)
    rewards = [v.logs[["step", "reward"]].dropna() for v in views if {"step", "reward"} <= set(v.logs)]
    logs = mean_over_seeds(rewards, "step", ["reward"], interval="range") if rewards else pd.DataFrame()
    evals = [v.evals for v in views if {"step", "benchmark"} <= set(v.evals.columns)]
    if evals:
        keys = ["benchmark", *(c for c in EVAL_SETTINGS if all(c in e.columns for e in evals)), "step"]
        scores = sorted({c for e in evals for c in e.columns if SCORE.fullmatch(c)})
        last = [e.drop_duplicates(keys, keep="last") for e in evals]  # a step evaluated again: its last row
        evals_mean = mean_over_seeds(last, keys, scores, interval="range")
    else:
        evals_mean = pd.DataFrame()

    def pooled(frames: list[pd.DataFrame]) -> pd.DataFrame:
        parts = [f.assign(module=f"seed{i}:" + f["module"].astype(str)) for i, f in enumerate(frames)
                 if len(f) and "module" in f.columns]  # fmt: skip
        return pd.concat(parts, ignore_index=True) if parts else frames[0]

    return RunView(
        label, color, steps, pooled([v.table for v in views]), pooled([v.spectra for v in views]), logs,
        evals_mean, first.ks, first.e1_min,
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
    parts.append(collapse_html(s.get("collapse")))
    if s["problems"]:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in s["problems"][:20])
        parts.append(f'<p class="warn">{len(s["problems"])} problem(s):</p><ul>{items}</ul>')
    return "\n".join(parts)


def collapse_html(record: dict[str, Any] | None) -> str:
    """The collapse verdict in a sentence: performance, with its step, and the geometry's signature."""
    if not record or record.get("collapsed") is None:
        why = html.escape(record["reason"]) if record else "no collapse record"
        return f"<p>Collapse: no verdict ({why}).</p>"
    if not record["collapsed"]:
        return f"<p>Collapse: no ({html.escape(record['reason'])}).</p>"
    geometry = []
    for when in ("onset", "end"):
        g = record.get(when)
        if g:
            names = {"e1_norm_median": "rank-normalised E_1", "erank_median": "effective rank",
                     "size_median": "relative size"}  # fmt: skip
            values = [(g.get(key), label) for key, label in names.items()]
            shown = ", ".join(f"{label} {v:.3g}" for v, label in values if v is not None)
            geometry.append(f"at the {when} (step {g['step']}): {shown}")
    return (
        f'<p class="warn">Collapsed (performance) from step {record["step"]}: '
        f"{html.escape(record['reason'])}. "
        f"Signature: <b>{html.escape(str(record['signature']))}</b> "
        f"({html.escape(str(record['signature_reason']))}); {html.escape('; '.join(geometry))}.</p>"
    )


def write_run_report(analysis: Analysis, k: int | None = None, heat_step: int | None = None) -> list[Path]:
    """analysis/plots/*.png and analysis/report.html of one analysed run; returns the files written."""
    figures = all_figures([run_view(analysis)], k, heat_step)
    pngs, page = write_figures(figures, analysis.folder, f"spectra — {analysis.name}", run_header(analysis))
    return [*pngs, page]


def final_row(
    view: RunView, summary: dict[str, Any], collapse: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One line of the comparison table: final accuracy and final geometry of a run, and its collapse
    verdict (``collapse``: a record judged against other runs, default the run's own summary's)."""
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
    }
    row |= collapse_columns(collapse if collapse is not None else summary.get("collapse"))
    return row


def main_score(table: pd.DataFrame) -> str | None:
    """The column a comparison ranks runs by: the first held-out Avg@n, else the final reward."""
    scores = [c for c in table.columns if " avg@" in c and table[c].notna().any()]
    if scores:
        return scores[0]
    return "reward (last 5 steps)" if "reward (last 5 steps)" in table.columns else None


def group_labels(
    configs: Sequence[dict[str, Any]], groups: list[list[int]], names: Sequence[str]
) -> list[str]:
    """A label per seed group: its run's name when alone, else the configuration values that tell the
    groups apart (``method lora, rank 8``), or the first run's method, with the number of seeds."""
    keys = distinguishing_keys([configs[g[0]] for g in groups])
    labels = []
    for g in groups:
        if len(g) == 1:
            labels.append(names[g[0]])
            continue
        c = configs[g[0]]
        what = ", ".join(f"{k} {c.get(k)}" for k in keys) or str(c.get("method") or names[g[0]])
        labels.append(f"{what} ({len(g)} seeds)")
    return labels


def seed_table(
    table: pd.DataFrame,
    groups: list[list[int]],
    labels: Sequence[str],
    label_col: str = "run",
    keep: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per seed group of a per-run table: ``configuration``, its ``runs`` and ``seeds``, the
    columns in ``keep`` as they are (the first run's), and for each other numeric column (but ``skip``)
    its mean, ``<col> ci_low`` and ``<col> ci_high`` (the Student-t 95 % interval of the mean, empty for
    one seed); then, on the
    main score (:func:`main_score`), the difference from the best configuration with its interval and
    whether it lies ``within seed noise of best`` (yes / no / "one seed")."""
    numeric = [c for c in table.select_dtypes("number").columns if c not in (*keep, *skip)]
    score = main_score(table)
    rows = []
    for g, label in zip(groups, labels, strict=True):
        part = table.iloc[g]
        row: dict[str, Any] = {"configuration": label, "runs": ", ".join(map(str, part[label_col])),
                               "seeds": len(g)}  # fmt: skip
        row |= {c: part[c].iloc[0] for c in keep if c in part.columns}
        for c in numeric:
            ci = t_interval(part[c].to_numpy(dtype=float))
            row[c] = ci.mean
            row[f"{c} ci_low"], row[f"{c} ci_high"] = ci.low, ci.high
        rows.append(row)
    out = pd.DataFrame(rows)
    if score is not None and len(groups) > 1:
        values = [table.iloc[g][score].to_numpy(dtype=float) for g in groups]
        means = [v[~pd.isna(v)].mean() if (~pd.isna(v)).any() else -math.inf for v in values]
        best = int(max(range(len(means)), key=lambda i: means[i]))
        diffs, noise = [], []
        # each configuration against the best, k − 1 comparisons: Bonferroni, so that the chance of any
        # false "beyond the seed noise" stays near 1 − CONFIDENCE (the best is itself chosen by its mean)
        level = 1 - (1 - CONFIDENCE) / (len(groups) - 1)
        for i, v in enumerate(values):
            if i == best:
                diffs.append("best")
                noise.append("—")
                continue
            d = difference_ci(v, values[best], level)
            diffs.append(str(d))
            inside = d.contains(0.0)
            noise.append("one seed" if inside is None else "yes" if inside else "no")
        out[f"{score}: difference from best"] = diffs
        out["within seed noise of best"] = noise
    return out


def seed_display(seeds: pd.DataFrame) -> pd.DataFrame:
    """:func:`seed_table` for reading: each numeric column as ``mean [low, high]`` (``mean`` alone for one
    seed), its ``ci_low``/``ci_high`` columns folded in."""
    shown = {}
    for c in seeds.columns:
        if c.endswith((" ci_low", " ci_high")):
            continue
        if f"{c} ci_low" in seeds.columns:
            shown[c] = [
                "—" if pd.isna(m) else f"{m:.3g}" if pd.isna(lo) else f"{m:.3g} [{lo:.3g}, {hi:.3g}]"
                for m, lo, hi in zip(seeds[c], seeds[f"{c} ci_low"], seeds[f"{c} ci_high"], strict=True)
            ]
        else:
            shown[c] = seeds[c]
    return pd.DataFrame(shown)


def noise_sentences(seeds: pd.DataFrame) -> list[str]:
    """The seed-noise verdicts of :func:`seed_table` in words, one per configuration but the best."""
    diff = next((c for c in seeds.columns if c.endswith(": difference from best")), None)
    if diff is None:
        return []
    score = diff.removesuffix(": difference from best")
    best = seeds.loc[seeds[diff] == "best", "configuration"].iloc[0]
    out = []
    for row in seeds.to_dict("records"):
        label, d, verdict = row["configuration"], row[diff], row["within seed noise of best"]
        if d == "best":
            continue
        if verdict == "one seed":
            out.append(f"{label} vs {best}: {score} differs by {d}; one seed on a side, no noise estimate.")
        elif verdict == "yes":
            out.append(
                f"{label} vs {best}: {score} differs by {d} (Welch interval): within the seed noise, "
                "these seeds cannot tell them apart."
            )
        else:
            out.append(f"{label} vs {best}: {score} differs by {d} (Welch interval): beyond the seed noise.")
    return out


def write_comparison(
    analyses: Sequence[Analysis], out: Path, labels: Sequence[str] | None = None, k: int | None = None
) -> tuple[pd.DataFrame, list[Path]]:
    """Runs side by side: out/compare.csv (final accuracy and geometry per run), out/plots/*.png,
    out/report.html; and out/compare_seeds.csv where some runs differ only by seed (their figures then
    show one curve per configuration: the mean over seeds with the seeds' range as its band)."""
    names = list(labels) if labels else [a.name for a in analyses]
    if len(set(names)) < len(names):  # two runs of the same name: tell them apart by their folders
        names = [f"{n} ({a.run_dir})" for n, a in zip(names, analyses, strict=True)]
    views = [
        run_view(a, n, PALETTE[i % len(PALETTE)])
        for i, (n, a) in enumerate(zip(names, analyses, strict=True))
    ]
    records = against_healthy([a.summary.get("collapse") for a in analyses], [a.rule for a in analyses])
    rows = [final_row(v, a.summary, r) for v, a, r in zip(views, analyses, records, strict=True)]
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "compare.csv") as tmp:
        table.to_csv(tmp, index=False)
    written = [out / "compare.csv"]
    header = ""
    configs = [a.config for a in analyses]
    groups = seed_groups(configs)
    seeded = any(len(g) > 1 for g in groups)
    if seeded:
        glabels = group_labels(configs, groups, names)
        seeds = seed_table(table, groups, glabels)
        with atomic_path(out / "compare_seeds.csv") as tmp:
            seeds.to_csv(tmp, index=False)
        written.append(out / "compare_seeds.csv")
        views = [
            seed_view([views[i] for i in g], lab, PALETTE[j % len(PALETTE)])
            for j, (g, lab) in enumerate(zip(groups, glabels, strict=True))
        ]
        header += "<p>Runs that differ only by seed, as the mean over seeds [Student-t 95 % interval]:</p>"
        header += _table_html(seed_display(seeds).to_dict("records"))
        header += "".join(f"<p>{html.escape(s)}</p>" for s in noise_sentences(seeds))
    else:
        (out / "compare_seeds.csv").unlink(missing_ok=True)  # from an earlier comparison with seeds
    header += (
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
    figures = all_figures(views, k)
    if seeded:
        figures = [replace(f, caption=f.caption + SEED_NOTE) for f in figures]
    pngs, page = write_figures(figures, out, "spectra — " + " vs ".join(v.label for v in views), header)
    return table, [*written, *pngs, page]
