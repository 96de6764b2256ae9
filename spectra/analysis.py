"""A run's ``analysis/`` folder: every metric of every recorded step, cached, summarised, drawn.

:func:`analyze_dir` is what ``spectra analyze RUN_DIR`` runs. It writes, atomically:

- ``metrics.csv``: one row per step × module (step, module, layer, proj, kind, m, n, status, one column
  per metric of :func:`spectra.engine.metric_columns`, error);
- ``spectra.csv``: σ_i(ΔW) (the top ``SPECTRUM_TOP``) of every matrix module at the plotted steps;
- ``summary.json``: the run's configuration, the engine options, per step the aggregates over modules
  (median, quartiles, mean) and per projection kind (median), the collapse flag with the rule that fired,
  and the problems met (damaged files, mismatched modules);
- ``plots/*.png`` and ``report.html`` (see :mod:`spectra.report`).

Re-running reuses what is there: W0's reference spectra stay cached in ``base/``, and only steps absent
from ``metrics.csv`` (or whose file could not be read last time) are analysed. Rows of steps no longer in
``deltas/`` (after a resume truncated the run) are dropped. A change of engine options recomputes all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from spectra.engine import EngineConfig, analyze_run
from spectra.errors import SpectraError
from spectra.h5io import atomic_path, write_json
from spectra.metrics.collapse import CollapseRule, detect_collapse, step_medians
from spectra.names import parse_module_name
from spectra.operators import VectorDelta
from spectra.store import Run, load_run
from spectra.svd import default_device, dense_svd, factored_svd

ANALYSIS_DIR = "analysis"
SPECTRUM_TOP = 64
PLOTTED_STEPS = 4

# the metrics aggregated per step in summary.json (k-dependent names are filled in from the engine's ks)
SUMMARY_METRICS = ("relative_size", "erank", "stable_rank", "E_1", "intruders", "nss", "bf16_sparsity")
K_METRICS = (
    "E_{k}", "rho_{k}", "rho_baseline_{k}", "off_principal_{k}", "rho_minor_{k}",
    "angle_left_{k}", "angle_right_{k}",
)  # fmt: skip


class NothingToAnalyze(SpectraError):
    """The run has no delta file that could be analysed."""


@dataclass
class Analysis:
    """What :func:`analyze_dir` produced (all of it also on disk under ``run_dir/analysis``)."""

    run_dir: Path
    table: pd.DataFrame
    summary: dict[str, Any]
    spectra: pd.DataFrame
    new_steps: list[int] = field(default_factory=list)
    reused_steps: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.run_dir / ANALYSIS_DIR


def engine_options(config: EngineConfig) -> dict[str, Any]:
    """The options that change the numbers (the device and batch budget do not)."""
    opts = asdict(config)
    for k in ("device", "max_batch_bytes", "eigh_streams"):
        opts.pop(k)
    opts["ks"] = list(opts["ks"])
    return opts


def analyze_dir(
    run_dir: str | Path,
    config: EngineConfig | None = None,
    rule: CollapseRule | None = None,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Analysis:
    """Analyse every recorded step of a run not analysed yet and rewrite ``analysis/`` (without plots).

    Raises :class:`spectra.RunDirError` for a directory that is not a run and :class:`NothingToAnalyze`
    when no step could be analysed; damaged files and mismatched modules are reported in
    ``Analysis.problems`` and in the table's ``status`` column while the rest is analysed.
    ``progress(done, total, label)`` is called as steps are analysed.
    """
    config = config or EngineConfig()
    rule = rule or CollapseRule()
    with load_run(run_dir) as run:
        steps = run.steps
        if not steps:
            raise NothingToAnalyze(
                f"{run.path / 'deltas'}: no delta files yet; train the run first (spectra train) or wait "
                "for its first recorded step"
            )
        folder = run.path / ANALYSIS_DIR
        prints = {str(s): fingerprint(run.delta_path(s)) for s in steps}
        key = cache_key(run, config)
        old = _cached_table(folder, key, force)
        if old is not None:
            retry = set(old.loc[~old["status"].isin(["ok", "nonfinite"]), "step"].astype(int))
            before = _previous_fingerprints(folder)
            retry |= {s for s in steps if before.get(str(s)) != prints[str(s)]}  # rewritten since
            old = old[old["step"].isin(steps) & ~old["step"].isin(retry)]
            done = set(old["step"].astype(int))
        else:
            done = set()
        todo = [s for s in steps if s not in done]
        fresh = analyze_run(run, todo, config, progress, SPECTRUM_TOP) if todo else pd.DataFrame()
        fresh, sigmas = _split_spectra(fresh)
        parts = [t for t in (old, fresh) if t is not None and len(t)]
        if not parts:
            raise NothingToAnalyze(f"{run.path / 'deltas'}: the delta files hold no modules")
        table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        for col in ("layer", "m", "n"):  # integers, also where a row has none (a file-level error)
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
        table = table.sort_values(["step", "module"], na_position="first", kind="stable")
        table = table.reset_index(drop=True)
        problems = _problems(table)
        if not (table["status"] == "ok").any():
            raise NothingToAnalyze(
                f"{run.path}: nothing could be analysed ({len(problems)} problem(s)); first: {problems[0]}"
            )
        plotted = plotted_steps(table)
        spectra = _spectra_at(run, plotted, folder / "spectra.csv", config, sigmas, set(todo), force)
        summary = summarize(run, table, config, rule) | {"cache": key, "fingerprints": prints}
        folder.mkdir(exist_ok=True)
        (folder / "summary.json").unlink(missing_ok=True)  # the cache key goes last: never a stale pair
        _write_csv(table, folder / "metrics.csv")
        _write_csv(spectra, folder / "spectra.csv")
        write_json(folder / "summary.json", summary)
    return Analysis(Path(run_dir), table, summary, spectra, todo, sorted(done & set(steps)), problems)


def fingerprint(path: Path) -> list[int]:
    """Size and modification time of a delta file: a file rewritten at the same step (after a resume)
    is analysed again."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cache_key(run: Run, config: EngineConfig) -> dict[str, Any]:
    """What metrics.csv depends on besides the delta files: the engine options that change the numbers,
    the spectra version (formulas), and W0 (:meth:`spectra.store.Run.base_fingerprint`)."""
    from spectra import __version__

    return {"engine": engine_options(config), "spectra": __version__, "base": run.base_fingerprint()}


def _previous_fingerprints(folder: Path) -> dict[str, Any]:
    try:
        prints = json.loads((folder / "summary.json").read_text()).get("fingerprints", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return prints if isinstance(prints, dict) else {}


def _cached_table(folder: Path, key: dict[str, Any], force: bool) -> pd.DataFrame | None:
    """metrics.csv from an earlier analysis with the same :func:`cache_key`, else None."""
    csv, summary = folder / "metrics.csv", folder / "summary.json"
    if force or not csv.exists() or not summary.exists():
        return None
    try:
        previous = json.loads(summary.read_text()).get("cache")
        table = pd.read_csv(csv)
    except (OSError, ValueError, AttributeError, pd.errors.ParserError):
        return None  # damaged cache: analyse again
    if previous != json.loads(json.dumps(key)) or not {"step", "module", "status"} <= set(table.columns):
        return None
    return table


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def _problems(table: pd.DataFrame) -> list[str]:
    bad = table[table["status"] != "ok"]
    return [
        f"step {int(r.step)}"
        + (f", {r.module}" if isinstance(r.module, str) else "")
        + f": {r.status}: {r.error}"
        for r in bad.itertuples()
    ]


def plotted_steps(table: pd.DataFrame, count: int = PLOTTED_STEPS) -> list[int]:
    """Up to ``count`` analysed steps spread over training (step 0, where ΔW is zero, left out unless
    it is all there is), always including the last."""
    steps = sorted(set(table.loc[table["status"] == "ok", "step"].astype(int)))
    nonzero = [s for s in steps if s > 0] or steps
    if len(nonzero) <= count:
        return nonzero
    idx = np.linspace(0, len(nonzero) - 1, count).round().astype(int)
    return [nonzero[i] for i in sorted(set(idx.tolist()))]


Spectra = dict[int, list[tuple[str, list[float]]]]  # step → [(module, top σ_i(ΔW))]


def _split_spectra(fresh: pd.DataFrame) -> tuple[pd.DataFrame, Spectra]:
    """``fresh`` without the engine's ``spectrum`` column, and that column per step."""
    if "spectrum" not in fresh.columns:
        return fresh, {}
    by_step: Spectra = {}
    for r in fresh.loc[fresh["status"] == "ok", ["step", "module", "spectrum"]].itertuples(index=False):
        if isinstance(r.spectrum, list):  # matrix modules only
            by_step.setdefault(int(r.step), []).append((r.module, r.spectrum))
    return fresh.drop(columns="spectrum"), by_step


def _spectra_at(
    run: Run,
    steps: list[int],
    path: Path,
    config: EngineConfig,
    fresh: Spectra,
    redo: set[int],
    force: bool,
) -> pd.DataFrame:
    """σ_i(ΔW), i ≤ SPECTRUM_TOP, of every matrix module at ``steps``: from the engine's SVDs of this
    analysis (``fresh``), else from the spectra.csv of the last one for steps not analysed again
    (``redo``), else computed."""
    old = None
    if path.exists() and not force:
        try:
            old = pd.read_csv(path)
            old = old[old["step"].isin(steps) & ~old["step"].isin(redo | set(fresh))]
        except (OSError, ValueError, pd.errors.ParserError, KeyError):
            old = None
    have = set(old["step"].astype(int)) if old is not None else set()
    device = torch.device(config.device) if config.device else default_device()
    rows = [
        r for s in steps if s in fresh for module, sigma in fresh[s] for r in _spectrum_rows(s, module, sigma)
    ]
    have |= set(fresh)
    for step in (s for s in steps if s not in have):
        try:
            dfile = run.open_delta(step)
        except SpectraError:
            continue  # reported through metrics.csv
        with dfile:
            for module in dfile.modules:  # one module in memory at a time
                rows += _module_spectrum(run, dfile, step, module, device)
    fresh = pd.DataFrame(rows, columns=["step", "module", "layer", "proj", "i", "sigma"])
    parts = [t for t in (old, fresh) if t is not None and len(t)]
    if not parts:
        return fresh
    return pd.concat(parts, ignore_index=True).sort_values(["step", "module", "i"]).reset_index(drop=True)


def _module_spectrum(
    run: Run, dfile: Any, step: int, module: str, device: torch.device
) -> list[dict[str, Any]]:
    """Rows of spectra.csv for one module (none for vectors and for modules that metrics.csv reports)."""
    try:
        op = run.read_module(dfile, module)[0]
    except SpectraError:
        return []
    if isinstance(op, VectorDelta) or not op.is_finite():
        return []
    op = op.to(device).to(dtype=torch.float64)
    factors = op.factors()
    s = factored_svd(*factors).S if factors is not None else dense_svd(op.to_dense()).S
    return _spectrum_rows(step, module, s[:SPECTRUM_TOP].cpu().tolist())


def _spectrum_rows(step: int, module: str, sigma: list[float]) -> list[dict[str, Any]]:
    layer, proj = parse_module_name(module)
    return [
        {"step": step, "module": module, "layer": layer, "proj": proj, "i": i + 1, "sigma": v}
        for i, v in enumerate(sigma)
    ]


def summary_metrics(config: EngineConfig) -> list[str]:
    """The metric columns aggregated per step: the fixed ones and the k-dependent ones for every k."""
    names = list(SUMMARY_METRICS)
    for k in config.ks:
        names += [m.format(k=k) for m in K_METRICS if m.format(k=k) not in names]
    return names


def per_step(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per step, over analysed matrix modules: ``<metric>`` (median), ``<metric>_q25``, ``<metric>_q75``
    and ``<metric>_mean`` for each metric present, and ``modules`` (how many were analysed)."""
    ok = table[(table["status"] == "ok") & (table["kind"] != "vector")]
    present = [m for m in metrics if m in ok.columns and ok[m].notna().any()]
    g = ok.groupby("step")[present]
    parts = [
        g.median(), g.quantile(0.25).add_suffix("_q25"), g.quantile(0.75).add_suffix("_q75"),
        g.mean().add_suffix("_mean"), ok.groupby("step").size().rename("modules"),
    ]  # fmt: skip
    return pd.concat(parts, axis=1).copy().reset_index()  # copy: one block per dtype, cheap to extend


def summarize(run: Run, table: pd.DataFrame, config: EngineConfig, rule: CollapseRule) -> dict[str, Any]:
    """summary.json: configuration, engine options, per-step aggregates and the collapse flag."""
    metrics = summary_metrics(config)
    steps = per_step(table, metrics)
    collapse = detect_collapse(step_medians(table[table["status"] == "ok"]), run.rewards, rule)
    ok = table[(table["status"] == "ok") & (table["kind"] != "vector")]
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
    cfg = run.config
    return {
        "run": {k: cfg.get(k) for k in RUN_HEADER if k in cfg} | {"path": str(run.path)},
        "engine": engine_options(config),
        "collapse_rule": asdict(rule),
        "steps": entries,
        "collapsed_steps": [e["step"] for e in entries if e["collapsed"]],
        "problems": _problems(table),
    }


RUN_HEADER = (
    "name", "model", "method", "rank", "alpha", "dropout", "loss", "lr", "batch_size", "num_generations",
    "max_steps", "delta_every", "eval_every", "seed", "dataset", "precision",
)  # fmt: skip


def _num(v: Any) -> float | None:
    """A JSON-safe number: NaN and missing become null."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v
