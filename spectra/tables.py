"""Tables made from the engine's rows: per-step aggregates over modules and the summary of a run.

Pure pandas: a step × module table (``metrics.csv``) in, per-step medians, quartiles and means out,
for the metrics the registry marks as summarised (:func:`spectra.metrics.registry.summary_columns`).
The pipeline writes them (summary.json); the figures draw them.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import pandas as pd

from spectra.codecs import MATRIX_KINDS
from spectra.metrics.collapse import CollapseRule, detect_collapse, step_medians
from spectra.metrics.registry import summary_columns

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


def collapse_flags(table: pd.DataFrame, rewards: pd.DataFrame | None, rule: CollapseRule) -> pd.DataFrame:
    """The rank-collapse rule per analysed step (:func:`spectra.metrics.collapse.detect_collapse`)."""
    return detect_collapse(step_medians(analysed_matrices(table)), rewards, rule)


def alarm_collapse(train_summary: dict[str, Any], logs: pd.DataFrame) -> tuple[int, str] | None:
    """The live collapse alarm's first firing (step, reason): ``collapse_step``/``collapse_reason`` of
    train_summary.json, else the first ``{"event": "collapse"}`` row of metrics.jsonl (a run still
    training, or killed); None when it never fired."""
    if train_summary.get("collapse_step") is not None:
        return int(train_summary["collapse_step"]), str(train_summary.get("collapse_reason") or "")
    if "event" in logs.columns:
        events = logs[logs["event"] == "collapse"]
        if len(events):
            return int(events.iloc[0]["step"]), str(events.iloc[0].get("reason") or "")
    return None


def summarize(
    config: dict[str, Any],
    run_path: str,
    table: pd.DataFrame,
    ks: tuple[int, ...],
    engine: dict[str, Any],
    rewards: pd.DataFrame | None,
    rule: CollapseRule,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """summary.json (configuration header, engine options, per-step aggregates, collapse flags,
    problems) and the per-step table the figures draw (with ``collapsed``)."""
    metrics = summary_columns(ks)
    steps = per_step(table, metrics)
    collapse = collapse_flags(table, rewards, rule)
    ok = analysed_matrices(table)
    by_proj = ok.groupby(["step", "proj"])[[m for m in metrics if m in ok.columns]].median()
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
                "by_proj": {
                    str(p): {m: _num(v) for m, v in vals.items()} for p, vals in proj_rows.iterrows()
                },
                "collapsed": bool(flag["collapsed"].iloc[0]) if len(flag) else False,
                "collapse_reason": str(flag["reason"].iloc[0]) if len(flag) else "",
                "reward": _num(flag["reward_smoothed"].iloc[0]) if len(flag) else None,
            }
        )
    flags = {e["step"]: e["collapsed"] for e in entries}
    steps["collapsed"] = steps["step"].map(flags).fillna(False).astype(bool)
    summary = {
        "run": {k: config.get(k) for k in RUN_HEADER if k in config} | {"path": run_path},
        "engine": engine,
        "collapse_rule": asdict(rule),
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
