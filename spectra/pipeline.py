"""The one entry point of an analysis: :func:`analyze_run`, and the :class:`Run` that :func:`load_run` opens.

:func:`analyze_run` is the one way a run is analysed (``spectra analyze``, ``spectra compare``,
``Run.analyze``): it takes the steps the cache of ``analysis/`` cannot answer (:mod:`spectra.run`), has
them analysed (:mod:`spectra.schedule`: units read from the store in memory-bounded chunks, one ahead,
handed to the engine, spread over processes), puts old and new rows together, aggregates them
(:mod:`spectra.tables`), and returns an :class:`Analysis` in memory. With ``save=True`` it writes,
atomically:

- ``metrics.csv``: one row per step × module (step, module, layer, proj, kind, m, n, status, one column
  per metric of the registry, error);
- ``spectra.csv``: σ_i(ΔW) (the top ``SPECTRUM_TOP``) of every matrix module at the plotted steps;
- ``summary.json``: the run's configuration, the engine options, per-step aggregates over modules,
  the collapse flag with the rule that fired, the problems met, and the cache key.

Re-running reuses what is there: W0's reference spectra stay cached in ``base/``, and only steps absent
from ``metrics.csv`` (or whose file changed or could not be read last time) are analysed. Rows of steps
no longer in ``deltas/`` (after a resume truncated the run) are dropped. A change of engine options, of
the spectra version or of W0 recomputes all. Over several processes, rank 0 alone writes.

A ΔW passes the pipeline layer one way, :mod:`spectra.run` → :mod:`spectra.schedule` → this module, and
imports follow it: this module imports the two others, the schedule imports the run, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spectra import shard
from spectra.deltafile import DeltaFile
from spectra.engine import EngineConfig, Item, analyze_checkpoint
from spectra.errors import RunDirError, SpectraError, first_line
from spectra.metrics.collapse import CollapseRule
from spectra.names import parse_module_name
from spectra.operators import VectorDelta
from spectra.run import (
    ANALYSIS_DIR,
    Progress,
    RunInputs,
    cache_key,
    cached_table,
    engine_options,
    fingerprint,
    previous_fingerprints,
    write_analysis,
)
from spectra.schedule import SPECTRUM_TOP, Sigmas, analyze_steps, check_devices, processes
from spectra.store import RunStore
from spectra.tables import collapse_flags, problems, summarize

PLOTTED_STEPS = 4


class NothingToAnalyze(SpectraError):
    """The run has no delta file that could be analysed."""


class Run(RunInputs):
    """A run directory opened for analysis (:func:`load_run`): the store's reading, plus ΔW operators
    checked against W0, W0's reference spectra (computed once, cached in base/; :class:`RunInputs`),
    and the analysis."""

    def analyze(self, steps: list[int] | None = None, **engine_options: Any) -> pd.DataFrame:
        """Every metric for every recorded step and module: one row per step × module (nothing is
        written but W0's reference spectra). Keyword options are those of :class:`EngineConfig`.
        A shortcut for ``analyze_run(run, EngineConfig(**options), steps=steps, save=False).table``."""
        return analyze_run(self, EngineConfig(**engine_options), steps=steps, save=False).table

    def collapse(
        self, analysis: pd.DataFrame | None = None, rule: CollapseRule | None = None
    ) -> pd.DataFrame:
        """The rank-collapse flag per checkpoint (:func:`spectra.metrics.detect_collapse`), from
        ``analysis`` (or a fresh :meth:`analyze`) and the ``reward`` column of metrics.jsonl."""
        analysis = self.analyze() if analysis is None else analysis
        return collapse_flags(analysis, self.rewards, rule or _run_rule(self), self.eval)


def _run_rule(run: RunStore) -> CollapseRule:
    """The collapse rule of the run's own ``--collapse-*`` options (run.json), as the live alarm applied
    it; a threshold out of range is an error naming run.json."""
    try:
        return CollapseRule.from_config(run.config)
    except (TypeError, ValueError) as e:
        raise RunDirError(f"{run.path / 'run.json'}: {first_line(e)}") from None


def load_run(path: str | Path) -> Run:
    """Open a run directory: ``run.config``, ``run.steps``, ``run.modules``, ``run.delta(step, module)``,
    ``run.metrics`` / ``run.eval`` (pandas) and ``run.analyze()`` (one row per step × module)."""
    return Run(path)


@dataclass
class Analysis:
    """An analysed run, in memory (and, when saved, under ``run_dir/analysis``): the step × module table,
    per-step aggregates (``per_step``, with ``collapsed``), summary.json, the spectra of the plotted
    steps, and the run's logs."""

    run_dir: Path
    config: dict[str, Any]
    engine: EngineConfig
    rule: CollapseRule
    table: pd.DataFrame
    per_step: pd.DataFrame
    summary: dict[str, Any]
    spectra: pd.DataFrame
    logs: pd.DataFrame
    evals: pd.DataFrame
    new_steps: list[int] = field(default_factory=list)
    reused_steps: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.run_dir / ANALYSIS_DIR

    @property
    def name(self) -> str:
        return self.summary["run"].get("name") or self.run_dir.name


def analyze_run(
    run: Run | str | Path,
    config: EngineConfig | None = None,
    rule: CollapseRule | None = None,
    steps: list[int] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    save: bool = True,
    devices: str | Sequence[str] | None = None,
    prefetch: bool = True,
) -> Analysis:
    """Analyse a run: every metric of every recorded step (or ``steps``) × module.

    With ``save`` (``spectra analyze``), steps analysed before with the same options are reused from
    ``analysis/`` (unless ``force``) and the folder is rewritten (without plots; :mod:`spectra.report`
    draws them); without it, everything asked is computed and nothing is written but base spectra.
    ``progress(done, total, label)`` is called as modules are analysed. Raises :class:`RunDirError` for
    a directory that is not a run and :class:`NothingToAnalyze` when no step could be analysed.

    ``devices`` (``"cuda:0,cuda:1"``, ``["cpu", "cpu"]``) spreads the steps not in the cache over one
    process per device (:mod:`spectra.shard`; workers are started here, this process keeps the first
    device). A process started by ``torchrun``/``accelerate launch`` analyses its share on its own device
    (``config.device``, else ``cuda:LOCAL_RANK``) and gets every row; rank 0 alone writes ``analysis/``.
    (So under such a launcher every rank must call it: the ranks exchange the plan and the rows.)
    ``prefetch``: read the next chunk from disk while the engine analyses this one. ``rule``: the
    collapse rule (default: the run's own ``--collapse-*`` options from run.json, as the live alarm
    applied them; the default thresholds for runs that do not record them).
    """
    config = config or EngineConfig()
    devices = check_devices(shard.parse_devices(devices), config)
    launched = shard.launched(config.device)
    if launched is not None and len(devices) > 1:
        raise shard.ShardError(
            f"--devices {','.join(devices)}: this process was started by torchrun or accelerate launch, "
            "which already spread the work; leave --devices out"
        )
    run = run if isinstance(run, Run) else load_run(run)
    rule = rule or _run_rule(run)
    recorded = run.steps
    steps = recorded if steps is None else list(steps)
    if not steps:
        raise NothingToAnalyze(
            f"{run.path / 'deltas'}: no delta files yet; train the run first (spectra train) or wait "
            "for its first recorded step"
        )
    folder = run.path / ANALYSIS_DIR
    prints = {str(s): fingerprint(run, s) for s in steps}
    key = cache_key(run, config)
    old = cached_table(folder, key) if save and not force else None
    done: set[int] = set()
    if old is not None:
        retry = set(old.loc[~old["status"].isin(["ok", "nonfinite"]), "step"].astype(int))
        before = previous_fingerprints(folder)
        retry |= {s for s in steps if before.get(str(s)) != prints[str(s)]}  # rewritten since
        old = old[old["step"].isin(steps) & ~old["step"].isin(retry)]
        done = set(old["step"].astype(int))
    todo = [s for s in steps if s not in done]
    if launched is not None:  # rank 0's view of the cache decides for all
        todo = launched.broadcast(todo)
        done = set(steps) - set(todo)
        old = old[old["step"].isin(done)] if old is not None else None
    fresh, sigmas = pd.DataFrame(), {}
    if todo:
        with processes(launched, devices, run, config, prefetch) as group:
            on = replace(config, device=group.device) if group.device else config
            shown = progress if group.is_main else None
            fresh, sigmas = analyze_steps(run, todo, on, shown, prefetch, group)
    save = save and (launched is None or launched.is_main)
    parts = [t for t in (old, fresh) if t is not None and len(t)]
    if not parts:
        raise NothingToAnalyze(f"{run.path / 'deltas'}: the delta files hold no modules")
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    table = table.reindex(columns=_table_columns(config, table))
    for col in ("layer", "m", "n"):  # integers, also where a row has none (a file-level error)
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    table = table.sort_values(["step", "module"], na_position="first", kind="stable").reset_index(drop=True)
    found = problems(table)
    if not (table["status"] == "ok").any():
        raise NothingToAnalyze(
            f"{run.path}: nothing could be analysed ({len(found)} problem(s)); first: {found[0]}"
        )
    plotted = plotted_steps(table)
    spectra_path = folder / "spectra.csv"
    spectra = _spectra_at(
        run, plotted, spectra_path if save and not force else None, config, sigmas, set(todo)
    )
    engine = engine_options(config)
    rewards, log_problem = run.reward_log()  # an unreadable log gives no rewards: no verdict from them
    summary, per_step = summarize(
        run.config, str(run.path), table, config.ks, engine, rewards, rule, run.eval
    )
    if log_problem:
        found.append(log_problem)
        summary["problems"] = [*summary.get("problems", []), log_problem]
    if save:
        summary |= {"cache": key, "fingerprints": prints}
        write_analysis(folder, table, spectra, summary)
    return Analysis(
        run.path, run.config, config, rule, table, per_step, summary, spectra, run.metrics, run.eval,
        todo, sorted(done), found,
    )  # fmt: skip


def _table_columns(config: EngineConfig, table: pd.DataFrame) -> list[str]:
    cols = ["step", "module", "layer", "proj", "kind", "m", "n", "status", *config.columns(), "error"]
    return cols + [c for c in table.columns if c not in cols]


def plotted_steps(table: pd.DataFrame, count: int = PLOTTED_STEPS) -> list[int]:
    """Up to ``count`` analysed steps spread over training (step 0, where ΔW is zero, left out unless
    it is all there is), always including the last."""
    steps = sorted(set(table.loc[table["status"] == "ok", "step"].astype(int)))
    nonzero = [s for s in steps if s > 0] or steps
    if len(nonzero) <= count:
        return nonzero
    idx = np.linspace(0, len(nonzero) - 1, count).round().astype(int)
    return [nonzero[i] for i in sorted(set(idx.tolist()))]


def _spectra_at(
    run: Run, steps: list[int], cached: Path | None, config: EngineConfig, fresh: Sigmas, redo: set[int]
) -> pd.DataFrame:
    """σ_i(ΔW), i ≤ SPECTRUM_TOP, of every matrix module at ``steps``: from the engine's SVDs of this
    analysis (``fresh``), else from the ``cached`` spectra.csv of the last one for steps not analysed
    again (``redo``), else computed (the engine's σ stage only)."""
    old = None
    if cached is not None and cached.exists():
        try:
            old = pd.read_csv(cached)
            old = old[old["step"].isin(steps) & ~old["step"].isin(redo | set(fresh))]
        except (OSError, ValueError, pd.errors.ParserError, KeyError):
            old = None
    have = set(old["step"].astype(int)) if old is not None else set()
    rows = [
        r for s in steps if s in fresh for module, sigma in fresh[s] for r in _spectrum_rows(s, module, sigma)
    ]
    have |= set(fresh)
    for step in (s for s in steps if s not in have):  # plotted now, analysed before: σ only
        try:
            dfile = run.open_delta(step)
        except SpectraError:
            continue  # reported through metrics.csv
        with dfile:
            for module in dfile.modules:  # one module in memory at a time
                rows += _module_spectrum(run, dfile, step, module, config)
    new = pd.DataFrame(rows, columns=["step", "module", "layer", "proj", "i", "sigma"])
    parts = [t for t in (old, new) if t is not None and len(t)]
    if not parts:
        return new
    return pd.concat(parts, ignore_index=True).sort_values(["step", "module", "i"]).reset_index(drop=True)


def _module_spectrum(
    run: Run, dfile: DeltaFile, step: int, module: str, config: EngineConfig
) -> list[dict[str, Any]]:
    """Rows of spectra.csv for one module, from the engine's σ stage alone (none for vectors and for
    modules that metrics.csv reports as problems)."""
    try:
        op, w0 = run.read_module(dfile, module)
    except SpectraError:
        return []
    if isinstance(op, VectorDelta) or not op.is_finite():
        return []
    sigma_only = EngineConfig(**{**asdict(config), "wt": "none", "bf16": False, "metrics": ("fro_norm",)})
    item = Item(module, op, w0, run.base_spectrum(module, config.keep))
    row = analyze_checkpoint([item], sigma_only, SPECTRUM_TOP)[0]
    return _spectrum_rows(step, module, row["spectrum"]) if "spectrum" in row else []


def _spectrum_rows(step: int, module: str, sigma: list[float]) -> list[dict[str, Any]]:
    layer, proj = parse_module_name(module)
    return [
        {"step": step, "module": module, "layer": layer, "proj": proj, "i": i + 1, "sigma": v}
        for i, v in enumerate(sigma)
    ]
