"""Reference spectra of the base weights W0, computed once per base model and cached in ``base/``.

For each module spectra keeps the full singular values σ(W0) (float64) and, for k up to ``keep``, the
top-k singular vectors (U_k, V_k: the principal subspaces) and the bottom-k (U_{-k}, V_{-k}: the minor
subspaces, among the min(m, n) singular triplets). Minor vectors are stored smallest first, so that
their first k columns are U_{-k} for every k ≤ keep. Everything is float64: float32 vectors would put a
floor of ~1e-6° on principal angles and ~1e-9 on ρ_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spectra.svd import dense_svd

DEFAULT_KEEP = 64


@dataclass
class BaseSpectrum:
    """σ (…, p) descending; U, V (…, m|n, K) top-K; U_minor, V_minor (…, m|n, K) smallest first."""

    sigma: Tensor
    U: Tensor
    V: Tensor
    U_minor: Tensor
    V_minor: Tensor

    @property
    def keep(self) -> int:
        return self.U.shape[-1]

    def truncate(self, keep: int) -> BaseSpectrum:
        """The same spectrum with at most ``keep`` top and bottom vector pairs (a cache that keeps more
        than asked gives the same results as one that keeps exactly what was asked)."""
        if keep >= self.keep:
            return self
        U, V, Um, Vm = (t[..., :keep] for t in (self.U, self.V, self.U_minor, self.V_minor))
        return BaseSpectrum(self.sigma, U, V, Um, Vm)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float64) -> BaseSpectrum:
        return BaseSpectrum(
            *(
                t.to(device=device, dtype=dtype)
                for t in (self.sigma, self.U, self.V, self.U_minor, self.V_minor)
            )
        )


def compute_base_spectrum(w0: Tensor, keep: int = DEFAULT_KEEP) -> BaseSpectrum:
    """Full σ(W0) and the top/bottom ``keep`` singular vector pairs of W0 (…, m, n), via the engine's
    float64 dense SVD, all in float64. ``keep`` is capped at min(m, n)."""
    p = min(w0.shape[-2:])
    k = min(keep, p)
    full = dense_svd(w0, k=p)
    return BaseSpectrum(
        sigma=full.S,
        U=full.U[..., :k].contiguous(),
        V=full.V[..., :k].contiguous(),
        U_minor=full.U[..., p - k :].flip(-1).contiguous(),
        V_minor=full.V[..., p - k :].flip(-1).contiguous(),
    )
