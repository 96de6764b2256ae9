"""A model's weight matrices, found and streamed from its safetensors files without loading the model.

:func:`resolve_model` finds the directory (an organism id, a local directory, or a hub id already in the
local hub cache: nothing is downloaded); :func:`weight_files` its safetensors files; :func:`plan_model`
the matrices to read, from the files' headers alone; :func:`stream_batches` reads them file by file and
tensor by tensor into float64 batches of one shape within a memory budget (:func:`work_bytes`), so that
peak memory is one batch, never the whole model. :func:`fingerprint` (size and mtime of each file) keys
caches of what was computed from them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from spectra.errors import SpectraError, first_line
from spectra.names import parse_module_name

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class MaturityError(SpectraError):
    """A model for the maturity probe cannot be found or read, or there is nothing to probe."""


@dataclass(frozen=True)
class Entry:
    """One matrix of a checkpoint: its tensor name, the file holding it, its shape and stored dtype."""

    name: str
    file: Path
    shape: tuple[int, int]
    dtype: str

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


# ------------------------------------------------------------------------------------------ finding models


def resolve_model(model: str) -> Path:
    """The local directory of ``model``: ``organism``/``organism@N``/``random-organism`` (built once and
    cached), a directory holding ``*.safetensors``, or a hub id already in the local hub cache."""
    from spectra.train.config import organism_sft_steps

    if organism_sft_steps(model) is not None:
        from spectra.train.checkpoint import find_model_dir

        return find_model_dir(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MaturityError(f"{model}: not a directory; expected a model directory with *.safetensors")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise MaturityError(f"{model}: no such directory; expected a model directory, a hub id or organism")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
    except Exception as e:
        raise MaturityError(
            f"{model}: not in the local hub cache ({first_line(e)}); the probe downloads nothing: fetch it "
            f"first (huggingface-cli download {model} --include '*.safetensors' '*.json')"
        ) from None
    return Path(local)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names, else every ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MaturityError(f"{index}: not a safetensors index ({first_line(e)})") from None
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MaturityError(f"{model_dir}: no *.safetensors files (the probe reads safetensors only)")
    return files


def fingerprint(model_dir: Path, files: Sequence[Path]) -> dict[str, list[int]]:
    """Size and modification time (ns) of each weight file (and the index), as the cache key."""
    paths = [*files, model_dir / "model.safetensors.index.json"]
    return {
        str(p.relative_to(model_dir)): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.exists()
    }


def plan_model(files: Sequence[Path], all_weights: bool) -> tuple[list[Entry], list[str]]:
    """The matrices to analyse, from the files' headers (no tensor is read): 2-D ``*.weight`` tensors
    inside a numbered layer (``layers.3.…``), every 2-D float tensor with ``all_weights``. Returns them
    and the names of 2-D tensors left out for their dtype (quantized or integer)."""
    entries, skipped = [], []
    for f in files:
        if not f.is_file():
            raise MaturityError(f"{f}: missing (named by the model's safetensors index)")
        try:
            with safe_open(f, "pt") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if len(shape) != 2 or min(shape) < 1:
                        continue
                    if not all_weights and (
                        not name.endswith(".weight") or parse_module_name(name)[0] is None
                    ):
                        continue
                    if dtype not in FLOAT_DTYPES:
                        skipped.append(name)
                        continue
                    entries.append(Entry(name, f, (int(shape[0]), int(shape[1])), dtype))
        except MaturityError:
            raise
        except Exception as e:
            raise MaturityError(f"{f}: not a readable safetensors file ({first_line(e)})") from None
    if not entries:
        raise MaturityError(
            f"{files[0].parent}: no matrices to analyse (no 2-D float weights in numbered layers)"
        )
    return entries, skipped


# ------------------------------------------------------------------------------------------- streaming


def work_bytes(shape: tuple[int, int]) -> int:
    """Float64 bytes one matrix takes while its σ are computed: X and X·V (N×M each) plus the Gram matrix
    and its eigenvectors (M×M each), M = min(shape)."""
    n, m = max(shape), min(shape)
    return 8 * (2 * n * m + 2 * m * m)


def stream_batches(
    entries: Sequence[Entry], budget_bytes: int, device: str
) -> Iterator[tuple[list[Entry], Tensor]]:
    """File by file, batches of same-shape matrices as float64 tensors (b, N, M) on ``device``, each
    batch within ``budget_bytes`` of work (:func:`work_bytes`; a single matrix larger than the budget is
    a batch of one). Tensors are read one at a time and copied into the batch, so at most one tensor
    read from disk is alive beside the batch being filled; the file is opened (memory-mapped) for one
    batch at a time, so that the pages read are unmapped with it, not held until the file's end."""
    by_file: dict[Path, dict[tuple[int, int], list[Entry]]] = {}
    for e in entries:
        by_file.setdefault(e.file, {}).setdefault(e.shape, []).append(e)
    for f, groups in by_file.items():
        for shape, group in groups.items():
            per = max(1, budget_bytes // work_bytes(shape))
            for start in range(0, len(group), per):
                chunk = group[start : start + per]
                X = torch.empty((len(chunk), *shape), dtype=torch.float64, device=device)
                with safe_open(f, "pt") as h:  # opened per batch: the file's mapped pages go with it
                    for i, e in enumerate(chunk):
                        X[i] = h.get_tensor(e.name)  # the tensor read is freed once copied
                yield chunk, X
                del X  # before the next batch is allocated
