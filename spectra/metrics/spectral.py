"""Metrics of a singular value spectrum σ (descending, any leading batch dimensions).

With p_i = σ_i / Σ_j σ_j. Zero singular values contribute nothing, so a factored operator's short
spectrum (its ρ nonzero values) gives the same answer as the full, zero-padded one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def frobenius_norm(s: Tensor) -> Tensor:
    """‖ΔW‖_F = √(Σ σ_i²)."""
    return torch.linalg.vector_norm(s, dim=-1)


def spectral_norm(s: Tensor) -> Tensor:
    """‖ΔW‖₂ = σ₁."""
    return s.amax(dim=-1)


def relative_update_size(s_delta: Tensor, s_w0: Tensor) -> Tensor:
    """‖ΔW‖_F / ‖W0‖_F, from the two spectra (NaN where W0 = 0: no scale to be relative to)."""
    ref = frobenius_norm(s_w0)
    return frobenius_norm(s_delta) / torch.where(ref > 0, ref, torch.nan)


def effective_rank(s: Tensor) -> Tensor:
    """Effective rank (Roy & Vetterli 2007): erank = exp(−Σ p_i log p_i), p_i = σ_i / Σσ.

    1 for a rank-1 matrix, n for n equal singular values; 0 for the zero matrix (by convention).
    """
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(entropy), torch.zeros_like(entropy))


def stable_rank(s: Tensor) -> Tensor:
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖₂² = Σσ_i² / σ₁² (0 for the zero matrix)."""
    s1 = spectral_norm(s)
    return torch.where(
        s1 > 0, s.square().sum(dim=-1) / s1.square().clamp_min(torch.finfo(s.dtype).tiny), 0 * s1
    )


def participation_ratio(s: Tensor) -> Tensor:
    """Participation ratio (Σσ_i²)² / Σσ_i⁴ (0 for the zero matrix)."""
    s2 = s.square()
    den = s2.square().sum(dim=-1)
    return torch.where(den > 0, s2.sum(dim=-1).square() / den.clamp_min(torch.finfo(s.dtype).tiny), 0 * den)


def rank_at(s: Tensor, fraction: float = 0.9) -> Tensor:
    """rank@f: the fewest singular values holding at least ``fraction`` of Σσ_i² (rank@90 for f = 0.9).

    0 for the zero matrix.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"rank_at: fraction must be in (0, 1], got {fraction}")
    energy = s.square()
    total = energy.sum(dim=-1, keepdim=True)
    cum = energy.cumsum(dim=-1)
    # count how many prefixes are still short of the target; one more reaches it
    short = (cum < fraction * total * (1 - 1e-12)).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, short + 1, torch.zeros_like(short))


def spectral_concentration(s: Tensor, k: int | Sequence[int] = 1) -> Tensor:
    """Spectral concentration E_k = Σ_{i≤k} σ_i² / Σ_i σ_i² (E_1 = σ₁²/‖ΔW‖_F²).

    With a list of k, the last dimension of the result runs over the list.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if min(ks) < 1:
        raise ValueError(f"spectral_concentration: k must be ≥ 1, got {ks}")
    energy = s.square()
    cum = energy.cumsum(dim=-1)
    total = cum[..., -1:].clamp_min(torch.finfo(s.dtype).tiny)
    idx = torch.tensor([min(kk, s.shape[-1]) - 1 for kk in ks], device=s.device)
    out = cum.index_select(-1, idx) / total
    return out.squeeze(-1) if isinstance(k, int) else out


def spectrum_drift(s_t: Tensor, s_0: Tensor) -> Tensor:
    """Normalised spectrum shift NSS = ‖σ(W_t) − σ(W0)‖₂ / ‖σ(W0)‖₂ (spectra of equal length)."""
    if s_t.shape[-1] != s_0.shape[-1]:
        raise ValueError(
            f"spectrum_drift: spectra of length {s_t.shape[-1]} and {s_0.shape[-1]}; expected equal"
        )
    return torch.linalg.vector_norm(s_t - s_0, dim=-1) / torch.linalg.vector_norm(s_0, dim=-1)
