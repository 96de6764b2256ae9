"""The maturity probe's figures (as :class:`spectra.figures.FigureSpec` data) and its offline report.

Models side by side, one colour each: the distribution of α per projection kind and of the other key
statistics (empirical CDFs: the fraction of modules at or below a value), the statistics against depth
(median over a layer's projections, band: their quartiles; depth = layer / (layers − 1), so that models
of different depth line up), α per layer × projection, and, with ``--runs``, each model's statistics
against what adapters did on it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from spectra.figspec import FigureSpec, HeatPanel, Line, Marks, Panel
from spectra.figures import PALETTE
from spectra.names import PROJECTIONS
from spectra.report import _table_html, write_figures

if TYPE_CHECKING:
    from spectra.probes.maturity import MaturityResult

#: One-line readings of every statistic (shown in the report; definitions in spectra/metrics/esd.py).
READINGS = {
    "alpha": "power-law exponent of the eigenvalue tail ρ(λ) ∝ λ^−α (Clauset–Shalizi–Newman fit). "
    "WeightWatcher reads 2–6 as typical of well-trained layers, below 2 as very heavy-tailed "
    "(over-trained), above 6 as under-trained; read it with its standard error and tail size",
    "alpha_stderr": "α's standard error (α − 1)/√n_tail: ±0.3 or more when α rests on a few dozen "
    "eigenvalues",
    "ks_distance": "Kolmogorov–Smirnov distance D between the tail and the fitted power law (smaller: "
    "a better fit)",
    "xmin": "where the fitted tail starts (x_min, chosen by the smallest D)",
    "num_tail": "eigenvalues in the fitted tail (λ ≥ x_min); α is left empty below 10 (WeightWatcher "
    "reports it from any tail, even 2)",
    "alpha_pvalue": "goodness of fit (with --pvalue): the share of synthetic spectra drawn from the fitted "
    "power law whose KS distance is at least this one's (Clauset et al. 2009 §4.1); p ≤ 0.1 rules the "
    "power law out, a larger p says only that it is plausible",
    "alpha_weighted": "α̂ = α·log10 λ_max, Martin & Mahoney's quality proxy that compares models of a "
    "family (lower: better trained)",
    "lambda_max": "largest eigenvalue σ_max² (WeightWatcher's 'spectral norm')",
    "log_spectral_norm": "log10 λ_max",
    "log_norm": "log10 ‖W‖_F² = log10 Σλ",
    "stable_rank": "Σλ / λ_max: how many directions carry energy comparable to the largest",
    "mp_sigma": "scale σ of the Marchenko–Pastur bulk fitted to the ESD (rescaled to mean 1)",
    "mp_bulk_max": "MP bulk edge λ₊: eigenvalues above it stand out of a random bulk",
    "mp_bulk_min": "lower MP edge λ₋",
    "num_spikes": "eigenvalues above λ₊ (with a Tracy–Widom margin): learned directions out of the bulk",
    "mp_softrank": "λ₊ / λ_max: near 1 the spectrum is all bulk (random-like), near 0 spikes dominate",
    "spectral_entropy": "entropy of λ/Σλ over ln(rank): 1 for a flat spectrum, lower as energy concentrates",
    "effective_rank": "exp(entropy of σ/Σσ) (Roy & Vetterli 2007)",
    "num_evals": "eigenvalues above 1e-5; the power law is fitted only from 50, and α needs a tail of 10",
}
LABELS = {
    "alpha": "α",
    "alpha_weighted": "α̂ = α·log10 λ_max",
    "num_spikes": "spikes above λ₊",
    "stable_rank": "stable rank",
    "mp_softrank": "MP soft rank",
    "log_spectral_norm": "log10 λ_max",
    "ks_distance": "KS distance D",
    "spectral_entropy": "spectral entropy",
}
DEPTH = "depth (layer / (layers − 1))"


def _ecdf(values: pd.Series) -> tuple[list[float], list[float]]:
    """The empirical CDF F(x) = #{v ≤ x}/n as a staircase: each value x_i rises from (i−1)/n to i/n."""
    x = np.sort(values.dropna().to_numpy(dtype=float))
    y = np.arange(len(x) + 1) / max(1, len(x))
    return np.repeat(x, 2).tolist(), np.stack([y[:-1], y[1:]], axis=1).ravel().tolist()


def _projs(table: pd.DataFrame) -> list[str]:
    present = set(table["proj"].dropna())
    return [p for p in PROJECTIONS if p in present] + sorted(present - set(PROJECTIONS))


def _colors(models: Sequence[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(models)}


def alpha_distributions(table: pd.DataFrame, models: Sequence[str]) -> FigureSpec:
    """α's empirical CDF per projection kind (and over all matrices), one line per model."""
    colors, panels = _colors(models), []
    kinds = [("all matrices", table), *((p, table[table["proj"] == p]) for p in _projs(table))]
    for title, part in kinds:
        lines = []
        for m in models:
            x, y = _ecdf(part.loc[part["model"] == m, "alpha"])
            if x:
                lines.append(Line(x, y, m, colors[m], markers=False, group=m, legend=title == "all matrices"))
        if lines:
            panels.append(Panel(f"α: {title}", "fraction ≤ α", lines, xlabel="α"))
    return FigureSpec(
        "alpha_distribution",
        "α per projection kind",
        "Empirical CDF of the power-law exponent α over each model's matrices of one kind (a curve further "
        "right: heavier-tailed spectra are rarer, i.e. larger α). " + READINGS["alpha"] + ". Matrices "
        "with fewer than 50 eigenvalues, or a fitted tail of fewer than 10, have no α; the tables give each "
        "model's median standard error and tail size.",
        panels,
        columns=2,
        sharex=False,
    )


def other_distributions(table: pd.DataFrame, models: Sequence[str]) -> FigureSpec:
    """The other key statistics' empirical CDFs over all matrices, one line per model."""
    colors, panels = _colors(models), []
    for stat in (
        "alpha_weighted",
        "num_spikes",
        "stable_rank",
        "mp_softrank",
        "ks_distance",
        "spectral_entropy",
    ):
        lines = []
        for m in models:
            x, y = _ecdf(table.loc[table["model"] == m, stat])
            if x:
                lines.append(Line(x, y, m, colors[m], markers=False, group=m, legend=not panels))
        if lines:
            panels.append(Panel(LABELS[stat], "fraction of matrices ≤ x", lines, xlabel=LABELS[stat]))
    return FigureSpec(
        "distributions",
        "Spikes, stable rank and the other statistics",
        "Empirical CDFs over each model's matrices. "
        + "; ".join(
            f"{LABELS[s]}: {READINGS[s]}"
            for s in ("alpha_weighted", "num_spikes", "stable_rank", "mp_softrank")
        )
        + ".",
        panels,
        columns=2,
        sharex=False,
    )


def depth(table: pd.DataFrame, models: Sequence[str]) -> FigureSpec:
    """Median statistics per layer against relative depth, band: quartiles over the layer's projections."""
    colors, panels = _colors(models), []
    layered = table.dropna(subset=["layer"])
    for stat in ("alpha", "num_spikes", "stable_rank", "alpha_weighted", "mp_softrank", "log_spectral_norm"):
        lines = []
        for m in models:
            part = layered[layered["model"] == m]
            if part.empty or part[stat].isna().all():
                continue
            g = part.groupby(part["layer"].astype(int))[stat]
            q = pd.DataFrame({"mid": g.median(), "lo": g.quantile(0.25), "hi": g.quantile(0.75)}).dropna()
            first, last = int(part["layer"].min()), int(part["layer"].max())
            x = ((q.index - first) / max(1, last - first)).tolist()
            lines.append(
                Line(
                    x,
                    q["mid"].tolist(),
                    m,
                    colors[m],
                    band=(q["lo"].tolist(), q["hi"].tolist()),
                    group=m,
                    legend=not panels,
                )
            )
        if lines:
            panels.append(Panel(f"{LABELS[stat]} by depth", LABELS[stat], lines, xlabel=DEPTH))
    return FigureSpec(
        "depth",
        "α, spikes and stable rank against depth",
        "Median over each layer's projection matrices (band: 25th–75th percentile over them), against the "
        "layer's relative depth.",
        panels,
        columns=2,
        sharex=False,
    )


def alpha_heatmaps(table: pd.DataFrame, models: Sequence[str]) -> FigureSpec:
    """α per layer × projection kind, one heatmap per model."""
    panels: list[Panel | HeatPanel] = []
    for m in models:
        part = table[(table["model"] == m)].dropna(subset=["layer"])
        if part.empty or part["alpha"].isna().all():
            continue
        grid = part.pivot_table(
            index=part["layer"].astype(int), columns="proj", values="alpha", aggfunc="median"
        )
        grid = grid.reindex(columns=_projs(part))  # kinds without any fit stay, blank
        z = [[None if np.isnan(v) else float(v) for v in row] for row in grid.to_numpy()]
        panels.append(HeatPanel(f"α: {m}", z, list(grid.columns), [str(i) for i in grid.index], "α"))  # type: ignore[arg-type]
    return FigureSpec(
        "alpha_heatmaps",
        "α per layer and projection",
        "Each cell is one matrix (the median where a layer "
        "has several of a kind); blank: no α (fewer than 50 eigenvalues, a tail of fewer than 10, or a flat "
        "spectrum).",
        panels,
        columns=2,
        sharex=False,
    )


def outcomes_figure(joined: pd.DataFrame, correlations: dict[str, Any]) -> FigureSpec:
    """Each model's median statistics against its runs' outcomes, one point per model."""
    panels = []
    series = (
        ("best_lora", "best low-rank LoRA", PALETTE[0]),
        ("best_structured", "best structured", PALETTE[1]),
    )
    for stat in ("alpha", "alpha_weighted", "stable_rank", "num_spikes"):
        marks = []
        for col, name, color in series:
            ok = joined[[stat, col]].dropna()
            if len(ok):
                marks.append(Marks(ok[stat].tolist(), ok[col].tolist(), name, color))
        if marks:
            r = "; ".join(f"{name}: {_r(correlations[stat][col])}" for col, name, _ in series)
            panels.append(
                Panel(
                    f"accuracy vs median {LABELS[stat]} ({r})",
                    "accuracy",
                    marks=marks,
                    xlabel=f"median {LABELS[stat]}",
                )
            )
    from spectra.probes.maturity_runs import OUTCOMES, pair_names

    for col in (*pair_names(joined), "collapse_rank"):
        ok = joined[["alpha", col]].dropna()
        if len(ok):
            name = OUTCOMES.get(col, f"{col} (difference of seed means)")
            panels.append(
                Panel(
                    f"{name} vs median α ({_r(correlations['alpha'][col])})",
                    name,
                    marks=[Marks(ok["alpha"].tolist(), ok[col].tolist(), name, PALETTE[2])],
                    xlabel="median α",
                )
            )
    n = int(joined[["best_lora", "best_structured"]].notna().any(axis=1).sum())
    return FigureSpec(
        "outcomes",
        "Maturity against what adapters did",
        f"Each point is one base model: its median statistic over all matrices against the best held-out "
        f"accuracy of its runs (else final training reward; 'best' is a maximum over configurations, "
        f"biased upward), and the named pairs' differences (structured − LoRA in the same setting; Welch "
        f"intervals in the table above). This rests on {n} model(s) with runs; r is "
        f"Pearson's, ρ Spearman's, over the models with both values (none below 3 models). Architecture, "
        f"tokenizer and data differ between models as well: a correlation here is a hypothesis to test, "
        f"not a cause.",
        panels,
        columns=2,
        sharex=False,
    )


def _r(c: dict[str, Any]) -> str:
    if c["pearson"] is None:
        return f"n={c['n']}, r undefined"
    return f"n={c['n']}, r={c['pearson']:.2f}, ρ={c['spearman']:.2f}"


def header(result: MaturityResult) -> str:
    """Models (path, matrices, fits, medians), readings of the statistics, problems, joined outcomes."""
    rows = []
    for label, s in result.summary["models"].items():
        med = s["median"]
        tested = s.get("pvalue_tested", 0)
        rows.append(
            {
                "model": label,
                "layers": s["layers"],
                "matrices": s["modules"],
                "fitted": s["fitted"],
                "tail < 10": s.get("short_tail", 0),
                "median α": med["alpha"],
                "median SE(α)": med["alpha_stderr"],
                "median tail": med["num_tail"],
                "power law ruled out (p ≤ 0.1)": f"{s['ruled_out']} of {tested}" if tested else "not tested",
                "median α̂": med["alpha_weighted"],
                "median spikes": med["num_spikes"],
                "median stable rank": med["stable_rank"],
                "median MP soft rank": med["mp_softrank"],
                "path": s["path"] + (" (cached)" if s["reused"] else ""),
            }
        )
    parts = [_table_html(rows)]
    for label, s in result.summary["models"].items():
        for reason, mods in s["without_fit"].items():
            parts.append(
                f"<p>{html.escape(label)}: {len(mods)} matrices without a full fit ({html.escape(reason)}"
                f"): {html.escape(', '.join(mods[:8]))}{' …' if len(mods) > 8 else ''}</p>"
            )
    by_proj = [
        {
            "model": label,
            "projection": p,
            "matrices": v["modules"],
            **{
                f"{LABELS.get(st, st)} median [q25, q75]": _band(v[st])
                for st in ("alpha", "alpha_stderr", "num_tail", "num_spikes", "stable_rank")
            },
        }
        for label, s in result.summary["models"].items()
        for p, v in s["by_proj"].items()
    ]
    parts += ["<h2>Per projection kind</h2>", _table_html(by_proj)]
    items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in READINGS.items())
    parts.append(
        "<details><summary>What each statistic means (λ = σ², unnormalised; spectra/metrics/esd.py, "
        f"docs/metrics.md)</summary><ul>{items}</ul></details>"
    )
    if result.problems:
        li = "".join(f"<li>{html.escape(p)}</li>" for p in result.problems)
        parts.append(f'<p class="warn">{len(result.problems)} problem(s):</p><ul>{li}</ul>')
    if result.outcomes is not None:
        cols = [
            "model",
            "runs",
            "alpha",
            "alpha_stderr",
            "num_tail",
            "best_lora",
            "best_lora_run",
            "best_structured",
            "best_structured_run",
            "collapse_rank",
            "lora_runs_analysed",
        ]
        join = result.summary["join"]
        compared = [
            {
                "model": p["model"],
                "pair": p["pair"],
                "seeds": f"{p['n']} vs {p['n_lora']}",
                "means": f"{p['mean']:.3g} vs {p['mean_lora']:.3g}",
                "difference [95 % Welch]": _welch(p),
                "verdict": p["verdict"],
            }
            for p in join["pairs"]
        ]
        parts += [
            "<h2>Joined with training outcomes</h2>",
            "<p>alpha, alpha_stderr, num_tail: the model's medians over its matrices. best_lora and "
            "best_structured: the best seed mean over configurations (a maximum, biased upward: not "
            "subtracted).</p>",
            _table_html(result.outcomes[[c for c in cols if c in result.outcomes]].to_dict("records")),
            "<h2>Structured against LoRA, named pairs</h2>",
            f"<p>Each structured method against plain LoRA in the same setting (all options but the method "
            f"equal), its seeds against LoRA's: the difference of the seed means with Welch's 95 % interval; "
            "a difference is called (higher / lower) only when Welch's interval at the Bonferroni level "
            f"over the {join['pair_tests']} pair(s) excludes 0.</p>",
            _table_html(compared) if compared else "<p>No structured run has a LoRA run in its setting.</p>",
        ]
    return "\n".join(parts)


def _welch(p: dict[str, Any]) -> str:
    if p["low"] is None or p["high"] is None:
        return f"{p['difference']:+.3g} (one seed: no interval)"
    return f"{p['difference']:+.3g} [{p['low']:+.3g}, {p['high']:+.3g}]"


def _band(q: dict[str, float | None]) -> str:
    if q["median"] is None:
        return "—"
    return f"{q['median']:.3g} [{q['q25']:.3g}, {q['q75']:.3g}]"


def write_maturity_report(result: MaturityResult, out: Path) -> list[Path]:
    """out/plots/*.png and out/report.html; returns their paths."""
    models = [t.label for t in result.models]
    t = result.table
    figures = [
        alpha_distributions(t, models),
        depth(t, models),
        other_distributions(t, models),
        alpha_heatmaps(t, models),
    ]
    if result.outcomes is not None:
        figures.append(outcomes_figure(result.outcomes, result.summary["join"]["correlations"]))
    figures = [f for f in figures if f.panels]
    pngs, page = write_figures(figures, out, "spectra — model maturity: " + ", ".join(models), header(result))
    return [*pngs, page]
