"""``OUT/sweep.csv`` and ``OUT/report.html`` of a sweep, from what is on disk (``spectra sweep``, and
``spectra sweep --report-only``).

Each cell's run is analysed (``spectra analyze``'s pipeline; an earlier analysis is reused) and gives one
row of ``sweep.csv``: the cell's values, its state (and error), the steps it ran, its final reward and
held-out scores and its geometry medians at the last recorded step (the columns of ``compare.csv``,
:func:`spectra.report.final_row`), whether it collapsed — the performance verdict of the run's own
``--collapse-*`` options (:mod:`spectra.metrics.collapse`) on its reward and held-out accuracy, or the
live alarm of ``--monitor-every`` —, from which step, with the geometry's signature judged against the
sweep's healthy cells (:func:`spectra.tables.against_healthy`), and its wall time. Where cells differ
only by seed, ``sweep_seeds.csv`` holds each configuration's mean and Student-t 95 % interval
(:func:`spectra.report.seed_table`).

The report, built from the core's figure specs: the cliff (final accuracy over two axes, default
rank × batch size, one panel per value of the other varying options; crosses where a seed collapsed),
E_1 and effective rank at the last step against the rank, and every configuration's reward, accuracy
and geometry on one step axis (the mean over seeds with the seeds' range as a band where there are
several).

``spectra demo``'s reading of its comparison (:func:`demo_reading`) is here too: the demo is a sweep.
(Just over 400 lines: the table, the figures and that reading share the cell rows.)
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

import spectra
from spectra.figspec import FigureSpec, HeatPanel, Line, Marks, Panel
from spectra.figures import PALETTE, series_band
from spectra.h5io import atomic_path
from spectra.metrics.collapse import CollapseRule, performance_verdict
from spectra.pipeline import Analysis, analyze_run
from spectra.report import (
    SEED_NOTE,
    _table_html,
    main_score,
    run_view,
    seed_display,
    seed_table,
    seed_view,
    write_figures,
)
from spectra.stats import seed_range
from spectra.store import read_jsonl
from spectra.tables import against_healthy, alarm_collapse

DEFAULT_AXES = ("rank", "batch_size")
COLLAPSE_COLUMNS = (
    "collapsed", "collapse step", "collapse signature", "collapse reason", "collapse flagged by",
)  # fmt: skip


def cell_row(
    cell: dict[str, Any], out: Path, varying: Sequence[str], analysis: Analysis | None,
    record: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    """One row of sweep.csv (see the module docstring) from a cell of sweep.json, its analysis and its
    collapse record (default: the analysis' own)."""
    from spectra.report import final_row

    run_dir = out / cell["name"]
    summary_path = run_dir / "train_summary.json"
    done = summary_path.exists()
    status = "finished" if done else cell.get("status") or ("interrupted" if (run_dir / "run.json").exists()
                                                           else "not started")  # fmt: skip
    if status == "finished" and not done:
        status = "interrupted"
    row: dict[str, Any] = {"cell": cell["name"], **{k: cell["values"].get(k) for k in varying}}
    row |= {"status": status, "error": None if done else cell.get("error")}
    trained = json.loads(summary_path.read_text()) if done else {}
    logs = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else pd.DataFrame()
    steps = trained.get("step")
    if steps is None and "step" in logs.columns and "reward" in logs.columns:
        steps = logs.loc[logs["reward"].notna(), "step"].max()
    row["steps"] = None if steps is None or pd.isna(steps) else int(steps)
    if analysis is not None:
        final = final_row(run_view(analysis, cell["name"]), analysis.summary)
        row |= {k: v for k, v in final.items() if k not in ("run", *COLLAPSE_COLUMNS) and k not in row}
    row |= _collapse(trained, logs, run_dir, analysis, record)
    row["wall s"] = cell.get("wall_s")
    return row


def cell_record(run_dir: Path, analysis: Analysis | None) -> dict[str, Any] | None:
    """The cell's collapse record: its analysis' (summary.json's ``collapse``), else the performance
    verdict alone from its metrics.jsonl and eval.jsonl (no ΔW recorded: no geometry)."""
    if analysis is not None:
        return analysis.summary.get("collapse")
    if not (run_dir / "run.json").exists():
        return None
    try:
        with spectra.load_run(run_dir) as run:
            rule = CollapseRule.from_config(run.config)
            v = performance_verdict(run.rewards, run.eval, rule)
    except (spectra.SpectraError, ValueError, OSError):
        return None
    return {"collapsed": v.collapsed, "step": v.step, "by": v.by, "reason": v.reason, "onset": None,
            "end": None, "signature": None, "signature_reason": None}  # fmt: skip


def _collapse(
    trained: dict, logs: pd.DataFrame, run_dir: Path, analysis: Analysis | None, record: dict[str, Any] | None
) -> dict[str, Any]:
    """Whether the run collapsed (the performance verdict; or the live alarm, which applies it online),
    from which step, with which signature, why and by whom."""
    record = record if record is not None else cell_record(run_dir, analysis)
    found = []  # (step, reason, by)
    alarm = alarm_collapse(trained, logs)
    if alarm is not None:
        found.append((*alarm, "monitor"))
    if record and record.get("collapsed"):
        found.append((int(record["step"]), record["reason"], "analysis"))
    if not found:
        verdict = "—" if (record is None or record.get("collapsed") is None) else "no"
        return dict(zip(COLLAPSE_COLUMNS, (verdict, None, None, None, None), strict=True))
    step, reason, _ = min(found, key=lambda f: f[0])
    by = ", ".join(sorted({f[2] for f in found}))
    sig = record.get("signature") if record else None
    return dict(zip(COLLAPSE_COLUMNS, ("yes", step, sig, reason, by), strict=True))


def sweep_table(
    plan: dict[str, Any], out: Path, device: str | None = None, log: Callable[[str], None] = print
) -> tuple[pd.DataFrame, dict[str, Analysis]]:
    """sweep.csv's rows for the cells of ``plan`` (sweep.json), analysing each cell that recorded ΔW; a
    collapsed cell's signature is judged against the sweep's healthy cells."""
    analyses: dict[str, Analysis] = {}
    found: list[Analysis | None] = []
    for cell in plan["cells"]:
        run_dir = out / cell["name"]
        analysis = None
        if (run_dir / "deltas").is_dir() and any((run_dir / "deltas").glob("step_*.h5")):
            try:
                # with the run's own --collapse-* options, as the live alarm applied them
                analysis = analyze_run(run_dir, spectra.EngineConfig(device=device))
                analyses[cell["name"]] = analysis
            except spectra.SpectraError as e:
                log(f"{cell['name']}: not analysed: {e}")
        found.append(analysis)
    records = [cell_record(out / c["name"], a) for c, a in zip(plan["cells"], found, strict=True)]
    rules = [a.rule if a is not None else CollapseRule() for a in found]
    records = against_healthy(records, rules)
    rows = [cell_row(c, out, plan["varying"], a, r)
            for c, a, r in zip(plan["cells"], found, records, strict=True)]  # fmt: skip
    table = pd.DataFrame(rows)
    table["collapse step"] = table["collapse step"].astype("Int64")
    return table, analyses


# --------------------------------------------------------------------------------------------- figures


def axes_of(varying: Sequence[str], asked: Sequence[str] | None = None) -> tuple[str, ...]:
    """The heatmap's (x, y) options: those asked, else rank × batch size where both vary, else the first
    varying options other than the seed and the method."""
    if asked:
        unknown = [a for a in asked if a not in varying]
        if unknown:
            raise spectra.SpectraError(
                f"--axes {','.join(asked)}: {', '.join(unknown)} does not vary in this sweep; choose among "
                + ", ".join(v for v in varying if v != "seed")
            )
        return tuple(asked)
    if all(a in varying for a in DEFAULT_AXES):
        return DEFAULT_AXES
    candidates = [v for v in varying if v not in ("seed", "method")] or [v for v in varying if v != "seed"]
    return tuple(candidates[:2])


def _sorted_values(values: pd.Series) -> list[Any]:
    uniq = list(dict.fromkeys(values.dropna().tolist()))
    try:
        return sorted(uniq)
    except TypeError:
        return uniq


def _with(axis: str | None, zipped: Sequence[Sequence[str]]) -> set[str]:
    """An axis and the options zipped with it (they vary along it)."""
    return {axis} | {k for g in zipped if axis in g for k in g} if axis else set()


def cliff(
    table: pd.DataFrame, axes: Sequence[str], varying: Sequence[str], zipped: Sequence[Sequence[str]] = ()
) -> FigureSpec | None:
    """Final accuracy over two axes (mean over seeds), one panel per value of the other varying options
    (options zipped with an axis vary along it); crosses on cells where a seed collapsed. Accuracies in
    [0, 1] share that colour scale."""
    score = main_score(table)
    if score is None or not axes:
        return None
    x = axes[0]
    y = axes[1] if len(axes) > 1 else None
    others = [v for v in varying if v not in _with(x, zipped) | _with(y, zipped) | {"seed"}]
    values = pd.to_numeric(table[score], errors="coerce")
    zrange = (0.0, 1.0) if values.between(0, 1).all() else None
    panels: list[Panel | HeatPanel] = []
    groups = table.groupby(others, sort=False, dropna=False) if others else [((), table)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        xs = _sorted_values(part[x])
        ys = _sorted_values(part[y]) if y else ["all"]
        z, marks = [], []
        for yv in ys:
            line = []
            for xv in xs:
                cells = part[(part[x] == xv) & ((part[y] == yv) if y else True)]
                vals = pd.to_numeric(cells[score], errors="coerce")
                line.append(float(vals.mean()) if vals.notna().any() else None)
                if (cells["collapsed"] == "yes").any():
                    marks.append((str(xv), str(yv)))
            z.append(line)
        title = ", ".join(f"{k} {v}" for k, v in zip(others, key, strict=True)) or f"{score}"
        panels.append(HeatPanel(title, z, [str(v) for v in xs], [str(v) for v in ys], score, xlabel=x,
                                ylabel=y or "", marks=marks, marks_name="collapsed (any seed)", zrange=zrange,
                                annotate=True))  # fmt: skip
    return FigureSpec(
        "cliff",
        f"Final accuracy over {x}" + (f" × {y}" if y else ""),
        f"Each cell: {score} at the end of training (mean over seeds); a cross where a seed's run was "
        "flagged by the collapse rule. A rank-collapse cliff is a sharp fall along the rank axis.",
        panels,
        columns=min(len(panels), 2),
        sharex=False,
    )


def geometry_vs_rank(
    table: pd.DataFrame, varying: Sequence[str], zipped: Sequence[Sequence[str]] = ()
) -> FigureSpec | None:
    """E_1 and effective rank at the last step against the rank: one line per value of the other
    varying options (mean over seeds, band: the seeds' range); methods that --rank does not size left out."""
    if "rank" not in varying or not {"E_1", "erank"} <= set(table.columns):
        return None
    if "method" in table.columns:  # methods whose size is not --rank have no place on a rank axis
        from spectra.train.methods import get_method

        table = table[[pd.isna(m) or get_method(str(m)).uses_rank for m in table["method"]]]
    others = [v for v in varying if v not in _with("rank", zipped) | {"seed"}]
    panels = []
    titles = {"E_1": "E_1 = σ₁²/‖ΔW‖² at the last step", "erank": "Effective rank at the last step"}
    for metric, title in titles.items():
        lines = []
        groups = table.groupby(others, sort=False, dropna=False) if others else [((), table)]
        for i, (key, part) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            ranks = _sorted_values(part["rank"])
            cis = [seed_range(pd.to_numeric(part.loc[part["rank"] == r, metric], errors="coerce"))
                   for r in ranks]  # fmt: skip
            keep = [j for j, c in enumerate(cis) if c.n]
            if not keep:
                continue
            mean = [cis[j].mean for j in keep]
            low = [cis[j].low if cis[j].low is not None else cis[j].mean for j in keep]
            high = [cis[j].high if cis[j].high is not None else cis[j].mean for j in keep]
            name = ", ".join(f"{k} {v}" for k, v in zip(others, key, strict=True)) or "median over modules"
            lines.append(Line([ranks[j] for j in keep], mean, name, PALETTE[i % len(PALETTE)],
                              band=(low, high), group=name))  # fmt: skip
        if lines:
            ticks = sorted({float(r) for ln in lines for r in ln.x})  # at the ranks: 2, 8, 64 on a log axis
            panels.append(Panel(title, metric, lines, xlabel="rank", logx=True, xticks=ticks))
    if not panels:
        return None
    return FigureSpec(
        "geometry_vs_rank",
        "Spectral concentration and effective rank against the rank",
        "Medians over modules at each run's last recorded step, mean over seeds (band: the range of the "
        "seeds where there are several; not a confidence interval). The study's collapsing adapters "
        "concentrate their update: E_1 rises and the effective rank falls while the rank grows.",
        panels,
        sharex=False,
    )


#: Steps the reward curves are averaged over (the collapse rule's default reward window).
REWARD_WINDOW = 5
_DASHES = ("solid", "dash", "dot", "dashdot")


def curves(cells: Sequence[dict[str, Any]], analyses: dict[str, Analysis]) -> FigureSpec | None:
    """Every configuration's reward (rolling mean over :data:`REWARD_WINDOW` steps) and median E_1 at
    its recorded steps on one step axis; the mean over seeds with the seeds' range where there are several
    (:func:`spectra.report.seed_view`), crosses where a seed was flagged."""
    groups: dict[str, list[str]] = {}
    for cell in cells:
        if cell["name"] in analyses:
            groups.setdefault(cell.get("group", cell["name"]), []).append(cell["name"])
    if not groups:
        return None
    reward, e1, marks = [], [], []
    for i, (group, names) in enumerate(groups.items()):
        color, dash = PALETTE[i % len(PALETTE)], _DASHES[(i // len(PALETTE)) % len(_DASHES)]
        label = group if len(names) == 1 else f"{group} ({len(names)} seeds)"
        view = seed_view([run_view(analyses[n], n, color) for n in names], label, color)
        if {"step", "reward"} <= set(view.logs.columns):
            r = view.logs.dropna(subset=["reward"]).sort_values("step")
            cols = [c for c in ("reward", "reward_lo", "reward_hi") if c in r]
            smooth = r[cols].rolling(REWARD_WINDOW, min_periods=1).mean()
            band = series_band(smooth, "reward") if "reward_lo" in smooth else None
            reward.append(Line(r["step"], smooth["reward"], label, color, dash, band, markers=False,
                               group=label))  # fmt: skip
        steps = view.steps
        if "E_1" in steps.columns and steps["E_1"].notna().any():
            band = series_band(steps, "E_1") if "E_1_lo" in steps else None
            e1.append(Line(steps["step"], steps["E_1"], label, color, dash, band, group=label, legend=False))
            if "collapsed" in steps and steps["collapsed"].any():
                flagged = steps[steps["collapsed"]]
                marks.append(Marks(flagged["step"], flagged["E_1"], "collapse flagged"))
    e1_min = next(iter(analyses.values())).rule.e1_min
    panels = [
        Panel(f"Reward (rolling mean over {REWARD_WINDOW} steps)", "reward", reward),
        Panel("Spectral concentration: median E_1 over modules", "E_1", e1, marks=marks,
              hlines=[] if e1_min is None else [(e1_min, "early-warning threshold")]),
    ]  # fmt: skip
    seeds = any(len(n) > 1 for n in groups.values())
    return FigureSpec(
        "curves",
        "Reward and E_1 of every configuration on one step axis",
        f"Top: the training reward, averaged over the last {REWARD_WINDOW} logged steps. Bottom: the "
        "median over modules of E_1 = σ₁²/‖ΔW‖² at each recorded step; crosses mark checkpoints at or "
        "after a collapse (the performance verdict)." + (SEED_NOTE if seeds else ""),
        [p for p in panels if p.lines],
    )


def write_sweep_report(
    out: str | Path,
    axes: Sequence[str] | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, list[Path]]:
    """sweep.csv (and sweep_seeds.csv where seeds vary), plots/*.png and report.html under ``out``, from
    sweep.json and the cells' run directories. Returns the table and the files written."""
    from spectra.probes.sweep import load_sweep

    out = Path(out)
    plan = load_sweep(out)
    chosen = axes_of(plan["varying"], axes)
    table, analyses = sweep_table(plan, out, device, log)
    with atomic_path(out / "sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    files = [out / "sweep.csv"]
    header = _plan_html(plan, table)
    if "seed" in plan["varying"]:
        groups: dict[str, list[int]] = {}
        for i, cell in enumerate(plan["cells"]):
            groups.setdefault(cell.get("group", cell["name"]), []).append(i)
        identity = [v for v in plan["varying"] if v != "seed"]
        seeds = seed_table(table, list(groups.values()), list(groups), label_col="cell", keep=identity,
                           skip=("seed", "steps", "last step", "collapse step"))  # fmt: skip
        seeds.insert(3 + len(identity), "collapsed", [
            f"{(table.iloc[g]['collapsed'] == 'yes').sum()} of {len(g)}" for g in groups.values()
        ])  # fmt: skip
        with atomic_path(out / "sweep_seeds.csv") as tmp:
            seeds.to_csv(tmp, index=False)
        files.append(out / "sweep_seeds.csv")
        header += "<p>Each configuration over its seeds: mean [Student-t 95 % interval of the mean].</p>"
        header += _table_html(seed_display(seeds).to_dict("records"))
    header += "<p>Every cell (sweep.csv):</p>" + _table_html(_shown(table).to_dict("records"))
    zipped = plan.get("zipped", [])
    varying = plan["varying"]
    figures = [cliff(table, chosen, varying, zipped), geometry_vs_rank(table, varying, zipped),
               curves(plan["cells"], analyses)]  # fmt: skip
    figures = [f for f in figures if f is not None and f.panels]
    pngs, page = write_figures(figures, out, f"spectra sweep — {out.name}", header)
    return table, [*files, *pngs, page]


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    """sweep.csv for the report's table: the columns a reader scans first."""
    keep = [c for c in table.columns if not c.startswith(("off_principal", "rho_")) and c != "last step"]
    return table[keep]


def _plan_html(plan: dict[str, Any], table: pd.DataFrame) -> str:
    counts = table["status"].value_counts().to_dict()
    parts = [
        "<p>"
        + html.escape(", ".join(f"{n} {s}" for s, n in counts.items()))
        + f" of {len(table)} cells. "
        + "Varying: "
        + html.escape(", ".join(plan["varying"]) or "nothing")
        + "; every cell: "
        + html.escape(", ".join(f"{k} {v}" for k, v in plan["base"].items()) or "the defaults")
        + ".</p>"
    ]
    failed = table[table["error"].notna()].to_dict("records")
    if failed:
        items = "".join(f"<li>{html.escape(str(r['cell']))}: {html.escape(str(r['error']))}</li>"
                        for r in failed)  # fmt: skip
        parts.append(f'<p class="warn">{len(failed)} cell(s) failed:</p><ul>{items}</ul>')
    collapsed = table[table["collapsed"] == "yes"].to_dict("records")
    if collapsed:
        which = ", ".join(
            f"{r['cell']} (step {r['collapse step']}, {r['collapse signature'] or 'no geometry'})"
            for r in collapsed
        )
        parts.append(f'<p class="warn">Collapsed: {html.escape(which)}.</p>')
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the demo


#: The study's two findings the demo reads, as (method, against, what the study found).
DEMO_FINDINGS = (
    ("pissa", "lora", "PiSSA's update stays in W0's principal directions and PiSSA lags LoRA"),
    ("dora", "lora", "DoRA ahead of LoRA, 46.6 % vs 42.5 % at 1.5B"),
)


def demo_reading(table: pd.DataFrame) -> list[str]:
    """What ``spectra demo``'s comparison says about the first study's findings (:data:`DEMO_FINDINGS`),
    from ``compare.csv``'s table (one row per run; several runs of a method are its seeds), one sentence
    per pair of methods present, by one standard for every claim: a difference is stated only when
    Welch's t-interval of the difference of the means over the seeds run excludes 0 (95 %, Bonferroni
    over the pairs read); with one seed on a side the numbers are printed as readings — a geometry number
    such as ρ_k is a measurement of that run — and the accuracy is said to be beyond what one seed can
    tell, with the ``spectra sweep`` command that can."""
    from spectra.stats import difference_ci

    score = main_score(table)
    if score is None or "method" not in table.columns:
        return []
    rho = next((c for c in table.columns if c.startswith("rho_")), None)
    present = [f for f in DEMO_FINDINGS if {f[0], f[1]} <= set(table["method"])]
    level = 1 - (1 - 0.95) / max(len(present), 1)

    def values(method: str, col: str | None) -> list[float]:
        if col is None or col not in table.columns:
            return []
        v = pd.to_numeric(table.loc[table["method"] == method, col], errors="coerce").dropna()
        return v.tolist()

    def reading(method: str, against: str, col: str | None) -> str:
        a, b = values(method, col), values(against, col)
        if not a or not b:
            return f"{col}: not measured"
        d = difference_ci(a, b, level)
        means = f"{col} {sum(a) / len(a):.3g} vs {sum(b) / len(b):.3g}"
        if d.low is None:
            return f"{means} ({'one seed each' if len(a) == len(b) == 1 else 'one seed on a side'})"
        n = f"{len(a)} vs {len(b)} seeds, Welch {level:.1%} interval of the difference {d}"
        if d.contains(0.0):
            return f"{means}: within the seed noise, cannot tell apart ({n})"
        return f"{means}: {method} {'above' if d.mean > 0 else 'below'} {against} ({n})"

    out = []
    for method, against, found in present:
        a, b = values(method, score), values(against, score)
        one_seed = min(len(a), len(b)) < 2
        parts = [reading(method, against, rho)] if method == "pissa" and rho else []
        parts.append(reading(method, against, score))
        sentence = f"{method} vs {against} (study: {found}): " + "; ".join(parts)
        if one_seed:
            sentence += (". One seed cannot tell the accuracy apart (on the organism the methods' order "
                         "changes from seed to seed); seeds can: spectra sweep --method "
                         f"{against},{method} --seed 0,1,2 --out runs/demo-seeds")  # fmt: skip
        out.append(sentence + ".")
    return out
