"""Building the organism once and caching it: one directory per (recipe version, seed, warm-start length).

A directory holds safetensors weights, ``config.json``, ``generation_config.json``, the tokenizer files
and ``organism.json`` (the recipe, ``sft_steps`` and the measured accuracy), so that the trainer loads it
through the same ``from_pretrained`` code path as any hub model. It is built in a temporary sibling
directory and renamed into place when finished: a directory with the final name is always complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from spectra.train.config import ORGANISM_SFT_STEPS
from spectra.train.organism.model import (
    MODEL_CONFIG,
    SFT_CONFIG,
    evaluate,
    make_model,
    make_tokenizer,
    sft,
)
from spectra.train.organism.task import (
    CARRY_DROP,
    MAX_COMPLETION_TOKENS,
    OPERAND_RANGE,
    organism_prompt,
    solution,
)

from spectra.h5io import current_umask

__all__ = ["DEFAULT_SFT_STEPS", "ORGANISM_VERSION", "build_organism", "cache_dir"]

log = logging.getLogger(__name__)

ORGANISM_VERSION: int = 1
"""Bumped whenever the recipe (task, tokenizer, model, SFT, evaluation) changes; part of the cache name."""

DEFAULT_SFT_STEPS: int = ORGANISM_SFT_STEPS
"""Optimizer steps of the supervised warm start of the default organism (the model id ``organism``)."""

_ORGANISM_JSON = "organism.json"
#: The files of a saved model directory that a cached build must have (besides its own marker file).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def cache_dir() -> Path:
    """The cache: ``$SPECTRA_CACHE``, else ``$XDG_CACHE_HOME/spectra``, else ``~/.cache/spectra``."""
    if os.environ.get("SPECTRA_CACHE"):
        return Path(os.environ["SPECTRA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spectra"
    return Path.home() / ".cache" / "spectra"


def _name(seed: int, sft_steps: int) -> str:
    name = f"organism-v{ORGANISM_VERSION}-seed{seed}"
    return name if sft_steps == DEFAULT_SFT_STEPS else f"{name}-sft{sft_steps}"


_REQUIRED_FILES = (*MODEL_FILES, _ORGANISM_JSON)


def is_built(path: Path, marker: str, expected: dict[str, Any]) -> bool:
    """Whether ``path`` is a finished build of a cached model: every file of :data:`MODEL_FILES` and the
    ``marker`` JSON there, the marker holding the ``expected`` values (its recipe)."""
    if not all((path / f).is_file() for f in (*MODEL_FILES, marker)):
        return False
    try:
        meta = json.loads((path / marker).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items())


def _is_complete(path: Path, seed: int, sft_steps: int) -> bool:
    """Whether ``path`` is a finished organism of this recipe (all files there, organism.json matching)."""
    return is_built(path, _ORGANISM_JSON, {"version": ORGANISM_VERSION, "seed": seed, "sft_steps": sft_steps})


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-"


def _reap_stale_tmp(root: Path, name: str) -> None:
    """Remove temporary build dirs of ``name`` left by dead processes on this host (killed builds)."""
    prefix = _tmp_prefix(name)
    for p in root.glob(prefix + "*"):
        pid_str = p.name[len(prefix) :].split("-", 1)[0]
        if not pid_str.isdigit():
            continue
        try:
            os.kill(int(pid_str), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # exists but not ours to signal: leave it alone


@contextlib.contextmanager
def _preserve_torch_state() -> Iterator[None]:
    """Leave torch's global RNG and grad mode as they were."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        yield


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _build(path: Path, seed: int, sft_steps: int) -> None:
    """Build the organism into the (empty) directory ``path``; ``organism.json`` is written last.

    The weights are initialised from ``torch.manual_seed(seed)``, then warm-started for ``sft_steps``
    steps (none: the random initialisation, measured like the others, so every length has the same files).
    """
    t0 = time.perf_counter()
    with _preserve_torch_state():
        torch.manual_seed(seed)
        tok = make_tokenizer()
        model = make_model(tok)
        losses = sft(model, tok, sft_steps, seed)
        sft_seconds = time.perf_counter() - t0
        accuracy = evaluate(model, tok, seed)  # also leaves tokenizer.json's padding as saved
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "version": ORGANISM_VERSION,
        "seed": seed,
        "sft_steps": sft_steps,
        "task": {
            "description": "three-digit addition, column by column, answer in \\boxed{}",
            "example_prompt": organism_prompt("347+588"),
            "example_solution": solution(347, 588)[0],
            "operand_range": list(OPERAND_RANGE),
            "carry_drop": CARRY_DROP,
            "max_completion_tokens": MAX_COMPLETION_TOKENS,
        },
        "config": {"model": MODEL_CONFIG, "sft": SFT_CONFIG, "parameters": n_params, "vocab_size": len(tok)},
        "sft": {"final_loss": _mean(losses[-20:]), "seconds": round(sft_seconds, 2)},
        "accuracy": accuracy,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (path / _ORGANISM_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def build_organism(
    seed: int = 0, root: Path | None = None, force: bool = False, sft_steps: int | None = None
) -> Path:
    """Build (once) and return the directory of the model organism for ``seed``.

    ``sft_steps`` is the length of the warm start (default :data:`DEFAULT_SFT_STEPS`; 0 = the random
    initialisation of ``seed``, the same architecture untrained). The directory,
    ``root/organism-v{ORGANISM_VERSION}-seed{seed}`` (``-sft{steps}`` appended for a non-default
    ``sft_steps``; ``root`` defaults to :func:`cache_dir`), loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. A complete one is
    reused unless ``force``. The build runs in a temporary sibling directory that is renamed into place
    only when finished, so a killed build never leaves a directory that passes for a finished one; two
    concurrent builds both finish and the first rename wins. Torch's global RNG state is left unchanged.
    """
    sft_steps = DEFAULT_SFT_STEPS if sft_steps is None else sft_steps
    if sft_steps < 0:
        raise ValueError(f"build_organism: sft_steps must be ≥ 0, got {sft_steps}")
    root = Path(cache_dir() if root is None else root).expanduser()
    name = _name(seed, sft_steps)
    final = root / name
    if not force and _is_complete(final, seed, sft_steps):
        return final

    log.info("building the model organism %s (seed %d, %d SFT steps)", final, seed, sft_steps)
    return build_once(
        final, lambda tmp: _build(tmp, seed, sft_steps), lambda p: _is_complete(p, seed, sft_steps), force
    )


def build_once(
    final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool], force: bool
) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``final`` and rename it into place when finished, so a
    killed build never leaves a directory that passes for a finished one (``complete``). A stale,
    incomplete or (``force``) replaced ``final`` is moved aside and deleted first; of two concurrent
    builds the first rename wins and the other uses it."""
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    _reap_stale_tmp(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{os.getpid()}-", dir=root))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the finished entry is an ordinary dir
    try:
        build(tmp)
        if final.exists() and (force or not complete(final)):
            # Replace a stale/incomplete/forced-out directory: move it aside first, then delete it.
            trash = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{os.getpid()}-old-", dir=root))
            final.rename(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not complete(final):  # lost a race to something that is not a finished build
                raise
            log.info("another process finished %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
