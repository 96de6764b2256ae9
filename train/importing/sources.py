"""What a SOURCE of ``spectra import`` is: a list of snapshots (step, weights folder, kind), in step order.

A SOURCE is one of

- a model folder (``config.json`` and safetensors weights) or a hub id in the local cache: one snapshot;
- a PEFT adapter folder (``adapter_config.json``): one snapshot;
- a training output folder whose children are checkpoints, one snapshot each:
  ``checkpoint-N/`` (transformers Trainer, TRL), ``global_step_N/…/huggingface/`` (verl, after
  ``python -m verl.model_merger merge``), ``global_step_N/`` holding an HF folder at any depth up to three
  (OpenRLHF). A checkpoint holds full weights or a PEFT adapter. One that cannot be read (no weights
  inside, a shard its index lists is missing) is skipped with its reason; the others are imported. An
  output folder that also holds the final weights itself (``trainer.save_model(output_dir)``) is its
  checkpoints, and those weights one more step when its trainer_state.json says at which.

The trainer's log (``trainer_state.json``'s ``log_history``) comes from the newest checkpoint that has
one, or the output folder itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from spectra.train.importing.errors import SourceError
from spectra.train.importing.weights import resolve_local

#: A checkpoint folder's name: ``checkpoint-N`` (transformers, TRL), ``global_step_N`` or ``global_stepN``.
CHECKPOINT = re.compile(r"^(?:checkpoint-|global_step_?)(\d+)$")
_SEARCH_DEPTH = 3


@dataclass(frozen=True)
class Snapshot:
    """One step of the imported run: the folder its weights are in, and whether they are a model or an
    adapter; ``origin`` says where it came from (shown to the user, kept in run.json)."""

    step: int
    path: Path
    kind: Literal["model", "adapter"]
    origin: str


@dataclass
class Sources:
    """Every snapshot of every SOURCE, in step order; skipped checkpoints with their reasons; the
    trainer log found (a ``trainer_state.json``) if any."""

    snapshots: list[Snapshot] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    trainer_state: Path | None = None


def kind_of(folder: Path) -> Literal["model", "adapter"] | None:
    """``adapter`` for a PEFT adapter folder, ``model`` for an HF model folder, None otherwise."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file() and (
        (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))
    ):
        return "model"
    return None


def weights_folder(checkpoint: Path) -> Path | None:
    """The model or adapter folder inside a checkpoint: itself, else the shallowest one below it (verl's
    ``actor/huggingface``, OpenRLHF's HF folder), preferring folders named ``huggingface``."""
    if kind_of(checkpoint):
        return checkpoint
    level = [checkpoint]
    for _ in range(_SEARCH_DEPTH):
        level = sorted(c for p in level for c in p.iterdir() if c.is_dir() and not c.is_symlink())
        found = [c for c in level if kind_of(c)]
        if found:
            return min(found, key=lambda c: (c.name != "huggingface", str(c)))
    return None


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, child)`` for each child named like a checkpoint, in step order."""
    found = []
    for child in folder.iterdir():
        m = CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_snapshots(sources: Sequence[str], step: int | None = None) -> Sources:
    """The snapshots of ``sources`` (module docstring). A model or adapter SOURCE is recorded at ``step``
    (default 1), the next one at ``step + 1``, …; checkpoints keep their own steps. Two snapshots at one
    step are an error."""
    out = Sources()
    next_step = 1 if step is None else step
    for source in sources:
        folder = resolve_local(source, "SOURCE")
        kind = kind_of(folder)
        found = checkpoints(folder)
        if kind is not None and not found:
            out.snapshots.append(Snapshot(next_step, folder, kind, f"{kind} {source}"))
            next_step += 1
            continue
        if not found:
            raise SourceError(
                f"SOURCE {source}: neither a model folder (config.json + *.safetensors), a PEFT adapter "
                "(adapter_config.json) nor a folder of checkpoints (checkpoint-N/, global_step_N/)"
            )
        for n, child in found:
            inner = weights_folder(child)
            if inner is None:
                hint = (
                    " (verl: run `python -m verl.model_merger merge` first)"
                    if "global_step" in child.name
                    else ""
                )
                out.skipped.append((str(child), f"no safetensors model or PEFT adapter inside{hint}"))
                continue
            out.snapshots.append(Snapshot(n, inner, kind_of(inner) or "model", f"{child.name} of {source}"))
        if kind is not None:  # the final weights a trainer's save_model wrote beside its checkpoints
            _final_weights(out, folder, kind, source, last=found[-1][0])
        out.trainer_state = _newest_trainer_state(folder, [c for _, c in found]) or out.trainer_state
    steps = [s.step for s in out.snapshots]
    dup = sorted({s for s in steps if steps.count(s) > 1})
    if dup:
        raise SourceError(
            f"SOURCE: two snapshots claim step {dup[0]}; import them separately (--step sets the step of a "
            "model or adapter SOURCE, checkpoints keep their own)"
        )
    out.snapshots.sort(key=lambda s: s.step)
    return out


def final_step(folder: Path, last: int) -> int | None:
    """The step of the final weights a trainer saved in its output ``folder`` beside its checkpoints
    (``trainer.save_model(output_dir)``): the ``global_step`` of the folder's own trainer_state.json when
    that is after the ``last`` checkpoint; None otherwise (they are then taken to be the last one's)."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step > last else None


def _final_weights(out: Sources, folder: Path, kind: str, source: str, last: int) -> None:
    """The final weights beside the checkpoints: one more step at :func:`final_step`, else skipped."""
    step = final_step(folder, last)
    if step is not None:
        out.snapshots.append(Snapshot(step, folder, kind, f"final {kind} of {source}"))
        return
    out.skipped.append(
        (
            str(folder),
            f"the {kind} saved beside the checkpoints: its step is unknown (no trainer_state.json beside it "
            f"with a global_step after {last}), so it is taken to be the last checkpoint's",
        )
    )


def _newest_trainer_state(folder: Path, children: list[Path]) -> Path | None:
    """The trainer_state.json with the longest log: the output folder's own, or its newest checkpoint's."""
    best, best_len = None, -1
    for candidate in [folder / "trainer_state.json", *(c / "trainer_state.json" for c in children)]:
        if not candidate.is_file():
            continue
        try:
            n = len(json.loads(candidate.read_text()).get("log_history", []))
        except (OSError, ValueError, AttributeError):
            continue
        if n > best_len:
            best, best_len = candidate, n
    return best
