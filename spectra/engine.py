"""The analysis engine: every metric for every module of a checkpoint, batched and streamed.

Modules of one step are grouped by (shape, stored form); each group is cut into chunks whose working
memory stays under ``max_batch_bytes``, and each chunk is loaded, moved to the device, analysed as one
batch and released before the next is read. Peak memory therefore depends on the chunk budget and the
largest shape, not on the number of modules.

Per chunk:

- σ(ΔW): factored operators by QR + core SVD (:func:`spectra.svd.factored_svd`), never dense; dense
  ones (full FT, MiSS, QuanTA, DoRA, IA3) by the float64 Gram/eigh path (:func:`spectra.svd.dense_svd`);
- alignment with W0's principal and minor subspaces for all k ≤ max(ks) at once, from the cached
  reference vectors in base/;
- W_t = W0 + ΔW: its full spectrum and top vectors (``wt="full"``, needed for the spectrum drift NSS),
  only its top vectors by randomized subspace iteration (``wt="topk"``), or nothing (``wt="none"``);
  then principal angles, intruder dimensions, NSS and bf16 update sparsity.

A module whose update is NaN/Inf, whose shape does not match W0, or whose data cannot be read gets a
row with ``status`` saying so and empty metrics; the rest of the checkpoint is still analysed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from torch import Tensor
from torch.profiler import record_function

from spectra import metrics as M
from spectra.base import BaseSpectrum
from spectra.errors import DeltaFileError, ShapeMismatchError, SpectraError
from spectra.names import parse_module_name
from spectra.operators import DeltaOperator, LowRank, VectorDelta, stack
from spectra.svd import EIGH_STREAMS, SVDResult, default_device, dense_svd, factored_svd, randomized_topk

if TYPE_CHECKING:  # the store imports the engine lazily; no import cycle at run time
    from spectra.store import DeltaFile, Run


@dataclass
class EngineConfig:
    """Options of the analysis engine.

    ks: the k of E_k, ρ_k and principal angles (each ≤ the number of base vectors kept).
    intruder_top, intruder_eps: top singular vectors of W_t examined, and the |cos| threshold ε.
    base_keep: singular vector pairs of W0 kept in base/ (top and bottom). Intruder dimensions are
        counted against the kept top vectors (column ``intruder_basis``); they are exact, i.e. against
        every singular vector of W0, when base_keep ≥ min(m, n).
    wt: how much of W_t's SVD to compute: "full" (full spectrum: exact NSS), "topk" (randomized top
        vectors only; NSS left empty) or "none" (no W_t metrics).
    bf16: compute bf16 update sparsity (needs W0 + ΔW dense).
    device: "cuda", "cpu", ... (default: CUDA when present).
    max_batch_bytes: working-memory budget of one batch.
    eigh_streams: on CUDA, eigendecompositions of a batch run on this many streams at once.
    zero_update: below this ‖ΔW‖_F/‖W0‖_F an update counts as zero (float32 rounding is ~6e-8): its
        shape metrics (erank, E_k, ρ_k, …) are left empty (NaN); norms and W_t metrics stay.
    """

    ks: tuple[int, ...] = (1, 8, 32)
    intruder_top: int = 10
    intruder_eps: float = 0.5
    base_keep: int = 64
    wt: Literal["full", "topk", "none"] = "full"
    bf16: bool = True
    device: str | None = None
    max_batch_bytes: int = 1 << 30
    rank_fraction: float = 0.9
    zero_update: float = 1e-6
    eigh_streams: int = EIGH_STREAMS

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"EngineConfig.ks must be positive integers, got {self.ks}")
        if self.wt not in ("full", "topk", "none"):
            raise ValueError(f"EngineConfig.wt must be 'full', 'topk' or 'none', got {self.wt!r}")
        self.ks = tuple(sorted(set(self.ks)))


@dataclass
class Item:
    """One module of one checkpoint, ready for the engine."""

    module: str
    op: DeltaOperator
    w0: Tensor
    base: BaseSpectrum


def metric_columns(config: EngineConfig) -> list[str]:
    """Names of the metric columns the engine writes, in order."""
    cols = [
        "fro_norm",
        "spectral_norm",
        "relative_size",
        "erank",
        "stable_rank",
        "participation_ratio",
        f"rank{round(config.rank_fraction * 100)}",
    ]
    cols += [f"E_{k}" for k in config.ks]
    for k in config.ks:
        cols += [
            f"rho_{k}",
            f"rho_left_{k}",
            f"rho_right_{k}",
            f"rho_baseline_{k}",
            f"off_principal_{k}",
            f"rho_minor_{k}",
            f"rho_minor_left_{k}",
            f"rho_minor_right_{k}",
        ]
    if config.wt != "none":
        cols += [f"angle_left_{k}" for k in config.ks] + [f"angle_right_{k}" for k in config.ks]
        cols += ["intruders", "intruder_basis", "nss"]
    if config.bf16:
        cols += ["bf16_sparsity"]
    return cols


def analyze_items(
    items: list[Item], config: EngineConfig | None = None, spectrum_top: int = 0
) -> list[dict[str, Any]]:
    """Analyse a list of same-shape items as one batch; one dict of metrics per item (with
    ``spectrum_top`` > 0, also ``"spectrum"``: the top σ_i(ΔW) as a list, from the same SVD)."""
    config = config or EngineConfig()
    device = torch.device(config.device) if config.device else default_device()
    if not items:
        return []
    m, n = items[0].op.shape[-2:]
    keep = items[0].base.keep
    if keep < min(max(config.ks), m, n):
        raise ValueError(
            f"EngineConfig.ks asks for k = {max(config.ks)} but base/ keeps {keep} singular vectors "
            f"of this {m}×{n} module; recompute base spectra with a larger keep or use smaller ks"
        )
    kmax = min(max(config.ks), keep)  # k beyond min(m, n) means the whole space

    # Moved in their stored dtype and cast on the device (a host-side cast would double the bytes sent);
    # float64 from here on: bf16/float32 factors would bias norms, alignments and DoRA's difference.
    with record_function("spectra.move"):
        op = stack([it.op.to(device).to(dtype=torch.float64) for it in items])
        base = BaseSpectrum(
            *(
                torch.stack([getattr(it.base, k).to(device) for it in items]).to(torch.float64)
                for k in ("sigma", "U", "V", "U_minor", "V_minor")
            )
        )
    factors = op.factors()
    with record_function("spectra.sigma_delta"):
        if factors is not None:
            s_delta = factored_svd(*factors).S
        else:
            s_delta = dense_svd(op.to_dense(), streams=config.eigh_streams).S

    out: dict[str, Tensor] = {
        "fro_norm": M.frobenius_norm(s_delta),
        "spectral_norm": M.spectral_norm(s_delta),
        "relative_size": M.relative_update_size(s_delta, base.sigma),
        "erank": M.effective_rank(s_delta),
        "stable_rank": M.stable_rank(s_delta),
        "participation_ratio": M.participation_ratio(s_delta),
        f"rank{round(config.rank_fraction * 100)}": M.rank_at(s_delta, config.rank_fraction),
    }
    E = M.spectral_concentration(s_delta, list(config.ks))
    with record_function("spectra.alignment"):
        principal = M.alignment_curves(op, base.U[..., :kmax], base.V[..., :kmax])
        minor = M.alignment_curves(op, base.U_minor[..., :kmax], base.V_minor[..., :kmax])
    for j, k in enumerate(config.ks):
        i = min(k, kmax) - 1
        out[f"E_{k}"] = E[..., j]
        out[f"rho_{k}"] = principal["two_sided"][..., i]
        out[f"rho_left_{k}"] = principal["left"][..., i]
        out[f"rho_right_{k}"] = principal["right"][..., i]
        out[f"off_principal_{k}"] = 1 - principal["two_sided"][..., i]
        out[f"rho_minor_{k}"] = minor["two_sided"][..., i]
        out[f"rho_minor_left_{k}"] = minor["left"][..., i]
        out[f"rho_minor_right_{k}"] = minor["right"][..., i]

    if config.wt != "none" or config.bf16:
        with record_function("spectra.move"):
            w0 = torch.stack([it.w0.to(device) for it in items])
        delta = (
            (factors[0].to(torch.float64) @ factors[1].to(torch.float64))
            if factors is not None
            else op.to_dense().to(torch.float64)
        )
        if config.bf16:
            with record_function("spectra.bf16"):
                out["bf16_sparsity"] = M.bf16_update_sparsity(w0, delta)
        if config.wt != "none":
            with record_function("spectra.wt"):
                out.update(_wt_metrics(w0.to(torch.float64) + delta, base, config, kmax))
        del delta, w0

    # An update below rounding of W0 (a zero update, as at step 0, seen through float32 factors or DoRA's
    # normalisation) has no shape: its shape metrics would be rounding noise, so they are left empty.
    zero = out["relative_size"] < config.zero_update
    if zero.any():
        for name in _shape_metrics(config):
            out[name] = torch.where(zero, torch.nan, out[name].to(torch.float64))

    # one transfer to the host per chunk, not one per value
    names = list(out)
    table = torch.stack([out[k].to(torch.float64) for k in names], dim=-1).cpu().tolist()
    integer = {k for k in names if not out[k].is_floating_point()}
    constants: dict[str, Any] = {
        f"rho_baseline_{k}": M.alignment_baseline(min(k, kmax), m, n) for k in config.ks
    }
    if config.wt != "none":
        constants["intruder_basis"] = keep
    rows = []
    for values in table:
        row = {k: int(v) if k in integer else v for k, v in zip(names, values, strict=True)}
        rows.append({**row, **constants})
    if spectrum_top > 0:
        for row, sigma in zip(rows, s_delta[..., :spectrum_top].cpu().tolist(), strict=True):
            row["spectrum"] = sigma
    return rows


def _shape_metrics(config: EngineConfig) -> list[str]:
    """Metrics of ΔW's shape (undefined for a zero update); norms and W_t's metrics are not among them."""
    names = ["erank", "stable_rank", "participation_ratio", f"rank{round(config.rank_fraction * 100)}"]
    for k in config.ks:
        names += [f"E_{k}", f"rho_{k}", f"rho_left_{k}", f"rho_right_{k}", f"off_principal_{k}"]
        names += [f"rho_minor_{k}", f"rho_minor_left_{k}", f"rho_minor_right_{k}"]
    return names


def _wt_metrics(wt: Tensor, base: BaseSpectrum, config: EngineConfig, kmax: int) -> dict[str, Tensor]:
    k_vec = max(kmax, config.intruder_top)
    if config.wt == "full":
        res: SVDResult = dense_svd(wt, k=k_vec, streams=config.eigh_streams)
    else:  # warm start from W0's top right vectors, oversampled where base/ keeps enough
        res = randomized_topk(wt, k=k_vec, start=base.V[..., : max(k_vec, min(base.keep, k_vec + 10))])
    out: dict[str, Tensor] = {}
    for k in config.ks:
        kk = min(k, kmax)
        out[f"angle_left_{k}"] = M.max_principal_angle(base.U[..., :kk], res.U[..., :kk])
        out[f"angle_right_{k}"] = M.max_principal_angle(base.V[..., :kk], res.V[..., :kk])
    out["intruders"] = M.intruder_dimensions(res.U[..., : config.intruder_top], base.U, config.intruder_eps)
    if config.wt == "full":
        out["nss"] = M.spectrum_drift(res.S, base.sigma)
    return out


def _item_bytes(shape: tuple[int, ...], rank: int, config: EngineConfig) -> int:
    """Working memory of one item (float64 bytes): W0, ΔW and W_t dense plus Gram/eigh work."""
    m, n = shape[-2:]
    p = min(m, n)
    kmax = max(max(config.ks), config.intruder_top)
    dense = 8 * (4 * m * n + 2 * p * p) if (rank == 0 or config.wt != "none" or config.bf16) else 0
    return dense + 8 * ((m + n) * (4 * kmax + 2 * rank))


def plan_chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Cut items (with per-item byte sizes) into consecutive chunks of at most ``budget`` bytes each
    (an item larger than the budget gets a chunk of its own)."""
    chunks: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if chunks and used + size <= budget:
            chunks[-1].append(i)
            used += size
        else:
            chunks.append([i])
            used = size
    return chunks


def analyze_checkpoint(items: list[Item], config: EngineConfig | None = None) -> list[dict[str, Any]]:
    """Every metric for modules already in memory (any shapes): grouped by shape and stored form,
    batched within the memory budget. One dict per item, in input order."""
    config = config or EngineConfig()
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, it in enumerate(items):
        rank = it.op.rank_bound if isinstance(it.op, LowRank) else 0
        groups.setdefault((tuple(it.op.shape), rank), []).append(i)
    rows: list[dict[str, Any]] = [{} for _ in items]
    for (shape, rank), idx in groups.items():
        for chunk in plan_chunks([_item_bytes(shape, rank, config)] * len(idx), config.max_batch_bytes):
            for j, row in zip(chunk, analyze_items([items[idx[j]] for j in chunk], config), strict=True):
                rows[idx[j]] = row
    return rows


def analyze_run(
    run: Run,
    steps: Iterable[int] | None = None,
    config: EngineConfig | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    spectrum_top: int = 0,
) -> pd.DataFrame:
    """Every metric for every recorded step × module of a :class:`spectra.store.Run`.

    Damaged files and modules are reported in the ``status`` column and skipped; the rest is analysed.
    ``progress(done, total, label)`` is called after each chunk with the module-steps done so far and
    the total expected (recorded steps × modules with a base weight), for a progress bar. With
    ``spectrum_top`` > 0 a ``spectrum`` column holds each matrix module's top σ_i(ΔW) (a list).
    """
    config = config or EngineConfig()
    steps = list(run.steps if steps is None else steps)
    keep = max(config.base_keep, max(config.ks), config.intruder_top)
    run.ensure_base_spectra(keep=keep, device=config.device, progress=progress)
    rows: list[dict[str, Any]] = []
    total, done = len(steps) * len(run.modules), 0
    for step in steps:
        try:
            dfile = run.open_delta(step)
        except DeltaFileError as e:
            rows.append(_status_row(step, None, "unreadable", str(e)))
            continue
        with dfile:
            groups: dict[tuple[Any, ...], list[str]] = {}
            for module in dfile.modules:
                try:
                    info = dfile.info(module)
                except DeltaFileError as e:
                    rows.append(_status_row(step, module, "unreadable", str(e)))
                    continue
                groups.setdefault((info.shape, info.kind, info.rank), []).append(module)
            for key, modules in groups.items():
                if key[1] == "vector":
                    rows += [_vector_row(run, dfile, step, mod) for mod in modules]
                    done += len(modules)
                    continue
                sizes = [_item_bytes(key[0], key[2], config)] * len(modules)
                for idx in plan_chunks(sizes, config.max_batch_bytes):
                    chunk = [modules[i] for i in idx]
                    rows += _analyze_chunk(run, dfile, step, key[1], chunk, config, spectrum_top)
                    done += len(idx)
                    if progress:
                        progress(done, total, f"step {step}")
    cols = ["step", "module", "layer", "proj", "kind", "m", "n", "status", *metric_columns(config), "error"]
    df = pd.DataFrame(rows)
    return df.reindex(columns=cols + [c for c in df.columns if c not in cols])


def _analyze_chunk(
    run: Run,
    dfile: DeltaFile,
    step: int,
    kind: str,
    modules: list[str],
    config: EngineConfig,
    spectrum_top: int = 0,
) -> list[dict[str, Any]]:
    items: list[Item] = []
    rows: list[dict[str, Any]] = []
    for module in modules:
        try:
            op, w0 = run.read_module(dfile, module)
            if not op.is_finite():
                rows.append(_status_row(step, module, "nonfinite", "ΔW contains NaN or Inf"))
                continue
            items.append(Item(module, op, w0, run.base_spectrum(module)))
        except ShapeMismatchError as e:
            rows.append(_status_row(step, module, "shape_mismatch", str(e)))
        except SpectraError as e:
            rows.append(_status_row(step, module, "unreadable", str(e)))
    if items:
        for it, metrics in zip(items, analyze_items(items, config, spectrum_top), strict=True):
            m, n = it.op.shape[-2:]
            rows.append(
                {**_identity(step, it.module), "kind": kind, "m": m, "n": n, "status": "ok", **metrics}
            )
    return rows


def _vector_row(run: Run, dfile: DeltaFile, step: int, module: str) -> dict[str, Any]:
    try:
        rec, theta0 = run.read_module(dfile, module)
    except SpectraError as e:
        return _status_row(step, module, "unreadable", str(e))
    assert isinstance(rec, VectorDelta)
    if not rec.is_finite():
        return _status_row(step, module, "nonfinite", "Δθ contains NaN or Inf")
    d = rec.delta.to(torch.float64)
    theta0 = theta0.to(torch.float64)
    fro = float(torch.linalg.vector_norm(d))
    ref = float(torch.linalg.vector_norm(theta0))
    return {
        **_identity(step, module),
        "kind": "vector",
        "m": d.shape[0],
        "n": 1,
        "status": "ok",
        "fro_norm": fro,
        "spectral_norm": fro,
        "relative_size": fro / ref if ref > 0 else math.nan,
    }


def _identity(step: int, module: str | None) -> dict[str, Any]:
    layer, proj = parse_module_name(module) if module else (None, None)
    return {"step": step, "module": module, "layer": layer, "proj": proj}


def _status_row(step: int, module: str | None, status: str, error: str) -> dict[str, Any]:
    return {**_identity(step, module), "status": status, "error": error, "fro_norm": math.nan}
