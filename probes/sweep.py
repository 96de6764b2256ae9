"""``spectra sweep``: a grid of ordinary runs, resumable, one cell per GPU; ``spectra demo`` is one.

A sweep is a union of *grids*. The options given with several values form the main grid (their product;
``--zip rank,alpha`` makes options vary together instead: rank 1, 16 with alpha 2, 32 is two cells);
each ``--also`` grid (``method=quanta,dora batch_size=4,8``) adds its own product. Options given with one
value apply to every cell unless a grid sets them. Each cell is a :class:`TrainConfig` trained into the
run directory ``OUT/<cell>``, named from the values that vary over the sweep, method first and then in
the order of ``spectra train --help`` (``lora-r64-b128-s0``; abbreviations in :data:`ABBREVIATIONS`).

Before anything runs, every cell's configuration is resolved and checked (a value an option cannot take
is a one-line error naming the option and the value), and every cell directory that exists is compared
with its cell: one trained with another configuration is refused, never written over. Then a cell that
finished (``train_summary.json``) is reused, one that was interrupted is resumed, and the others are
trained. A cell that fails is recorded with its error and the sweep goes on; Ctrl-C stops it, every
finished cell intact (the next run of the same command resumes). ``OUT/sweep.json`` holds the plan and
each cell's state (:func:`cell_states`).

Where GPUs are given (or visible) each cell runs as its own process, one cell per GPU (group) at a time
(:mod:`spectra.probes.sweep_processes`). On the CPU, cells run one after another in this process.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from spectra.train.config import TrainConfig

from spectra.errors import SpectraError, first_line
from spectra.h5io import write_json

#: How a varying option is written in a cell's name: ``r64`` for rank 64; an option not listed is written
#: as its field name and value (``epsilon0.2``); an empty abbreviation writes the value alone (``dapo``).
ABBREVIATIONS = {
    "rank": "r", "batch_size": "b", "seed": "s", "alpha": "a", "lr": "lr", "quanta_d": "d",
    "num_generations": "g", "max_steps": "steps", "dropout": "drop", "model": "", "loss": "",
    "dataset": "",
}  # fmt: skip
STATE_FILE = "sweep.json"
LOGS = "logs"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Preset:
    """A prepared sweep (``spectra sweep --preset NAME``): its grid, further grids and heatmap axes."""

    grid: dict[str, tuple]
    also: tuple[dict[str, tuple], ...] = ()
    zipped: tuple[tuple[str, ...], ...] = ()
    axes: tuple[str, ...] = ("rank", "batch_size")


#: The prepared sweeps. ``organism``: LoRA over ranks 1–128 with α = 2r (a constant scale α/r = 2: the
#: update per step grows with the rank) at batch sizes 4 and 8, DoRA r16 and QuanTA d3 for contrast, 20
#: steps at the organism's lr 1e-3: 14 cells, 170 s on 2 cores. It shows a cliff between ranks 16 and
#: 64; with α fixed at 64 the organism has none (README, "Sweeps"; benchmarks/RESULTS.md, findings).
PRESETS = {
    "organism": Preset(
        grid={
            "method": ("lora",), "rank": (1, 4, 16, 64, 128), "alpha": (2.0, 8.0, 32.0, 128.0, 256.0),
            "batch_size": (4, 8), "max_steps": (20,), "eval_every": (20,),
        },
        also=({"method": ("dora",), "rank": (16,), "alpha": (32.0,), "batch_size": (4, 8)},
              {"method": ("quanta",), "batch_size": (4, 8)}),
        zipped=(("rank", "alpha"),),
    ),
}  # fmt: skip


class SweepError(SpectraError):
    """A sweep cannot be run as asked (a cell directory holds another run, names collide, no GPU…)."""


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its name, the values the grids gave it, and its (unresolved) config."""

    name: str
    values: dict[str, Any]
    config: TrainConfig
    group: str  # the name without the seed: cells of one group differ only by seed

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out) / self.name


@dataclass
class Sweep:
    """The plan of a sweep (:func:`plan_sweep`)."""

    out: Path
    base: dict[str, Any]
    grids: list[dict[str, tuple]]
    cells: list[Cell]
    varying: list[str]
    processes_per_cell: int = 1
    zipped: list[list[str]] = field(default_factory=list)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell → status, error, wall_s

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "grids": [{k: list(v) for k, v in g.items()} for g in self.grids],
            "varying": self.varying,
            "zipped": self.zipped,
            "processes_per_cell": self.processes_per_cell,
            "cells": [
                {"name": c.name, "group": c.group, "values": c.values, **self.states.get(c.name, {})}
                for c in self.cells
            ],
        }

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / STATE_FILE, self.to_json())


# ------------------------------------------------------------------------------------------------ plan


def plan_sweep(
    out: str | Path,
    grid: Mapping[str, Sequence[Any]],
    also: Sequence[Mapping[str, Sequence[Any]]] = (),
    processes_per_cell: int = 1,
    zipped: Sequence[Sequence[str]] = (),
) -> Sweep:
    """The cells of a sweep, each configuration resolved and checked (:class:`TrainConfigError` names the
    option and value a cell cannot take). ``grid``: field → values (one value: every cell); ``also``:
    further grids over the same single values; ``zipped``: groups of options that vary together (their
    i-th values in one cell, ``rank`` 1, 16 with ``alpha`` 2, 32) wherever a grid gives them all. An
    ``also`` grid that gives no seeds takes the main grid's (``--seed 0,1,2`` replicates every cell)."""
    out = Path(out)
    base = {k: v[0] for k, v in grid.items() if len(v) == 1}
    main = {k: tuple(v) for k, v in grid.items() if len(v) > 1}
    # seeds are replicates, not a configuration: an --also grid without its own takes the main grid's
    seeds = {"seed": main["seed"]} if "seed" in main else {}
    products = [main, *({**seeds, **{k: tuple(v) for k, v in a.items()}} for a in also)]
    for group in zipped:
        missing = [k for k in group if k not in grid and not any(k in a for a in also)]
        if missing:
            raise SweepError(f"--zip {','.join(group)}: {', '.join(missing)} given no values")
    assigned: list[dict[str, Any]] = []
    for product in products:
        for combo in _combinations(product, zipped):
            values = {**base, **combo}
            if values not in assigned:
                assigned.append(values)
    for reserved in ("out", "name"):
        if any(reserved in a for a in assigned):
            raise SweepError(f"--{reserved}: set by the sweep (cells are OUT/<cell>); not a grid option")
    configs = [TrainConfig(**a, out=str(out)) for a in assigned]
    varying = _varying(configs)
    cells, seen = [], {}
    for values, cfg in zip(assigned, configs, strict=True):
        name = cell_name(cfg, varying)
        if name in seen:
            raise SweepError(
                f"cells {seen[name]} and {values} would both be {out / name}; give values that differ in "
                "their names"
            )
        seen[name] = values
        cfg = replace(cfg, name=name)
        cfg.resolve(num_processes=processes_per_cell)  # every value checked before anything runs
        group = cell_name(cfg, [f for f in varying if f != "seed"])
        cells.append(Cell(name, {k: getattr(cfg, k) for k in varying}, cfg, group))
    return Sweep(out, base, [g for g in products if g], cells, varying, processes_per_cell,
                 [list(g) for g in zipped])  # fmt: skip


def _combinations(product: dict[str, tuple], zipped: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values; a zipped group is one axis of its options' i-th values."""
    axes: list[tuple[tuple[str, ...], list[tuple]]] = []  # (options, values of each along the axis)
    done: set[str] = set()
    for key in product:
        if key in done:
            continue
        group = next((tuple(g) for g in zipped if key in g and all(k in product for k in g)), (key,))
        lengths = {len(product[k]) for k in group}
        if len(lengths) > 1:
            given = ", ".join(f"{k} {len(product[k])}" for k in group)
            raise SweepError(f"--zip {','.join(group)}: zipped options need as many values each ({given})")
        axes.append((group, list(zip(*(product[k] for k in group), strict=True))))
        done |= set(group)
    cells = []
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = (zip(keys, values, strict=True) for (keys, _), values in zip(axes, combo, strict=True))
        cells.append({k: v for pair in pairs for k, v in pair})
    return cells


def demo_sweep(
    out: str | Path,
    methods: Sequence[str],
    model: str = "organism",
    max_steps: int | None = None,
    seed: int = 0,
) -> Sweep:
    """``spectra demo``'s sweep: one cell per method (``OUT/<method>``), each with its preset values."""
    from spectra.train.config import method_names

    known = method_names()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise SweepError(
            f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose among "
            + ", ".join(known)
        )
    grid: dict[str, tuple] = {"method": tuple(dict.fromkeys(methods)), "model": (model,), "seed": (seed,)}
    if max_steps is not None:
        grid["max_steps"] = (max_steps,)
    return plan_sweep(out, grid)


def _varying(configs: Sequence[TrainConfig]) -> list[str]:
    """The fields whose values differ between cells, method first, then in TrainConfig's order."""
    names = [f.name for f in fields(TrainConfig) if f.name not in ("out", "name", "resolved")]
    differ = [n for n in names if len({repr(getattr(c, n)) for c in configs}) > 1]
    return sorted(differ, key=lambda n: n != "method")


def cell_name(cfg: TrainConfig, varying: Sequence[str]) -> str:
    """``<method>-<abbr><value>-…`` over the varying fields (the method always first; rank and alpha left
    out for a method they do not size, ``quanta-b4``)."""
    from spectra.train.methods import get_method

    skip = {"method"} | (set() if get_method(cfg.method).uses_rank else {"rank", "alpha"})
    return "-".join([cfg.method, *(ABBREVIATIONS.get(f, f) + _text(getattr(cfg, f)) for f in varying
                                   if f not in skip)])  # fmt: skip


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, tuple):
        text = "+".join(map(str, value))
    elif value is None:
        text = "default"
    else:
        text = str(value)
        if "/" in text or os.sep in text:
            text = Path(text.rstrip("/" + os.sep)).name or text  # a path: its last part
    return re.sub(r"[^A-Za-z0-9.@+_=]", "_", text)


# ---------------------------------------------------------------------------------------- cell states


def finished(run_dir: Path) -> bool:
    """Whether a run trained to its end (the trainer writes train_summary.json last)."""
    return (run_dir / "train_summary.json").exists()


def check_cells(sweep: Sweep) -> dict[str, str]:
    """Each cell's state on disk: ``finished``, ``interrupted`` (run.json without train_summary.json) or
    ``new``. A cell directory holding a run of another configuration is a :class:`SweepError`."""
    from spectra.train.methods import get_method

    states = {}
    for cell in sweep.cells:
        run_json = cell.run_dir / "run.json"
        if not run_json.exists():
            states[cell.name] = "new"
            continue
        try:
            stored = json.loads(run_json.read_text())
        except (OSError, ValueError) as e:
            raise SweepError(f"{run_json}: unreadable ({first_line(e)}); move that run away") from None
        asked = cell.config.resolve(num_processes=sweep.processes_per_cell)
        want = asked.to_dict()
        want["target_modules"] = list(get_method(asked.method).targets(asked))
        differ = [k for k, v in want.items() if k not in ("out", "name") and k in stored and stored[k] != v]
        if differ:
            was = ", ".join(f"{k} {stored[k]}" for k in differ)
            now = ", ".join(f"{k} {want[k]}" for k in differ)
            raise SweepError(
                f"{cell.run_dir} holds a run trained with {was}, not as asked now ({now}); use another "
                "--out or delete that run"
            )
        states[cell.name] = "finished" if finished(cell.run_dir) else "interrupted"
    return states


def load_sweep(out: str | Path) -> dict[str, Any]:
    """``OUT/sweep.json`` as written by :meth:`Sweep.save` (a :class:`SweepError` when absent)."""
    path = Path(out) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no sweep here; run `spectra sweep --out {out} …` first") from None
    except ValueError as e:
        raise SweepError(f"{path}: not valid JSON ({first_line(e)})") from None


def _previous_states(out: Path) -> dict[str, dict[str, Any]]:
    try:
        old = load_sweep(out)
    except SweepError:
        return {}
    keep = ("status", "error", "wall_s")
    return {c["name"]: {k: c[k] for k in keep if k in c} for c in old.get("cells", [])}


# ------------------------------------------------------------------------------------------------- run


def run_sweep(sweep: Sweep, gpus: Sequence[str] | None = None, log: Log = print) -> dict[str, dict[str, Any]]:
    """Train every cell that is not finished (see the module docstring); returns each cell's state
    (``status``: finished, failed, interrupted; ``error``; ``wall_s``), also saved in ``OUT/sweep.json``.

    ``gpus``: run each cell as its own process on these GPUs (groups of ``processes_per_cell``); None:
    one after another in this process. A KeyboardInterrupt is re-raised once the state is saved."""
    on_disk = check_cells(sweep)
    before = _previous_states(sweep.out)
    sweep.states = {c.name: before.get(c.name, {}) for c in sweep.cells}
    todo = []
    for cell in sweep.cells:
        if on_disk[cell.name] == "finished":
            log(f"{cell.name}: already trained in {cell.run_dir}, reused")
            sweep.states[cell.name] |= {"status": "finished", "error": None}
        else:
            todo.append(cell)
    sweep.save()
    if gpus is None and sweep.processes_per_cell == 1:
        for i, cell in enumerate(todo):
            _run_here(sweep, cell, on_disk[cell.name] == "interrupted", f"[{i + 1}/{len(todo)}]", log)
    else:
        from spectra.probes.sweep_processes import gpu_slots, run_processes

        slots = gpu_slots(list(gpus or []), sweep.processes_per_cell) if gpus else [[]]
        run_processes(sweep, todo, {c.name: on_disk[c.name] == "interrupted" for c in todo}, slots, log)
    return sweep.states


def _run_here(sweep: Sweep, cell: Cell, resume: bool, counter: str, log: Log) -> None:
    from spectra.train.trainer import train

    log(f"{counter} {cell.name}: " + ("resuming the interrupted run" if resume else "training"))
    state = sweep.states[cell.name]
    t0 = time.perf_counter()
    try:
        train(cell.config, resume=resume)
        state |= {"status": "finished", "error": None}
    except KeyboardInterrupt:
        state |= {"status": "interrupted", "error": None}
        raise
    except Exception as e:
        if os.environ.get("SPECTRA_DEBUG"):
            raise
        error = str(e) if isinstance(e, SpectraError) else f"{type(e).__name__}: {first_line(e)}"
        state |= {"status": "failed", "error": error}
        log(f"{cell.name}: failed: {error}; the sweep goes on")
    finally:
        state["wall_s"] = round(state.get("wall_s", 0.0) + time.perf_counter() - t0, 1)
        sweep.save()
