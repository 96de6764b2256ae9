"""Tables made from the engine's rows: per-step aggregates over modules and the summary of a run.

Pure pandas: a step × module table (``metrics.csv``) in, per-step medians, quartiles and means out,
for the metrics the registry marks as summarised (:func:`spectra.metrics.registry.summary_columns`).
The pipeline writes them (summary.json); the figures draw them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from spectra.codecs import MATRIX_KINDS
from spectra.metrics.collapse import CollapseRule, detect_collapse, judge, signature, step_medians
from spectra.metrics.precision import pooled_share
from spectra.metrics.registry import pooled_columns, summary_columns

#: The configuration keys shown at the top of summary.json and of the report.
RUN_HEADER = (
    "name", "model", "method", "rank", "alpha", "dropout", "loss", "lr", "batch_size", "num_generations",
    "max_steps", "delta_every", "eval_every", "seed", "dataset", "precision",
)  # fmt: skip


def analysed_matrices(table: pd.DataFrame) -> pd.DataFrame:
    """Rows analysed without a problem of modules that are linear maps (vectors have norms only)."""
    return table[(table["status"] == "ok") & table["kind"].isin(MATRIX_KINDS)]


def problems(table: pd.DataFrame) -> list[str]:
    """One line per row that could not be analysed: step, module, status and why."""
    bad = table[table["status"] != "ok"]
    return [
        f"step {int(r.step)}"
        + (f", {r.module}" if isinstance(r.module, str) else "")
        + f": {r.status}: {r.error}"
        for r in bad.itertuples()
    ]


def per_step(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per step, over analysed matrix modules: ``<metric>`` (median), ``<metric>_q25``, ``<metric>_q75``
    and ``<metric>_mean`` for each metric present, and ``modules`` (how many were analysed)."""
    ok = analysed_matrices(table)
    present = [m for m in metrics if m in ok.columns and ok[m].notna().any()]
    g = ok.groupby("step")[present]
    parts = [
        g.median(), g.quantile(0.25).add_suffix("_q25"), g.quantile(0.75).add_suffix("_q75"),
        g.mean().add_suffix("_mean"), ok.groupby("step").size().rename("modules"),
    ]  # fmt: skip
    return pd.concat(parts, axis=1).copy().reset_index()  # copy: one block per dtype, cheap to extend


def pooled_per_step(table: pd.DataFrame) -> dict[int, dict[str, float | None]]:
    """Per step, the registry's pooled shares (:func:`spectra.metrics.registry.pooled_columns`) over the
    analysed matrix modules, pooled by entry count m·n (:func:`spectra.metrics.precision.pooled_share`):
    the per-model figure of sparsity_in_rl, not a median of modules."""
    ok = analysed_matrices(table)
    cols = [c for c in pooled_columns() if c in ok.columns]
    return {
        int(step): {c: _num(pooled_share(g[c], g["m"] * g["n"])) for c in cols if g[c].notna().any()}
        for step, g in ok.groupby("step")
    }


def collapse_flags(
    table: pd.DataFrame, rewards: pd.DataFrame | None, rule: CollapseRule, evals: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The collapse verdict per analysed step (:func:`spectra.metrics.collapse.detect_collapse`)."""
    return detect_collapse(step_medians(analysed_matrices(table)), rewards, rule, evals)


def collapse_record(
    table: pd.DataFrame,
    rewards: pd.DataFrame | None,
    rule: CollapseRule,
    evals: pd.DataFrame | None = None,
    healthy_size: float | None = None,
) -> dict[str, Any]:
    """The run's collapse record (:func:`spectra.metrics.collapse.judge`): the performance verdict with
    its onset step, and the geometry at the onset and at the end with its signature; JSON-safe."""
    record = judge(step_medians(analysed_matrices(table)), rewards, rule, evals, healthy_size)
    for key in ("onset", "end"):
        if record[key]:
            record[key] = {k: _num(v) if k != "step" else v for k, v in record[key].items()}
    return record


def healthy_size(records: Sequence[Mapping[str, Any] | None]) -> float | None:
    """The healthy runs' reference for the ``large`` signature: the median, over the records (summary.json's
    ``collapse``) of runs that did not collapse, of the median relative size at their end; None when
    there is none."""
    ends = [r["end"] for r in records if r and r.get("collapsed") is False and r.get("end")]
    sizes = [e["size_median"] for e in ends if e.get("size_median") is not None]
    return float(np.median(sizes)) if sizes else None


def against_healthy(
    records: Sequence[Mapping[str, Any] | None], rules: Sequence[CollapseRule]
) -> list[dict[str, Any] | None]:
    """Collapse records of runs compared side by side (a sweep, ``spectra compare``), each collapsed one's
    signature judged against the healthy ones among them (:func:`healthy_size`) instead of the fixed
    reference a run alone has."""
    reference = healthy_size(records)
    out: list[dict[str, Any] | None] = []
    for record, rule in zip(records, rules, strict=True):
        if record and record.get("collapsed") and reference is not None:
            name, why = signature(record.get("onset"), record.get("end"), rule, reference)
            record = {**record, "signature": name, "signature_reason": why}
        out.append(dict(record) if record else None)
    return out


def collapse_columns(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The collapse verdict as table columns: ``collapsed`` (yes / no / — without a verdict), ``collapse
    step`` (the onset) and ``collapse signature``."""
    if not record or record.get("collapsed") is None:
        return {"collapsed": "—", "collapse step": None, "collapse signature": None}
    if not record["collapsed"]:
        return {"collapsed": "no", "collapse step": None, "collapse signature": None}
    return {"collapsed": "yes", "collapse step": record.get("step"),
            "collapse signature": record.get("signature")}  # fmt: skip


def alarm_collapse(train_summary: dict[str, Any], logs: pd.DataFrame) -> tuple[int, str] | None:
    """The live collapse alarm's first firing (onset step, reason): ``collapse_onset`` (else
    ``collapse_step``, where it fired) and ``collapse_reason`` of train_summary.json, else the first
    ``{"event": "collapse"}`` row of metrics.jsonl (a run still training, or killed); None when it never
    fired."""
    if train_summary.get("collapse_step") is not None:
        step = train_summary.get("collapse_onset")
        step = train_summary["collapse_step"] if step is None else step
        return int(step), str(train_summary.get("collapse_reason") or "")
    if "event" in logs.columns:
        events = logs[logs["event"] == "collapse"]
        if len(events):
            first = events.iloc[0]
            onset = first.get("onset")
            step = first["step"] if onset is None or pd.isna(onset) else onset
            return int(step), str(first.get("reason") or "")
    return None


def summarize(
    config: dict[str, Any],
    run_path: str,
    table: pd.DataFrame,
    ks: tuple[int, ...],
    engine: dict[str, Any],
    rewards: pd.DataFrame | None,
    rule: CollapseRule,
    evals: pd.DataFrame | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """summary.json (configuration header, engine options, per-step aggregates, the collapse record
    (``collapse``: :func:`collapse_record`) and per-step flags, problems) and the per-step table the
    figures draw (with ``collapsed``: at or after a collapsed run's onset)."""
    metrics = summary_columns(ks)
    steps = per_step(table, metrics)
    collapse = collapse_flags(table, rewards, rule, evals)
    ok = analysed_matrices(table)
    by_proj = ok.groupby(["step", "proj"])[[m for m in metrics if m in ok.columns]].median()
    pooled = pooled_per_step(table)
    entries = []
    for row in steps.itertuples(index=False):
        step = int(row.step)
        flag = collapse[collapse["step"] == step]
        proj_rows = by_proj.loc[step] if step in by_proj.index.get_level_values(0) else pd.DataFrame()
        entries.append(
            {
                "step": step,
                "modules": int(row.modules),
                "problems": int(((table["step"] == step) & (table["status"] != "ok")).sum()),
                "median": {m: _num(getattr(row, m)) for m in metrics if m in steps.columns},
                "mean": {m: _num(getattr(row, f"{m}_mean")) for m in metrics if f"{m}_mean" in steps.columns},
                "pooled": pooled.get(step, {}),  # per model, by entry count (pooled_per_step)
                "by_proj": {
                    str(p): {m: _num(v) for m, v in vals.items()} for p, vals in proj_rows.iterrows()
                },
                "collapsed": bool(flag["collapsed"].iloc[0]) if len(flag) else False,
                "collapse_reason": str(flag["reason"].iloc[0]) if len(flag) else "",
                "collapse_warning": bool(flag["warning"].iloc[0]) if len(flag) else False,
                "reward": _num(flag["reward_smoothed"].iloc[0]) if len(flag) else None,
            }
        )
    flags = {e["step"]: e["collapsed"] for e in entries}
    steps["collapsed"] = steps["step"].map(flags).fillna(False).astype(bool)
    summary = {
        "run": {k: config.get(k) for k in RUN_HEADER if k in config} | {"path": run_path},
        "engine": engine,
        "collapse_rule": asdict(rule),
        "collapse": collapse_record(table, rewards, rule, evals),
        "steps": entries,
        "collapsed_steps": [e["step"] for e in entries if e["collapsed"]],
        "problems": problems(table),
    }
    return summary, steps


def _num(v: Any) -> float | None:
    """A JSON-safe number: NaN and missing become null."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v
