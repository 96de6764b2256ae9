"""The cells of a sweep in processes of their own, one per GPU (group) at a time (``spectra sweep
--gpus``): each cell is ``spectra train …`` (:func:`cell_command`; through ``accelerate launch`` for
``--processes-per-cell`` > 1, with a port per GPU group so that cells side by side do not collide), with
``CUDA_VISIBLE_DEVICES`` set to its GPUs and its console in ``OUT/logs/<cell>.log``. The parent records
each cell's end in ``OUT/sweep.json``; a failed cell's error is the last ``error:`` line of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spectra.probes.sweep import LOGS, Cell, Log, Sweep, SweepError, finished

#: First port of the processes of multi-process cells (one port per GPU group).
BASE_PORT = 29500


def visible_gpus() -> list[str]:
    """The GPUs this process sees: ``CUDA_VISIBLE_DEVICES``'s entries, else 0 … n − 1 (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: Sequence[str], processes_per_cell: int) -> list[list[str]]:
    """The GPUs split into groups of ``processes_per_cell``: one cell runs on each group at a time."""
    if len(gpus) < processes_per_cell:
        raise SweepError(
            f"--processes-per-cell {processes_per_cell}: only {len(gpus)} GPU(s) given ({','.join(gpus)})"
        )
    n = len(gpus) // processes_per_cell
    return [list(gpus[i * processes_per_cell : (i + 1) * processes_per_cell]) for i in range(n)]


def cell_command(cell: Cell, resume: bool, processes_per_cell: int = 1, port: int = BASE_PORT) -> list[str]:
    """The command that trains ``cell`` in its own process: ``spectra train …`` (``accelerate launch``
    with ``processes_per_cell`` processes when more than one)."""
    from spectra.cli.options import to_args

    train = ["train", *to_args(cell.config), *(["--resume"] if resume else [])]
    if processes_per_cell > 1:
        # --multi_gpu: accelerate's torchrun launcher, N processes with or without GPUs (gloo on a CPU);
        # without it accelerate starts one process unless it sees several GPUs or a config says so
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes_per_cell), "--main_process_port", str(port)]  # fmt: skip
        return [*launch, "-m", "spectra.cli.main", *train]
    return [sys.executable, "-m", "spectra.cli.main", *train]


def run_processes(
    sweep: Sweep, todo: list[Cell], resume: dict[str, bool], slots: list[list[str]], log: Log
) -> None:
    """One process per cell, one cell per slot at a time; the parent records each cell's end."""
    logs = sweep.out / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    queue = list(todo)
    running: dict[int, tuple[Cell, subprocess.Popen, float, Any]] = {}  # slot → cell, process, start, log
    try:
        while queue or running:
            for slot in [s for s in range(len(slots)) if s not in running]:
                if not queue:
                    break
                cell = queue.pop(0)
                cmd = cell_command(cell, resume[cell.name], sweep.processes_per_cell, BASE_PORT + slot)
                env = dict(os.environ)
                if slots[slot]:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(slots[slot])
                handle = open(logs / f"{cell.name}.log", "a")  # closed when the cell ends
                handle.write(f"$ {' '.join(cmd)}\n")
                handle.flush()
                # its own session: a terminal's Ctrl-C reaches the parent only, which then sends each cell one
                # SIGINT (a second one would make torchrun/accelerate kill their workers mid-checkpoint)
                proc = subprocess.Popen(
                    cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
                where = f"GPU {','.join(slots[slot])}" if slots[slot] else "its own process"
                log(f"{cell.name}: training on {where} (log: {logs / (cell.name + '.log')})")
                running[slot] = (cell, proc, time.perf_counter(), handle)
            time.sleep(0.5)
            for slot, (cell, proc, t0, handle) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del running[slot]
                _record_process(sweep, cell, proc.returncode, time.perf_counter() - t0, log)
    except KeyboardInterrupt:
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for cell, proc, t0, handle in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
            state = sweep.states[cell.name]
            state |= {"status": "finished" if finished(cell.run_dir) else "interrupted", "error": None}
            state["wall_s"] = round(state.get("wall_s", 0.0) + time.perf_counter() - t0, 1)
        sweep.save()
        raise


def _record_process(sweep: Sweep, cell: Cell, returncode: int, seconds: float, log: Log) -> None:
    state = sweep.states[cell.name]
    state["wall_s"] = round(state.get("wall_s", 0.0) + seconds, 1)
    if returncode == 0 and finished(cell.run_dir):
        state |= {"status": "finished", "error": None}
        log(f"{cell.name}: finished in {seconds:.0f} s")
    else:
        error = _last_error(sweep.out / LOGS / f"{cell.name}.log") or f"exit status {returncode}"
        state |= {"status": "failed", "error": error}
        log(f"{cell.name}: failed: {error}; the sweep goes on")
    sweep.save()


def _last_error(log_file: Path) -> str | None:
    """The last ``error:`` line of a cell's log (``spectra train`` prints its one-line error so), else
    the last line."""
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":")[0]]
    return (errors or lines or [None])[-1]
