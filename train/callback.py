"""``SpectraCallback``: spectra's recorder, live geometry, collapse alarm and live checks as one Trainer
callback, for any ``transformers.Trainer`` subclass (TRL's GRPO/RLOO/SFT/DPO trainers, a plain Trainer).

>>> trainer.add_callback(SpectraCallback(out="runs", name="my-run", delta_every=50, monitor_every=10))
... # doctest: +SKIP

At ``on_train_begin`` it reads the model it is given: the method from the PEFT configuration
(:func:`find_method`: tuner type, ``use_dora``, ``use_rslora``, ``init_lora_weights``; no PEFT: full
fine-tuning of the trainable linear projections), W0 from the base checkpoint (the model's
``name_or_path``, or ``base=``) exactly as ``spectra train`` reads it
(:class:`~spectra.train.checkpoint.BaseCheckpoint`), and for residual-initialised LoRA (PiSSA, OLoRA,
CorDA) the initial factors B0, A0. Anything it cannot read is one line (:class:`CallbackError`) before
any step runs and before anything is written. Then it writes the run directory ``out/name`` as
``spectra train`` does: ``run.json`` (what it could read: model, method, rank, alpha, targets, the trainer
and its arguments), ``base/``, ``deltas/`` (:class:`~spectra.train.recorder.DeltaRecorder`),
``metrics.jsonl`` (:class:`~spectra.train.recorder.MetricsLogger`), the live geometry joined to the
trainer's own logs (:class:`~spectra.train.monitor.GeometryMonitor`; the callback moves itself first in
the trainer's list so that reporters see it), the collapse alarm
(:class:`~spectra.train.monitor.CollapseAlarm`) and the live checks of :mod:`spectra.train.live_checks`.

``spectra train`` is this callback on TRL's GRPO trainer: :func:`spectra.train.trainer.prepare` builds it
with the method and base it resolved (:meth:`SpectraCallback.attach`) and writes run.json itself.

Several processes (DDP, gloo or NCCL): only the main process writes; every process takes part in the
log schedule. DeepSpeed ZeRO-3 shards parameters: around every read of the weights (the step-0 snapshot,
each record, each measurement, the checks) all processes gather them (:func:`gathered`, with
``deepspeed.zero.GatheredParameters``; only when deepspeed is importable and the model has ZeRO-3
parameters). ZeRO-2 shards optimizer states only: the parameters are whole on every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spectra.train.checkpoint import BaseCheckpoint, find_model_dir
from spectra.train.config import ON_COLLAPSE
from spectra.train.live_checks import LiveChecks
from spectra.train.methods.base import Method
from spectra.train.monitor import CollapseAlarm, GeometryMonitor
from spectra.train.recorder import DeltaRecorder, MetricsLogger
from torch import nn
from transformers import TrainerCallback

from spectra import RunWriter
from spectra.errors import SpectraError, first_line
from spectra.metrics.collapse import CollapseRule
from spectra.names import PROJECTIONS

#: PEFT tuners spectra records, and how a LoRA's ``init_lora_weights`` maps to its ΔW rule.
SUPPORTED = (
    "LORA (LoRA, rsLoRA, DoRA, PiSSA, OLoRA, CorDA), ADALORA, VERA, IA3, LN_TUNING, MISS, spectra's QuanTA, "
    "or full fine-tuning (no PEFT)"
)
_RESIDUAL_INITS = ("pissa", "olora", "corda")  # the base becomes W0 − s·B0·A0: ΔW = s·(B·A − B0·A0)
_PEFT_TUNERS = {"ADALORA": "adalora", "VERA": "vera", "IA3": "ia3", "LN_TUNING": "lntuning", "MISS": "miss"}


class CallbackError(SpectraError):
    """SpectraCallback was given a model or an option it cannot record."""


@dataclasses.dataclass
class Found:
    """What :func:`find_method` read off a model."""

    method: Method  # the registered method whose ΔW rule records it
    name: str  # what the model is (``olora`` is recorded by PiSSA's rule)
    config: dict[str, Any]  # rank, alpha, targets, … as the model's configuration has them


def find_method(model: nn.Module) -> Found:
    """The registered method of ``model`` (module docstring), or a one-line :class:`CallbackError`."""
    from spectra.train.methods import get_method

    if not any(p.requires_grad for p in model.parameters()):
        raise CallbackError(
            f"SpectraCallback: the model ({type(model).__name__}) has no trainable parameters; expected "
            f"an adapter or a model to fine-tune: {SUPPORTED}"
        )
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        return _peft_method(model, peft_config)
    from spectra.train.methods.quanta import quanta_modules

    if quanta_modules(model):
        return Found(get_method("quanta"), "quanta", {})
    full = get_method("full")
    trainable = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and not n.endswith("lm_head")
    }
    targets = [t for t in PROJECTIONS if t in trainable] or sorted(trainable)
    if not targets:
        raise CallbackError(
            f"SpectraCallback: the model ({type(model).__name__}) has trainable parameters but no trainable "
            f"linear layer and no PEFT adapter; expected {SUPPORTED}"
        )
    model.spectra_targets = tuple(targets)  # Full.modules reads them
    return Found(full, "full", {"target_modules": targets})


def _peft_method(model: nn.Module, configs: dict[str, Any]) -> Found:
    from spectra.train.methods import get_method
    from spectra.train.methods.base import ADAPTER

    active = getattr(model, "active_adapter", ADAPTER)
    others = [a for a in configs if a != ADAPTER]  # e.g. the frozen "ref" copy TRL's DPOTrainer adds
    trained = sorted(
        {a for n, p in model.named_parameters() for a in others if p.requires_grad and f".{a}." in n}
    )
    if ADAPTER not in configs or active != ADAPTER or trained:
        raise CallbackError(
            f"SpectraCallback: the PEFT model has adapters {sorted(configs)} (active: {active!r}, trained: "
            f"{trained or [active]}); spectra records one trained adapter named {ADAPTER!r}"
        )
    cfg = configs[ADAPTER]
    tuner = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    targets = cfg.target_modules
    info: dict[str, Any] = {
        "peft_type": tuner,
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
    }
    for key, out in (
        ("r", "rank"),
        ("lora_alpha", "alpha"),
        ("lora_dropout", "dropout"),
        ("init_r", "init_r"),
    ):
        if getattr(cfg, key, None) is not None:
            info[out] = getattr(cfg, key)
    if tuner == "LORA":
        init = cfg.init_lora_weights
        init_name = init.split("_", 1)[0] if isinstance(init, str) else None  # pissa_niter_4 → pissa
        if init_name == "loftq" or getattr(cfg, "use_qalora", False):
            raise CallbackError(
                f"SpectraCallback: LoRA with init_lora_weights={init!r} changes the base weights in a way "
                f"spectra cannot measure against W0; expected {SUPPORTED}"
            )
        info |= {
            "use_dora": bool(cfg.use_dora),
            "use_rslora": bool(cfg.use_rslora),
            "init_lora_weights": init,
        }
        if init_name in _RESIDUAL_INITS:
            if cfg.use_dora:
                raise CallbackError(
                    f"SpectraCallback: DoRA with init_lora_weights={init!r}; expected {SUPPORTED}"
                )
            return Found(get_method("pissa"), init_name, info)
        name = "dora" if cfg.use_dora else "rslora" if cfg.use_rslora else "lora"
        return Found(get_method(name), name, info)
    if tuner in _PEFT_TUNERS:
        if tuner == "VERA":
            info["vera_rank"] = cfg.r
        return Found(get_method(_PEFT_TUNERS[tuner]), _PEFT_TUNERS[tuner], info)
    raise CallbackError(f"SpectraCallback: the model's PEFT tuner is {tuner}; spectra records {SUPPORTED}")


def base_path(model: nn.Module) -> str | None:
    """Where the model's base weights were loaded from, as the model remembers it."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        for cfg in configs.values():
            if getattr(cfg, "base_model_name_or_path", None):
                return str(cfg.base_model_name_or_path)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "name_or_path", None) or getattr(
        getattr(inner, "config", None), "_name_or_path", None
    )


def _base_checkpoint(model: nn.Module, base: str | Path | None) -> tuple[Path, BaseCheckpoint]:
    where = str(base) if base is not None else base_path(model)
    if not where:
        raise CallbackError(
            "SpectraCallback: the model does not say where its base weights came from (no name_or_path); "
            "pass SpectraCallback(base=<the base model's directory or hub id>)"
        )
    try:
        model_dir = find_model_dir(where)
        return model_dir, BaseCheckpoint(model_dir, dtype=next(model.parameters()).dtype)
    except SpectraError as e:
        raise CallbackError(
            f"SpectraCallback: base model {where}: {first_line(e)}; pass SpectraCallback(base=<directory>)"
        ) from None


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The whole parameters of a DeepSpeed ZeRO-3 model inside the block, on every process (all must
    enter it: it is a collective); nothing to do otherwise (DDP, ZeRO-0/1/2, one process)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # ZeRO-3 parameters exist only when deepspeed is installed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling us (None when not found)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def _trainer_args(args: Any) -> dict[str, Any]:
    try:
        return json.loads(args.to_json_string())
    except (AttributeError, TypeError, ValueError):
        return {}


class SpectraCallback(TrainerCallback):
    """Record ΔW, log its live geometry and run the collapse alarm and the live checks in any Trainer
    (module docstring).

    ``out``/``name``: the run directory (``name`` defaults to the method's name, made free with -2, -3, …);
    ``delta_every``: ΔW every N optimizer steps (and at steps 0 and the last; 0: those two only);
    ``monitor_every``: live geometry every N steps (0: off, and no collapse alarm); ``on_collapse``:
    "warn" or "stop"; ``monitor_modules``: the sample of dense modules the monitor measures (0: all);
    ``base``: the base model's directory or hub id when the model does not remember it;
    ``base_copy_limit_mb``: copy W0 into ``base/`` up to this size, else point at the checkpoint;
    ``collapse_rule``: the alarm's thresholds (default: spectra's)."""

    def __init__(
        self,
        out: str | Path = "runs",
        name: str | None = None,
        delta_every: int = 50,
        monitor_every: int = 10,
        on_collapse: str = "warn",
        monitor_modules: int = 32,
        base: str | Path | None = None,
        base_copy_limit_mb: float = 512.0,
        collapse_rule: CollapseRule | None = None,
    ):
        for option, value in (("delta_every", delta_every), ("monitor_every", monitor_every),
                              ("monitor_modules", monitor_modules)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CallbackError(f"SpectraCallback({option}={value!r}): expected a whole number ≥ 0")
        if on_collapse not in ON_COLLAPSE:
            raise CallbackError(
                f"SpectraCallback(on_collapse={on_collapse!r}): expected one of {ON_COLLAPSE}"
            )
        self.out, self.name = Path(out), name
        self.delta_every, self.monitor_every, self.on_collapse = delta_every, monitor_every, on_collapse
        self.monitor_modules, self.base_arg, self.base_copy_limit_mb = (
            monitor_modules,
            base,
            base_copy_limit_mb,
        )
        self.rule = collapse_rule or CollapseRule()
        self.model: nn.Module | None = None
        self.found: Found | None = None
        self.run_dir: Path | None = None
        self.recorder: DeltaRecorder | None = None
        self.logger: MetricsLogger | None = None
        self.monitor: GeometryMonitor | None = None
        self.alarm: CollapseAlarm | None = None
        self.checks: LiveChecks | None = None
        self.resume = False
        self.first_check = monitor_every or delta_every  # the step of the first live checks
        self.check_pending = False

    # -- set-up
    def attach(
        self,
        model: nn.Module,
        method: Method,
        base: BaseCheckpoint,
        run_dir: str | Path,
        resume: bool = False,
    ) -> SpectraCallback:
        """Build the parts for ``model`` trained with ``method`` against ``base`` into ``run_dir`` (what
        ``on_train_begin`` does from the model alone; ``spectra train`` calls it with what it resolved)."""
        if not method.modules(model):
            raise CallbackError(
                f"SpectraCallback: found {method.name} on {type(model).__name__} but no adapted module in it"
            )
        self.model, self.resume = model, resume
        self.run_dir = Path(run_dir)
        writer = RunWriter(self.run_dir)  # makes no folder until the first write
        self.recorder = DeltaRecorder(
            writer, method, model, base, self.delta_every, self.base_copy_limit_mb, resume=resume
        )
        if self.monitor_every:  # the alarm reads the monitor's geometry from the logs
            self.monitor = GeometryMonitor(
                method, model, base, self.run_dir, self.monitor_every, self.monitor_modules
            )
            self.alarm = CollapseAlarm(writer, self.rule, self.on_collapse, resume, self.monitor_every)
        self.checks = None if resume else LiveChecks.of_model(model, method.modules(model))
        self.logger = MetricsLogger(writer, self.recorder, self.monitor, self.alarm, self.checks)
        return self

    def _attach_found(self, model: nn.Module, args: Any, trainer: Any) -> None:
        """``on_train_begin`` for a user's trainer: read the model, check, then write run.json."""
        found = find_method(model)
        model_dir, base = _base_checkpoint(model, self.base_arg)
        from spectra.train.methods.base import ADAPTER, cpu, find_layers

        name = self.name or free_name(self.out, found.name)
        if (self.out / name / "run.json").exists():
            raise CallbackError(
                f"SpectraCallback: {self.out / name} already holds a run; pass another name (or none: "
                f"{found.name}-2, -3, … are chosen)"
            )
        if found.method.name == "adalora":
            warnings.warn(
                "SpectraCallback: AdaLoRA reallocates its ranks only when update_and_allocate(step) is "
                "called after each optimizer step, which transformers/TRL trainers never do; unless your "
                "script does, the ranks stay as initialised",
                UserWarning,
                stacklevel=2,
            )
        with gathered(model):
            if found.method.name == "pissa":  # B0, A0 as training begins (spectra train: at attach time)
                for _, layer in find_layers(model, found.method.layer_cls()):
                    if not hasattr(layer, "spectra_init"):
                        layer.spectra_init = (
                            cpu(layer.lora_B[ADAPTER].weight),
                            cpu(layer.lora_A[ADAPTER].weight),
                        )
            self.attach(model, found.method, base, self.out / name)
        assert self.recorder is not None
        self.found = found
        if args is not None and _is_main(args):
            from spectra.train.versions import versions

            config = {
                "model": base_path(model) if self.base_arg is None else str(self.base_arg),
                "model_path": str(model_dir),
                "method": found.name,
                "spectra_method": found.method.name,
                **found.config,
                "adapted_modules": len(found.method.modules(model)),
                "seed": getattr(args, "seed", None),
                "lr": getattr(args, "learning_rate", None),
                "max_steps": getattr(args, "max_steps", None),
                "delta_every": self.delta_every,
                "monitor_every": self.monitor_every,
                "on_collapse": self.on_collapse,
                "trainer": type(trainer).__name__ if trainer is not None else None,
                "trainer_args": _trainer_args(args),
                "recorded_by": "SpectraCallback",
                "versions": versions(),
            }
            self.recorder.writer.write_config(config)

    # -- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = _calling_trainer()
        if self.recorder is None:
            if model is None:
                raise CallbackError("SpectraCallback: the trainer gave no model at on_train_begin")
            self._attach_found(model, args, trainer)
        if trainer is not None:  # first in the list: the geometry joins the logs before reporters read them
            callbacks = trainer.callback_handler.callbacks
            if callbacks and callbacks[0] is not self and self in callbacks:
                callbacks.remove(self)  # safe mid-iteration: the handler's next index is the next callback
                callbacks.insert(0, self)
        assert self.recorder is not None and self.model is not None
        with gathered(self.model):
            self.recorder.on_train_begin(args, state, control, **kwargs)
        if self.alarm is not None:
            self.alarm.on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        assert self.recorder is not None and self.model is not None
        step = state.global_step
        recorded = self.delta_every and step % self.delta_every == 0
        measured = self.monitor is not None and step % self.monitor.every == 0
        with gathered(self.model) if recorded or measured else contextlib.nullcontext():
            self.recorder.on_step_end(args, state, control, **kwargs)
            if self.monitor is not None:
                self.monitor.on_step_end(args, state, control, **kwargs)
        if self.alarm is not None:
            self.alarm.on_step_end(args, state, control, **kwargs)
        if self.checks is not None and step == self.first_check:
            self.check_pending = True
            control.should_log = True  # on every process: the trainer's logging is a collective under DDP

    def on_log(self, args, state, control, logs=None, **kwargs):
        assert self.logger is not None
        if self.monitor is not None:
            self.monitor.on_log(args, state, control, logs=logs, **kwargs)
        if logs and "train_runtime" in logs and self.recorder is not None:
            # the trainer's closing log comes before on_train_end: record the last step now, so that
            # train_summary.json (written by the logger below) names every recorded step
            with gathered(self.model):
                self.recorder.on_train_end(args, state, control, **kwargs)
        if logs and self.checks is not None:
            end = "train_runtime" in logs  # the end: checked before train_summary.json is written
            if not end and state.is_world_process_zero:
                self.checks.observe(logs)
            if end or self.check_pending:
                self.check_pending = False
                with gathered(self.model):  # every process takes part in a ZeRO-3 gather
                    if state.is_world_process_zero:
                        self.checks.check(state.global_step, end=end)
        self.logger.on_log(args, state, control, logs=logs, **kwargs)
        if self.alarm is not None:
            self.alarm.on_log(args, state, control, logs=logs, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        assert self.recorder is not None and self.model is not None
        with gathered(self.model):
            self.recorder.on_train_end(args, state, control, **kwargs)
        if self.alarm is not None:
            self.alarm.on_train_end(args, state, control, **kwargs)


def _is_main(args: Any) -> bool:
    process_index = getattr(args, "process_index", 0)
    return process_index == 0


def free_name(out: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, … : the first that is not taken in ``out``."""
    candidate, i = name, 1
    while (out / candidate).exists():
        i += 1
        candidate = f"{name}-{i}"
    return candidate
