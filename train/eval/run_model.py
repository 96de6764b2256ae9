"""The model to evaluate: a saved model, a PEFT adapter checkpoint, or a run at a recorded step.

A run at step t is its base model with every recorded update added, W = W0 + ΔW_t, where W0 is the run's
own ``base/`` copy (the weight training started from, in the training dtype) and ΔW_t is read from
``deltas/step_t.h5`` and made dense (DoRA's and IA3's rules applied to W0; LayerNorm tuning's vectors
added to the norms). This is the method's merged weight: the tests check that the rebuilt model's
logits equal the trained model's.

Full fine-tuning recorded by the trainer is the one exception. It also trains the embeddings, the norms
and the head, which the delta files do not hold (they record the target projections). At a step where
the trainer kept a checkpoint (``checkpoints/checkpoint-t``, always the last step) its complete weights
are loaded instead; at other steps those parameters stay at their base values, and the result says so.
(A run made by ``spectra import`` of full weights holds every floating tensor's update: W0 + ΔW_t is the
imported model itself.)

Precision: ΔW is materialised in float64 and added to W0 in float64, and only the sum is cast to the
model's dtype (one rounding; a bf16-stored LoRA update merges to the correctly rounded float32 weight).

A step whose delta file cannot be made into weights raises :class:`DamagedStep`, one line naming the file
and module: the file is missing, not a regular file, truncated or damaged (:mod:`spectra.store` checks
it), lacks a module of the run's ``base/``, or holds a ΔW that is not finite or not of W0's shape.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from spectra.train.checkpoint import find_model_dir, load_pretrained
from spectra.train.config import EvalError, TrainConfigError
from torch import nn

from spectra import Run, load_run
from spectra.deltafile import DeltaFile, delta_filename
from spectra.errors import SpectraError, first_line
from spectra.operators import VectorDelta


@dataclass
class Target:
    """What `spectra eval` was pointed at: a model directory, and a run (or one of its steps) when it is
    one."""

    label: str  # run name, or the model's name
    model_dir: Path  # the (base) model's directory
    run: Run | None = None
    step: int | None = None  # a run's trainer checkpoint folder: that step
    adapter_dir: Path | None = None  # a PEFT adapter checkpoint on top of model_dir


@dataclass
class Weights:
    """Where the evaluated weights came from."""

    note: str  # for people: "base + ΔW of 168 modules from deltas/step_000050.h5", …
    complete: bool = True  # False: full fine-tuning without a checkpoint (embeddings, norms, head at W0)
    rounded_away: float = 0.0  # share of nonzero ΔW entries lost when merged in bf16/fp16


class DamagedStep(EvalError):
    """A run's step whose weights cannot be built from its delta file (see the module docstring)."""


#: What a damaged file or record raises from inside h5py, numpy or torch when the store has not named it.
_READ_ERRORS = (
    OSError, KeyError, ValueError, TypeError, AttributeError, IndexError, UnicodeError, RuntimeError,
)  # fmt: skip

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def resolve_target(target: str) -> Target:
    """A run directory (has run.json), one of its trainer checkpoints (``checkpoints/checkpoint-N``: the
    run at step N), a PEFT adapter checkpoint (adapter_config.json), a saved model (config.json),
    ``organism``, or a hub id."""
    path = Path(target).expanduser()
    if path.is_file():
        raise EvalError(f"{target}: a file; expected a run directory, a model directory or a hub id")
    if path.is_dir():
        if (path / "run.json").is_file():
            run = load_run(path)
            return Target(run.config.get("name") or path.name, run_model_dir(run), run=run)
        match = _CHECKPOINT.fullmatch(path.name)
        if match and (path.parent.parent / "run.json").is_file():
            run = load_run(path.parent.parent)
            step = int(match.group(1))
            if step not in run.steps:
                raise EvalError(
                    f"{target}: a trainer checkpoint of {run.path} at step {step}, which has no delta file; "
                    f"evaluate the run at a recorded step ({', '.join(map(str, run.steps))}) with --step"
                )
            return Target(run.config.get("name") or run.path.name, run_model_dir(run), run=run, step=step)
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise EvalError(
                    f"{path / 'adapter_config.json'}: no base_model_name_or_path; cannot find the base"
                )
            return Target(path.name, _find(base, f"{path}: its base model {base}"), adapter_dir=path)
        if not (path / "config.json").is_file():
            raise EvalError(
                f"{target}: neither a run (no run.json), a saved model (no config.json) nor a PEFT adapter "
                "(no adapter_config.json)"
            )
        return Target(path.name, path)
    if str(path.parent) not in (".", "") and path.parent.is_dir():  # runs/lroa: a typo, not a hub id
        raise EvalError(f"{target}: no such directory in {path.parent}; expected a run or model directory")
    return Target(target.rstrip("/").rsplit("/", 1)[-1], _find(target, target))


def _find(model: str, what: str) -> Path:
    try:
        return find_model_dir(model)
    except TrainConfigError as e:
        raise EvalError(f"{what}: {str(e).split(': ', 1)[-1]}") from None


def run_model_dir(run: Run) -> Path:
    """The base model of a run: the directory it was trained from, else run.json's model found again."""
    stored = run.config.get("model_path")
    if stored and (Path(stored) / "config.json").is_file():
        return Path(stored)
    model = run.config.get("model")
    if not model:
        raise EvalError(f"{run.path / 'run.json'}: no model; cannot find the run's base model")
    return _find(model, f"{run.path}: its base model {model}")


def select_steps(run: Run, spec: str) -> list[int]:
    """The steps ``--step`` names: ``last``, ``all``, or a comma-separated list of recorded steps."""
    recorded = run.steps
    if not recorded:
        raise EvalError(f"{run.path}: no delta files in deltas/; train the run first")
    if spec == "last":
        return recorded[-1:]
    if spec == "all":
        return recorded
    steps = []
    for part in spec.split(","):
        try:
            step = int(part)
        except ValueError:
            raise EvalError(f"--step {spec}: expected last, all, or recorded steps such as 0,50") from None
        if step < 0:
            raise EvalError(f"--step {step}: expected a recorded step ≥ 0 ({', '.join(map(str, recorded))})")
        if step not in recorded:
            raise EvalError(
                f"--step {step}: {run.path} recorded no step {step} (no deltas/{delta_filename(step)}); "
                f"recorded steps: {', '.join(map(str, recorded))}"
            )
        steps.append(step)
    return sorted(set(steps))


def merges_weights(target: Target, step: int | None) -> bool:
    """True when the weights are made by adding an update to the base (ΔW or a PEFT adapter)."""
    if target.adapter_dir is not None:
        return True
    return target.run is not None and step is not None and full_checkpoint(target.run, step) is None


def load_target(target: Target, step: int | None, dtype: torch.dtype) -> tuple[Any, nn.Module, Weights]:
    """Tokenizer, model (on the CPU) and where its weights came from, for ``step`` of a run (None: the
    model or adapter itself)."""
    option = str(target.run.path if target.run else target.adapter_dir or target.model_dir)
    if target.run is not None and step is not None:
        ckpt = full_checkpoint(target.run, step)
        if ckpt is not None:  # the trainer saves the tokenizer beside the weights
            tokenizer, model = load_pretrained(ckpt, dtype, str(ckpt))
            return tokenizer, model, Weights(f"trainer checkpoint {ckpt.relative_to(target.run.path)}")
    tokenizer, model = load_pretrained(target.model_dir, dtype, option)
    if target.adapter_dir is not None:
        return (
            tokenizer,
            merge_adapter(model, target.adapter_dir),
            Weights(f"PEFT adapter {target.adapter_dir} merged"),
        )
    if target.run is None or step is None:
        return tokenizer, model, Weights(f"model {target.model_dir}")
    count, rounded = apply_delta(model, target.run, step)
    weights = Weights(
        f"base + ΔW of {count} modules from deltas/{delta_filename(step)}", rounded_away=rounded
    )
    imported_whole = bool(target.run.config.get("imported")) and "full" == target.run.config.get("method")
    if target.run.config.get("method") == "full" and step > 0 and not imported_whole:
        weights.complete = False
        weights.note += (
            "; embeddings, norms and head at their base values (full fine-tuning trains them, but the delta "
            "files hold the projections only and no trainer checkpoint was kept for this step)"
        )
    return tokenizer, model, weights


def full_checkpoint(run: Run, step: int) -> Path | None:
    """The trainer checkpoint with complete weights at ``step`` of a full fine-tuning run, if kept."""
    if run.config.get("method") != "full":
        return None
    ckpt = run.path / "checkpoints" / f"checkpoint-{step}"
    if (ckpt / "config.json").is_file() and any(ckpt.glob("model*.safetensors")):
        return ckpt
    return None


def check_step(run: Run, step: int) -> None:
    """Raise :class:`DamagedStep` when the delta file of ``step`` cannot be opened, lacks a module of the
    run's ``base/``, or has a module whose kind or shape cannot be read (metadata only: no tensor is
    read, so this is cheap enough to run on every step before any model loads)."""
    with _open_step(run, step) as d:
        for name in d.modules:
            try:
                d.info(name)
            except SpectraError as e:
                raise DamagedStep(str(e)) from e
            except _READ_ERRORS as e:
                raise DamagedStep(f"{d.path}: module {name!r}: damaged metadata ({_why(e)})") from e


def _open_step(run: Run, step: int) -> DeltaFile:
    """The open delta file of ``step``, checked to hold every module of the run's ``base/``."""
    try:
        d = run.open_delta(step)
    except SpectraError as e:
        raise DamagedStep(str(e)) from e
    except _READ_ERRORS as e:  # a library's error the store let through
        path = run.path / "deltas" / delta_filename(step)
        raise DamagedStep(f"{path}: cannot be read ({_why(e)})") from e
    try:
        stored = set(d.modules)
        missing = [m for m in run.modules if m not in stored]
    except BaseException:
        d.close()
        raise
    if missing:
        d.close()
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DamagedStep(
            f"{d.path}: no module {missing[0]!r}{more} of the run's base/; expected every recorded module "
            "(the file is incomplete)"
        )
    return d


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def read_delta(run: Run, d: DeltaFile, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ΔW, W0)`` of ``module`` in float64: ΔW materialised from its stored form in float64, checked to
    be finite and of W0's shape (:class:`DamagedStep` otherwise)."""
    try:
        rec, w0 = run.read_module(d, module)
        delta = rec.delta if isinstance(rec, VectorDelta) else rec.to_dense()
        delta = delta.to(torch.float64)  # to_dense() gives float64 already; a vector's θ_t − θ_0 does not
    except SpectraError as e:
        raise DamagedStep(str(e)) from e
    except _READ_ERRORS as e:
        raise DamagedStep(f"{d.path}: module {module!r} could not be read ({_why(e)})") from e
    if tuple(delta.shape) != tuple(w0.shape):
        raise DamagedStep(
            f"{d.path}: module {module!r} has ΔW of shape {tuple(delta.shape)} but W0 is {tuple(w0.shape)}"
        )
    finite = torch.isfinite(delta)
    if not bool(finite.all()):
        raise DamagedStep(
            f"{d.path}: module {module!r} has {int((~finite).sum())} non-finite ΔW entries (NaN or Inf); "
            "expected finite numbers"
        )
    return delta, w0.to(torch.float64)


@torch.no_grad()
def apply_delta(model: nn.Module, run: Run, step: int) -> tuple[int, float]:
    """Set every recorded parameter of ``model`` to W0 + ΔW at ``step`` (in place): the sum is formed in
    float64 and cast once to the parameter's dtype. Returns the number of modules and the share of
    nonzero ΔW entries that the model's dtype rounds away (0 in float32: in bf16, W0 + ΔW rounds back to
    W0 wherever |ΔW| is below half a bf16 step of W0).

    W0 is the run's ``base/`` weight, so applying another step afterwards is correct too. Raises
    :class:`DamagedStep` when the step's file or one of its modules is damaged (see the module
    docstring), and :class:`EvalError` when a recorded module is missing from the model or has another
    shape, or when the model's own weight is not the run's W0 (the model is not the run's base)."""
    params = dict(model.named_parameters())
    lost = moved = 0
    with _open_step(run, step) as d:
        for i, name in enumerate(d.modules):
            delta, w0 = read_delta(run, d, name)
            key = name if name in params else f"{name}.weight"
            if key not in params:
                raise EvalError(
                    f"{d.path}: module {name!r} is not in the model at {run_model_dir(run)}; "
                    "run.json's model is not the run's base"
                )
            param = params[key]
            if tuple(param.shape) != tuple(delta.shape):
                raise EvalError(
                    f"{d.path}: module {name!r} has ΔW of shape {tuple(delta.shape)} but the model's "
                    f"{key} is {tuple(param.shape)}; run.json's model is not the run's base"
                )
            if i == 0 and not torch.allclose(param.double(), w0, rtol=1e-2, atol=1e-2):
                raise EvalError(
                    f"{run.path}: the model at {run_model_dir(run)} is not the run's base "
                    f"({key} differs from base/); evaluate with the model the run was trained from"
                )
            merged = (w0 + delta).to(param.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise DamagedStep(
                    f"{d.path}: module {name!r}: W0 + ΔW overflows {str(param.dtype).removeprefix('torch.')} "
                    f"(|ΔW| up to {delta.abs().max().item():.3g}); expected an update of a trained model"
                )
            if param.dtype != torch.float32:
                nonzero = delta != 0
                moved += int(nonzero.sum())
                lost += int((nonzero & (merged == w0.to(param.dtype))).sum())
            param.copy_(merged)
        count = len(d.modules)
    return count, lost / moved if moved else 0.0


def merge_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """PEFT's own load and merge of an adapter checkpoint (LoRA family, IA3, VeRA, …)."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # transformers 5 renames that PEFT still calls
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing\S*` is deprecated")
            return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except Exception as e:  # PEFT's reason in one line
        first = first_line(e)
        raise EvalError(f"{adapter_dir}: PEFT could not load and merge this adapter ({first})") from None
