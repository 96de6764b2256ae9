"""The Marchenko–Pastur (MP) bulk of an empirical spectral density, fitted as WeightWatcher 0.7.7 does it.

For an N×M matrix (Q = N/M ≥ 1) with random entries, the eigenvalues of WᵀW follow the MP law, supported
on [λ₋, λ₊] = [σ²(1 − 1/√Q)², σ²(1 + 1/√Q)²]; heavy-tailed self-regularisation (Martin & Mahoney, JMLR
22(165), 2021) reads a trained layer's ESD as such a bulk plus spikes above λ₊. :func:`mp_fit` fits σ as
WeightWatcher's ``analyze(mp_fit=True)`` does, step by step and batched, so that the numbers agree with
``weightwatcher==0.7.7`` (tests/test_esd.py): a linear-kernel density of the rescaled eigenvalues
(:func:`_kde_linear`, scikit-learn's), its squared distance to the MP density (:class:`_MPObjective`, its
``resid_mp``) minimised over a grid of σ (scipy's ``brute``) and polished by Nelder–Mead
(:func:`nelder_mead_1d`, scipy's ``fmin``).

Batched throughout: one row per matrix (eigenvalues of shape (b, p)), float64 on the input's device.
The power-law tail of the same ESD, and :func:`spectra.metrics.esd.esd_fit` that gathers both fits, are
in :mod:`spectra.metrics.esd`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor

MP_BANDWIDTH = 0.1  # WeightWatcher's kernel density bandwidth, in units of the mean eigenvalue
BLOCK_ELEMENTS = 1 << 24  # work-tensor size per block of rows of the residual's grid search


def _kde_linear(points: Tensor, grid: Tensor, bandwidth: float) -> Tensor:
    """Linear-kernel density of each row of ``points`` (b, p, ascending) at ``grid`` (b, G):
    ρ(x) = (1/(p h)) Σ_i max(0, 1 − |x − x_i|/h) (scikit-learn's ``KernelDensity(kernel='linear')``),
    summed in O(p + G log p) with prefix sums over the points within h on each side of x."""
    h = bandwidth
    p = points.shape[-1]
    prefix = torch.cat([points.new_zeros(points.shape[0], 1), points.cumsum(-1)], dim=-1)
    lo = torch.searchsorted(points, grid - h, right=True)  # first x_i > x − h
    mid = torch.searchsorted(points, grid, right=True)  # first x_i > x
    hi = torch.searchsorted(points, grid + h, right=False)  # first x_i ≥ x + h
    n_left, n_right = (mid - lo).to(grid.dtype), (hi - mid).to(grid.dtype)
    s_left = prefix.gather(-1, mid) - prefix.gather(-1, lo)
    s_right = prefix.gather(-1, hi) - prefix.gather(-1, mid)
    total = n_left - (n_left * grid - s_left) / h + n_right - (s_right - n_right * grid) / h
    return total.clamp_min(0) / (p * h)


class _MPObjective:
    """WeightWatcher's MP residual (RMT_Util.resid_mp): squared distance between the MP density of
    scale σ and a kernel density estimate of the rescaled ESD, on the grid points where the estimate
    exceeds 0.01; 10⁶ per point when the MP support [λ₋, λ₊] misses the estimate's mode or overshoots
    the grid. For a square matrix (Q = 1), the quarter-circle law (1/(πσ²))√(4 − x²) of √λ instead."""

    def __init__(self, to_fit: Tensor, Q: float, bandwidth: float, grid_size: int = 1000):
        self.Q = Q
        top = to_fit[:, -1:] + 0.5
        g = torch.arange(grid_size, dtype=to_fit.dtype, device=to_fit.device)
        grid = g * (top / (grid_size - 1))  # numpy.linspace(0, top, grid_size)
        grid[:, -1:] = top
        density = _kde_linear(to_fit, grid, bandwidth)
        good = density > 0.01
        peak = torch.where(good, density, -math.inf).argmax(-1, keepdim=True)
        self.mode = grid.gather(-1, peak)
        self.x_top = torch.where(good, grid, -math.inf).amax(-1, keepdim=True)
        self.penalty = 1e6 * good.sum(-1, keepdim=True).to(grid.dtype)
        cols = good.any(0).nonzero().flatten()  # only grid points that count somewhere are kept
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
        x, y, good = grid[:, lo:hi], density[:, lo:hi], good[:, lo:hi]
        # MP density m(x) = Q/(2πσ²) · √((λ₊ − x)(x − λ₋))/x = c(σ)·√(max(0, q)), q = (λ₊+λ₋)/x − λ₊λ₋/x² − 1
        self.u = torch.where(x > 0, 1 / x, 0.0)  # x = 0 gives q = −1: density 0, as WeightWatcher's NaN → 0
        self.u2 = self.u.square()
        self.good = good.to(grid.dtype)
        self.gy = torch.where(good, y, 0.0)
        self.yy = self.gy.square().sum(-1, keepdim=True)
        if Q == 1:  # the quarter circle's shape √(4 − x²) does not depend on σ
            qc = torch.where(good, (4 - x * x).clamp_min(0).sqrt(), 0.0)
            self.qc = (qc.square().sum(-1, keepdim=True), (qc * self.gy).sum(-1, keepdim=True), self.yy)

    def take(self, rows: slice) -> _MPObjective:
        """The same objective for some rows of the batch (to evaluate it in blocks)."""
        part = copy.copy(self)
        for name in ("mode", "x_top", "penalty", "u", "u2", "good", "gy", "yy"):
            setattr(part, name, getattr(self, name)[rows])
        if self.Q == 1:
            part.qc = tuple(t[rows] for t in self.qc)
        return part

    def edges(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """MP edges λ₊ = (σ(1 + √(1/Q)))², λ₋ = (σ(1 − √(1/Q)))²."""
        return (s * (1 + math.sqrt(1 / self.Q))).square(), (s * (1 - math.sqrt(1 / self.Q))).square()

    def misses(self, sigma: Tensor) -> Tensor:
        """(b, K): σ whose support is rejected (the 10⁶ penalty); never for Q = 1."""
        if self.Q == 1:
            return torch.zeros_like(sigma, dtype=torch.bool)
        b, a = self.edges(sigma)
        return (b < self.mode) | (b > self.x_top) | (a > self.mode)

    def __call__(self, sigma: Tensor) -> Tensor:
        """Residual for σ of shape (b, K): (b, K)."""
        if self.Q == 1:  # c·q(x) − y with c = 1/(πσ²): Σ(cq − y)² = c²Σq² − 2cΣqy + Σy², O(1) per σ
            c = 1 / (math.pi * sigma * sigma)
            return (c * c * self.qc[0] - 2 * c * self.qc[1] + self.qc[2]).nan_to_num(nan=math.inf)
        # Σ_good (c√q⁺ − y)² = c²·Σ good·q⁺ − 2c·Σ good·y·√q⁺ + Σ good·y²: two batched products over the grid
        b, a = self.edges(sigma)
        q = (a + b)[..., None] * self.u[:, None, :] - (a * b)[..., None] * self.u2[:, None, :] - 1
        q = q.clamp_min_(0)
        s1 = (q @ self.good[..., None]).squeeze(-1)
        s2 = (q.sqrt_() @ self.gy[..., None]).squeeze(-1)
        c = self.Q / (2 * math.pi * sigma * sigma)
        r = (c * c * s1 - 2 * c * s2 + self.yy).nan_to_num(nan=math.inf)
        return torch.where(self.misses(sigma), self.penalty.expand_as(r), r)

    def brute(self, grid: Tensor, valid: Tensor) -> Tensor:
        """The residual at every σ of ``grid`` (b, K) where ``valid``, +∞ elsewhere. Penalised σ are
        filled in without evaluating the density: the rest form one interval of k per row (λ₊ and λ₋
        grow with σ), and only the longest such interval is evaluated, in blocks of rows."""
        keep = valid & ~self.misses(grid)
        res = torch.where(valid, self.penalty.expand_as(grid), math.inf)
        width = keep.sum(-1)
        w = int(width.max()) if grid.shape[0] else 0
        if w == 0:
            return res
        start = keep.int().argmax(-1, keepdim=True)
        k = torch.arange(w, device=grid.device)
        idx = (start + k).clamp_max(grid.shape[-1] - 1)
        sub = torch.empty(grid.shape[0], w, dtype=grid.dtype, device=grid.device)
        rows = max(1, BLOCK_ELEMENTS // max(1, w * self.u.shape[-1]))
        for r0 in range(0, grid.shape[0], rows):
            part = slice(r0, r0 + rows)
            sub[part] = self.take(part)(grid[part].gather(-1, idx[part]))
        return res.scatter(-1, idx, torch.where(k < width[:, None], sub, res.gather(-1, idx)))


def nelder_mead_1d(
    f: Callable[[Tensor], Tensor], x0: Tensor, xatol: float = 1e-4, fatol: float = 1e-4, maxiter: int = 200
) -> Tensor:
    """``scipy.optimize.fmin`` in one dimension, step for step, for a batch of starting points x0 (b,).

    Simplex {x0, 1.05·x0}; reflection 1, expansion 2, contraction ½, shrink ½; stops an item when
    |x₁ − x₀| ≤ xatol and |f₁ − f₀| ≤ fatol, or after ``maxiter`` iterations or function calls.
    ``f`` maps (b, 1) to (b, 1).
    """

    def F(x: Tensor) -> Tensor:
        return f(x[:, None])[:, 0]

    def order(s0: Tensor, s1: Tensor, f0: Tensor, f1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        swap = f1 < f0  # numpy's argsort keeps ties in place
        return (
            torch.where(swap, s1, s0),
            torch.where(swap, s0, s1),
            torch.where(swap, f1, f0),
            torch.where(swap, f0, f1),
        )

    s0 = x0.clone()
    s1 = torch.where(x0 != 0, 1.05 * x0, torch.full_like(x0, 0.00025))
    s0, s1, f0, f1 = order(s0, s1, F(s0), F(s1))
    calls = torch.full_like(x0, 2.0)
    for _ in range(1, maxiter):  # scipy counts its first iteration as 1
        active = ~(((s1 - s0).abs() <= xatol) & ((f0 - f1).abs() <= fatol)) & (calls < maxiter)
        if not bool(active.any()):
            break
        xr = 2.0 * s0 - 1.0 * s1  # reflect the worst point through the best
        fr = F(xr)
        better, inside = fr < f0, fr < f1  # (in 1-D the second-worst point is the best one)
        x2 = torch.where(
            better, 3.0 * s0 - 2.0 * s1, torch.where(inside, 1.5 * s0 - 0.5 * s1, 0.5 * s0 + 0.5 * s1)
        )
        f2 = F(x2)  # expansion, outside or inside contraction
        take2 = torch.where(better, f2 < fr, torch.where(inside, f2 <= fr, f2 < f1))
        new1 = torch.where(take2, x2, torch.where(better, xr, s1))
        newf1 = torch.where(take2, f2, torch.where(better, fr, f1))
        shrink = ~better & ~take2
        xs = s0 + 0.5 * (s1 - s0)
        fs = F(xs) if bool((shrink & active).any()) else f1
        new1, newf1 = torch.where(shrink, xs, new1), torch.where(shrink, fs, newf1)
        calls = calls + torch.where(active, 2.0 + shrink.to(calls.dtype), 0.0)
        s0, s1, f0, f1 = order(s0, torch.where(active, new1, s1), f0, torch.where(active, newf1, f1))
    return s0


def mp_fit(lam: Tensor, shape: tuple[int, int], bandwidth: float = MP_BANDWIDTH) -> dict[str, Tensor]:
    """Marchenko–Pastur bulk fitted to the ESD, as WeightWatcher's ``mp_fit`` (analyze(mp_fit=True)).

    With Q = N/M ≥ 1, the eigenvalues are rescaled to mean 1 (λ̃ = λ·M/Σλ), then σ minimises the
    :class:`_MPObjective` residual: a grid σ ∈ [0.05 s, 2 s) in steps of 0.01 s, s = √λ̃_max/(1 + 1/√Q),
    polished by Nelder–Mead (scipy's ``brute`` + ``fmin``). The bulk edge is λ₊ = σ²(1 + 1/√Q)²
    (λ₋ = σ²(1 − 1/√Q)²); spikes are the λ̃ > λ₊ + √(Q^(−1/2) λ₊^(2/3) M^(−2/3)) (a Tracy–Widom
    margin); MP soft rank = λ₊ / λ̃_max. Returns σ (rescaled units), λ₊ and λ₋ in units of λ, spikes and
    soft rank, each (b,).
    """
    N, M = max(shape), min(shape)
    Q = N / M
    if lam.shape[-1] < M:  # the missing eigenvalues are zeros
        lam = torch.cat([lam.new_zeros(lam.shape[0], M - lam.shape[-1]), lam], dim=-1)
    lam = lam.to(torch.float64).sort(dim=-1).values
    scale2 = M / lam.sum(-1, keepdim=True)  # Wscale²
    x = lam * scale2
    top = x[:, -1]
    objective = _MPObjective(x.sqrt() if Q == 1 else x, Q, bandwidth)
    s = (top / (1 + 1.0 / math.sqrt(Q)) ** 2).sqrt()
    start, stop, step = 0.05 * s, 2.0 * s, 0.01 * s
    size = torch.ceil((stop - start) / step).long()  # numpy.arange(start, stop, step)
    k = torch.arange(int(size.max()), dtype=x.dtype, device=x.device)
    grid = start[:, None] + k * ((start + step) - start)[:, None]
    res = objective.brute(grid, k < size[:, None])
    sigma0 = grid.gather(-1, res.argmin(-1, keepdim=True))[:, 0]
    sigma = nelder_mead_1d(objective, sigma0)
    bulk_max = (sigma * (1 + 1 / math.sqrt(Q))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(Q))) ** 2
    tw = 1 / math.sqrt(Q) * bulk_max.pow(2 / 3) * M ** (-2 / 3)
    spikes = (x > (bulk_max + tw.sqrt())[:, None]).sum(-1).to(x.dtype)
    return {
        "mp_sigma": sigma,
        "mp_bulk_max": bulk_max / scale2[:, 0],
        "mp_bulk_min": bulk_min / scale2[:, 0],
        "num_spikes": spikes,
        "mp_softrank": bulk_max / top,
    }
