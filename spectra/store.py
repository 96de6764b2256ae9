"""The run directory: reading and writing ``run.json``, ``base/``, ``deltas/``, ``metrics.jsonl``.

The on-disk format is documented in docs/format.md so that it can be read without spectra. In short::

    runs/<name>/
      run.json                 resolved configuration (+ "schema_version")
      base/weights.h5          W0 of every adapted module   (or base/pointer.json → safetensors files)
      base/spectra.h5          σ(W0), top/bottom singular vectors, written once by ensure_base_spectra
      deltas/step_000050.h5    one file per recorded step, written atomically
      metrics.jsonl            one JSON object per logged training step
      eval.jsonl               evaluation results over training

Writes go to a temporary name in the same folder and are renamed into place; readers never see a
half-written file, and an interrupted write leaves the previous file untouched.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from spectra.base import DEFAULT_KEEP, BaseSpectrum, compute_base_spectrum
from spectra.errors import DeltaFileError, RunDirError, ShapeMismatchError
from spectra.h5io import atomic_path, attr_str, read_tensor, write_json, write_tensor
from spectra.metrics.collapse import CollapseRule, detect_collapse, step_medians
from spectra.operators import DeltaOperator, Dense, DoRA, LowRank, Scaled, VectorDelta
from spectra.svd import default_device

SCHEMA_VERSION = 1
DELTA_FORMAT = "spectra-delta"
WEIGHTS_FORMAT = "spectra-base-weights"
SPECTRA_FORMAT = "spectra-base-spectra"
_STEP_RE = re.compile(r"^step_(\d{6,})\.h5$")

Record = DeltaOperator | VectorDelta


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


def _open(path: Path, fmt: str) -> h5py.File:
    if not path.exists():
        raise DeltaFileError(f"{path}: file is missing")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DeltaFileError(
            f"{path}: not a readable HDF5 file (truncated or damaged?): {str(e).splitlines()[0]}"
        ) from None
    try:
        _check_version(f, path, fmt)
    except DeltaFileError:
        f.close()
        raise
    return f


# --------------------------------------------------------------------------------------------- writing


class RunWriter:
    """Writes a run directory. The trainer's checkpoint callback and synthetic benchmarks use this."""

    def __init__(self, path: str | Path):
        self.path = Path(path)  # folders are made on first write: a run that never starts leaves nothing

    def _folder(self, name: str = "") -> Path:
        folder = self.path / name if name else self.path
        folder.mkdir(parents=True, exist_ok=True)
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
                g = mods.create_group(_h5name(name))
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

    def write_delta(
        self, step: int, modules: Mapping[str, Record], shared: Mapping[str, Tensor] | None = None
    ) -> Path:
        """``deltas/step_NNNNNN.h5`` with every module's update in its exact stored form.

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
            for name, rec in modules.items():
                _write_record(mods.create_group(_h5name(name)), name, rec, shared)
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


def _h5name(module: str) -> str:
    return module.replace("/", "|")


def _write_record(g: h5py.Group, name: str, rec: Record, shared: Mapping[str, Tensor]) -> None:
    g.attrs["name"] = name
    g.attrs["shape"] = list(rec.shape)

    def put(key: str, t: Tensor | None) -> None:
        if t is None:
            return
        for sname, s in shared.items():
            if t.ndim == 2 and t.data_ptr() == s.data_ptr() and t.stride() == s.stride():
                g.attrs[f"{key}_ref"] = f"/shared/{sname}"
                g.attrs[f"{key}_ref_shape"] = list(t.shape)
                return
        write_tensor(g, key, t)

    if isinstance(rec, Dense):
        g.attrs["kind"] = "dense"
        put("delta", rec.delta)
    elif isinstance(rec, LowRank):
        g.attrs["kind"] = "lowrank"
        g.attrs["scale"] = float(rec.scale)
        for key in ("B", "A", "mid", "row", "B0", "A0"):
            put(key, getattr(rec, key))
    elif isinstance(rec, DoRA):
        g.attrs["kind"] = "dora"
        g.attrs["scale"] = float(rec.scale)
        for key in ("B", "A", "magnitude"):
            put(key, getattr(rec, key))
    elif isinstance(rec, Scaled):
        g.attrs["kind"] = "scaled"
        g.attrs["axis"] = rec.axis
        put("l", rec.l)
    elif isinstance(rec, VectorDelta):
        g.attrs["kind"] = "vector"
        put("delta", rec.delta)
    else:
        raise TypeError(
            f"write_delta: module {name!r} has an update of type {type(rec).__name__}; "
            "expected Dense, LowRank, DoRA, Scaled or VectorDelta"
        )


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ModuleInfo:
    """What the file says about one module without reading its tensors."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int  # columns of the factored form (0 for non-factored kinds)


class DeltaFile:
    """One open delta file; modules are read one at a time (``with DeltaFile(path) as d: ...``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = _open(self.path, DELTA_FORMAT)
        self.step = int(self._f.attrs.get("step", -1))
        try:
            self._groups = {attr_str(g, "name") or k: g for k, g in self._f["modules"].items()}
        except (KeyError, OSError) as e:
            self._f.close()
            raise DeltaFileError(f"{self.path}: no readable /modules group ({e})") from None

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def modules(self) -> list[str]:
        return list(self._groups)

    def info(self, module: str) -> ModuleInfo:
        g = self._group(module)
        kind = attr_str(g, "kind") or "?"
        try:
            shape = tuple(int(x) for x in g.attrs["shape"])
            rank = 0
            if kind == "lowrank":
                rank = self._dim(g, "B", -1) + (self._dim(g, "B0", -1) if self._has(g, "B0") else 0)
        except (KeyError, TypeError, ValueError, IndexError, OSError) as e:
            raise DeltaFileError(
                f"{self.path}: module {module!r} lacks a readable shape or B ({e})"
            ) from None
        return ModuleInfo(module, kind, shape, rank)

    def read(self, module: str, w0: Tensor | None = None) -> Record:
        """The module's update as an operator. DoRA and IA3 need ``w0`` (the original base weight).

        The datasets are checked against each other and against the group's ``shape``."""
        rec = self._read(module, w0)
        declared = self.info(module).shape
        if tuple(rec.shape) != declared:
            raise DeltaFileError(
                f"{self.path}: module {module!r} declares shape {declared} "
                f"but its datasets make {tuple(rec.shape)}"
            )
        return rec

    def _read(self, module: str, w0: Tensor | None) -> Record:
        g = self._group(module)
        kind = attr_str(g, "kind")
        try:
            if kind == "dense":
                return Dense(self._get(g, "delta"))
            if kind == "vector":
                return VectorDelta(self._get(g, "delta"))
            if kind == "lowrank":
                return LowRank(
                    self._get(g, "B"),
                    self._get(g, "A"),
                    float(g.attrs.get("scale", 1.0)),
                    *(self._get(g, k) if self._has(g, k) else None for k in ("mid", "row", "B0", "A0")),
                )
            if kind in ("dora", "scaled"):
                if w0 is None:
                    raise DeltaFileError(f"{self.path}: module {module!r} ({kind}) needs W0 to be read")
                if kind == "dora":
                    return DoRA(
                        w0,
                        self._get(g, "magnitude"),
                        self._get(g, "B"),
                        self._get(g, "A"),
                        float(g.attrs.get("scale", 1.0)),
                    )
                return Scaled(w0, self._get(g, "l"), attr_str(g, "axis") or "row")  # type: ignore[arg-type]
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DeltaFileError(
                f"{self.path}: module {module!r} is damaged: {str(e).splitlines()[0]}"
            ) from None
        raise DeltaFileError(
            f"{self.path}: module {module!r} has unknown kind {kind!r}; expected one of "
            "dense, lowrank, dora, scaled, vector"
        )

    def _group(self, module: str) -> h5py.Group:
        if module not in self._groups:
            raise DeltaFileError(f"{self.path}: no module {module!r}")
        return self._groups[module]

    def _has(self, g: h5py.Group, key: str) -> bool:
        return key in g or f"{key}_ref" in g.attrs

    def _dim(self, g: h5py.Group, key: str, axis: int) -> int:
        if key in g:
            return int(g[key].shape[axis])
        return int(g.attrs[f"{key}_ref_shape"][axis])

    def _get(self, g: h5py.Group, key: str) -> Tensor:
        if key in g:
            return read_tensor(g[key])
        ref = attr_str(g, f"{key}_ref")
        if ref is None:
            raise KeyError(f"dataset {key!r} missing")
        rows, cols = (int(x) for x in g.attrs[f"{key}_ref_shape"])
        return read_tensor(self._f[ref], rows, cols)


class Run:
    """A run directory opened for analysis (see :func:`load_run`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: not a directory; expected a run directory (runs/<name>/)")
        cfg = self.path / "run.json"
        if not cfg.exists():
            raise RunDirError(f"{self.path}: no run.json; this is not a spectra run directory")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{cfg}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise RunDirError(f"{cfg}: expected a JSON object, found {type(self.config).__name__}")
        version = self.config.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RunDirError(
                f"{cfg}: schema_version {version!r} is not supported; expected {SCHEMA_VERSION}"
            )
        self._weights: h5py.File | None = None
        self._pointer: dict[str, Any] | None = None
        self._spectra: h5py.File | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.steps}, modules={len(self.modules)})"

    # -- what is there
    @property
    def steps(self) -> list[int]:
        """Recorded steps, ascending (from the names of the files in deltas/)."""
        d = self.path / "deltas"
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STEP_RE.match(p.name)))

    def delta_path(self, step: int) -> Path:
        return self.path / "deltas" / delta_filename(step)

    def open_delta(self, step: int) -> DeltaFile:
        """The delta file of ``step`` (raises :class:`DeltaFileError` when missing or damaged)."""
        return DeltaFile(self.delta_path(step))

    @property
    def modules(self) -> list[str]:
        """Modules with a base weight, in stored order."""
        if (self.path / "base" / "pointer.json").exists():
            return list(self._read_pointer()["names"])
        return [attr_str(g, "name") or k for k, g in self._weights_file()["modules"].items()]

    # -- base weights and spectra
    def w0(self, module: str) -> Tensor:
        """The original base weight W0 of ``module`` (from base/weights.h5 or the pointed-to files)."""
        if (self.path / "base" / "pointer.json").exists():
            return self._w0_from_pointer(module)
        mods = self._weights_file()["modules"]
        key = _h5name(module)
        if key not in mods:
            raise RunDirError(f"{self.path / 'base' / 'weights.h5'}: no base weight for module {module!r}")
        if "W0" not in mods[key]:
            raise RunDirError(f"{self.path / 'base' / 'weights.h5'}: module {module!r} has no W0 dataset")
        return read_tensor(mods[key]["W0"])

    def base_spectrum(self, module: str) -> BaseSpectrum:
        """W0's reference spectrum, computing and caching base/spectra.h5 on first use."""
        f = self._spectra_file()
        key = _h5name(module)
        if key not in f["modules"]:
            raise RunDirError(
                f"{self.path / 'base' / 'spectra.h5'}: no spectrum for module {module!r}; "
                "delete the file to recompute it"
            )
        g = f["modules"][key]
        return BaseSpectrum(*(read_tensor(g[k]) for k in ("sigma", "U", "V", "U_minor", "V_minor")))

    def base_fingerprint(self) -> dict[str, list[int] | None]:
        """Size and modification time (ns) of the files W0 is read from: ``base/weights.h5``, or
        ``base/pointer.json`` and the safetensors files it names (None for a file that is missing)."""
        base = self.path / "base"
        files = [base / "weights.h5"] if (base / "weights.h5").exists() else [base / "pointer.json"]
        if files[0].name == "pointer.json" and files[0].exists():
            try:
                files += [Path(f) for f in json.loads(files[0].read_text()).get("files", [])]
            except (OSError, ValueError, AttributeError):
                pass  # a damaged pointer: reading W0 reports it
        stats = {f.name: f.stat() if f.exists() else None for f in files}
        return {name: [st.st_size, st.st_mtime_ns] if st else None for name, st in stats.items()}

    def ensure_base_spectra(
        self,
        keep: int | None = None,
        device: torch.device | str | None = None,
        progress: Callable[[int, int, str], None] | None = None,
    ) -> Path:
        """Compute σ(W0) and the kept singular vectors for every matrix module once; write
        base/spectra.h5 atomically. Does nothing if the file exists and keeps at least ``keep`` vectors
        (any number when ``keep`` is None; a new file keeps ``DEFAULT_KEEP``). ``progress(done, total,
        label)`` is called after each module."""
        path = self.path / "base" / "spectra.h5"
        source = json.dumps(self.base_fingerprint(), sort_keys=True)
        if path.exists():
            try:
                with h5py.File(path, "r") as f:
                    enough = keep is None or int(f.attrs.get("keep", 0)) >= keep
                    if enough and attr_str(f, "source") in (None, source):  # older files have no source
                        return path
            except OSError:
                pass  # damaged cache: recompute it
            self._close_spectra()
        keep = DEFAULT_KEEP if keep is None else keep
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = SPECTRA_FORMAT
            f.attrs["source"] = source  # W0's files as they were: rewritten W0, recomputed spectra
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["keep"] = keep
            mods = f.create_group("modules")
            for i, module in enumerate(self.modules, 1):
                w0 = self.w0(module)
                if w0.ndim == 2:  # vector parameters (LayerNorm tuning) have no spectrum
                    spec = compute_base_spectrum(w0.to(device or default_device()), keep)
                    g = mods.create_group(_h5name(module))
                    g.attrs["name"] = module
                    g.attrs["shape"] = list(w0.shape)
                    for k in ("sigma", "U", "V", "U_minor", "V_minor"):
                        write_tensor(g, k, getattr(spec, k))
                if progress:
                    progress(i, len(self.modules), "base spectra (once per run)")
        return path

    # -- updates
    def delta(self, step: int, module: str) -> Record:
        """ΔW of ``module`` at ``step`` as an operator, checked against W0's shape."""
        with self.open_delta(step) as d:
            return self.read_module(d, module)[0]

    def deltas(self, step: int) -> Iterator[tuple[str, Record]]:
        """Stream ``(module, operator)`` pairs of one step, one module in memory at a time."""
        with self.open_delta(step) as d:
            for module in d.modules:
                yield module, self.read_module(d, module)[0]

    def read_module(self, d: DeltaFile, module: str) -> tuple[Record, Tensor]:
        """``(ΔW operator, W0)`` of ``module`` from an open delta file, checked against W0's shape."""
        info = d.info(module)
        w0 = self.w0(module)
        if tuple(w0.shape) != info.shape:
            raise ShapeMismatchError(
                f"{d.path}: module {module!r} has ΔW of shape {info.shape} but W0 is "
                f"{tuple(w0.shape)}; the run's base/ does not match its deltas"
            )
        return d.read(module, w0 if info.kind in ("dora", "scaled") else None), w0

    # -- logs
    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.jsonl as a DataFrame (one row per logged training step)."""
        return read_jsonl(self.path / "metrics.jsonl")

    @property
    def eval(self) -> pd.DataFrame:
        """eval.jsonl as a DataFrame."""
        return read_jsonl(self.path / "eval.jsonl")

    @property
    def rewards(self) -> pd.DataFrame | None:
        """``step`` and ``reward`` of metrics.jsonl (logged rows with a reward), or None without any."""
        logged = self.metrics
        if not {"step", "reward"} <= set(logged.columns):
            return None
        return logged[["step", "reward"]].dropna().sort_values("step")

    def analyze(self, steps: list[int] | None = None, **engine_options: Any) -> pd.DataFrame:
        """Every metric for every recorded step and module: one row per step × module.

        Keyword options are those of :class:`spectra.engine.EngineConfig`.
        """
        from spectra.engine import EngineConfig, analyze_run

        return analyze_run(self, steps, EngineConfig(**engine_options))

    def collapse(
        self, analysis: pd.DataFrame | None = None, rule: CollapseRule | None = None
    ) -> pd.DataFrame:
        """The rank-collapse flag per checkpoint (:func:`spectra.metrics.detect_collapse`), from
        ``analysis`` (or a fresh :meth:`analyze`) and the ``reward`` column of metrics.jsonl."""
        analysis = self.analyze() if analysis is None else analysis
        return detect_collapse(step_medians(analysis), self.rewards, rule)

    def close(self) -> None:
        for f in (self._weights, self._spectra):
            if f is not None:
                f.close()
        self._weights = self._spectra = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _weights_file(self) -> h5py.File:
        if self._weights is None:
            path = self.path / "base" / "weights.h5"
            if not path.exists():
                raise RunDirError(
                    f"{self.path}: no base/weights.h5 or base/pointer.json; the run has no "
                    "base weights recorded yet"
                )
            try:
                self._weights = _open(path, WEIGHTS_FORMAT)
            except DeltaFileError as e:
                raise RunDirError(str(e)) from None
        return self._weights

    def _spectra_file(self) -> h5py.File:
        if self._spectra is None:
            path = self.ensure_base_spectra()
            try:
                self._spectra = _open(path, SPECTRA_FORMAT)
            except DeltaFileError as e:
                raise RunDirError(str(e)) from None
        return self._spectra

    def _close_spectra(self) -> None:
        if self._spectra is not None:
            self._spectra.close()
            self._spectra = None

    def _read_pointer(self) -> dict[str, Any]:
        if self._pointer is None:
            path = self.path / "base" / "pointer.json"
            try:
                ptr = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise RunDirError(f"{path}: not valid JSON ({e})") from None
            if not (
                isinstance(ptr, dict)
                and isinstance(ptr.get("files"), list)
                and isinstance(ptr.get("names"), dict)
            ):
                raise RunDirError(f'{path}: expected {{"files": [...], "names": {{module: tensor}}}}')
            self._pointer = ptr
        return self._pointer

    def _w0_from_pointer(self, module: str) -> Tensor:
        from safetensors import safe_open

        ptr = self._read_pointer()
        name = ptr["names"].get(module)
        if name is None:
            raise RunDirError(f"{self.path / 'base' / 'pointer.json'}: no tensor named for module {module!r}")
        for file in ptr["files"]:
            if not Path(file).exists():
                raise RunDirError(f"{self.path / 'base' / 'pointer.json'}: base checkpoint {file} is missing")
            with safe_open(file, framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise RunDirError(
            f"{self.path / 'base' / 'pointer.json'}: tensor {name!r} (module {module!r}) is in "
            f"none of {ptr['files']}"
        )


def read_jsonl(path: Path) -> pd.DataFrame:
    """A JSON-lines file as a DataFrame. A missing file gives an empty frame; a line that is not a JSON
    object (a torn append from an interrupted run) is skipped with a warning naming it."""
    if not path.exists():
        return pd.DataFrame()
    rows, bad = [], []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(i + 1)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s): {bad[:10]}", stacklevel=2)
    return pd.DataFrame(rows)


def load_run(path: str | Path) -> Run:
    """Open a run directory: ``run.config``, ``run.steps``, ``run.modules``, ``run.delta(step, module)``,
    ``run.metrics`` / ``run.eval`` (pandas) and ``run.analyze()`` (one row per step × module)."""
    return Run(path)
