"""Small HDF5 and file helpers: atomic writes and tensors with their dtype kept as an attribute.

HDF5 has no bfloat16; a bfloat16 tensor is stored as its raw 16-bit pattern (uint16) with the attribute
``dtype = "bfloat16"``. Every dataset carries ``dtype`` (the torch dtype name) so that a reader in any
language knows what the bits mean, and HDF5's fletcher32 checksum, so that a damaged byte is an error
when read rather than a changed number.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    return ds


def read_tensor(
    ds: h5py.Dataset, rows: int | None = None, cols: int | None = None, strict: bool = False
) -> Tensor:
    """Read a dataset written by :func:`write_tensor`, optionally only its leading rows × cols block.

    ``strict``: the ``dtype`` attribute must match the type HDF5 stores (an ``int32`` label on float data
    would otherwise be read as other numbers), and may be absent only for plain float data; ValueError
    otherwise."""
    name = ds.attrs.get("dtype", None)
    name = name.decode() if isinstance(name, bytes) else name
    unlabelled_float = name is None and ds.dtype.kind == "f"  # self-describing: read as stored
    if strict and not unlabelled_float and (name not in _STORED_AS or ds.dtype != _STORED_AS[name]):
        raise ValueError(
            f"dataset {ds.name!r} declares dtype {name!r} but stores {ds.dtype}; expected one of "
            f"{', '.join(f'{k} (stored as {v})' for k, v in _STORED_AS.items())}"
        )
    if rows is not None or cols is not None:
        arr = ds[: rows if rows is not None else ds.shape[0], : cols if cols is not None else ds.shape[1]]
    else:
        arr = ds[()]
    arr = np.asarray(arr)
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if name in _NAME_TO_TORCH and t.dtype != _NAME_TO_TORCH[name]:
        t = t.to(_NAME_TO_TORCH[name])
    return t


ATTRS_CHECKSUM = "attrs_crc32"


def attrs_checksum(obj: h5py.HLObject) -> int:
    """CRC-32 of an HDF5 object's attributes (all but the checksum itself), in a canonical JSON form.

    Datasets are protected by fletcher32; this protects the attributes that change what they mean
    (``scale``, ``shape``, ``kind``, references), which HDF5 does not checksum."""
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
    """A string attribute, decoded."""
    v = obj.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else (None if v is None else str(v))
