"""A model folder's safetensors weights, read tensor by tensor and row block by row block.

``safetensors``' own reader maps the whole file into memory: every page a read touches stays resident
(and counts in the process's RSS) until the file is closed, so streaming a 7B model through it holds a
shard's worth of pages. A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets from the end of the header) and
the raw little-endian tensors; :class:`ModelFiles` reads that header and then only the bytes of the rows
asked for, with ``os.pread``, so that memory stays at one block whatever the model's size.

A folder is a Hugging Face model directory: ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (a shard the index lists but the folder lacks is a
:class:`~spectra.train.importing.errors.SourceError`), or any ``*.safetensors`` files.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from spectra.train.importing.errors import SourceError
from torch import Tensor

from spectra.errors import first_line

#: safetensors dtype → torch dtype (every value little-endian, as safetensors stores them).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOATING = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, safetensors dtype, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file (a damaged or foreign file is a one-line SourceError)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is not plausible")
            header = json.loads(fh.read(n))
        size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: safetensors header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(x) for x in info["shape"])
            begin, end = (8 + n + int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has dtype {dtype}, which spectra does not read")
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize or end > size:
            raise SourceError(f"{path}: tensor {name!r}: its byte range does not fit its shape (truncated?)")
        entries[name] = TensorEntry(path, dtype, shape, begin, end)
    return entries


class ModelFiles:
    """The safetensors tensors of a model (or adapter) folder, by name; ``label`` names it in errors."""

    def __init__(self, folder: str | Path, label: str = "model"):
        if sys.byteorder != "little":  # the bytes are viewed in place as torch tensors
            raise SourceError(f"{folder}: safetensors (little-endian) are read on little-endian hosts only")
        self.dir = Path(folder)
        self.label = label
        self.entries: dict[str, TensorEntry] = {}
        for f in self._files():
            for name, entry in read_header(f).items():
                self.entries.setdefault(name, entry)

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise SourceError(f"{index}: not a safetensors index ({first_line(e)})") from None
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise SourceError(
                    f"{index}: lists {len(shards)} shards but {len(missing)} are missing ({missing[0]}"
                    f"{', …' if len(missing) > 1 else ''})"
                )
            return [self.dir / s for s in shards]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            kinds = sorted({p.suffix for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")})
            extra = (
                f" (it has {', '.join(kinds)} files: spectra reads safetensors only, no pickle)"
                if kinds
                else ""
            )
            raise SourceError(f"{self.dir}: no *.safetensors weights in this {self.label} folder{extra}")
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    def block(self, name: str, start: int = 0, stop: int | None = None) -> tuple[int, int, tuple[int, ...]]:
        """``(start, stop, shape)`` of rows ``start:stop`` of tensor ``name`` (``stop`` clipped)."""
        e = self.entries[name]
        if not e.shape:
            return 0, 1, ()
        stop = e.shape[0] if stop is None else min(stop, e.shape[0])
        return start, stop, (stop - start, *e.shape[1:])

    def rows_into(self, name: str, start: int, stop: int | None, buffer: Tensor) -> Tensor:
        """Rows ``start:stop`` of tensor ``name`` read from disk into ``buffer`` (a contiguous uint8
        tensor at least that many bytes long, reused by the caller so that no block allocates), as a
        view of it in the stored dtype and shape."""
        e = self.entries[name]
        start, stop, shape = self.block(name, start, stop)
        dtype = DTYPES[e.dtype]
        width = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        count = (stop - start) * width
        view = memoryview(buffer.numpy()).cast("B")[:count]
        if len(view) < count:
            raise ValueError(f"rows_into: a buffer of {len(view)} bytes for {count}")
        fd = os.open(e.file, os.O_RDONLY)
        try:
            done = 0
            while done < count:  # pread may return less than asked for
                got = os.preadv(fd, [view[done:]], e.begin + start * width + done)
                if got == 0:
                    raise SourceError(f"{e.file}: tensor {name!r} is truncated")
                done += got
        finally:
            os.close(fd)
        return buffer[:count].view(dtype).reshape(shape)

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of tensor ``name`` (its first dimension), read from disk, as stored."""
        start, stop, shape = self.block(name, start, stop)
        nbytes = math.prod(shape) * DTYPES[self.entries[name].dtype].itemsize
        return self.rows_into(name, start, stop, torch.empty(nbytes, dtype=torch.uint8))

    def get(self, name: str) -> Tensor:
        """The whole tensor ``name`` as stored."""
        return self.rows(name)


def resolve_local(model: str, what: str) -> Path:
    """A local folder for ``model``: the path itself, or a hub id's snapshot in the local cache only
    (``spectra import`` never downloads; ``what`` names the argument in errors)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{what} {model}: not a folder; expected a model, adapter or checkpoint folder")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise SourceError(f"{what} {model}: no such folder; expected a local path or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            local_files_only=True,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:
        raise SourceError(
            f"{what} {model}: not in the local hub cache ({first_line(e)}); spectra import does not "
            f"download: run `hf download {model}` first"
        ) from None
    return Path(local)
