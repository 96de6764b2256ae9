"""Metrics that relate an update to the singular subspaces of the base weight W0 = U Σ Vᵀ.

U_k, V_k are W0's top-k left/right singular vectors (the principal subspace), U_{-k}, V_{-k} its
bottom-k (the minor subspace, among the min(m, n) singular triplets). Pass either to the alignment
functions: alignment with the minor subspace is the same formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spectra.operators import DeltaOperator, as_operator, orthonormal_right


def alignment_curves(delta: Tensor | DeltaOperator, U: Tensor, V: Tensor) -> dict[str, Tensor]:
    """Principal alignment for every k = 1..K at once, given U (…, m, K) and V (…, n, K).

    Returns ``two_sided``, ``left`` and ``right``, each (…, K), with entry k−1 equal to

    - two-sided ρ_k = ‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F²   (random baseline k²/(m·n)),
    - left       ‖U_kᵀ ΔW‖_F² / ‖ΔW‖_F²          (random baseline k/m),
    - right      ‖ΔW V_k‖_F² / ‖ΔW‖_F²          (random baseline k/n).

    Computed in float64. Factored operators are never made dense: ΔW = L'Qᵀ with Q orthonormal
    (:func:`spectra.operators.orthonormal_right`), so every norm is a sum of squares and each ratio lies
    in [0, 1] to rounding, even when ΔW is a small difference of large factors (PiSSA). NaN when ΔW = 0.
    """
    U, V = U.to(torch.float64), V.to(torch.float64)
    op = as_operator(delta)
    factors = op.factors()
    if factors is not None:
        Lp, Q = orthonormal_right(*factors)
        UL = U.mT @ Lp  # (…, K, ρ): U_Kᵀ ΔW = UL·Qᵀ
        fro2 = Lp.square().sum(dim=(-2, -1))
        left = UL.square().sum(dim=-1).cumsum(dim=-1)
        QV = Q.mT @ V  # (…, ρ, K)
        right = (Lp @ QV).square().sum(dim=-2).cumsum(dim=-1)
        core = (UL @ QV).square()  # (…, K, K): (U_Kᵀ ΔW V_K)²
    else:
        X = op.to_dense()
        fro2 = X.square().sum(dim=(-2, -1))
        UX = U.mT @ X  # (…, K, n)
        left = UX.square().sum(dim=-1).cumsum(dim=-1)
        right = (X @ V).square().sum(dim=-2).cumsum(dim=-1)
        core = (UX @ V).square()
    two_sided = core.cumsum(dim=-1).cumsum(dim=-2).diagonal(dim1=-2, dim2=-1)
    den = torch.where(fro2 > 0, fro2, torch.nan).unsqueeze(-1)
    return {"two_sided": two_sided / den, "left": left / den, "right": right / den}


def principal_alignment(delta: Tensor | DeltaOperator, U_k: Tensor, V_k: Tensor) -> Tensor:
    """ρ_k = ‖U_kᵀ ΔW V_k‖_F² / ‖ΔW‖_F², the share of update energy inside W0's top-k subspaces.

    1 for an update inside them, 0 for one in their orthogonal complement; off-principal energy is
    1 − ρ_k. Use W0's bottom-k vectors for alignment with the minor subspace.
    """
    return alignment_curves(delta, U_k, V_k)["two_sided"][..., -1]


def alignment_baseline(k: int, m: int, n: int, side: str = "both") -> float:
    """Expected alignment of an isotropic random update: k²/(m·n) two-sided, k/m left, k/n right."""
    if side == "both":
        return k * k / (m * n)
    if side == "left":
        return k / m
    if side == "right":
        return k / n
    raise ValueError(f"alignment_baseline: side must be 'both', 'left' or 'right', got {side!r}")


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles in degrees between span(A) and span(B), A and B (…, d, k) with orthonormal
    columns, ascending; the last is the largest angle.

    cos θ_i = σ_i(AᵀB) (descending) and sin θ_i = σ_i(B − A·AᵀB) (ascending); θ_i = atan2(sin, cos),
    which stays accurate for small angles where arccos alone loses half the digits (Björck & Golub 1973).
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    AtB = A.mT @ B
    cos = torch.linalg.svdvals(AtB)
    sin = torch.linalg.svdvals(B - A @ AtB).flip(-1)
    return torch.rad2deg(torch.atan2(sin, cos))


def max_principal_angle(A: Tensor, B: Tensor) -> Tensor:
    """The largest principal angle (degrees) between span(A) and span(B)."""
    return principal_angles(A, B)[..., -1]


def intruder_dimensions(U_t: Tensor, U_0: Tensor, eps: float = 0.5) -> Tensor:
    """Intruder dimensions (Shuttleworth et al. 2024): how many columns u of U_t (the top singular
    vectors of W_t, usually the top 10) have max_j |⟨u, u_j(W0)⟩| < ``eps`` over the columns of U_0
    (the singular vectors of W0 kept)."""
    cos = (U_0.mT.to(torch.float64) @ U_t.to(torch.float64)).abs().amax(dim=-2)
    return (cos < eps).sum(dim=-1)
