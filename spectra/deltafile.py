"""One HDF5 file of a run, opened and checked, and the delta file read module by module.

Every HDF5 file of a run (``deltas/step_NNNNNN.h5``, ``base/weights.h5``, ``base/spectra.h5``) carries a
``format`` and a ``schema_version`` attribute and a checksum of its root attributes;
:func:`open_checked` opens only a regular file (a FIFO would block) and checks all three.
:class:`DeltaFile` is one recorded step: the declared kind, shape and factored rank of each module
(:meth:`DeltaFile.info`, no tensor read), and each module's :class:`spectra.codecs.Stored` record
(:meth:`DeltaFile.read`), every dataset checked against the codec table (dtypes included), its
``dtype`` attribute against what HDF5 stores, its checksum where it has one. A file's ``step`` must match
its name; each problem is a :class:`DeltaFileError` naming the file and module.

The run directory around these files is :mod:`spectra.store`'s; writing is :mod:`spectra.writer`'s.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from torch import Tensor

from spectra.codecs import CODECS, Stored, check_record, codec
from spectra.errors import DeltaFileError, first_line
from spectra.h5io import ATTRS_CHECKSUM, ChecksumError, attr_str, attrs_checksum, check_attrs, read_tensor

SCHEMA_VERSION = 1
DELTA_FORMAT = "spectra-delta"
WEIGHTS_FORMAT = "spectra-base-weights"
SPECTRA_FORMAT = "spectra-base-spectra"
#: Root attribute of a delta file: how many module groups the writer put in it.
MODULE_COUNT = "module_count"


def h5name(module: str) -> str:
    """The HDF5 group name of a module (a ``/`` in a module name would open a subgroup)."""
    return module.replace("/", "|")


def delta_filename(step: int) -> str:
    """``step_000050.h5`` for step 50."""
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    return f"step_{step:06d}.h5"


def _check_version(f: h5py.File, path: Path, fmt: str) -> None:
    got_fmt = attr_str(f, "format")
    if got_fmt != fmt:
        raise DeltaFileError(f"{path}: format attribute is {got_fmt!r}; expected {fmt!r}")
    version = f.attrs.get("schema_version", None)
    if not isinstance(version, (int, np.integer)) or version != SCHEMA_VERSION:
        raise DeltaFileError(
            f"{path}: schema_version {version} is not supported; this spectra reads "
            f"version {SCHEMA_VERSION} (upgrade spectra or rewrite the file)"
        )


def open_checked(path: Path, fmt: str) -> h5py.File:
    """Open an HDF5 file of format ``fmt`` for reading; only regular files are opened."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DeltaFileError(f"{path}: file is missing") from None
    except OSError as e:
        raise DeltaFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise DeltaFileError(f"{path}: not a regular file (a FIFO, device or folder); expected an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DeltaFileError(
            f"{path}: not a readable HDF5 file (truncated or damaged?): {first_line(e)}"
        ) from None
    try:
        check_attrs(f)
        _check_version(f, path, fmt)
    except DeltaFileError:
        f.close()
        raise
    except Exception as e:  # damaged root metadata
        f.close()
        raise DeltaFileError(f"{path}: damaged file metadata ({type(e).__name__}: {first_line(e)})") from e
    return f


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ModuleInfo:
    """What the file says about one module without reading its tensors."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int  # columns of the factored form (0 for kinds that are not factored)

    @property
    def needs_w0(self) -> bool:
        return CODECS[self.kind].needs_w0 if self.kind in CODECS else False

    @property
    def matrix(self) -> bool:
        return CODECS[self.kind].matrix if self.kind in CODECS else True


class DeltaFile:
    """One open delta file; modules are read one at a time (``with DeltaFile(path) as d: ...``).

    ``step``, when given, must equal the file's ``step`` attribute (a file renamed or linked under
    another step's name is an error, not another step's numbers).
    """

    def __init__(self, path: str | Path, step: int | None = None):
        self.path = Path(path)
        self._f = open_checked(self.path, DELTA_FORMAT)
        try:
            self.step = int(self._f.attrs["step"])
            if step is not None and self.step != step:
                raise DeltaFileError(
                    f"{self.path}: the file says it is step {self.step}, but its name is step {step}'s "
                    "(renamed or linked?)"
                )
            groups = self._f["modules"]
            if not isinstance(groups, h5py.Group):
                raise DeltaFileError(f"{self.path}: /modules is not a group")
            self._groups: dict[str, h5py.Group] = {}
            self.duplicates: set[str] = set()
            self._held = 0  # module groups in the file (a name stored twice counts twice)
            for key, g in groups.items():
                self._held += 1
                if not isinstance(g, h5py.Group):
                    raise DeltaFileError(f"{self.path}: /modules/{key} is not a group")
                name = attr_str(g, "name") or key
                if name in self._groups:
                    self.duplicates.add(name)
                self._groups[name] = g
            count = self._f.attrs.get(MODULE_COUNT, None)
            self.declared: int | None = None if count is None else _as_count(count)
            if count is not None and self.declared is None:
                raise DeltaFileError(
                    f"{self.path}: {MODULE_COUNT} attribute is {count!r}; expected a non-negative integer"
                )
        except DeltaFileError:
            self._f.close()
            raise
        except Exception as e:  # a bit flip in metadata surfaces as any of several library errors
            self._f.close()
            raise DeltaFileError(
                f"{self.path}: damaged file metadata ({type(e).__name__}: {first_line(e)})"
            ) from e

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def modules(self) -> list[str]:
        return list(self._groups)

    @property
    def lost(self) -> int:
        """How many module groups the file's ``module_count`` says it lacks (0 for files without it)."""
        return max(0, (self.declared or 0) - self._held)

    def info(self, module: str) -> ModuleInfo:
        """Kind, declared shape and factored rank of ``module`` (checked against the codec table)."""
        g = self._group(module)
        try:
            check_attrs(g)
            stored = g.attrs.get(ATTRS_CHECKSUM)
            if stored is not None and int(stored) != attrs_checksum(g):
                raise DeltaFileError(
                    f"{self.path}: module {module!r} is corrupt: its attributes fail their checksum"
                )
            kind = attr_str(g, "kind")
            c = codec(kind)
            raw_shape = np.asarray(g.attrs["shape"])
            shape = tuple(int(x) for x in raw_shape.reshape(-1))
            dims = 2 if c.matrix else 1
            if raw_shape.ndim != 1 or len(shape) != dims or min(shape, default=0) < 1:
                raise DeltaFileError(
                    f"{self.path}: module {module!r}: shape attribute {raw_shape.tolist()} is not "
                    f"{dims} positive integer(s)"
                )
            rank = c.rank({k: self._shape(g, k) for k in c.rank_from if self._has(g, k)})
        except DeltaFileError:
            raise
        except Exception as e:
            raise DeltaFileError(
                f"{self.path}: module {module!r} lacks a readable shape or kind ({first_line(e)})"
            ) from None
        return ModuleInfo(module, c.kind, shape, rank)

    def read(self, module: str) -> Stored:
        """The module's stored record, every dataset read and checked against the codec table (its
        ``dtype`` attribute against the HDF5 type, its checksum where it has one)."""
        info = self.info(module)
        g = self._group(module)
        c = CODECS[info.kind]
        try:
            tensors = {k: self._get(g, k) for k in c.datasets if self._has(g, k)}
            extra = sorted(k for k in g if k not in c.datasets)
            if extra:
                raise ValueError(f"unexpected dataset {extra[0]!r} for kind {c.kind}")
            rec = Stored(info.kind, info.shape, tensors, {a: g.attrs[a] for a in c.attrs if a in g.attrs})
            check_record(rec)
        except (OSError, ChecksumError) as e:
            raise DeltaFileError(f"{self.path}: module {module!r} is corrupt: {first_line(e)}") from None
        except Exception as e:
            raise DeltaFileError(f"{self.path}: module {module!r} is damaged: {first_line(e)}") from None
        return rec

    def _group(self, module: str) -> h5py.Group:
        if module not in self._groups:
            raise DeltaFileError(f"{self.path}: no module {module!r}")
        if module in self.duplicates:
            raise DeltaFileError(f"{self.path}: module {module!r} is stored twice in this file")
        return self._groups[module]

    def _has(self, g: h5py.Group, key: str) -> bool:
        return key in g or f"{key}_ref" in g.attrs

    def _shape(self, g: h5py.Group, key: str) -> tuple[int, ...]:
        if key in g:
            return tuple(g[key].shape)
        return tuple(int(x) for x in g.attrs[f"{key}_ref_shape"])

    def _get(self, g: h5py.Group, key: str) -> Tensor:
        if key in g:
            return read_tensor(g[key], strict=True)
        ref = attr_str(g, f"{key}_ref")
        if ref is None:
            raise KeyError(f"dataset {key!r} missing")
        rows, cols = (int(x) for x in g.attrs[f"{key}_ref_shape"])
        target = self._f.get(ref)
        if not isinstance(target, h5py.Dataset):
            raise KeyError(f"{key}_ref {ref!r} names no dataset")
        return read_tensor(target, rows, cols, strict=True)


def _as_count(v: Any) -> int | None:
    """A non-negative integer attribute's value, or None when it is not one."""
    a = np.asarray(v)
    return int(a) if a.shape == () and a.dtype.kind in "iu" and int(a) >= 0 else None
