"""Where files meet compute: a run's reference spectra, its analysis, and the ``analysis/`` folder.

:func:`analyze_run` is the one way a run is analysed (``spectra analyze``, ``spectra compare``,
``Run.analyze``): it reads each recorded step's modules from the store in memory-bounded chunks, hands
them to the engine (:mod:`spectra.engine`), and with ``save=True`` writes, atomically:

- ``metrics.csv``: one row per step × module (step, module, layer, proj, kind, m, n, status, one column
  per metric of the registry, error);
- ``spectra.csv``: σ_i(ΔW) (the top ``SPECTRUM_TOP``) of every matrix module at the plotted steps;
- ``summary.json``: the run's configuration, the engine options, per-step aggregates over modules,
  the collapse flag with the rule that fired, the problems met, and the cache key.

Re-running reuses what is there: W0's reference spectra stay cached in ``base/``, and only steps absent
from ``metrics.csv`` (or whose file changed or could not be read last time) are analysed. Rows of steps
no longer in ``deltas/`` (after a resume truncated the run) are dropped. A change of engine options, of
the spectra version or of W0 recomputes all. Anything that goes wrong with one file or module becomes a
row with ``status`` and ``error`` naming it; the rest is analysed.

The steps to analyse are planned as units (a chunk of same-shape modules within the engine's memory
budget, or a step's vector parameters). The next unit is read on another thread while the engine
analyses this one (``prefetch``; into pinned memory for a GPU), so that at most two units' tensors are
in host memory whatever the number of modules. Over several processes (:mod:`spectra.shard`: torchrun,
``accelerate launch`` or ``devices=[...]``), rank 0 plans, each rank analyses a consecutive share of
the units (whole steps, or chunks of one step), every rank gets all rows, and rank 0 alone writes.

(Over 400 lines: the cache, the streaming and the sharding share the row format and the one entry
point; apart they would be three modules importing each other's internals.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra import shard
from spectra.base import DEFAULT_KEEP, BaseSpectrum, compute_base_spectrum
from spectra.engine import EngineConfig, EngineConfigError, Item, analyze_checkpoint, item_bytes, plan_chunks
from spectra.errors import DeltaFileError, RunDirError, ShapeMismatchError, SpectraError, first_line
from spectra.h5io import atomic_path, remove_stale_temporaries, write_json
from spectra.metrics import registry
from spectra.metrics.collapse import CollapseRule
from spectra.names import parse_module_name
from spectra.operators import Record, VectorDelta, from_stored
from spectra.store import DeltaFile, RunStore
from spectra.tables import collapse_flags, problems, summarize
from spectra.writer import RunWriter

ANALYSIS_DIR = "analysis"
SPECTRUM_TOP = 64
PLOTTED_STEPS = 4
#: Bumped when base/spectra.h5 must be recomputed (2: float64 singular vectors).
BASE_SPECTRA_PRECISION = "float64"

Progress = Callable[[int, int, str], None]


class NothingToAnalyze(SpectraError):
    """The run has no delta file that could be analysed."""


class Run(RunStore):
    """A run directory opened for analysis (:func:`load_run`): the store's reading, plus ΔW operators
    checked against W0, W0's reference spectra (computed once, cached in base/), and the analysis."""

    _checked_keep: int = -1  # the largest keep ensure_base_spectra has checked base/spectra.h5 for

    # -- updates
    def read_module(self, d: DeltaFile, module: str) -> tuple[Record, Tensor]:
        """``(ΔW operator, W0)`` of ``module`` from an open delta file, checked against W0's shape."""
        info = d.info(module)
        w0 = self.w0(module)
        if tuple(w0.shape) != info.shape:
            raise ShapeMismatchError(
                f"{d.path}: module {module!r} has ΔW of shape {info.shape} but W0 is "
                f"{tuple(w0.shape)}; the run's base/ does not match its deltas"
            )
        rec = d.read(module)
        try:
            op = from_stored(rec, w0 if info.needs_w0 else None)
        except (ValueError, TypeError, RuntimeError) as e:
            raise DeltaFileError(f"{d.path}: module {module!r} is damaged: {first_line(e)}") from None
        if tuple(op.shape) != info.shape:
            raise DeltaFileError(
                f"{d.path}: module {module!r} declares shape {info.shape} "
                f"but its datasets make {tuple(op.shape)}"
            )
        return op, w0

    def delta(self, step: int, module: str) -> Record:
        """ΔW of ``module`` at ``step`` as an operator, checked against W0's shape."""
        with self.open_delta(step) as d:
            return self.read_module(d, module)[0]

    def deltas(self, step: int) -> Iterator[tuple[str, Record]]:
        """Stream ``(module, operator)`` pairs of one step, one module in memory at a time."""
        with self.open_delta(step) as d:
            for module in d.modules:
                yield module, self.read_module(d, module)[0]

    # -- base spectra
    def ensure_base_spectra(
        self,
        keep: int | None = None,
        device: torch.device | str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Compute σ(W0) and the kept singular vectors (float64) of every matrix module once and write
        base/spectra.h5. Does nothing if the file exists for the same W0 and keeps at least ``keep``
        vectors (any number when ``keep`` is None; a new file keeps ``DEFAULT_KEEP``)."""
        path = self.base_spectra_path
        attrs = self.base_spectra_attrs()
        source = json.dumps(self.base_fingerprint(), sort_keys=True)
        if attrs is not None:
            enough = keep is None or int(attrs.get("keep", 0)) >= keep
            same = attrs.get("source") in (None, source) and attrs.get("precision") == BASE_SPECTRA_PRECISION
            if enough and same:
                return path
        self.close_base_spectra()
        keep = DEFAULT_KEEP if keep is None else keep
        dev = EngineConfig(device=str(device) if device is not None else None).torch_device()
        modules = self.modules

        def spectra() -> Iterator[tuple[str, tuple[int, ...], dict[str, Tensor]]]:
            for i, module in enumerate(modules, 1):
                w0 = self.w0(module)
                if w0.ndim == 2:  # vector parameters (LayerNorm tuning) have no spectrum
                    spec = compute_base_spectrum(w0.to(dev), keep)
                    yield module, tuple(w0.shape), {k: t.cpu() for k, t in asdict(spec).items()}
                if progress:
                    progress(i, len(modules), "base spectra (once per run)")

        attrs = {"keep": keep, "source": source, "precision": BASE_SPECTRA_PRECISION}
        path = RunWriter(self.path).write_base_spectra(spectra(), attrs)
        self._checked_keep = keep
        return path

    def base_spectrum(self, module: str, keep: int | None = None) -> BaseSpectrum:
        """W0's reference spectrum (computed and cached in base/spectra.h5 on first use); with ``keep``,
        at most that many top and bottom vector pairs, whatever the cache holds."""
        if keep is None or keep > self._checked_keep:  # checked once per Run (and per larger keep)
            self.ensure_base_spectra(keep)
            self._checked_keep = max(self._checked_keep, keep or 0)
        spec = BaseSpectrum(**self.read_base_spectrum(module))
        return spec if keep is None else spec.truncate(keep)

    # -- analysis
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
    devices = _check_devices(shard.parse_devices(devices), config)
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
    old = _cached_table(folder, key) if save and not force else None
    done: set[int] = set()
    if old is not None:
        retry = set(old.loc[~old["status"].isin(["ok", "nonfinite"]), "step"].astype(int))
        before = _previous_fingerprints(folder)
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
        with _shards(launched, devices, run, config, prefetch) as group:
            on = replace(config, device=group.device) if group.device else config
            shown = progress if group.is_main else None
            fresh, sigmas = _analyze_steps(run, todo, on, shown, prefetch, group)
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
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)
        (folder / "summary.json").unlink(missing_ok=True)  # the cache key goes last: never a stale pair
        _write_csv(table, folder / "metrics.csv")
        _write_csv(spectra, spectra_path)
        write_json(folder / "summary.json", summary)
    return Analysis(
        run.path, run.config, config, rule, table, per_step, summary, spectra, run.metrics, run.eval,
        todo, sorted(done), found,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- several processes


def _check_devices(devices: list[str], config: EngineConfig) -> list[str]:
    """Each of ``--devices`` checked as the engine's ``--device`` is (one line naming the option)."""
    for d in devices:
        try:
            replace(config, device=d)
        except EngineConfigError as e:
            raise shard.ShardError(f"--devices {','.join(devices)}: {e}") from None
    return devices


@contextmanager
def _shards(
    launched: shard.Group | None, devices: list[str], run: Run, config: EngineConfig, prefetch: bool
) -> Iterator[shard.Group]:
    """The processes the analysis runs on: the launcher's, workers started for ``devices``, or this one."""
    if launched is not None:
        yield launched
    elif len(devices) > 1:
        with shard.spawned(devices, _worker, (str(run.path), asdict(config), prefetch)) as group:
            yield group
    else:
        yield shard.Group(device=devices[0] if devices else None)


def _worker(
    index: int, store: str, world: int, devices: list[str], threads: int,
    run_path: str, config: dict[str, Any], prefetch: bool,
) -> None:  # fmt: skip
    """A worker of :func:`shard.spawned`: rank ``index + 1``'s share of the plan rank 0 broadcasts."""
    with shard.join_spawned(index + 1, store, world, devices, threads) as group:
        on = replace(EngineConfig(**config), device=group.device)
        _analyze_steps(load_run(run_path), None, on, None, prefetch, group)


# ---------------------------------------------------------------------------------- steps → engine rows


Sigmas = dict[int, list[tuple[str, list[float]]]]  # step → [(module, top σ_i(ΔW))]


class Unit(NamedTuple):
    """One piece of work: modules of one step read and analysed together, a chunk of same-shape
    matrices within the memory budget or a step's vector parameters (``cost``: working bytes)."""

    step: int
    modules: list[str]
    matrix: bool
    cost: int


class _Loaded(NamedTuple):
    """A unit as read: the engine's items, rows already settled (problems, vectors), the file's path."""

    items: list[Item]
    rows: list[dict[str, Any]]
    path: Path | None


def _analyze_steps(
    run: Run,
    steps: list[int] | None,
    config: EngineConfig,
    progress: Progress | None,
    prefetch: bool = True,
    group: shard.Group = shard.ONE,
) -> tuple[pd.DataFrame, Sigmas]:
    """Rows of ``steps``, streamed chunk by chunk, and the top σ_i(ΔW) of each analysed matrix module.

    Over several processes (``group``), rank 0 computes W0's spectra and plans the chunks (the other
    ranks pass ``steps=None``), each rank analyses its share, and every rank gets all the rows."""
    if group.is_main:
        run.ensure_base_spectra(keep=config.keep, device=config.device, progress=progress)
    group.barrier()
    units, rows = group.broadcast(_plan(run, steps or [], config) if group.is_main else None)
    units = [Unit(*u) for u in units]
    mine = _run_units(run, _share(units, group.rank, group.world), config, progress, prefetch, group)
    rows = list(rows) + [r for part in group.all_gather(mine) for r in part]
    sigmas: Sigmas = {}
    for r in rows:
        spectrum = r.pop("spectrum", None)
        if r["status"] == "ok" and spectrum is not None:
            sigmas.setdefault(r["step"], []).append((r["module"], spectrum))
    return pd.DataFrame(rows), sigmas


def _plan(run: Run, steps: list[int], config: EngineConfig) -> tuple[list[Unit], list[dict[str, Any]]]:
    """The units of ``steps`` in order (from the files' declared shapes, no tensor read), and the rows
    of what cannot be analysed (a file or a module's metadata unreadable, a module missing from a step's
    file)."""
    units: list[Unit] = []
    rows: list[dict[str, Any]] = []
    for step in steps:
        try:
            dfile = run.open_delta(step)
        except SpectraError as e:
            rows.append(_status_row(step, None, "unreadable", str(e)))
            continue
        with dfile:
            for module, why in run.missing_modules(step, dfile):  # a gap is a row, not a smaller step
                rows.append(_status_row(step, module, "missing", why))
            groups: dict[tuple[Any, ...], list[str]] = {}
            for module in dfile.modules:
                try:
                    info = dfile.info(module)
                except SpectraError as e:
                    rows.append(_status_row(step, module, "unreadable", str(e)))
                    continue
                groups.setdefault((info.shape, info.matrix, info.rank), []).append(module)
        for (shape, matrix, rank), modules in groups.items():
            if not matrix:
                units.append(Unit(step, modules, False, max(1, 8 * sum(shape) * len(modules))))
                continue
            size = item_bytes(shape, rank, config)
            for idx in plan_chunks([size] * len(modules), config.max_batch_bytes):
                units.append(Unit(step, [modules[i] for i in idx], True, size * len(idx)))
    return units, rows


def _share(units: list[Unit], rank: int, world: int) -> list[Unit]:
    """Rank ``rank``'s consecutive run of units, the runs of equal cost (to within one unit): whole steps
    of a run of many steps, chunks of modules of a single step."""
    if world == 1:
        return units
    total = sum(u.cost for u in units) or 1
    mine, before = [], 0
    for u in units:
        if min(world - 1, int((before + u.cost / 2) * world / total)) == rank:
            mine.append(u)
        before += u.cost
    return mine


def _run_units(
    run: Run,
    units: list[Unit],
    config: EngineConfig,
    progress: Progress | None,
    prefetch: bool,
    group: shard.Group,
) -> list[dict[str, Any]]:
    """Rows of ``units``: each read (on another thread, one unit ahead, with ``prefetch``), then
    analysed by the engine."""
    reader = _Reader(run, config.keep, pin=config.torch_device().type == "cuda")
    loads = _prefetched(reader.read, units) if prefetch else (reader.read(u) for u in units)
    rows: list[dict[str, Any]] = []
    total, done = sum(len(u.modules) for u in units), 0
    where = f" (process {group.rank + 1} of {group.world})" if group.world > 1 else ""
    try:
        for unit, loaded in zip(units, loads, strict=True):
            group.check()
            rows += loaded.rows
            if loaded.items:
                rows += _analyze_items(unit.step, loaded, config)
            done += len(unit.modules)
            if progress and unit.matrix:
                progress(done, total, f"step {unit.step}{where}")
    finally:
        loads.close()  # no read left running on the other thread
        reader.close()
    return rows


def _prefetched(read: Callable[[Unit], _Loaded], units: list[Unit]) -> Iterator[_Loaded]:
    """``read(unit)`` for each unit in turn, the next one read on another thread while the caller
    analyses this one (h5py reads and checksums partly outside the GIL; torch computes outside it)."""
    if not units:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="spectra-read") as pool:
        pending: Future[_Loaded] = pool.submit(read, units[0])
        try:
            for nxt in [*units[1:], None]:
                loaded = pending.result()
                if nxt is not None:
                    pending = pool.submit(read, nxt)
                yield loaded
        finally:
            pending.cancel()


class _Reader:
    """Reads units from their delta files, one file open at a time; with ``pin``, into pinned host
    memory (the engine's copies to the GPU then run at full speed)."""

    def __init__(self, run: Run, keep: int, pin: bool):
        self.run, self.keep, self.pin = run, keep, pin
        self._file: DeltaFile | None = None

    def read(self, unit: Unit) -> _Loaded:
        try:
            dfile = self._open(unit.step)
        except SpectraError as e:  # readable when planned, not now (rewritten meanwhile)
            return _Loaded([], [_status_row(unit.step, m, "unreadable", str(e)) for m in unit.modules], None)
        if not unit.matrix:
            return _Loaded([], [_vector_row(self.run, dfile, unit.step, m) for m in unit.modules], dfile.path)
        items, rows = _read_items(self.run, dfile, unit.step, unit.modules, self.keep)
        if self.pin:
            items = [Item(it.module, _pinned(it.op), it.w0.pin_memory(), _pinned(it.base)) for it in items]
        return _Loaded(items, rows, dfile.path)

    def _open(self, step: int) -> DeltaFile:
        if self._file is None or self._file.step != step:
            self.close()
            self._file = self.run.open_delta(step)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _pinned(obj: Any) -> Any:
    """The same dataclass (operator, base spectrum) with its tensors in pinned host memory."""
    tensors = {f.name: getattr(obj, f.name) for f in fields(obj)}
    return replace(obj, **{k: t.pin_memory() for k, t in tensors.items() if isinstance(t, Tensor)})


def _read_items(
    run: Run, dfile: DeltaFile, step: int, modules: list[str], keep: int
) -> tuple[list[Item], list[dict[str, Any]]]:
    """The engine's items of ``modules``, and a row for each module that cannot be analysed."""
    items: list[Item] = []
    rows: list[dict[str, Any]] = []
    for module in modules:
        try:
            op, w0 = run.read_module(dfile, module)
            if not op.is_finite():
                rows.append(_status_row(step, module, "nonfinite", f"{dfile.path}: ΔW contains NaN or Inf"))
                continue
            items.append(Item(module, op, w0, run.base_spectrum(module, keep)))
        except ShapeMismatchError as e:
            rows.append(_status_row(step, module, "shape_mismatch", str(e)))
        except SpectraError as e:
            rows.append(_status_row(step, module, "unreadable", str(e)))
        except Exception as e:  # anything else a damaged file can raise: named, and the rest goes on
            rows.append(
                _status_row(step, module, "unreadable", f"{dfile.path}: {type(e).__name__}: {first_line(e)}")
            )
    return items, rows


def _analyze_items(step: int, loaded: _Loaded, config: EngineConfig) -> list[dict[str, Any]]:
    """The engine's rows of a unit's items, with the module's identity and the file named in errors."""
    rows = []
    for it, metrics in zip(loaded.items, analyze_checkpoint(loaded.items, config, SPECTRUM_TOP), strict=True):
        m, n = it.op.shape[-2:]
        if metrics["status"] != "ok":
            metrics["error"] = f"{loaded.path}: {metrics['error']}"
        rows.append({**_identity(step, it.module), "kind": it.op.codec.kind, "m": m, "n": n, **metrics})
    return rows


def _vector_row(run: Run, dfile: DeltaFile, step: int, module: str) -> dict[str, Any]:
    """A vector parameter's row: the registry's vector metrics (norms) of Δθ against θ0."""
    try:
        rec, theta0 = run.read_module(dfile, module)
    except SpectraError as e:
        return _status_row(step, module, "unreadable", str(e))
    assert isinstance(rec, VectorDelta)
    if not rec.is_finite():
        return _status_row(step, module, "nonfinite", f"{dfile.path}: Δθ contains NaN or Inf")
    norms = _VectorNorms(rec.delta, theta0)
    values = {name: float(registry.METRICS[name].compute(norms, 0)) for name in registry.vector_columns()}
    ident = {**_identity(step, module), "kind": "vector", "m": rec.delta.shape[0], "n": 1}
    return {**ident, "status": "ok", **values}


class _VectorNorms:
    """A vector seen as an n×1 matrix: its one singular value is its norm."""

    def __init__(self, delta: Tensor, theta0: Tensor):
        self.sigma = torch.linalg.vector_norm(delta.to(torch.float64)).reshape(1)
        self.base_sigma = torch.linalg.vector_norm(theta0.to(torch.float64)).reshape(1)


def _identity(step: int, module: str | None) -> dict[str, Any]:
    layer, proj = parse_module_name(module) if module else (None, None)
    return {"step": step, "module": module, "layer": layer, "proj": proj}


def _status_row(step: int, module: str | None, status: str, error: str) -> dict[str, Any]:
    return {**_identity(step, module), "status": status, "error": error, "fro_norm": np.nan}


def _table_columns(config: EngineConfig, table: pd.DataFrame) -> list[str]:
    cols = ["step", "module", "layer", "proj", "kind", "m", "n", "status", *config.columns(), "error"]
    return cols + [c for c in table.columns if c not in cols]


# ------------------------------------------------------------------------------------ the cache of analysis/


def engine_options(config: EngineConfig) -> dict[str, Any]:
    """The options that change the numbers (the device and batch budget do not)."""
    opts = asdict(config)
    for k in ("device", "max_batch_bytes", "eigh_streams"):
        opts.pop(k)
    opts["ks"] = list(opts["ks"])
    if opts["metrics"] is not None:
        opts["metrics"] = list(opts["metrics"])
    return opts


def fingerprint(run: RunStore, step: int) -> list[int] | None:
    """Size and modification time of a step's delta file: a file rewritten at the same step (after a
    resume) is analysed again. None when there is no single readable file for it."""
    try:
        st = run.delta_path(step).stat()
    except (SpectraError, OSError):
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_key(run: RunStore, config: EngineConfig) -> dict[str, Any]:
    """What metrics.csv depends on besides the delta files: the engine options that change the numbers,
    the spectra version (formulas), and W0 (:meth:`spectra.store.RunStore.base_fingerprint`)."""
    from spectra import __version__

    return {"engine": engine_options(config), "spectra": __version__, "base": run.base_fingerprint()}


def _previous_fingerprints(folder: Path) -> dict[str, Any]:
    try:
        prints = json.loads((folder / "summary.json").read_text()).get("fingerprints", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return prints if isinstance(prints, dict) else {}


def _cached_table(folder: Path, key: dict[str, Any]) -> pd.DataFrame | None:
    """metrics.csv from an earlier analysis with the same :func:`cache_key`, else None."""
    csv, summary = folder / "metrics.csv", folder / "summary.json"
    if not csv.exists() or not summary.exists():
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
