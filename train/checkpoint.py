"""The base checkpoint: where a model lives on disk, and W0 read back from its safetensors files.

ΔW is always measured against the *original* W0 of the checkpoint, never against the in-memory base
layer (PiSSA/MiLoRA replace it by a residual; merging and unmerging in bf16 drifts it). So W0 is read from
the checkpoint's safetensors files by tensor name, whatever the model object holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from spectra.train.config import TrainConfigError
from torch import Tensor

from spectra.errors import first_line


def resolve_model_dir(model: str) -> Path:
    """A local directory holding the model: ``model`` itself when it is one, else the hub snapshot.

    Hub ids are fetched (or found in the local hub cache) with ``huggingface_hub.snapshot_download``,
    restricted to the files a model needs; weights must be safetensors (no pickle).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TrainConfigError(f"--model {model}: directory has no config.json; expected a saved model")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise TrainConfigError(f"--model {model}: no such directory; expected a local model path or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = snapshot_download(
            model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        )
    except HFValidationError as e:
        raise TrainConfigError(f"--model {model}: not a valid hub id or local path ({e})") from None
    except Exception as e:  # offline, unknown repo, gated: say which model and why in one line
        first = first_line(e)
        raise TrainConfigError(f"--model {model}: could not be fetched from the hub: {first}") from None
    return Path(local)


def find_model_dir(model: str) -> Path:
    """The directory of ``model``: an organism (``organism``, ``organism@N``, ``random-organism``: built once
    and cached), ``smollm2`` (SmolLM2-135M-Instruct, converted once and cached), a local directory or a hub
    id."""
    from spectra.train.config import SMOLLM2, organism_sft_steps

    if model == SMOLLM2:
        from spectra.train.smollm2 import smollm2_dir

        return smollm2_dir()
    sft_steps = organism_sft_steps(model)
    if sft_steps is not None:
        from spectra.train.organism import build_organism

        return build_organism(seed=0, sft_steps=sft_steps)
    return resolve_model_dir(model)


def model_dtype(precision: str) -> torch.dtype:
    """``bf16``, ``fp32``, or ``auto``: bf16 on a GPU that supports it, float32 otherwise."""
    if precision == "bf16" or (
        precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ):
        return torch.bfloat16
    return torch.float32


def load_pretrained(model_dir: str | Path, dtype: torch.dtype, option: str) -> tuple[Any, Any]:
    """Tokenizer and causal LM from a local directory (safetensors only; no remote code); ``option``
    names what the user gave in errors. A tokenizer without a pad token pads with its end token."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir, option)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise TrainConfigError(f"{option}: could not be loaded from {model_dir} ({first})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random and carry on
        raise TrainConfigError(
            f"{option}: {model_dir} has no weights for {len(missing)} parameters ({', '.join(missing[:3])}"
            f"{', …' if len(missing) > 3 else ''}); it is not a complete {type(model).__name__}"
        )
    return tokenizer, model


def load_tokenizer(model_dir: str | Path, option: str) -> Any:
    """The tokenizer of a local model directory; one without a pad token pads with its end token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise TrainConfigError(f"{option}: no tokenizer could be loaded from {model_dir} ({first})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class BaseCheckpoint:
    """Read W0 tensors by name from a model directory's safetensors files (sharded or not).

    ``dtype``: the dtype the model was loaded in. W0 is returned cast to it, because that is the weight
    training started from (an fp32 checkpoint loaded in bf16 starts from bf16(W0)).
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None):
        self.dir = Path(model_dir)
        self.dtype = dtype
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise TrainConfigError(
                    f"--model {self.dir}: no *.safetensors weights; spectra reads W0 from safetensors only"
                )
            self.files = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    self.files.update({name: f for name in h.keys()})

    def tensor_name(self, module: str, param: str = "weight") -> str:
        """The checkpoint's name for ``module.param``; tolerates a missing or extra ``model.`` prefix."""
        for name in (
            f"{module}.{param}",
            f"model.{module}.{param}",
            f"{module.removeprefix('model.')}.{param}",
        ):
            if name in self.files:
                return name
        raise KeyError(f"{module}.{param} is not in the checkpoint {self.dir}")

    def get(self, module: str, param: str = "weight") -> Tensor:
        """W0 (or θ0) of ``module`` as stored in the checkpoint."""
        name = self.tensor_name(module, param)
        with safe_open(self.files[name], "pt") as h:
            t = h.get_tensor(name)
        return t if self.dtype is None else t.to(self.dtype)

    def nbytes(self, modules: list[str], param: str = "weight") -> int:
        """Bytes the tensors of ``modules`` take in the checkpoint."""
        total = 0
        for module in modules:
            name = self.tensor_name(module, param)
            with safe_open(self.files[name], "pt") as h:
                sl = h.get_slice(name)
                total += math.prod(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
