"""Small HDF5 and file helpers: atomic writes and tensors with their dtype kept as an attribute.

HDF5 has no bfloat16; a bfloat16 tensor is stored as its raw 16-bit pattern (uint16) with the attribute
``dtype = "bfloat16"``. Every dataset carries ``dtype`` (the torch dtype name) so that a reader in any
language knows what the bits mean, HDF5's fletcher32 checksum of each chunk, and ``crc32``: the CRC-32
(zlib) of the whole array's bytes (C order, little-endian, as stored), so that a damaged byte is an
error when read rather than a changed number.

Why a whole-array checksum as well as fletcher32: fletcher32 only checks the chunks HDF5 finds. A
damaged chunk index (a flipped byte in a B-tree node) loses a chunk, and HDF5 then returns the fill
value (zeros) for it without any error. The CRC-32 of the array as read catches that, and any other way
of reading numbers that are not the ones written (a damaged shape, type or filter mask). Files written
before ``crc32`` existed are checked as far as they can be: every chunk of the array present exactly
once, each with its filters applied (:func:`check_chunks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

_TORCH_TO_NAME = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}
_NAME_TO_TORCH = {v: k for k, v in _TORCH_TO_NAME.items()}
#: The numpy type HDF5 stores each dtype name as (bfloat16: its raw bits).
_STORED_AS = {name: np.dtype(np.uint16 if name == "bfloat16" else name) for name in _NAME_TO_TORCH}
_TMP_PATTERN = ".*.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An interrupted write leaves neither a half-written ``path`` nor the temporary file behind, and an
    existing ``path`` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files (``.<name>.XXXX.tmp``) an interrupted :func:`atomic_path` left in
    ``folder``; returns them. Call it only as the one writer of that folder."""
    removed = []
    for tmp in folder.glob(_TMP_PATTERN):
        if tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indent 2, keys sorted)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def write_tensor(group: h5py.Group, name: str, t: Tensor, compression: str | None = None) -> h5py.Dataset:
    """Store a tensor as a dataset with a ``dtype`` attribute (bfloat16 as raw uint16)."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in _TORCH_TO_NAME:
        raise TypeError(
            f"write_tensor: dtype {t.dtype} of {name!r} is not storable; expected one of "
            f"{sorted(_NAME_TO_TORCH)}"
        )
    data = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    checksum = data.ndim > 0 and data.size > 0  # HDF5 filters need a chunked, non-empty dataset
    ds = group.create_dataset(name, data=data, compression=compression, fletcher32=checksum)
    ds.attrs["dtype"] = _TORCH_TO_NAME[t.dtype]
    ds.attrs[DATA_CHECKSUM] = data_checksum(data)
    return ds


DATA_CHECKSUM = "crc32"


class ChecksumError(ValueError):
    """A dataset's numbers are not the ones written: its crc32 differs, or a chunk is missing."""


def data_checksum(arr: np.ndarray) -> int:
    """CRC-32 (zlib) of an array's bytes in C order, little-endian: the ``crc32`` attribute of a dataset."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return zlib.crc32(arr.reshape(-1).view(np.uint8))


def check_chunks(ds: h5py.Dataset) -> None:
    """ChecksumError unless every chunk of a chunked dataset is stored exactly once, with all its
    filters applied (HDF5 reads a chunk its index has lost as the fill value, without an error)."""
    if ds.chunks is None or ds.size == 0:
        return
    found: list[tuple[tuple[int, ...], int]] = []
    try:
        ds.id.chunk_iter(lambda info: found.append((tuple(info.chunk_offset), info.filter_mask)))
    except AttributeError:  # HDF5 before 1.14: one look-up per chunk
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            found.append((tuple(info.chunk_offset), info.filter_mask))
    expected = 1
    for size, chunk in zip(ds.shape, ds.chunks, strict=True):
        expected *= -(-size // chunk)
    offsets = {offset for offset, _ in found}
    on_grid = all(
        o % c == 0 and o < size
        for offset in offsets
        for o, c, size in zip(offset, ds.chunks, ds.shape, strict=True)
    )
    if len(found) != expected or len(offsets) != expected or not on_grid:
        raise ChecksumError(
            f"dataset {ds.name!r}: its chunk index lists {len(found)} chunk(s) of the {expected} its shape "
            "needs (a damaged index: lost chunks would read as zeros)"
        )
    if any(mask for _, mask in found):
        raise ChecksumError(f"dataset {ds.name!r}: a chunk is stored with its filters (checksum) skipped")


def read_tensor(
    ds: h5py.Dataset, rows: int | None = None, cols: int | None = None, strict: bool = False
) -> Tensor:
    """Read a dataset written by :func:`write_tensor`, optionally only its leading rows × cols block.

    ``strict``: the ``dtype`` attribute must match the type HDF5 stores (an ``int32`` label on float data
    would otherwise be read as other numbers), and may be absent only for plain float data; ValueError
    otherwise. Always: every chunk present (:func:`check_chunks`) and the whole array's ``crc32`` where
    the dataset has one (read whole even for a block); :class:`ChecksumError` otherwise."""
    check_attrs(ds)
    name = ds.attrs.get("dtype", None)
    name = name.decode() if isinstance(name, bytes) else name
    unlabelled_float = name is None and ds.dtype.kind == "f"  # self-describing: read as stored
    if strict and not unlabelled_float and (name not in _STORED_AS or ds.dtype != _STORED_AS[name]):
        raise ValueError(
            f"dataset {ds.name!r} declares dtype {name!r} but stores {ds.dtype}; expected one of "
            f"{', '.join(f'{k} (stored as {v})' for k, v in _STORED_AS.items())}"
        )
    check_chunks(ds)
    stored = ds.attrs.get(DATA_CHECKSUM, None)
    block = rows is not None or cols is not None
    if stored is not None or not block:
        arr = np.asarray(ds[()])  # the whole array: its checksum covers the whole
        if stored is not None and _as_int(stored) != data_checksum(arr):
            raise ChecksumError(
                f"dataset {ds.name!r}: its numbers fail their crc32 checksum (a damaged chunk, chunk "
                "index, shape or type)"
            )
        if block:
            arr = arr[:rows, :cols]
    else:
        arr = np.asarray(ds[:rows, :cols])
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if name in _NAME_TO_TORCH and t.dtype != _NAME_TO_TORCH[name]:
        t = t.to(_NAME_TO_TORCH[name])
    return t


def _as_int(value: Any) -> int | None:
    """An integer attribute's value, or None when it is not one."""
    v = np.asarray(value)
    return int(v) if v.shape == () and v.dtype.kind in "iu" else None


ATTRS_CHECKSUM = "attrs_crc32"


#: The attribute types spectra writes (HDF5 type classes): numbers and strings, nothing else.
_ATTR_CLASSES = frozenset({h5py.h5t.INTEGER, h5py.h5t.FLOAT, h5py.h5t.STRING})
_ATTR_MAX_ELEMENTS = 1 << 16  # spectra's attributes are scalars and short lists


def check_attrs(obj: h5py.HLObject, names: tuple[str, ...] | None = None) -> None:
    """ValueError when an attribute of ``obj`` (or those of ``names`` present) has a type or size that
    spectra never writes. A damaged header can declare such a type, and HDF5 may crash the process
    when asked to read it (a variable-length type that is not a string), so this is checked from the
    type alone, before any value is read."""
    for name in obj.attrs if names is None else names:
        key = name.encode() if isinstance(name, str) else name
        if names is not None and not h5py.h5a.exists(obj.id, key):
            continue
        attr = h5py.h5a.open(obj.id, key)
        t = attr.get_type()
        cls = t.get_class()
        ok = cls in _ATTR_CLASSES and (cls == h5py.h5t.STRING or t.get_size() <= 8)
        elements = attr.get_space().get_simple_extent_npoints()
        if not ok or elements > _ATTR_MAX_ELEMENTS:
            raise ValueError(
                f"{obj.name}: attribute {name!r} has a type or size spectra never writes (damaged header?)"
            )


def attrs_checksum(obj: h5py.HLObject) -> int:
    """CRC-32 of an HDF5 object's attributes (all but the checksum itself), in a canonical JSON form.

    Datasets are protected by fletcher32; this protects the attributes that change what they mean
    (``scale``, ``shape``, ``kind``, references), which HDF5 does not checksum. Call
    :func:`check_attrs` first on an object of a file that may be damaged."""
    items = {k: _plain(v) for k, v in obj.attrs.items() if k != ATTRS_CHECKSUM}
    return zlib.crc32(json.dumps(items, sort_keys=True).encode())


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def attr_str(obj: h5py.HLObject, key: str, default: str | None = None) -> str | None:
    """A string attribute, decoded (its type checked first: :func:`check_attrs`)."""
    check_attrs(obj, (key,))
    v = obj.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))
