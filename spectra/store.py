"""The run directory, read: ``run.json``, ``base/``, ``deltas/``, ``metrics.jsonl``, ``eval.jsonl``.

This module only reads (no linear algebra): updates cross it as :class:`spectra.codecs.Stored` records,
checked against the codec table; :mod:`spectra.run` turns them into operators and computes. The on-disk
format is documented in docs/format.md so that it can be read without spectra::

    runs/<name>/
      run.json                 resolved configuration (+ "schema_version")
      base/weights.h5          W0 of every adapted module   (or base/pointer.json → safetensors files)
      base/spectra.h5          σ(W0), top/bottom singular vectors (cached by spectra.run)
      deltas/step_000050.h5    one file per recorded step, written atomically
      metrics.jsonl            one JSON object per logged training step
      eval.jsonl               evaluation results over training

:class:`RunStore` says what is there (the steps, from the names of deltas/'s files; the modules, from
base/), opens a step's file (a :class:`spectra.deltafile.DeltaFile`, which checks each file and record it
reads), reads W0 and the cached reference spectra, and the logs. Writing is :mod:`spectra.writer`'s.
Every dataset carries HDF5's fletcher32 checksum and the crc32 of the whole array (:mod:`spectra.h5io`),
so a flipped bit, in the numbers or in the chunk index, is reported as a corrupt file rather than read as
a changed number (files written before checksums existed still read, their chunk index checked complete).

Reading trusts nothing: two files claiming one step are an error, a step whose file lacks a module the
run records is found by :meth:`RunStore.missing_modules`, and a reward log that cannot be read gives no
rewards (:meth:`RunStore.reward_log` says so). In the core, no module but this one and
:mod:`spectra.deltafile` opens a run's files for reading.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import h5py
import pandas as pd
from torch import Tensor

from spectra.deltafile import (
    SCHEMA_VERSION,
    SPECTRA_FORMAT,
    WEIGHTS_FORMAT,
    DeltaFile,
    delta_filename,
    h5name,
    open_checked,
)
from spectra.errors import DeltaFileError, RunDirError, SpectraError, first_line
from spectra.h5io import attr_str, read_tensor

_STEP_RE = re.compile(r"^step_(\d{6,})\.h5$")


class RunStore:
    """A run directory opened for reading (:func:`spectra.load_run` gives a :class:`spectra.pipeline.Run`,
    which adds what needs computation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: not a directory; expected a run directory (runs/<name>/)")
        cfg = self.path / "run.json"
        if not cfg.exists():
            raise RunDirError(f"{self.path}: no run.json; this is not a spectra run directory")
        try:
            self.config: dict[str, Any] = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{cfg}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise RunDirError(f"{cfg}: expected a JSON object, found {type(self.config).__name__}")
        version = self.config.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RunDirError(
                f"{cfg}: schema_version {version!r} is not supported; expected {SCHEMA_VERSION}"
            )
        self._weights: h5py.File | None = None
        self._listings: dict[int, set[str]] = {}  # step → modules its file holds (missing_modules)
        self._pointer: dict[str, Any] | None = None
        self._spectra: h5py.File | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, steps={self.steps}, modules={len(self.modules)})"

    # -- what is there
    def step_files(self) -> dict[int, list[Path]]:
        """Every file of deltas/ named like a delta file, by the step its name says."""
        d = self.path / "deltas"
        found: dict[int, list[Path]] = {}
        if d.exists() and not d.is_dir():
            raise RunDirError(f"{d}: not a folder; expected the folder of delta files (step_NNNNNN.h5)")
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if m := _STEP_RE.match(p.name):
                    found.setdefault(int(m.group(1)), []).append(p)
        return found

    @property
    def steps(self) -> list[int]:
        """Recorded steps, ascending (from the names of the files in deltas/)."""
        return sorted(self.step_files())

    def delta_path(self, step: int) -> Path:
        """The delta file of ``step``; a DeltaFileError when two file names claim that step."""
        paths = self.step_files().get(step, [])
        if len(paths) > 1:
            raise DeltaFileError(
                f"{self.path / 'deltas'}: {len(paths)} files claim step {step} "
                f"({', '.join(p.name for p in paths)}); keep one"
            )
        return paths[0] if paths else self.path / "deltas" / delta_filename(step)

    def open_delta(self, step: int) -> DeltaFile:
        """The delta file of ``step`` (raises :class:`DeltaFileError` when missing or damaged)."""
        return DeltaFile(self.delta_path(step), step)

    def missing_modules(self, step: int, dfile: DeltaFile) -> list[tuple[str | None, str]]:
        """What the open delta file of ``step`` lacks: ``(module, why)`` for each module the run records
        that the file does not hold, and ``(None, why)`` when its ``module_count`` says it lost groups
        that cannot be named. A module the run records is one with a base weight that some step's file
        holds (so a base that lists modules never recorded, as a pointer to a whole checkpoint may, is
        not a gap)."""
        held = set(dfile.modules)
        try:
            base = [m for m in self.modules if m not in held]
        except SpectraError:
            base = []  # base/ unreadable: every module's row says so
        named = [m for m in base if self._recorded_elsewhere(m, step)]
        lost = dfile.lost
        if lost > len(named) and len(base) == lost:  # the file counts them: base/ names them
            named = base
        rows: list[tuple[str | None, str]] = [
            (m, f"{dfile.path}: module {m!r} is missing from this step's file (the run records it)")
            for m in named
        ]
        if lost > len(named):
            rows.append(
                (None, f"{dfile.path}: the file was written with {dfile.declared} module(s) but holds "
                 f"{len(held)}: {lost - len(named)} lost")
            )  # fmt: skip
        return rows

    def incomplete_steps(self) -> dict[int, list[tuple[str | None, str]]]:
        """``{step: missing_modules(...)}`` for every recorded step whose file lacks a module (files that
        cannot be opened are not listed: reading them says why)."""
        gaps = {}
        for step in self.steps:
            try:
                dfile = self.open_delta(step)
            except SpectraError:
                continue
            with dfile:
                if found := self.missing_modules(step, dfile):
                    gaps[step] = found
        return gaps

    def _recorded_elsewhere(self, module: str, step: int) -> bool:
        """Whether a step's file other than ``step``'s holds ``module`` (file listings cached)."""
        cache = self._listings
        for other in self.steps:
            if other == step:
                continue
            if other not in cache:
                try:
                    with self.open_delta(other) as d:
                        cache[other] = set(d.modules)
                except SpectraError:
                    cache[other] = set()
            if module in cache[other]:
                return True
        return False

    @property
    def modules(self) -> list[str]:
        """Modules with a base weight, in stored order."""
        if (self.path / "base" / "pointer.json").exists():
            return list(self._read_pointer()["names"])
        return [attr_str(g, "name") or k for k, g in self._weights_file()["modules"].items()]

    # -- base weights
    def w0(self, module: str) -> Tensor:
        """The original base weight W0 of ``module`` (from base/weights.h5 or the pointed-to files)."""
        if (self.path / "base" / "pointer.json").exists():
            return self._w0_from_pointer(module)
        path = self.path / "base" / "weights.h5"
        mods = self._weights_file()["modules"]
        key = h5name(module)
        if key not in mods:
            raise RunDirError(f"{path}: no base weight for module {module!r}")
        if "W0" not in mods[key]:
            raise RunDirError(f"{path}: module {module!r} has no W0 dataset")
        try:
            return read_tensor(mods[key]["W0"], strict=True)
        except Exception as e:
            raise RunDirError(f"{path}: W0 of module {module!r} is damaged: {first_line(e)}") from None

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

    # -- base spectra (computed by the pipeline, stored here)
    @property
    def base_spectra_path(self) -> Path:
        return self.path / "base" / "spectra.h5"

    def base_spectra_attrs(self) -> dict[str, Any] | None:
        """The root attributes of base/spectra.h5 (``keep``, ``source``, ``precision``), or None when the
        file is missing or unreadable."""
        path = self.base_spectra_path
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                if attr_str(f, "format") != SPECTRA_FORMAT:
                    return None
                return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        except OSError:
            return None

    def read_base_spectrum(self, module: str) -> dict[str, Tensor]:
        """The stored reference spectrum of ``module``: ``sigma``, ``U``, ``V``, ``U_minor``, ``V_minor``."""
        f = self._spectra_file()
        key = h5name(module)
        if key not in f["modules"]:
            raise RunDirError(
                f"{self.base_spectra_path}: no spectrum for module {module!r}; delete the file to "
                "recompute it"
            )
        g = f["modules"][key]
        try:
            return {k: read_tensor(g[k], strict=True) for k in ("sigma", "U", "V", "U_minor", "V_minor")}
        except Exception as e:
            raise RunDirError(
                f"{self.base_spectra_path}: module {module!r} is damaged ({first_line(e)}); delete the file "
                "to recompute it"
            ) from None

    def close_base_spectra(self) -> None:
        if self._spectra is not None:
            self._spectra.close()
            self._spectra = None

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
        """``step`` and ``reward`` of metrics.jsonl (logged rows with a reward), or None without any
        (and when the log could not be read at all: :meth:`reward_log` says so)."""
        return self.reward_log()[0]

    def reward_log(self) -> tuple[pd.DataFrame | None, str | None]:
        """``(rewards, problem)``: the rewards of metrics.jsonl as :attr:`rewards` gives them, and one
        line saying what of the log could not be read (None when all of it could). A log none of whose
        lines can be read gives no rewards: nothing is guessed from it."""
        path = self.path / "metrics.jsonl"
        rows, bad, lines = _jsonl_rows(path)
        problem = None
        if lines and not rows:
            problem = (
                f"{path}: could not be read (none of its {lines} line(s) is a JSON object of UTF-8 text); "
                "no reward, so no reward-based verdict"
            )
            return None, problem
        if bad:
            problem = f"{path}: skipped {len(bad)} unreadable line(s): {bad[:10]}"
        logged = pd.DataFrame(rows)
        if not {"step", "reward"} <= set(logged.columns):
            return None, problem
        rewards = logged[["step", "reward"]].copy()
        rewards["reward"] = pd.to_numeric(rewards["reward"], errors="coerce")
        return rewards.dropna().sort_values("step"), problem

    def close(self) -> None:
        for f in (self._weights, self._spectra):
            if f is not None:
                f.close()
        self._weights = self._spectra = None

    def __enter__(self):
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
                self._weights = open_checked(path, WEIGHTS_FORMAT)
            except DeltaFileError as e:
                raise RunDirError(str(e)) from None
        return self._weights

    def _spectra_file(self) -> h5py.File:
        if self._spectra is None:
            try:
                self._spectra = open_checked(self.base_spectra_path, SPECTRA_FORMAT)
            except DeltaFileError as e:
                raise RunDirError(str(e)) from None
        return self._spectra

    def _read_pointer(self) -> dict[str, Any]:
        if self._pointer is None:
            path = self.path / "base" / "pointer.json"
            try:
                ptr = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        where = self.path / "base" / "pointer.json"
        name = ptr["names"].get(module)
        if name is None:
            raise RunDirError(f"{where}: no tensor named for module {module!r}")
        for file in ptr["files"]:
            if not Path(file).is_file():
                raise RunDirError(f"{where}: base checkpoint {file} is missing")
            try:
                with safe_open(file, framework="pt") as f:
                    if name in f.keys():
                        return f.get_tensor(name)
            except Exception as e:
                raise RunDirError(f"{where}: base checkpoint {file} is unreadable: {first_line(e)}") from None
        raise RunDirError(f"{where}: tensor {name!r} (module {module!r}) is in none of {ptr['files']}")


def read_jsonl(path: Path, integer_keys: tuple[str, ...] = ("step",)) -> pd.DataFrame:
    """A JSON-lines file as a DataFrame. A missing file gives an empty frame. A line that is not a JSON
    object of UTF-8 text (a torn append from an interrupted run, a damaged byte), or whose
    ``integer_keys`` are not integers, is skipped with one warning naming the file and the lines."""
    rows, bad, _ = _jsonl_rows(path, integer_keys)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s): {bad[:10]}", stacklevel=2)
    return pd.DataFrame(rows)


def _jsonl_rows(
    path: Path, integer_keys: tuple[str, ...] = ("step",)
) -> tuple[list[dict[str, Any]], list[int], int]:
    """The readable rows of a JSON-lines file, the numbers of its unreadable lines, and how many
    non-blank lines it has (a missing file: none)."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    lines = 0
    if not path.is_file():
        return rows, bad, lines
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            lines += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if isinstance(row, dict) and all(_is_int(row[k]) for k in integer_keys if k in row):
                rows.append(row)
            else:
                bad.append(i)
    return rows, bad, lines


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
