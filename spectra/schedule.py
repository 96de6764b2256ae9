"""The schedule of an analysis: the steps cut into units, shared over processes, and read one unit ahead.

A unit is a chunk of same-shape matrices of one step within the engine's memory budget, or a step's
vector parameters (:class:`Unit`). :func:`analyze_steps` plans the units of the steps asked from the files'
declared shapes without reading a tensor (:func:`_plan`), gives each process a consecutive share of equal
cost (:func:`_share`: whole steps of a run of many steps, chunks of modules of a single step), and has
each unit read, then analysed by the engine (:mod:`spectra.engine`). With ``prefetch``, the next unit is
read on another thread while the engine analyses this one (into pinned memory for a GPU), so that at
most two units' tensors are in host memory whatever the number of modules. Anything that goes wrong
with one file or module becomes a row with ``status`` and ``error`` naming it; the rest is analysed.

Over several processes (:mod:`spectra.shard`: torchrun, ``accelerate launch``, or workers started here
for ``devices``: :func:`processes`), rank 0 computes W0's spectra and plans, each rank analyses its share,
and every rank gets all the rows.

Imports :mod:`spectra.run` (the run the units are read from); in the core, only :mod:`spectra.pipeline`
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra import shard
from spectra.deltafile import DeltaFile
from spectra.engine import EngineConfig, EngineConfigError, Item, analyze_checkpoint, item_bytes, plan_chunks
from spectra.errors import ShapeMismatchError, SpectraError, first_line
from spectra.metrics import registry
from spectra.names import parse_module_name
from spectra.operators import VectorDelta
from spectra.run import Progress, RunInputs

#: How many of each matrix module's top singular values of ΔW the engine returns (spectra.csv).
SPECTRUM_TOP = 64

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


def analyze_steps(
    run: RunInputs,
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


def _plan(run: RunInputs, steps: list[int], config: EngineConfig) -> tuple[list[Unit], list[dict[str, Any]]]:
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
    run: RunInputs,
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

    def __init__(self, run: RunInputs, keep: int, pin: bool):
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
    run: RunInputs, dfile: DeltaFile, step: int, modules: list[str], keep: int
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


def _vector_row(run: RunInputs, dfile: DeltaFile, step: int, module: str) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------- several processes


def check_devices(devices: list[str], config: EngineConfig) -> list[str]:
    """Each of ``--devices`` checked as the engine's ``--device`` is (one line naming the option)."""
    for d in devices:
        try:
            replace(config, device=d)
        except EngineConfigError as e:
            raise shard.ShardError(f"--devices {','.join(devices)}: {e}") from None
    return devices


@contextmanager
def processes(
    launched: shard.Group | None, devices: list[str], run: RunInputs, config: EngineConfig, prefetch: bool
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
        analyze_steps(RunInputs(run_path), None, on, None, prefetch, group)
