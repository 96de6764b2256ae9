"""Live ΔW geometry during training, and the rank-collapse alarm (``--monitor-every``, ``--on-collapse``).

:class:`GeometryMonitor` (a Trainer callback) measures, every ``--monitor-every`` optimizer steps, the
geometry of the current update of every adapted module from the weights in memory: no file is read or
written per step, nothing is copied off the training device. It asks the method for its operators with
:meth:`~spectra.train.methods.base.Method.live_delta` (the ΔW rule of ``record``, declared once, without
copies) and hands them to the analysis core's engine (:func:`spectra.engine.analyze_checkpoint`, batched
by shape, on the training device) with the metrics of :data:`METRICS`: relative size, E_1, E_k,
effective rank, stable rank and ρ_k against W0's top singular vectors, for the engine's k (1, 8, 32). W0's
σ and top vectors come from ``base/spectra.h5`` (:meth:`spectra.run.RunInputs.base_spectrum`, written by
the ΔW recorder when training begins), loaded onto the device once, at the first measured step. The
numbers are those ``spectra analyze`` gives for the same step (tests/test_monitor.py).

Which modules:

- factored updates (LoRA family, PiSSA/MiLoRA, AdaLoRA, VeRA: ``LowRank``): every module, always. Their
  σ(ΔW) comes from QR of the thin factors and an r×r SVD; a step costs a few ms on the organism;
- dense updates (full, DoRA, MiSS, QuanTA, IA3): a fixed sample of at most ``--monitor-modules`` modules
  (:func:`sample_modules`: an equal share per projection kind, layers spread evenly from first to last;
  all modules when there are no more). Each sampled module's metrics are exact (the core's float64
  Gram/eigh SVD of the dense ΔW); the medians are over the sample, so on a model with more modules than
  the sample they estimate the medians over all modules (per projection kind: over the sampled layers).
  Full fine-tuning needs W0 to form W_t − W0: the monitor reads W0 of the sampled modules from the
  checkpoint once and keeps it on the device (:class:`HeldBase`); MiSS does the same; DoRA and IA3 use
  the base layers' own weights (W0, in memory); QuanTA needs no W0;
- vector updates (LayerNorm tuning) have no matrix geometry: nothing is measured.

The medians over modules (``geometry/<metric>``) and per projection kind (``geometry/<proj>/<metric>``),
with ``geometry/modules`` (how many were measured), join the trainer's log of that step (the monitor asks
for a log there): they reach ``metrics.jsonl``, the console line and every ``--report-to`` integration.
The monitor runs inside :class:`~spectra.train.callback.SpectraCallback`, which puts itself first in the
trainer's callback list (transformers calls the reporting callbacks — TensorBoard, W&B, … — before those
given to the trainer, and every ``on_log`` receives the same ``logs`` dict), so that the geometry is in
the logs before the reporting callbacks and spectra's own read them.

:class:`CollapseAlarm` applies the collapse verdict (:mod:`spectra.metrics.collapse`, constants from
``--collapse-*``) online: at each measured step, on the reward logged so far (full windows of
``--collapse-window`` steps, a fall beyond ``--collapse-z`` standard errors and, with
``--collapse-reward-floor``, most of the way to the floor; held-out accuracy is for ``spectra analyze``).
It fires at the first measured step at or after the fall, so the geometry there (rank-normalised E_1,
effective rank, relative size) is the onset's, and names its signature (``concentrated``, or ``large``
against the fixed reference a run alone has, or ``neither``). The first time it fires it writes a
``{"event": "collapse", ...}`` row to ``metrics.jsonl`` and prints one line; with ``--on-collapse stop``
it also ends training there: the trainer saves a checkpoint at that step, the ΔW recorder records the
final step, and ``train_summary.json`` holds ``collapse_step``, ``collapse_onset``, ``collapse_reason``
and ``collapse_signature``. With ``--collapse-e1`` (the former concentration test, off by default) it
also gives one early warning (``{"event": "collapse_warning"}``) the first time the median E_1 reaches
it; a warning never stops a run.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.methods.base import Method
from torch import Tensor, nn
from transformers import TrainerCallback

from spectra import RunWriter, load_run
from spectra.base import BaseSpectrum
from spectra.engine import EngineConfig, Item, analyze_checkpoint
from spectra.errors import first_line
from spectra.metrics.collapse import (
    INPUTS,
    CollapseRule,
    early_warning,
    performance_verdict,
    reward_falls,
    signature,
)
from spectra.names import parse_module_name
from spectra.operators import DeltaOperator, LowRank
from spectra.store import read_jsonl

#: The registry metrics the monitor computes: those of σ(ΔW) and of ΔW's alignment with W0's top vectors.
METRICS = ("relative_size", "E_1", "E_1_norm", "update_rank", "E_{k}", "erank", "stable_rank", "rho_{k}")
PREFIX = "geometry/"


def sample_modules(names: list[str], limit: int) -> list[str]:
    """A fixed sample of at most ``limit`` of ``names`` (0: all), in their order: every projection kind
    gets an equal share (±1, more where a kind has fewer modules than its share), its layers spread
    evenly from the first to the last."""
    if limit <= 0 or len(names) <= limit:
        return list(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(parse_module_name(name)[1], []).append(name)
    quota = dict.fromkeys(groups, 0)
    left = limit
    while left:
        for kind, group in groups.items():
            if left and quota[kind] < len(group):
                quota[kind] += 1
                left -= 1
    chosen = {
        group[i]
        for kind, group in groups.items()
        for i in np.linspace(0, len(group) - 1, quota[kind]).round().astype(int)
    }
    return [n for n in names if n in chosen]


class HeldBase:
    """W0 for the records whose rule reads it (full fine-tuning, MiSS): read from the checkpoint the
    first time a module asks, then held on the training device (BaseCheckpoint's ``get``, in memory)."""

    def __init__(self, base: BaseCheckpoint, device: torch.device):
        self.base, self.device = base, device
        self.held: dict[tuple[str, str], Tensor] = {}

    def get(self, module: str, param: str = "weight") -> Tensor:
        key = (module, param)
        if key not in self.held:
            self.held[key] = self.base.get(module, param).to(self.device)
        return self.held[key]

    def keep_only(self, modules: Collection[str]) -> None:
        self.held = {k: v for k, v in self.held.items() if k[0] in modules}


class GeometryMonitor(TrainerCallback):
    """Every ``every`` optimizer steps, the medians of :data:`METRICS` over the adapted modules' current
    ΔW, added to the trainer's log of that step (module docstring)."""

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        base: BaseCheckpoint,
        run_dir: Path,
        every: int,
        dense_modules: int = 32,
    ):
        self.method, self.model, self.base, self.run_dir = method, model, base, Path(run_dir)
        self.every, self.dense_modules = every, dense_modules
        self.modules: list[str] | None = None  # measured modules (set up at the first measured step)
        self.factored = False
        self.spectra: dict[str, BaseSpectrum] = {}
        self.held: HeldBase | None = None
        self.config: EngineConfig | None = None
        self.pending: dict[str, float] | None = None  # measured, not yet logged
        self.failed = False  # a measurement raised: measure no more (the log schedule stays)
        self.measured: list[int] = []
        self.seconds = 0.0  # time spent measuring (ΔW operators + engine), set-up excluded
        self.setup_seconds = 0.0  # the first step's set-up: W0's spectra (and held W0) onto the device

    # -- set-up, once
    def setup(self) -> None:
        """Choose the modules, load W0's spectra (σ and top vectors) onto the training device."""
        t0 = time.perf_counter()
        trained = [p for p in self.model.parameters() if p.requires_grad]
        device = (trained or list(self.model.parameters()))[0].device
        self.held = HeldBase(self.base, device)
        self.config = EngineConfig(
            metrics=METRICS, wt="none", bf16=False, base_keep=max(EngineConfig().ks), device=str(device)
        )
        names = self.method.modules(self.model)
        probe = self.method.live_delta(self.model, self.held, names[:1]).modules if names else {}
        form = next(iter(probe.values()), None)
        if not isinstance(form, DeltaOperator):  # vector updates (LayerNorm tuning): no geometry
            self.modules = []
        else:
            self.factored = isinstance(form, LowRank)
            self.modules = names if self.factored else sample_modules(names, self.dense_modules)
        self.held.keep_only(self.modules)
        keep = self.config.keep
        if not self.modules:
            return
        with load_run(self.run_dir) as run:
            for name in self.modules:
                s = run.base_spectrum(name, keep)  # σ(W0) and the top vectors: all that METRICS read
                top = BaseSpectrum(s.sigma, s.U, s.V, s.U_minor[..., :0], s.V_minor[..., :0])
                self.spectra[name] = top.to(device)
        self.setup_seconds += time.perf_counter() - t0

    # -- one measurement
    def measure(self) -> dict[str, float]:
        """The ``geometry/...`` medians of the current ΔW (over modules, and per projection kind)."""
        if self.modules is None:
            self.setup()
        assert self.config is not None and self.modules is not None
        if not self.modules:
            return {}
        t0 = time.perf_counter()
        with _threads(1 if self.config.torch_device().type == "cpu" else None):
            delta = self.method.live_delta(self.model, self.held, None if self.factored else self.modules)
            items = [  # W0 itself is not read: with wt="none" and no bf16 the engine needs W0's spectrum only
                Item(name, op, _shape_only(op.shape), self.spectra[name])
                for name, op in delta.modules.items()
                if isinstance(op, DeltaOperator) and name in self.spectra
            ]
            rows = analyze_checkpoint(items, self.config)
        ok = [(it.module, row) for it, row in zip(items, rows, strict=True) if row["status"] == "ok"]
        columns = self.config.columns()
        values = np.array([[row.get(c, np.nan) for c in columns] for _, row in ok], dtype=float)
        values = values.reshape(len(ok), len(columns))
        out: dict[str, float] = {f"{PREFIX}modules": float(len(ok))}
        out |= _medians(values, columns, PREFIX)
        kinds = np.array([parse_module_name(module)[1] for module, _ in ok])
        for proj in dict.fromkeys(kinds.tolist()):
            out |= _medians(values[kinds == proj], columns, f"{PREFIX}{proj}/")
        self.seconds += time.perf_counter() - t0
        return out

    # -- callback
    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every:
            return
        # every process logs at the monitor's steps: the trainer's logging gathers the loss over processes
        # (a collective), so asking for a log on the main process only would hang or mismatch under DDP
        control.should_log = True
        if not state.is_world_process_zero or self.failed:
            return
        try:
            self.pending = self.measure()
        except Exception as e:  # a measurement must not end a run: say so once and measure no more
            self.failed = True
            warnings.warn(
                f"spectra train: the live geometry failed at step {state.global_step} and is off for the "
                f"rest of the run ({type(e).__name__}: {first_line(e)}); ΔW is still recorded",
                stacklevel=1,
            )
            return
        self.measured.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None and "train_runtime" not in logs:
            logs.update(self.pending)
            self.pending = None

    def summary(self) -> dict[str, Any]:
        """What ``train_summary.json`` records of the monitor."""
        return {
            "monitor_s": round(self.seconds, 4),
            "monitor_setup_s": round(self.setup_seconds, 4),
            "monitored_steps": list(self.measured),
            "monitored_modules": len(self.modules or []),
        }


@functools.cache
def _shape_only(shape: tuple[int, ...]) -> Tensor:
    return torch.empty(shape, device="meta")


def _medians(values: np.ndarray, columns: list[str], prefix: str) -> dict[str, float]:
    """``prefix + column`` → median over the rows of ``values`` (NaN skipped, as pandas' median does
    for metrics.csv; a column without a value is left out)."""
    out = {}
    for j, col in enumerate(columns):
        present = values[:, j][~np.isnan(values[:, j])]
        if len(present):
            out[prefix + col] = float(np.median(present))
    return out


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block (None: unchanged). The monitor's batched
    factorisations of small matrices gain nothing from threads, and on a loaded CPU the threads' waits
    cost far more than the work (a (4, 256, 32) QR: 85 ms with 2 threads, 0.5 ms with 1)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CollapseAlarm(TrainerCallback):
    """The collapse rule, evaluated at every measured step on the monitor's medians and the reward
    logged so far, from the first full reward window on (module docstring). ``action``: "warn" or
    "stop"."""

    def __init__(
        self,
        writer: RunWriter,
        rule: CollapseRule,
        action: str = "warn",
        resume: bool = False,
        every: int = 1,
    ):
        from rich.console import Console

        self.writer, self.rule, self.action, self.resume = writer, rule, action, resume
        self.every = every  # the monitor's interval: only its steps can fire
        self.console = Console(soft_wrap=True, highlight=False)
        self.rewards: list[tuple[int, float]] = []
        self.collapse: dict[str, Any] | None = None  # the first collapse: step, reason, …
        self.warning: dict[str, Any] | None = None  # the first early warning
        self.stopped = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.resume and state.is_world_process_zero):
            return
        logged = read_jsonl(self.writer.path / "metrics.jsonl")  # kept rows of the resumed run
        for row in logged.to_dict("records"):
            if row.get("event") == "collapse" and self.collapse is None:
                self.collapse = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
            elif row.get("event") == "collapse_warning" and self.warning is None:
                self.warning = {k: v for k, v in row.items() if isinstance(v, (str, int, float))}
            elif _finite(row.get("reward")):
                self.rewards.append((int(row["step"]), float(row["reward"])))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs:
            return
        fired = self.observe(state.global_step, logs) if state.is_world_process_zero else None
        if state.global_step % self.every:
            return
        if _from_main(fired) and self.action == "stop":  # every process stops at the same step
            self.stopped = True
            control.should_save = True  # a checkpoint at this step; the recorder records the final ΔW
            control.should_training_stop = True

    def observe(self, step: int, logs: dict[str, Any]) -> dict[str, Any] | None:
        """Take one log; the collapse event when the verdict first says collapsed at a measured step
        (the first monitored step at or after the fall: its geometry is the onset's)."""
        if _finite(logs.get("reward")):
            self.rewards.append((step, float(logs["reward"])))
        medians = {col: logs.get(f"{PREFIX}{metric}") for col, metric in INPUTS.items()}
        medians = {col: float(v) if _finite(v) else None for col, v in medians.items()}
        if medians["e1_median"] is None and medians["size_median"] is None:
            return None  # not a measured step
        self._warn_early(step, medians)
        if self.collapse is not None or len(self.rewards) < self.rule.reward_window:
            return None  # fired already; the reward's first window is not complete
        rewards = pd.DataFrame(self.rewards, columns=["step", "reward"])
        verdict = performance_verdict(rewards, None, self.rule)
        if not verdict.collapsed:
            return None
        onset = {"step": step, **medians}
        name, why = signature(onset, None, self.rule)
        falls = reward_falls(rewards, self.rule)
        self.collapse = {
            "step": step, "event": "collapse", "action": self.action, "reason": verdict.reason,
            "onset": verdict.step, "signature": name, "signature_reason": why, **medians,
            "reward_smoothed": _or_none(falls["mean"].iloc[-1]),
            "reward_peak": _or_none(falls["peak"].iloc[-1]),
        }  # fmt: skip
        self.writer.append_metrics(self.collapse)
        then = (
            f"stopping (--on-collapse stop): a checkpoint and ΔW are saved at step {step}"
            if self.action == "stop"
            else "training goes on (--on-collapse warn)"
        )
        line = (f"spectra train: collapsed at step {step} (from step {verdict.step}: {verdict.reason}); "
                f"signature {name} ({why}); {then}")  # fmt: skip
        self.console.print(line, markup=False)
        return self.collapse

    def _warn_early(self, step: int, medians: dict[str, float | None]) -> None:
        """The early warning (``--collapse-e1``, ``--collapse-erank``): one line and one
        ``{"event": "collapse_warning"}`` row the first time the concentration test holds; never a stop."""
        if self.warning is not None or self.collapse is not None or not early_warning(medians, self.rule):
            return
        self.warning = {"step": step, "event": "collapse_warning", "e1_median": medians["e1_median"],
                        "erank_median": medians["erank_median"]}  # fmt: skip
        self.writer.append_metrics(self.warning)
        self.console.print(
            f"spectra train: early warning at step {step}: median E_1 {medians['e1_median']:.2f} ≥ "
            f"{self.rule.e1_min:g} (--collapse-e1); no collapse (the reward has not fallen)",
            markup=False,
        )

    def summary(self) -> dict[str, Any]:
        """What ``train_summary.json`` records of the alarm."""
        c = self.collapse or {}
        return {
            "collapse_step": c.get("step"),
            "collapse_reason": c.get("reason"),
            "collapse_onset": c.get("onset"),
            "collapse_signature": c.get("signature"),
            "collapse_warning_step": (self.warning or {}).get("step"),
            "stopped_on_collapse": self.stopped,
            "collapse_rule": {**asdict(self.rule), "action": self.action},
        }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _or_none(v: Any) -> float | None:
    return float(v) if _finite(v) else None


def _from_main(value: Any) -> Any:
    """``value`` as the main process has it, on every process (the decision to stop must be shared)."""
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def collapse_rule(cfg: Any) -> CollapseRule:
    """The rule of a :class:`~spectra.train.config.TrainConfig`'s ``--collapse-*`` options."""
    return CollapseRule.from_config(asdict(cfg))
