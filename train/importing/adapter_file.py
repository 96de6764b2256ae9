"""An open PEFT adapter file (``adapter_model.safetensors`` beside its ``adapter_config.json``): its tensors
grouped by the base model's module, its config's values checked for type, and the helpers every tuner's
reader (:mod:`.tuners`) shares. One-line :class:`~spectra.train.importing.errors.SourceError` on anything
that does not fit the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.importing.errors import SourceError
from torch import Tensor

from spectra.operators import Dense, Record, VectorDelta

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
PREFIX = "base_model.model."
F64 = torch.float64


class NotFactored(Exception):
    """A layout the factored readers do not cover: read through PEFT's dense merge instead."""


class AdapterFile:
    """The open adapter file: its tensors grouped by base-model module, and the config's values."""

    def __init__(self, folder: Path, file: Path, config: dict[str, Any], base: BaseCheckpoint, handle: Any):
        self.folder, self.file, self.config, self.base, self.handle = folder, file, config, base, handle
        self.keys: list[str] = list(handle.keys())

    @property
    def where(self) -> str:
        return str(self.folder / CONFIG)

    def tensor(self, key: str) -> Tensor:
        return self.handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def option(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """A config value of the expected JSON type (SourceError naming the file and key otherwise)."""
        if name not in self.config or self.config[name] is None:
            if default is ...:
                raise SourceError(f"{self.where}: no {name!r}; a {self.config['peft_type']} adapter needs it")
            return default
        value = self.config[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise SourceError(f"{self.where}: {name!r} is {value!r}; expected {_type_names(kind)}")
        return value

    def groups(
        self, suffixes: tuple[str, ...]
    ) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, str]]]:
        """(module → {suffix: key}) for the tuner's tensors, and (key → (module, param)) for full copies of
        base tensors (``modules_to_save``). Keys that are neither: SourceError."""
        groups: dict[str, dict[str, str]] = {}
        full: dict[str, tuple[str, str]] = {}
        for key in self.keys:
            name = key.removeprefix(PREFIX)
            for suffix in suffixes:
                if name.endswith("." + suffix):
                    module = name[: -len(suffix) - 1]
                    self.w0_shape(module, "weight", key)  # the module must be in BASE
                    groups.setdefault(module, {})[suffix] = key
                    break
            else:
                if "." in name:
                    module, param = name.rsplit(".", 1)
                    if self._has(module, param):
                        full[key] = (module, param)
                        continue
                raise SourceError(
                    f"{self.file}: tensor {key} is neither a {self.config['peft_type']} tensor "
                    f"nor a tensor of the base model {self.base.dir}"
                )
        return groups, full

    def _has(self, module: str, param: str) -> bool:
        try:
            self.base.tensor_name(module, param)
        except KeyError:
            return False
        return True

    def w0_shape(self, module: str, param: str, key: str) -> tuple[int, ...]:
        """The shape of BASE's ``module.param`` (read from the safetensors header, not the tensor)."""
        try:
            name = self.base.tensor_name(module, param)
        except KeyError:
            raise SourceError(
                f"{self.file}: tensor {key} adapts {module}, "
                f"which has no {param} in the base model {self.base.dir}"
            ) from None
        with safe_open(self.base.files[name], "pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def expect(self, key: str, got: tuple[int, ...], want: tuple[int, ...], what: str) -> None:
        if tuple(got) != tuple(want):
            raise SourceError(
                f"{self.file}: tensor {key} has shape {tuple(got)}; expected {tuple(want)} ({what})"
            )


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _as_tuple(kind))


def meta(shape: tuple[int, ...]) -> Tensor:
    """A shape-only stand-in for W0 (the recorder's form: DoRA and IA3 records are written without W0)."""
    return torch.empty(shape, device="meta")


def linear_shape(adapter: AdapterFile, module: str, key: str) -> tuple[int, int]:
    shape = adapter.w0_shape(module, "weight", key)
    if len(shape) != 2:
        raise NotFactored(f"module {module} has a {len(shape)}-D weight {shape}")
    return shape[0], shape[1]


def full_copies(
    adapter: AdapterFile,
    full: dict[str, tuple[str, str]],
    out: dict[str, Record],
    tensors: dict[str, tuple[str, str]],
) -> None:
    """``modules_to_save``: the saved parameter replaces W0's; ΔW = W − W0 (float64, exact)."""
    for key, (module, param) in full.items():
        w0 = adapter.base.get(module, param)
        new = adapter.tensor(key)
        adapter.expect(key, tuple(new.shape), tuple(w0.shape), f"the base model's {module}.{param}")
        diff = new.to(F64) - w0.to(F64)
        name = module if (param == "weight" and diff.ndim == 2) else f"{module}.{param}"
        out[name] = Dense(diff) if diff.ndim == 2 else VectorDelta(diff)
        tensors[name] = (module, param)
