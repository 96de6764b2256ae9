"""The metric registry: every metric the engine computes, declared once.

Each :class:`Metric` names its column, the function that computes it from the quantities the engine
has for a batch of same-shape modules (:class:`Quantities`), whether it is per-k, whether it measures
the *shape* of ΔW (left empty for a zero update), its range, what a higher value means, and its label
and formula for figures and docs. Everything else is derived from this table: the engine's columns
(:func:`columns`), which metrics are empty for a zero update, the per-step summary, the collapse inputs,
the layer × projection heatmaps, docs/metrics.md (:func:`markdown`) and the parametrised property tests
(tests/test_properties.py). Adding a metric is one :func:`register` call plus its test.

The engine computes its quantities lazily, so a metric costs only what it reads: ``sigma`` (σ(ΔW)),
``principal`` / ``minor`` (alignment curves with W0's kept vectors), ``wt`` (singular vectors, and with
``wt="full"`` values, of W_t = W0 + ΔW), ``w0`` and ``delta`` (dense, for bf16 sparsity), ``delta``
alone (dense ΔW, for the shares of unchanged weights). A metric marked ``pooled`` also gets a
per-model value in the summary: pooled by entry count over a step's modules
(:func:`spectra.metrics.precision.pooled_share`), not a median.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from spectra.metrics.collapse import numerical_rank, rank_normalised_concentration
from spectra.metrics.esd import esd_alpha, esd_power_law
from spectra.metrics.precision import bf16_update_sparsity, near_zero_share, unchanged_share
from spectra.metrics.spectral import (
    effective_rank,
    frobenius_norm,
    participation_ratio,
    rank_at,
    relative_update_size,
    spectral_concentration,
    spectral_norm,
    spectrum_drift,
    stable_rank,
)
from spectra.metrics.subspace import alignment_baseline, intruder_dimensions, max_principal_angle

#: What a metric needs computed: σ(ΔW); alignment with W0's kept vectors; W_t's top vectors; W_t's
#: full spectrum; the dense ΔW and W0 (bf16 sparsity); the dense ΔW alone (shares of unchanged weights;
#: enabled with ``bf16``); nothing (constants of the shape).
Stage = Literal["sigma", "alignment", "wt", "wt_full", "bf16", "delta", "constant"]


class Quantities(Protocol):
    """What the engine has at hand for a batch of b same-shape modules (all float64, on its device)."""

    m: int
    n: int
    kmax: int  # k beyond kmax (the base vectors kept, or min(m, n)) means kmax
    keep: int  # base vector pairs kept per module
    rank_fraction: float
    intruder_top: int
    intruder_eps: float
    sigma: Tensor  # σ(ΔW), (b, p) descending
    base_sigma: Tensor  # σ(W0), (b, min(m, n))
    base_U: Tensor  # W0's top singular vectors (b, m, keep)
    base_V: Tensor
    principal: dict[str, Tensor]  # alignment curves with W0's top vectors (b, kmax)
    minor: dict[str, Tensor]  # … with its bottom vectors
    wt_U: Tensor  # top singular vectors of W_t (b, m, ≥ max(kmax, intruder_top))
    wt_V: Tensor
    wt_sigma: Tensor  # full σ(W_t) (wt="full" only)
    w0: Tensor
    delta: Tensor


@dataclass(frozen=True)
class Metric:
    """One column of the engine's table (per-k metrics: one column per k, ``name`` holds ``{k}``).

    compute(q, k) returns one value per module of the batch (b,). ``upper`` may be ``"rank"``: at most
    min(m, n). ``scale_degree``: the power of c by which the value changes when ΔW becomes c·ΔW (0:
    invariant; None: neither). ``rotation_invariant``: unchanged when ΔW becomes Q₁ ΔW Q₂ with Q₁, Q₂
    orthogonal (and W0 unchanged) — true of every function of σ(ΔW) alone. ``optional``: the value
    may be empty (NaN) for a reason of the metric's own, such as too few eigenvalues for a power-law fit;
    any other non-finite value flags the module as ``nonfinite``.
    """

    name: str
    compute: Callable[[Quantities, int], Tensor]
    label: str
    formula: str
    stage: Stage = "sigma"
    per_k: bool = False
    shape: bool = False
    lower: float | None = None
    upper: float | str | None = None
    higher: str = ""
    integer: bool = False
    summary: bool = False
    heatmap: bool = False
    vector: bool = False
    scale_degree: int | None = None
    rotation_invariant: bool = False
    optional: bool = False  # may be NaN for a reason of its own (e.g. too few eigenvalues for a fit)
    pooled: bool = False  # a share of entries: also pooled per model by entry count in the summary

    def column(self, k: int | None = None, rank_fraction: float = 0.9) -> str:
        return self.name.format(k=k, pct=round(rank_fraction * 100))


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric to the registry (names are unique)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    if metric.per_k != ("{k}" in metric.name):
        raise ValueError(f"metric {metric.name!r}: a per-k metric has {{k}} in its name, and only it")
    METRICS[metric.name] = metric
    return metric


def _at(curves: dict[str, Tensor], side: str, q: Quantities, k: int) -> Tensor:
    return curves[side][..., min(k, q.kmax) - 1]


def _power_law(sigma: Tensor, q: Quantities, name: str) -> Tensor:
    """One statistic of the power-law fit beside α (its standard error, its tail size), fitted once."""
    return esd_power_law(sigma, (q.m, q.n))[name]


def _const(q: Quantities, value: float) -> Tensor:
    return torch.full(q.sigma.shape[:-1], float(value), dtype=torch.float64, device=q.sigma.device)


_SIGMA = {"stage": "sigma", "rotation_invariant": True}
_SHAPE = {"shape": True, "scale_degree": 0}
_SHARE = {"lower": 0.0, "upper": 1.0}

for _m in (
    Metric("fro_norm", lambda q, k: frobenius_norm(q.sigma), "‖ΔW‖_F", "√(Σ σ_i²)", **_SIGMA,
           lower=0.0, higher="a larger update", vector=True, scale_degree=1),
    Metric("spectral_norm", lambda q, k: spectral_norm(q.sigma), "‖ΔW‖₂", "σ₁", **_SIGMA, lower=0.0,
           higher="a larger update", vector=True, scale_degree=1),
    Metric("relative_size", lambda q, k: relative_update_size(q.sigma, q.base_sigma), "‖ΔW‖_F / ‖W0‖_F",
           "‖ΔW‖_F / ‖W0‖_F", **_SIGMA, lower=0.0, higher="a larger update relative to W0",
           summary=True, heatmap=True, vector=True, scale_degree=1),
    Metric("erank", lambda q, k: effective_rank(q.sigma), "effective rank",
           "exp(−Σ p_i log p_i), p_i = σ_i/Σσ (Roy & Vetterli 2007)", **_SIGMA, **_SHAPE, lower=1.0,
           upper="rank", higher="energy spread over more directions", summary=True, heatmap=True),
    Metric("stable_rank", lambda q, k: stable_rank(q.sigma), "stable rank", "Σσ_i² / σ₁²", **_SIGMA,
           **_SHAPE, lower=1.0, upper="rank", higher="energy spread over more directions", summary=True),
    Metric("participation_ratio", lambda q, k: participation_ratio(q.sigma), "participation ratio",
           "(Σσ_i²)² / Σσ_i⁴", **_SIGMA, **_SHAPE, lower=1.0, upper="rank",
           higher="energy spread over more directions"),
    Metric("rank{pct}", lambda q, k: rank_at(q.sigma, q.rank_fraction), "rank@90",
           "fewest σ_i holding 90 % of Σσ_i²", **_SIGMA, **_SHAPE, lower=1.0, upper="rank",
           higher="energy spread over more directions", integer=True),
    Metric("E_1", lambda q, k: spectral_concentration(q.sigma, 1), "E_1", "σ₁² / Σσ_i²", **_SIGMA,
           **_SHAPE, **_SHARE, higher="energy folded into one direction", summary=True,
           heatmap=True),
    Metric("E_1_norm", lambda q, k: rank_normalised_concentration(q.sigma), "rank-normalised E_1",
           "(E_1 − 1/r) / (1 − 1/r), r = #{σ_i > 1e-10·σ₁} (the rank of ΔW); NaN for r = 1",
           **_SIGMA, **_SHAPE, **_SHARE, optional=True, summary=True,
           higher="energy folded into one of the r directions the update can use (the study's collapse "
                  "signature)"),
    Metric("update_rank", lambda q, k: numerical_rank(q.sigma), "rank of ΔW",
           "r = #{σ_i > 1e-10·σ₁} (a rank-r LoRA: r; PiSSA/MiLoRA: up to 2r; dense: min(m, n) in general)",
           **_SIGMA, **_SHAPE, lower=1.0, upper="rank", integer=True, summary=True,
           higher="more directions in the update"),
    Metric("E_{k}", lambda q, k: spectral_concentration(q.sigma, k), "E_k", "Σ_{i≤k} σ_i² / Σσ_i²",
           **_SIGMA, **_SHAPE, **_SHARE, per_k=True, higher="energy in fewer directions", summary=True),
    Metric("rho_{k}", lambda q, k: _at(q.principal, "two_sided", q, k), "ρ_k",
           "‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F² (U_k, V_k: W0's top-k singular vectors)", stage="alignment",
           per_k=True, **_SHAPE, **_SHARE, higher="update inside W0's principal subspaces", summary=True),
    Metric("rho_left_{k}", lambda q, k: _at(q.principal, "left", q, k), "ρ_k (left)",
           "‖U_kᵀ ΔW‖_F² / ‖ΔW‖_F²", stage="alignment", per_k=True, **_SHAPE, **_SHARE,
           higher="update in W0's principal output directions"),
    Metric("rho_right_{k}", lambda q, k: _at(q.principal, "right", q, k), "ρ_k (right)",
           "‖ΔW V_k‖_F² / ‖ΔW‖_F²", stage="alignment", per_k=True, **_SHAPE, **_SHARE,
           higher="update in W0's principal input directions"),
    Metric("rho_baseline_{k}", lambda q, k: _const(q, alignment_baseline(min(k, q.kmax), q.m, q.n)),
           "random baseline of ρ_k", "k² / (m·n)", stage="constant", per_k=True, **_SHARE,
           summary=True, scale_degree=0),
    Metric("off_principal_{k}", lambda q, k: 1 - _at(q.principal, "two_sided", q, k), "1 − ρ_k",
           "1 − ρ_k", stage="alignment", per_k=True, **_SHAPE, **_SHARE,
           higher="update off W0's principal subspaces", summary=True, heatmap=True),
    Metric("rho_minor_{k}", lambda q, k: _at(q.minor, "two_sided", q, k), "minor ρ_k",
           "‖U_{−k}ᵀ ΔW V_{−k}‖_F² / ‖ΔW‖_F² (W0's bottom-k singular vectors)", stage="alignment",
           per_k=True, **_SHAPE, **_SHARE, higher="update inside W0's minor subspaces", summary=True),
    Metric("rho_minor_left_{k}", lambda q, k: _at(q.minor, "left", q, k), "minor ρ_k (left)",
           "‖U_{−k}ᵀ ΔW‖_F² / ‖ΔW‖_F²", stage="alignment", per_k=True, **_SHAPE, **_SHARE),
    Metric("rho_minor_right_{k}", lambda q, k: _at(q.minor, "right", q, k), "minor ρ_k (right)",
           "‖ΔW V_{−k}‖_F² / ‖ΔW‖_F²", stage="alignment", per_k=True, **_SHAPE, **_SHARE),
    Metric("angle_left_{k}", lambda q, k: max_principal_angle(q.base_U[..., : min(k, q.kmax)],
                                                               q.wt_U[..., : min(k, q.kmax)]),
           "largest angle, top-k left subspaces", "max_i θ_i, cos θ_i = σ_i(U_kᵀ U_k(W_t)), degrees",
           stage="wt", per_k=True, lower=0.0, upper=90.0, higher="W0's output directions rotated more",
           summary=True),
    Metric("angle_right_{k}", lambda q, k: max_principal_angle(q.base_V[..., : min(k, q.kmax)],
                                                                q.wt_V[..., : min(k, q.kmax)]),
           "largest angle, top-k right subspaces", "max_i θ_i, cos θ_i = σ_i(V_kᵀ V_k(W_t)), degrees",
           stage="wt", per_k=True, lower=0.0, upper=90.0, higher="W0's input directions rotated more",
           summary=True),
    Metric("intruders", lambda q, k: intruder_dimensions(q.wt_U[..., : q.intruder_top], q.base_U,
                                                         q.intruder_eps),
           "intruder dimensions", "#{i ≤ 10: max_j |⟨u_i(W_t), u_j(W0)⟩| < 0.5} (Shuttleworth et al. 2024)",
           stage="wt", lower=0.0, higher="new directions among W_t's top singular vectors", integer=True,
           summary=True),
    Metric("intruder_basis", lambda q, k: _const(q, q.keep), "W0 vectors compared against",
           "top singular vectors of W0 kept (intruders are exact when ≥ min(m, n))", stage="constant",
           lower=1.0, integer=True),
    Metric("nss", lambda q, k: spectrum_drift(q.wt_sigma, q.base_sigma), "spectrum drift NSS",
           "‖σ(W_t) − σ(W0)‖₂ / ‖σ(W0)‖₂", stage="wt_full", lower=0.0, higher="W0's spectrum changed more",
           summary=True),
    Metric("alpha", lambda q, k: esd_alpha(q.wt_sigma, (q.m, q.n)), "ESD α of W_t",
           "power-law exponent of the tail of λ_i = σ_i(W_t)² (Clauset–Shalizi–Newman MLE, x_min at "
           "minimum KS distance; WeightWatcher 0.7.7's fit); NaN when the tail holds < 10 eigenvalues",
           stage="wt_full", lower=1.0,
           higher="a lighter-tailed spectrum (WeightWatcher: 2–6 typical of well-trained layers, < 2 very "
                  "heavy-tailed / over-trained, > 6 under-trained)", summary=True, optional=True),
    Metric("alpha_stderr", lambda q, k: _power_law(q.wt_sigma, q, "alpha_stderr"),
           "standard error of α (W_t)", "(α − 1)/√n_tail (Clauset et al. 2009, eq. 3.2)", stage="wt_full",
           lower=0.0, higher="a less certain α (a shorter tail)", summary=True, optional=True),
    Metric("alpha_num_tail", lambda q, k: _power_law(q.wt_sigma, q, "num_tail"), "tail size of α (W_t)",
           "n_tail = #{λ_i ≥ x_min}: the eigenvalues α is fitted to", stage="wt_full", lower=1.0,
           higher="α read from more eigenvalues", integer=True, summary=True, optional=True),
    Metric("alpha_base", lambda q, k: esd_alpha(q.base_sigma, (q.m, q.n)), "ESD α of W0",
           "the same fit of λ_i = σ_i(W0)²", stage="constant", lower=1.0,
           higher="a lighter-tailed base spectrum", summary=True, optional=True),
    Metric("alpha_base_stderr", lambda q, k: _power_law(q.base_sigma, q, "alpha_stderr"),
           "standard error of α (W0)", "(α − 1)/√n_tail of W0's fit", stage="constant", lower=0.0,
           higher="a less certain α (a shorter tail)", summary=True, optional=True),
    Metric("alpha_base_num_tail", lambda q, k: _power_law(q.base_sigma, q, "num_tail"), "tail size of α (W0)",
           "n_tail = #{λ_i(W0) ≥ x_min}", stage="constant", lower=1.0, higher="α read from more eigenvalues",
           integer=True, summary=True, optional=True),
    Metric("bf16_sparsity", lambda q, k: bf16_update_sparsity(q.w0, q.delta), "bf16 update sparsity",
           "mean over entries of [bf16(W0 + ΔW) = bf16(W0)]", stage="bf16", **_SHARE,
           higher="more of the update lost when the model is stored in bf16", summary=True),
    Metric("unchanged_share", lambda q, k: unchanged_share(q.delta), "unchanged weights (ΔW = 0)",
           "#{ΔW_ij = 0} / (m·n), ΔW the exact difference of the stored values (sparsity_in_rl's update "
           "sparsity, Mukherjee et al. 2025)", stage="delta", **_SHARE, higher="a sparser update",
           summary=True, pooled=True, scale_degree=0),
    Metric("near_zero_share", lambda q, k: near_zero_share(q.delta), "near-zero weights (|Δw| ≤ 1e-5)",
           "#{|ΔW_ij| ≤ 1e-5} / (m·n) (sparsity_in_rl's isclose(ΔW, 0, atol=1e-5))", stage="delta",
           **_SHARE, higher="more of the update below 1e-5", summary=True, pooled=True),
):  # fmt: skip
    register(_m)


def selected(wt: str = "full", bf16: bool = True, names: Sequence[str] | None = None) -> list[Metric]:
    """The metrics an analysis computes: those whose stage is enabled (``wt`` "full", "topk" or
    "none"; ``bf16``: the metrics of the dense ΔW, bf16 sparsity and the unchanged shares), restricted
    to ``names`` (registry names) when given."""
    enabled = {"sigma", "alignment", "constant"}
    enabled |= {"wt", "wt_full"} if wt == "full" else {"wt"} if wt == "topk" else set()
    enabled |= {"bf16", "delta"} if bf16 else set()
    if names is not None:
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; the registry has {sorted(METRICS)}")
    return [m for m in METRICS.values() if m.stage in enabled and (names is None or m.name in names)]


def expand(
    metrics: Sequence[Metric], ks: Sequence[int], rank_fraction: float = 0.9
) -> Iterator[tuple[Metric, int, str]]:
    """``(metric, k, column)`` for every column of ``metrics`` (per-k ones once per k), in order, each
    column once."""
    seen: set[str] = set()
    for m in metrics:
        for k in ks if m.per_k else [0]:
            col = m.column(k, rank_fraction)
            if col not in seen:
                seen.add(col)
                yield m, k, col


def columns(ks: Sequence[int], wt: str = "full", bf16: bool = True, rank_fraction: float = 0.9) -> list[str]:
    """The metric columns of an analysis, in order."""
    return [col for _, _, col in expand(selected(wt, bf16), ks, rank_fraction)]


def _flagged(flag: str, ks: Sequence[int], rank_fraction: float = 0.9) -> list[str]:
    return [col for m, _, col in expand(list(METRICS.values()), ks, rank_fraction) if getattr(m, flag)]


def shape_columns(ks: Sequence[int], rank_fraction: float = 0.9) -> list[str]:
    """Columns that measure ΔW's shape (empty for a zero update)."""
    return _flagged("shape", ks, rank_fraction)


def summary_columns(ks: Sequence[int]) -> list[str]:
    """Columns aggregated per step (summary.json, the per-step tables the figures draw)."""
    return _flagged("summary", ks)


def pooled_columns() -> list[str]:
    """Columns also pooled per model by entry count in the summary (shares of a module's entries)."""
    return [m.name for m in METRICS.values() if m.pooled and not m.per_k]


def heatmap_columns(k: int) -> list[tuple[str, str]]:
    """``(column, label)`` of the layer × projection heatmaps at the plotted k."""
    return [(m.column(k), m.label.replace("_k", f"_{k}")) for m in METRICS.values() if m.heatmap]


def vector_columns() -> list[str]:
    """Columns computed for vector parameters (norms only)."""
    return [m.name for m in METRICS.values() if m.vector]


def label(column: str) -> str:
    """The label of a column, e.g. ``rho_8`` → ``ρ_8`` (the column itself when unknown)."""
    for m in METRICS.values():
        if not m.per_k and column in (m.name, m.column()):
            return m.label
        head, _, tail = m.name.partition("{k}")
        k = column[len(head) : len(column) - len(tail)] if m.per_k else ""
        if k.isdigit() and column == f"{head}{k}{tail}":
            return m.label.replace("_k", f"_{k}")
    return column


def markdown() -> str:
    """docs/metrics.md: the registry as a table (tests/test_docs.py keeps the file equal to this)."""
    lines = [
        "# Metrics",
        "",
        "Generated from the metric registry (`spectra/metrics/registry.py`); do not edit by hand",
        "(`spectra metrics > docs/metrics.md`). σ_i are the singular values of ΔW",
        "(descending), W0 = U Σ Vᵀ, U_k, V_k its top-k and U_{−k}, V_{−k} its bottom-k singular vectors,",
        "W_t = W0 + ΔW. Per-k columns are written once per k of the analysis (`ks`, default 1, 8, 32).",
        "*Shape* metrics are left empty for an update below 1e-6·‖W0‖ (a zero update has no shape).",
        "",
        "| column | meaning | formula | range | higher means | shape | needs |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METRICS.values():
        lo = "" if m.lower is None else f"{m.lower:g}"
        hi = "∞" if m.upper is None else ("min(m, n)" if m.upper == "rank" else f"{m.upper:g}")
        rng = f"[{lo or '−∞'}, {hi}]"
        name = m.name.replace("{pct}", "90")
        cells = [
            f"`{name}`",
            m.label,
            m.formula,
            rng,
            m.higher or "—",
            "yes" if m.shape else "",
            _STAGES[m.stage],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


_STAGES: dict[str, str] = {
    "sigma": "σ(ΔW)",
    "alignment": "W0's kept vectors",
    "wt": "W_t's top vectors (`wt` ≠ none)",
    "wt_full": "σ(W_t) (`wt` = full)",
    "bf16": "dense W0 + ΔW (`bf16`)",
    "delta": "dense ΔW (`bf16`)",
    "constant": "W0's spectrum or the shape only",
}
