"""The model-maturity probe: heavy-tailed spectral statistics of a base model's frozen weights (issue 16).

``spectra probe maturity MODEL …`` measures, for every projection matrix of every layer of each model
(embeddings and head too with ``all_weights``), every statistic of :func:`spectra.metrics.esd.esd_fit`:
the power-law exponent α of the eigenvalue spectrum λ_i = σ_i² (unnormalised, as WeightWatcher 0.7.7),
its KS distance, weighted α̂ = α·log10 λ_max, stable rank, the Marchenko–Pastur bulk edge, spikes and soft
rank, spectral entropy and effective rank. Every α comes with its tail size ``num_tail`` and standard error
(α − 1)/√n_tail, and is empty (with the reason) when the tail holds fewer than ``esd.MIN_TAIL``
eigenvalues; ``--pvalue`` adds Clauset–Shalizi–Newman's goodness-of-fit p (``alpha_pvalue``).
Definitions and references: spectra/metrics/esd.py and docs/metrics.md.

How a model is read (:mod:`spectra.probes.weights`; peak memory: one batch of same-shape matrices, never
the whole model):

1. :func:`resolve_model`: an organism id (built once and cached), a local directory, or a hub id found in
   the local hub cache (nothing is downloaded);
2. :func:`plan_model`: each safetensors file's tensor names, shapes and dtypes, from the headers only;
3. :func:`stream_batches`: file by file, the matrices of one shape in batches that fit ``budget_bytes``
   of float64 work, each read with ``get_tensor`` one at a time and copied into the batch;
4. :func:`analyse_batch`: σ from the core's exact path (``spectra.svd.dense_svd``), then ``esd_fit``.

Each model's table is cached in ``out/cache/`` under the size and mtime of its weight files
(:func:`fingerprint`) and the options; :func:`probe_maturity` writes ``maturity.csv``, ``summary.json``
and ``report.html`` (:mod:`spectra.probes.maturity_report`), joined with training outcomes when runs are
given (:mod:`spectra.probes.maturity_runs`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from spectra.probes.maturity_config import MaturityOptions
from spectra.probes.weights import (
    Entry,
    MaturityError,
    fingerprint,
    plan_model,
    resolve_model,
    stream_batches,
    weight_files,
    work_bytes,
)
from torch import Tensor

import spectra
from spectra.errors import SpectraError, first_line
from spectra.h5io import atomic_path, write_json
from spectra.metrics import esd
from spectra.names import parse_module_name
from spectra.svd import dense_svd

#: Every statistic of ``esd_fit``, in its order: the columns of maturity.csv after the identifiers
#: (``alpha_pvalue`` is empty unless ``--pvalue`` asked for the goodness-of-fit test).
STATS = (*esd.WW_COLUMNS, "alpha_pvalue", "effective_rank", "num_evals")
#: What stands beside α wherever it is shown: its standard error (α − 1)/√n_tail and the tail size.
BESIDE_ALPHA = ("alpha_stderr", "num_tail")
ID_COLUMNS = ("model", "module", "layer", "proj", "rows", "cols", "dtype", "file")
CACHE_VERSION = 2  # 2: α needs a tail of esd.MIN_TAIL; alpha_pvalue
DEFAULT_BUDGET_MB = 1024

Progress = Callable[[str, int], Callable[[int], None]]  # start(label, total) → advance(n)


@dataclass
class ModelTable:
    """One model's result: its rows (one per matrix) and where they came from."""

    label: str
    path: Path
    table: pd.DataFrame
    fingerprint: dict[str, list[int]]
    reused: bool
    skipped: list[str] = field(default_factory=list)  # tensors left out (quantized, integer)
    peak_batch_bytes: int = 0


def _sigma(X: Tensor) -> Tensor:
    """σ of each matrix (b, p) by the core's exact path; a matrix with non-finite entries gets NaN."""
    finite = torch.isfinite(X).flatten(1).all(-1)
    if bool(finite.all()):
        return dense_svd(X).S
    S = torch.full((X.shape[0], min(X.shape[-2:])), math.nan, dtype=torch.float64, device=X.device)
    if bool(finite.any()):
        S[finite] = dense_svd(X[finite]).S
    return S


def analyse_batch(
    label: str, chunk: Sequence[Entry], X: Tensor, options: MaturityOptions | None = None
) -> list[dict[str, Any]]:
    """One row per matrix of the batch: its identifiers and every ``esd_fit`` statistic (with the
    goodness-of-fit p-value when ``options.pvalue``), plus ``reason`` (why some are empty: too few
    eigenvalues, a tail too short for α, a flat spectrum, non-finite weights)."""
    options = options or MaturityOptions()
    try:
        S = _sigma(X)
        stats, reasons = esd.esd_fit(
            S, chunk[0].shape, pvalue_samples=options.samples, seed=options.pvalue_seed
        )
        values = {k: v.cpu().tolist() for k, v in stats.items()}
    except Exception as e:  # one matrix at a time, so that a failure is that matrix's row alone
        if len(chunk) > 1:
            return [
                r
                for i in range(len(chunk))
                for r in analyse_batch(label, chunk[i : i + 1], X[i : i + 1], options)
            ]
        values, reasons = {k: [math.nan] for k in STATS}, [f"failed: {first_line(e)}"]
    rows = []
    for i, e in enumerate(chunk):
        layer, proj = parse_module_name(e.module)
        row: dict[str, Any] = {
            "model": label,
            "module": e.module,
            "layer": layer,
            "proj": proj,
            "rows": e.shape[0],
            "cols": e.shape[1],
            "dtype": e.dtype,
            "file": e.file.name,
        }
        row |= {k: values[k][i] for k in STATS}
        row["reason"] = "non-finite weights" if reasons[i] == "non-finite singular values" else reasons[i]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ one model, cached


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "--", label.strip("/")) or "model"


def _options(all_weights: bool, options: MaturityOptions) -> dict[str, Any]:
    """What changes the numbers besides the weights (part of the cache key)."""
    return {
        "cache_version": CACHE_VERSION,
        "all_weights": all_weights,
        "eval_floor": esd.EVALS_THRESH,
        "min_evals": esd.MIN_EVALS,
        "min_tail": esd.MIN_TAIL,
        "mp_bandwidth": esd.MP_BANDWIDTH,
        "pvalue_samples": options.samples,
        "pvalue_seed": options.pvalue_seed if options.pvalue else None,
        "spectra": spectra.__version__,
    }


def analyse_model(
    label: str,
    cache: Path,
    *,
    all_weights: bool = False,
    device: str | None = None,
    force: bool = False,
    budget_bytes: int = DEFAULT_BUDGET_MB << 20,
    progress: Progress | None = None,
    options: MaturityOptions | None = None,
) -> ModelTable:
    """Every matrix of one model, streamed; reused from ``cache`` when the weight files' fingerprint and
    the options match what was cached."""
    options = options or MaturityOptions()
    path = resolve_model(label)
    files = weight_files(path)
    fp = fingerprint(path, files)
    stem = cache / _slug(label)
    key = {"model": label, "path": str(path), "fingerprint": fp, "options": _options(all_weights, options)}
    meta_file, table_file = stem.with_suffix(".json"), stem.with_suffix(".csv")
    if not force and meta_file.is_file() and table_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            if {k: meta.get(k) for k in key} == json.loads(json.dumps(key)):
                table = _normalise(pd.read_csv(table_file, keep_default_na=False, na_values=[""]))
                return ModelTable(label, path, table, fp, True, meta.get("skipped", []))
        except (OSError, ValueError):
            pass  # a damaged cache entry: analyse again
    entries, skipped = plan_model(files, all_weights)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    advance = progress(label, len(entries)) if progress else None
    rows: list[dict[str, Any]] = []
    peak = 0
    for chunk, X in stream_batches(entries, budget_bytes, device):
        peak = max(peak, len(chunk) * work_bytes(chunk[0].shape))
        rows += analyse_batch(label, chunk, X, options)
        del X
        if advance:
            advance(len(chunk))
    order = {e.name.removesuffix(".weight"): i for i, e in enumerate(entries)}
    table = pd.DataFrame(rows, columns=[*ID_COLUMNS, *STATS, "reason"])
    table = table.sort_values(["layer", "module"], key=_layer_key(order), na_position="first", kind="stable")
    table = _normalise(table.reset_index(drop=True))
    with atomic_path(table_file) as tmp:
        table.to_csv(tmp, index=False)
    write_json(meta_file, {**key, "skipped": skipped, "peak_batch_bytes": peak})
    return ModelTable(label, path, table, fp, False, skipped, peak)


def _normalise(table: pd.DataFrame) -> pd.DataFrame:
    """The same dtypes whether the table was computed or read back: layer an integer or empty, reason text."""
    return table.assign(layer=table["layer"].astype("Int64"), reason=table["reason"].fillna("").astype(str))


def _layer_key(order: dict[str, int]) -> Callable[[pd.Series], pd.Series]:
    """Sort key: layer number, then the checkpoint's order of the modules."""
    return lambda s: s.map(order) if s.name == "module" else s


# ------------------------------------------------------------------------------------------ summaries

#: Statistics drawn against depth and correlated with training outcomes (medians over modules).
KEY_STATS = ("alpha", "alpha_weighted", "num_spikes", "stable_rank", "mp_softrank", "log_spectral_norm")
#: Clauset et al.'s rule: a goodness-of-fit p at or below 0.1 rules the power law out.
PVALUE_RULED_OUT = 0.1


def _quartiles(s: pd.Series) -> dict[str, float | None]:
    s = s.dropna()
    if not len(s):
        return {"median": None, "q25": None, "q75": None}
    return {k: float(s.quantile(q)) for k, q in (("median", 0.5), ("q25", 0.25), ("q75", 0.75))}


def model_summary(t: ModelTable) -> dict[str, Any]:
    """Per model: medians over modules, quartiles per projection kind, medians per layer (with depth =
    layer / (layers − 1), so that models of different depth line up), and the modules without a fit.
    The tail size is summarised over the matrices with an α, like α and its standard error beside it
    (a tail too short for α stays in maturity.csv)."""
    df = t.table.assign(num_tail=t.table["num_tail"].where(t.table["alpha"].notna()))
    layers = sorted(int(x) for x in df["layer"].dropna().unique())
    span = max(1, layers[-1] - layers[0]) if layers else 1
    without = df[df["reason"].fillna("") != ""]
    by_depth = []
    for layer, g in df.dropna(subset=["layer"]).groupby(df["layer"].dropna().astype(int)):
        entry: dict[str, Any] = {"layer": int(layer), "depth": (int(layer) - layers[0]) / span}
        entry |= {s: _quartiles(g[s])["median"] for s in STATS}
        by_depth.append(entry)
    tested = df["alpha_pvalue"].notna()
    return {
        "path": str(t.path),
        "fingerprint": t.fingerprint,
        "modules": len(df),
        "fitted": int(df["alpha"].notna().sum()),
        "short_tail": int(df["reason"].fillna("").str.contains("α needs").sum()),
        "pvalue_tested": int(tested.sum()),
        "ruled_out": int((df.loc[tested, "alpha_pvalue"] <= PVALUE_RULED_OUT).sum()),
        "layers": len(layers),
        "median": {s: _quartiles(df[s])["median"] for s in STATS},
        "by_proj": {
            str(p): {"modules": len(g), **{s: _quartiles(g[s]) for s in STATS}}
            for p, g in df.groupby("proj", sort=False)
        },
        "by_depth": by_depth,
        "without_fit": {r: sorted(g["module"]) for r, g in without.groupby("reason")},
        "skipped_tensors": t.skipped,
        "reused": t.reused,
    }


# ----------------------------------------------------------------------------------------- the probe


def _clean(obj: Any) -> Any:
    """JSON-ready: NaN and ±∞ become null, numpy and pandas scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or obj is pd.NA:
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class MaturityResult:
    """What :func:`probe_maturity` made: the tables, the summary, the joined outcomes, the files."""

    models: list[ModelTable]
    table: pd.DataFrame
    summary: dict[str, Any]
    problems: list[str]
    outcomes: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)


def probe_maturity(
    models: Sequence[str],
    out: str | Path = "probes/maturity",
    *,
    runs: Sequence[str | Path] = (),
    all_weights: bool = False,
    device: str | None = None,
    force: bool = False,
    budget_mb: int = DEFAULT_BUDGET_MB,
    progress: Progress | None = None,
    report: bool = True,
    options: MaturityOptions | None = None,
) -> MaturityResult:
    """Probe each model (a model that cannot be read is a line of ``problems``, the others go on), join
    with the training outcomes of ``runs`` (run directories or sweep folders; their base models are
    probed too), and write ``out/maturity.csv``, ``out/summary.json`` and ``out/report.html``.
    ``options``: the goodness-of-fit test (:class:`MaturityOptions`)."""
    from spectra.probes.maturity_runs import collect_runs, join_outcomes

    options = options or MaturityOptions()
    options.check()
    if budget_mb < 1:
        raise MaturityError(f"--memory-mb {budget_mb}: expected a positive number of MiB")
    out = Path(out)
    problems: list[str] = []
    run_table = collect_runs(runs, problems) if runs else None
    labels = list(dict.fromkeys([*models, *(run_table["model"].dropna() if run_table is not None else [])]))
    if not labels:
        raise MaturityError("no model to probe: give model ids or directories, or --runs with runs in them")
    done: list[ModelTable] = []
    for label in labels:
        try:
            done.append(
                analyse_model(
                    label,
                    out / "cache",
                    all_weights=all_weights,
                    device=device,
                    force=force,
                    budget_bytes=budget_mb << 20,
                    progress=progress,
                    options=options,
                )
            )
        except (SpectraError, OSError, ValueError, RuntimeError) as e:
            message = first_line(e)
            problems.append(message if label in message else f"{label}: {message}")
    if not done:
        raise MaturityError("no model could be read: " + "; ".join(problems))
    table = pd.concat([t.table for t in done], ignore_index=True)
    summary: dict[str, Any] = {
        "models": {t.label: model_summary(t) for t in done},
        "statistics": list(STATS),
        "esd": {
            "eigenvalues": "λ = σ² of each weight matrix, unnormalised (WeightWatcher 0.7.7's default)",
            "eval_floor": esd.EVALS_THRESH,
            "min_evals": esd.MIN_EVALS,
            "min_tail": esd.MIN_TAIL,
            "alpha_stderr": "(α − 1)/√n_tail, n_tail = num_tail, the eigenvalues at or above x_min",
            "mp_bandwidth": esd.MP_BANDWIDTH,
            "pvalue": (
                {
                    "test": "Clauset, Shalizi & Newman 2009 §4.1, semi-parametric bootstrap",
                    "samples": options.pvalue_samples,
                    "seed": options.pvalue_seed,
                    "ruled_out_at": PVALUE_RULED_OUT,
                }
                if options.pvalue
                else None
            ),
            "reading": "WeightWatcher: α 2–6 typical of well-trained layers, < 2 very heavy-tailed "
            "(over-trained), > 6 under-trained",
        },
        "problems": problems,
    }
    outcomes = None
    if run_table is not None:
        outcomes, joined = join_outcomes(run_table, summary["models"], [t.path for t in done])
        summary["runs"] = run_table.to_dict("records")
        summary["join"] = joined
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "maturity.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(out / "summary.json", _clean(summary))
    files = [out / "maturity.csv", out / "summary.json"]
    result = MaturityResult(done, table, summary, problems, outcomes, files)
    if report:
        from spectra.probes.maturity_report import write_maturity_report

        result.files += write_maturity_report(result, out)
    return result
