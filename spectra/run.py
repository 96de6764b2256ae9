"""A run opened for analysis, and its two caches: W0's reference spectra and the last analysis.

:class:`RunInputs` adds to the store (:class:`spectra.store.RunStore`) what the engine's items need: each
ΔW as an operator checked against W0's shape (:meth:`RunInputs.read_module`), and W0's reference spectra,
computed once per run and cached in ``base/spectra.h5`` (recomputed when W0's files or
:data:`BASE_SPECTRA_PRECISION` change, or when more singular vectors are asked for than it keeps).

The cache of ``analysis/``: what ``metrics.csv`` depends on besides the delta files (:func:`cache_key`),
each delta file's size and modification time (:func:`fingerprint`), reading an earlier analysis back
(:func:`cached_table`, :func:`previous_fingerprints`) and writing one (:func:`write_analysis`).
:func:`spectra.pipeline.analyze_run` decides from them which steps to analyse again.

The bottom of the pipeline layer: it imports neither the schedule nor the entry point.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from spectra.base import DEFAULT_KEEP, BaseSpectrum, compute_base_spectrum
from spectra.deltafile import DeltaFile
from spectra.engine import EngineConfig
from spectra.errors import DeltaFileError, ShapeMismatchError, SpectraError, first_line
from spectra.h5io import atomic_path, remove_stale_temporaries, write_json
from spectra.operators import Record, from_stored
from spectra.store import RunStore
from spectra.writer import RunWriter

ANALYSIS_DIR = "analysis"
#: Bumped when base/spectra.h5 must be recomputed (2: float64 singular vectors).
BASE_SPECTRA_PRECISION = "float64"

#: ``progress(done, total, label)``: called as work is done.
Progress = Callable[[int, int, str], None]


class RunInputs(RunStore):
    """A run directory as the analysis reads it: the store's reading, plus ΔW operators checked against
    W0 and W0's reference spectra (computed once, cached in base/). :class:`spectra.pipeline.Run`, what
    :func:`spectra.load_run` opens, adds the analysis."""

    _checked_keep: int = -1  # the largest keep ensure_base_spectra has checked base/spectra.h5 for

    # -- updates
    def read_module(self, d: DeltaFile, module: str) -> tuple[Record, Tensor]:
        """``(ΔW operator, W0)`` of ``module`` from an open delta file, checked against W0's shape."""
        info = d.info(module)
        w0 = self.w0(module)
        if tuple(w0.shape) != info.shape:
            raise ShapeMismatchError(
                f"{d.path}: module {module!r} has ΔW of shape {info.shape} but W0 is "
                f"{tuple(w0.shape)}; the run's base/ does not match its deltas"
            )
        rec = d.read(module)
        try:
            op = from_stored(rec, w0 if info.needs_w0 else None)
        except (ValueError, TypeError, RuntimeError) as e:
            raise DeltaFileError(f"{d.path}: module {module!r} is damaged: {first_line(e)}") from None
        if tuple(op.shape) != info.shape:
            raise DeltaFileError(
                f"{d.path}: module {module!r} declares shape {info.shape} "
                f"but its datasets make {tuple(op.shape)}"
            )
        return op, w0

    def delta(self, step: int, module: str) -> Record:
        """ΔW of ``module`` at ``step`` as an operator, checked against W0's shape."""
        with self.open_delta(step) as d:
            return self.read_module(d, module)[0]

    def deltas(self, step: int) -> Iterator[tuple[str, Record]]:
        """Stream ``(module, operator)`` pairs of one step, one module in memory at a time."""
        with self.open_delta(step) as d:
            for module in d.modules:
                yield module, self.read_module(d, module)[0]

    # -- base spectra
    def ensure_base_spectra(
        self,
        keep: int | None = None,
        device: torch.device | str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Compute σ(W0) and the kept singular vectors (float64) of every matrix module once and write
        base/spectra.h5. Does nothing if the file exists for the same W0 and keeps at least ``keep``
        vectors (any number when ``keep`` is None; a new file keeps ``DEFAULT_KEEP``)."""
        path = self.base_spectra_path
        attrs = self.base_spectra_attrs()
        source = json.dumps(self.base_fingerprint(), sort_keys=True)
        if attrs is not None:
            enough = keep is None or int(attrs.get("keep", 0)) >= keep
            same = attrs.get("source") in (None, source) and attrs.get("precision") == BASE_SPECTRA_PRECISION
            if enough and same:
                return path
        self.close_base_spectra()
        keep = DEFAULT_KEEP if keep is None else keep
        dev = EngineConfig(device=str(device) if device is not None else None).torch_device()
        modules = self.modules

        def spectra() -> Iterator[tuple[str, tuple[int, ...], dict[str, Tensor]]]:
            for i, module in enumerate(modules, 1):
                w0 = self.w0(module)
                if w0.ndim == 2:  # vector parameters (LayerNorm tuning) have no spectrum
                    spec = compute_base_spectrum(w0.to(dev), keep)
                    yield module, tuple(w0.shape), {k: t.cpu() for k, t in asdict(spec).items()}
                if progress:
                    progress(i, len(modules), "base spectra (once per run)")

        attrs = {"keep": keep, "source": source, "precision": BASE_SPECTRA_PRECISION}
        path = RunWriter(self.path).write_base_spectra(spectra(), attrs)
        self._checked_keep = keep
        return path

    def base_spectrum(self, module: str, keep: int | None = None) -> BaseSpectrum:
        """W0's reference spectrum (computed and cached in base/spectra.h5 on first use); with ``keep``,
        at most that many top and bottom vector pairs, whatever the cache holds."""
        if keep is None or keep > self._checked_keep:  # checked once per Run (and per larger keep)
            self.ensure_base_spectra(keep)
            self._checked_keep = max(self._checked_keep, keep or 0)
        spec = BaseSpectrum(**self.read_base_spectrum(module))
        return spec if keep is None else spec.truncate(keep)


# ------------------------------------------------------------------------------------ the cache of analysis/


def engine_options(config: EngineConfig) -> dict[str, Any]:
    """The options that change the numbers (the device and batch budget do not)."""
    opts = asdict(config)
    for k in ("device", "max_batch_bytes", "eigh_streams"):
        opts.pop(k)
    opts["ks"] = list(opts["ks"])
    if opts["metrics"] is not None:
        opts["metrics"] = list(opts["metrics"])
    return opts


def fingerprint(run: RunStore, step: int) -> list[int] | None:
    """Size and modification time of a step's delta file: a file rewritten at the same step (after a
    resume) is analysed again. None when there is no single readable file for it."""
    try:
        st = run.delta_path(step).stat()
    except (SpectraError, OSError):
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_key(run: RunStore, config: EngineConfig) -> dict[str, Any]:
    """What metrics.csv depends on besides the delta files: the engine options that change the numbers,
    the spectra version (formulas), and W0 (:meth:`spectra.store.RunStore.base_fingerprint`)."""
    from spectra import __version__

    return {"engine": engine_options(config), "spectra": __version__, "base": run.base_fingerprint()}


def previous_fingerprints(folder: Path) -> dict[str, Any]:
    """The :func:`fingerprint` of each step the last analysis recorded in summary.json (none when it
    cannot be read)."""
    try:
        prints = json.loads((folder / "summary.json").read_text()).get("fingerprints", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return prints if isinstance(prints, dict) else {}


def cached_table(folder: Path, key: dict[str, Any]) -> pd.DataFrame | None:
    """metrics.csv from an earlier analysis with the same :func:`cache_key`, else None."""
    csv, summary = folder / "metrics.csv", folder / "summary.json"
    if not csv.exists() or not summary.exists():
        return None
    try:
        previous = json.loads(summary.read_text()).get("cache")
        table = pd.read_csv(csv)
    except (OSError, ValueError, AttributeError, pd.errors.ParserError):
        return None  # damaged cache: analyse again
    if previous != json.loads(json.dumps(key)) or not {"step", "module", "status"} <= set(table.columns):
        return None
    return table


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def write_analysis(folder: Path, table: pd.DataFrame, spectra: pd.DataFrame, summary: dict[str, Any]) -> None:
    """Write ``folder`` (``analysis/``): metrics.csv, spectra.csv and summary.json, each atomically, the
    summary (with the cache key) removed first and written last, so that a key never stands beside tables
    it does not describe."""
    folder.mkdir(exist_ok=True)
    remove_stale_temporaries(folder)
    (folder / "summary.json").unlink(missing_ok=True)  # the cache key goes last: never a stale pair
    _write_csv(table, folder / "metrics.csv")
    _write_csv(spectra, folder / "spectra.csv")
    write_json(folder / "summary.json", summary)
