"""The ΔW checkpoint callback and the JSONL loggers of a run.

:class:`DeltaRecorder` writes ``deltas/step_NNNNNN.h5`` at step 0, every ``every`` optimizer steps and at
the last step, on the main process only, each file atomically (:class:`spectra.RunWriter`). Its first
write also stores ``base/``: W0 of every adapted module read from the base checkpoint (copied into
``base/weights.h5`` up to a size limit, else a pointer to the safetensors files) and W0's reference
spectra (``base/spectra.h5``). It times itself, so the cost of recording can be compared with training.

:class:`MetricsLogger` appends every log of the trainer (TRL's reward, reward std, completion lengths,
clip ratios, entropy, KL when β > 0, …) to ``metrics.jsonl`` with its step, and the live geometry of
:mod:`spectra.train.monitor` (``geometry/...``) where it was measured.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.methods.base import Method
from torch import nn
from transformers import TrainerCallback

from spectra import RunWriter, load_run
from spectra.h5io import write_json

if TYPE_CHECKING:
    from spectra.train.live_checks import LiveChecks
    from spectra.train.monitor import CollapseAlarm, GeometryMonitor


class DeltaRecorder(TrainerCallback):
    """Record the exact ΔW of every adapted module at step 0, every ``every`` steps and at the end."""

    def __init__(
        self,
        writer: RunWriter,
        method: Method,
        model: nn.Module,
        base: BaseCheckpoint,
        every: int,
        base_copy_limit_mb: float = 512.0,
        spectra_device: str | None = None,
        resume: bool = False,
    ):
        self.writer, self.method, self.model, self.base = writer, method, model, base
        self.every = every
        self.base_copy_limit = base_copy_limit_mb * 2**20
        self.spectra_device = spectra_device
        self.resume = resume  # resuming: step 0 was recorded by the first session
        self.recorded: list[int] = []
        self.seconds = 0.0  # time spent recording (ΔW extraction + writing), base/ excluded
        self.base_seconds = 0.0  # time spent writing base/ (once per run)

    # -- base/
    def write_base(self) -> None:
        """Store W0 (or a pointer to it) and its reference spectra, unless base/ is already complete."""
        t0 = time.perf_counter()
        base_dir = self.writer.path / "base"
        if not ((base_dir / "weights.h5").exists() or (base_dir / "pointer.json").exists()):
            tensors = self.method.base_tensors(self.model)
            if self.base.nbytes([m for m, _ in tensors.values()]) <= self.base_copy_limit:
                self.writer.write_base_weights({k: self.base.get(m, p) for k, (m, p) in tensors.items()})
            else:
                names = {k: self.base.tensor_name(m, p) for k, (m, p) in tensors.items()}
                files = sorted({str(self.base.files[n]) for n in names.values()})
                self.writer.write_base_pointer(files, names)
        with load_run(self.writer.path) as run:
            run.ensure_base_spectra(device=self.spectra_device)
        self.base_seconds += time.perf_counter() - t0

    # -- deltas/
    def record(self, step: int) -> Path:
        t0 = time.perf_counter()
        delta = self.method.record(self.model, self.base)
        path = self.writer.write_delta(step, delta.modules, delta.shared)
        self.seconds += time.perf_counter() - t0
        self.recorded.append(step)
        return path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.write_base()
        if self.resume:  # the steps kept from before the interruption
            self.recorded = load_run(self.writer.path).steps
        else:
            self.record(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.every and state.global_step % self.every == 0:
            self.record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step not in self.recorded:
            self.record(state.global_step)


class MetricsLogger(TrainerCallback):
    """Append each training log (with its step) to ``metrics.jsonl``; non-finite numbers become null.

    The trainer's closing summary (runtime, samples per second) goes to ``train_summary.json`` instead,
    with the time spent recording ΔW beside it, and what the geometry monitor, the collapse alarm and the
    live checks (:mod:`spectra.train.live_checks`) record.
    """

    def __init__(
        self,
        writer: RunWriter,
        recorder: DeltaRecorder | None = None,
        monitor: GeometryMonitor | None = None,
        alarm: CollapseAlarm | None = None,
        checks: LiveChecks | None = None,
    ):
        self.writer = writer
        self.recorder = recorder
        self.monitor, self.alarm, self.checks = monitor, alarm, checks
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, object] = {"step": state.global_step}
        for k, v in logs.items():
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        if self.recorder is not None:
            row["record_s"] = round(self.recorder.seconds, 4)
        if self.monitor is not None:
            row["monitor_s"] = round(self.monitor.seconds, 4)
        if "train_runtime" in logs:
            if self.recorder is not None:
                row["base_s"] = round(self.recorder.base_seconds, 4)
                row["recorded_steps"] = list(self.recorder.recorded)
            for extra in (self.monitor, self.alarm, self.checks):
                if extra is not None:
                    row |= extra.summary()
            write_json(self.writer.path / "train_summary.json", row)
            return
        row["wall_s"] = round(time.perf_counter() - self.t0, 3)
        self.writer.append_metrics(row)


class ConsoleLog(TrainerCallback):
    """One short line per logged step on the console: step, reward, completion length, seconds."""

    def __init__(self, max_steps: int, banner: str = ""):
        from rich.console import Console

        self.console = Console(soft_wrap=True, highlight=False)
        self.max_steps = max_steps
        self.banner = banner

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.banner:
            self.console.print(self.banner, markup=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        length = logs.get("completions/mean_length", float("nan"))
        geometry = ""
        if "geometry/E_1" in logs:  # the live geometry (spectra.train.monitor), where it was measured
            erank = logs.get("geometry/erank", float("nan"))
            geometry = f"  E_1 {logs['geometry/E_1']:.2f}  erank {erank:.1f}"
        self.console.print(
            f"step {state.global_step:>5}/{self.max_steps}  reward {logs['reward']:.3f}  "
            f"len {length:.1f}  {logs.get('step_time', float('nan')):.2f} s/step{geometry}"
        )
