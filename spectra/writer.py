"""Writing a run directory: ``run.json``, ``base/``, ``deltas/``, ``metrics.jsonl`` (docs/format.md).

Every file is written to a temporary name in its folder and renamed into place (:func:`atomic_path`):
readers never see a half-written file and an interrupted write leaves the previous file untouched. The
first write of a :class:`RunWriter` into a folder removes the temporary files an interrupted writer of
the same run left there. Updates are written in their stored form (:mod:`spectra.codecs`), which every
operator of :mod:`spectra.operators` gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import h5py
from torch import Tensor

from spectra.codecs import CODECS, Stored, check_dtype
from spectra.deltafile import (
    DELTA_FORMAT,
    MODULE_COUNT,
    SCHEMA_VERSION,
    SPECTRA_FORMAT,
    WEIGHTS_FORMAT,
    delta_filename,
    h5name,
)
from spectra.h5io import (
    ATTRS_CHECKSUM,
    atomic_path,
    attrs_checksum,
    remove_stale_temporaries,
    write_json,
    write_tensor,
)


class Storable(Protocol):
    """Anything with a stored form (every operator in :mod:`spectra.operators`)."""

    def to_stored(self) -> Stored: ...


class RunWriter:
    """Writes a run directory. The trainer's checkpoint callback and synthetic benchmarks use this."""

    def __init__(self, path: str | Path):
        self.path = Path(path)  # folders are made on first write: a run that never starts leaves nothing
        self._cleaned: set[Path] = set()

    def _folder(self, name: str = "") -> Path:
        folder = self.path / name if name else self.path
        folder.mkdir(parents=True, exist_ok=True)
        if folder not in self._cleaned:  # what an interrupted writer of this run left behind
            remove_stale_temporaries(folder)
            self._cleaned.add(folder)
        return folder

    def write_config(self, config: Mapping[str, Any]) -> None:
        """``run.json``: the resolved configuration, with ``schema_version`` added."""
        write_json(self._folder() / "run.json", {**config, "schema_version": SCHEMA_VERSION})

    def write_base_weights(self, weights: Mapping[str, Tensor]) -> None:
        """``base/weights.h5``: W0 of every adapted module (and θ0 of vector parameters), once."""
        with atomic_path(self._folder("base") / "weights.h5") as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = WEIGHTS_FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            mods = f.create_group("modules")
            for name, w in weights.items():
                g = mods.create_group(h5name(name))
                g.attrs["name"] = name
                write_tensor(g, "W0", w)

    def write_base_pointer(self, files: list[str | Path], names: Mapping[str, str]) -> None:
        """``base/pointer.json``: W0 lives in safetensors files (``names`` maps module → tensor name)."""
        write_json(
            self._folder("base") / "pointer.json",
            {
                "format": "safetensors",
                "files": [str(Path(p).resolve()) for p in files],
                "names": dict(names),
                "schema_version": SCHEMA_VERSION,
            },
        )

    def write_base_spectra(
        self, spectra: Iterable[tuple[str, tuple[int, ...], Mapping[str, Tensor]]], attrs: Mapping[str, Any]
    ) -> Path:
        """``base/spectra.h5`` from ``(module, shape, {name: tensor})`` entries, consumed one at a time
        (the caller may compute each lazily), with the root attributes ``attrs``."""
        path = self._folder("base") / "spectra.h5"
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = SPECTRA_FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value
            mods = f.create_group("modules")
            for module, shape, tensors in spectra:
                g = mods.create_group(h5name(module))
                g.attrs["name"] = module
                g.attrs["shape"] = list(shape)
                for key, t in tensors.items():
                    write_tensor(g, key, t)
        return path

    def write_delta(
        self,
        step: int,
        modules: Mapping[str, Storable] | Iterable[tuple[str, Storable]],
        shared: Mapping[str, Tensor] | None = None,
    ) -> Path:
        """``deltas/step_NNNNNN.h5`` with every module's update in its exact stored form.

        ``modules``: a mapping, or ``(name, update)`` pairs consumed one at a time (an importer streams a
        model's updates through it, one module in memory at a time).

        ``shared`` names matrices stored once under ``/shared`` (VeRA's random matrices): a factor that
        is a leading block view of one of them (``shared[:rows, :cols]``) is written as a reference.
        """
        path = self._folder("deltas") / delta_filename(step)
        shared = dict(shared or {})
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = DELTA_FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["step"] = step
            sh = f.create_group("shared")
            for name, t in shared.items():
                write_tensor(sh, name, t)
            mods = f.create_group("modules")
            count = 0
            for name, rec in modules.items() if isinstance(modules, Mapping) else modules:
                _write_record(mods.create_group(h5name(name)), name, rec, shared)
                count += 1
            f.attrs[MODULE_COUNT] = count  # a group lost later is then a gap, not a smaller step
        return path

    def append_metrics(self, row: Mapping[str, Any], filename: str = "metrics.jsonl") -> None:
        """Append one JSON line to ``metrics.jsonl`` (or ``eval.jsonl``) in a single write."""
        path = self._folder() / filename
        line = json.dumps(dict(row), sort_keys=True) + "\n"
        if path.exists() and path.stat().st_size and not _ends_with_newline(path):
            line = "\n" + line  # an earlier append was torn: keep this row on a line of its own
        with open(path, "a") as fh:
            fh.write(line)
            fh.flush()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1) == b"\n"


def _write_record(g: h5py.Group, name: str, op: Storable, shared: Mapping[str, Tensor]) -> None:
    rec = op.to_stored() if hasattr(op, "to_stored") else op
    if not isinstance(rec, Stored) or rec.kind not in CODECS:
        raise TypeError(
            f"write_delta: module {name!r} has an update of type {type(op).__name__}; expected an "
            "operator of spectra.operators (one with a stored form)"
        )
    for key, t in rec.tensors.items():
        try:
            check_dtype(rec.codec, key, t)
        except ValueError as e:
            raise TypeError(f"write_delta: module {name!r}: {e}") from None
    g.attrs["name"] = name
    g.attrs["kind"] = rec.kind
    g.attrs["shape"] = list(rec.shape)
    for key, value in rec.attrs.items():
        g.attrs[key] = value
    for key, t in rec.tensors.items():
        ref = _shared_ref(t, shared)
        if ref is None:
            write_tensor(g, key, t)
        else:
            g.attrs[f"{key}_ref"] = f"/shared/{ref}"
            g.attrs[f"{key}_ref_shape"] = list(t.shape)
    g.attrs[ATTRS_CHECKSUM] = attrs_checksum(g)  # last: it covers every attribute above


def _shared_ref(t: Tensor, shared: Mapping[str, Tensor]) -> str | None:
    """The name of the shared matrix ``t`` is a leading block view of, if any."""
    for sname, s in shared.items():
        if t.ndim == 2 and t.data_ptr() == s.data_ptr() and t.stride() == s.stride():
            return sname
    return None
