"""The analysis engine: every registered metric for modules already in memory, batched and chunked.

The engine sees items (a module's ΔW operator, its W0 and W0's reference spectrum), never a run
directory: :mod:`spectra.schedule` reads them from the store, and :mod:`spectra.pipeline` writes what
comes out. Items are grouped by (shape, factored rank); each group is cut into chunks whose working
memory stays under ``max_batch_bytes``, and each chunk is moved to the device and analysed as one batch.

Per chunk the engine computes, lazily and only as the selected metrics (:mod:`spectra.metrics.registry`)
ask for them:

- σ(ΔW): factored operators by QR + core SVD (:func:`spectra.svd.factored_svd`), never dense; dense
  ones (full FT, MiSS, QuanTA, DoRA, IA3) by the float64 Gram/eigh path (:func:`spectra.svd.dense_svd`);
- alignment with W0's principal and minor subspaces for all k ≤ max(ks) at once;
- W_t = W0 + ΔW: its full spectrum and top vectors (``wt="full"``), or only its top vectors by subspace
  iteration run to convergence (``wt="topk"``, same accuracy), or nothing (``wt="none"``);
- the dense W0 and ΔW for bf16 update sparsity.

A chunk that fails is analysed again item by item, so one bad module cannot take its neighbours down:
its row gets ``status`` "error" and the message. A module whose metrics come out non-finite gets
``status`` "nonfinite". Rows of the engine carry the metrics, ``status`` and ``error``; the pipeline
adds the module's identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor
from torch.profiler import record_function

from spectra.base import BaseSpectrum
from spectra.errors import SpectraError, first_line
from spectra.metrics import registry
from spectra.metrics.subspace import alignment_curves
from spectra.operators import DeltaOperator, LowRank, stack
from spectra.svd import EIGH_STREAMS, SVDResult, converged_topk, default_device, dense_svd, factored_svd


class EngineConfigError(SpectraError, ValueError):
    """An option of the analysis engine has a value it cannot take."""


@dataclass
class EngineConfig:
    """Options of the analysis engine.

    ks: the k of E_k, ρ_k and principal angles (each ≤ the number of base vectors kept).
    intruder_top, intruder_eps: top singular vectors of W_t examined, and the |cos| threshold ε.
    base_keep: singular vector pairs of W0 used (top and bottom). Intruder dimensions are counted against
        the kept top vectors (column ``intruder_basis``); they are exact, i.e. against every singular
        vector of W0, when base_keep ≥ min(m, n). The results depend only on this option, never on how
        many vectors an earlier analysis cached in base/.
    wt: how much of W_t's SVD to compute: "full" (full spectrum: exact NSS), "topk" (top vectors by
        subspace iteration run to convergence, as accurate; NSS left empty) or "none" (no W_t metrics).
    bf16: compute bf16 update sparsity (needs W0 + ΔW dense).
    device: "cuda", "cpu", "cuda:1", ... (default: CUDA when present).
    max_batch_bytes: working-memory budget of one batch.
    eigh_streams: on CUDA, eigendecompositions of a batch run on this many streams at once.
    zero_update: below this ‖ΔW‖_F/‖W0‖_F an update counts as zero (float32 rounding is ~6e-8): its
        shape metrics (erank, E_k, ρ_k, …) are left empty (NaN); norms and W_t metrics stay.
    metrics: registry names to compute (default: all whose stage is enabled).
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
    metrics: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise EngineConfigError(f"EngineConfig.ks must be positive integers, got {self.ks}")
        if self.wt not in ("full", "topk", "none"):
            raise EngineConfigError(f"EngineConfig.wt must be 'full', 'topk' or 'none', got {self.wt!r}")
        if not 0 < self.rank_fraction <= 1:
            raise EngineConfigError(f"EngineConfig.rank_fraction must be in (0, 1], got {self.rank_fraction}")
        if self.base_keep < 1 or self.intruder_top < 1:
            raise EngineConfigError("EngineConfig.base_keep and intruder_top must be ≥ 1")
        self.ks = tuple(sorted(set(self.ks)))
        self.torch_device()  # a bad --device is an error now, not deep inside the first batch
        if self.metrics is not None:
            try:
                registry.selected(names=self.metrics)
            except ValueError as e:
                raise EngineConfigError(f"EngineConfig.metrics: {e}") from None
            self.metrics = tuple(self.metrics)

    @property
    def keep(self) -> int:
        """Base vector pairs every analysis with these options uses (capped at min(m, n) per module)."""
        return max(self.base_keep, max(self.ks), self.intruder_top)

    def torch_device(self) -> torch.device:
        if self.device is None:
            return default_device()
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise EngineConfigError(
                f"--device {self.device}: {first_line(e)}; expected cpu, cuda or cuda:N"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError(f"--device {self.device}: no CUDA device is visible; use cpu")
        if device.type not in ("cpu", "cuda"):
            raise EngineConfigError(
                f"--device {self.device}: the engine needs float64 (cpu or cuda); {device.type} has none"
            )
        return device

    def selected(self) -> list[registry.Metric]:
        return registry.selected(self.wt, self.bf16, self.metrics)

    def columns(self) -> list[str]:
        """Names of the metric columns of an analysis, in order (with ``wt="topk"`` the full-spectrum
        ones, such as ``nss``, are listed and left empty)."""
        listed = registry.selected("full" if self.wt == "topk" else self.wt, self.bf16, self.metrics)
        return [col for _, _, col in registry.expand(listed, self.ks, self.rank_fraction)]


@dataclass
class Item:
    """One module of one checkpoint, ready for the engine."""

    module: str
    op: DeltaOperator
    w0: Tensor
    base: BaseSpectrum


def metric_columns(config: EngineConfig) -> list[str]:
    """Names of the metric columns the engine writes, in order (:meth:`EngineConfig.columns`)."""
    return config.columns()


class Batch:
    """The quantities of a batch of same-shape items that metrics read (:class:`registry.Quantities`),
    each computed on first use."""

    def __init__(self, items: list[Item], config: EngineConfig, device: torch.device):
        self.config = config
        self.m, self.n = items[0].op.shape[-2:]
        self.keep = items[0].base.keep
        self.kmax = min(max(config.ks), self.keep)  # k beyond min(m, n) means the whole space
        self.rank_fraction = config.rank_fraction
        self.intruder_top = config.intruder_top
        self.intruder_eps = config.intruder_eps
        self._items = items
        self._device = device
        # Moved in their stored dtype and cast on the device (a host-side cast would double the bytes
        # sent); float64 from here on: bf16/float32 factors would bias norms, alignments and DoRA.
        with record_function("spectra.move"):
            self.op = stack([it.op.to(device).to(dtype=torch.float64) for it in items])
            self.base = BaseSpectrum(
                *(
                    torch.stack([getattr(it.base, k).to(device) for it in items]).to(torch.float64)
                    for k in ("sigma", "U", "V", "U_minor", "V_minor")
                )
            )
        self.factors = self.op.factors()

    @cached_property
    def sigma(self) -> Tensor:
        with record_function("spectra.sigma_delta"):
            if self.factors is not None:
                return factored_svd(*self.factors).S
            return dense_svd(self.op.to_dense(), streams=self.config.eigh_streams).S

    @property
    def base_sigma(self) -> Tensor:
        return self.base.sigma

    @property
    def base_U(self) -> Tensor:
        return self.base.U

    @property
    def base_V(self) -> Tensor:
        return self.base.V

    @cached_property
    def principal(self) -> dict[str, Tensor]:
        with record_function("spectra.alignment"):
            return alignment_curves(self.op, self.base.U[..., : self.kmax], self.base.V[..., : self.kmax])

    @cached_property
    def minor(self) -> dict[str, Tensor]:
        with record_function("spectra.alignment"):
            return alignment_curves(
                self.op, self.base.U_minor[..., : self.kmax], self.base.V_minor[..., : self.kmax]
            )

    @cached_property
    def w0(self) -> Tensor:
        with record_function("spectra.move"):
            return torch.stack([it.w0.to(self._device) for it in self._items]).to(torch.float64)

    @cached_property
    def delta(self) -> Tensor:
        if self.factors is not None:
            return self.factors[0] @ self.factors[1]
        return self.op.to_dense()

    @cached_property
    def _wt(self) -> SVDResult:
        k_vec = max(self.kmax, self.intruder_top)
        with record_function("spectra.wt"):
            wt = self.w0 + self.delta
            if self.config.wt == "full":
                return dense_svd(wt, k=k_vec, streams=self.config.eigh_streams)
            # warm start from W0's top right vectors, oversampled where base/ keeps enough
            start = self.base.V[..., : min(self.keep, k_vec + 10)]
            return converged_topk(wt, k=min(k_vec, self.m, self.n), start=start)

    @property
    def wt_U(self) -> Tensor:
        return self._wt.U

    @property
    def wt_V(self) -> Tensor:
        return self._wt.V

    @property
    def wt_sigma(self) -> Tensor:
        return self._wt.S


def analyze_items(
    items: list[Item], config: EngineConfig | None = None, spectrum_top: int = 0
) -> list[dict[str, Any]]:
    """Analyse a list of same-shape items as one batch; one dict of metrics per item (with
    ``spectrum_top`` > 0, also ``"spectrum"``: the top σ_i(ΔW) as a list, from the same SVD)."""
    config = config or EngineConfig()
    if not items:
        return []
    batch = Batch(items, config, config.torch_device())
    if batch.keep < min(max(config.ks), batch.m, batch.n):
        raise ValueError(
            f"EngineConfig.ks asks for k = {max(config.ks)} but base/ keeps {batch.keep} singular vectors "
            f"of this {batch.m}×{batch.n} module; recompute base spectra with a larger keep or use smaller ks"
        )
    out: dict[str, Tensor] = {}
    integer: set[str] = set()
    optional: set[str] = set()  # may be NaN for a reason of their own (too few eigenvalues, ...)
    for metric, k, col in registry.expand(config.selected(), config.ks, config.rank_fraction):
        out[col] = metric.compute(batch, k).to(torch.float64)
        if metric.integer:
            integer.add(col)
        if metric.optional:
            optional.add(col)

    # An update below rounding of W0 (a zero update, as at step 0, seen through float32 factors or DoRA's
    # normalisation) has no shape: its shape metrics would be rounding noise, so they are left empty.
    zero = frobenius_ratio(batch) < config.zero_update
    shape = set(registry.shape_columns(config.ks, config.rank_fraction))
    if zero.any():
        for col in shape & set(out):
            out[col] = torch.where(zero, torch.nan, out[col])

    # one transfer to the host per chunk, not one per value
    names = list(out)
    table = torch.stack([out[k] for k in names], dim=-1).cpu().tolist()
    zeros = zero.cpu().tolist()
    rows = []
    for values, is_zero in zip(table, zeros, strict=True):
        row: dict[str, Any] = {k: int(v) if k in integer and math.isfinite(v) else v
                               for k, v in zip(names, values, strict=True)}  # fmt: skip
        bad = [
            k
            for k, v in row.items()
            if not math.isfinite(v) and not (is_zero and k in shape) and not (k in optional and math.isnan(v))
        ]
        row["status"] = "nonfinite" if bad else "ok"
        if bad:
            row["error"] = f"non-finite {', '.join(bad)}"
        rows.append(row)
    if spectrum_top > 0:
        for row, sigma in zip(rows, batch.sigma[..., :spectrum_top].cpu().tolist(), strict=True):
            row["spectrum"] = sigma
    return rows


def frobenius_ratio(batch: Batch) -> Tensor:
    """‖ΔW‖_F / ‖W0‖_F per item (the zero-update test)."""
    return torch.linalg.vector_norm(batch.sigma, dim=-1) / torch.linalg.vector_norm(batch.base.sigma, dim=-1)


def item_bytes(shape: tuple[int, ...], rank: int, config: EngineConfig) -> int:
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


def group_key(item: Item) -> tuple[tuple[int, ...], int]:
    """Items batch together when they have the same shape and factored rank (0: not factored)."""
    return tuple(item.op.shape), item.op.rank_bound if isinstance(item.op, LowRank) else 0


def analyze_checkpoint(
    items: list[Item],
    config: EngineConfig | None = None,
    spectrum_top: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every metric for modules already in memory (any shapes): grouped by shape and factored rank,
    batched within the memory budget. One dict per item, in input order, with ``status`` and ``error``.
    ``progress(n)`` is called with the number of items each chunk finished."""
    config = config or EngineConfig()
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(group_key(it), []).append(i)
    rows: list[dict[str, Any]] = [{} for _ in items]
    for (shape, rank), idx in groups.items():
        for chunk in plan_chunks([item_bytes(shape, rank, config)] * len(idx), config.max_batch_bytes):
            members = [items[idx[j]] for j in chunk]
            for j, row in zip(chunk, _isolated(members, config, spectrum_top), strict=True):
                rows[idx[j]] = row
            if progress:
                progress(len(chunk))
    return rows


def _isolated(items: list[Item], config: EngineConfig, spectrum_top: int) -> list[dict[str, Any]]:
    """:func:`analyze_items` on a chunk; if it fails, each item alone, so that a failure is one row's."""
    try:
        return analyze_items(items, config, spectrum_top)
    except Exception as e:
        if len(items) == 1:
            return [{"status": "error", "error": f"analysis failed: {type(e).__name__}: {first_line(e)}"}]
        return [row for it in items for row in _isolated([it], config, spectrum_top)]
