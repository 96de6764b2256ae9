"""Heavy-tailed metrics of the empirical spectral density (ESD) of a weight matrix, batched.

For a matrix W (N×M, N ≥ M) with singular values σ_i, the ESD is that of λ_i = σ_i², the eigenvalues of
WᵀW, *unnormalised* (no 1/N): exactly what WeightWatcher 0.7.7's ``analyze()`` uses by default.
Heavy-tailed self-regularisation theory (Martin & Mahoney, JMLR 22(165), 2021, "Implicit
self-regularization in deep neural networks"; Nature Communications 12:4122, 2021, "Predicting trends in
the quality of state-of-the-art neural networks without access to training or testing data") reads a
trained layer's quality off the power-law tail ρ(λ) ∝ λ^(−α) of this density and off its
Marchenko–Pastur (MP) bulk. The tail is fitted as Clauset, Shalizi & Newman (SIAM Review 51, 2009,
"Power-law distributions in empirical data") do it, with WeightWatcher's conventions, so that the numbers
agree with ``weightwatcher==0.7.7`` (tested in tests/test_esd.py):

- the fit sees the eigenvalues λ > ``eval_floor`` (1e-5, WeightWatcher's EVALS_THRESH), ascending;
- every one of them but the largest is a candidate x_min; for each, the continuous MLE
  α = 1 + n / Σ_{λ_i ≥ x_min} ln(λ_i / x_min) over the n eigenvalues of the tail, and the
  Kolmogorov–Smirnov distance D = max_j |(1 − (λ_j/x_min)^(1−α)) − j/n| over the tail (j = 0 … n−1,
  the empirical CDF taken at the lower end of each step, as WeightWatcher does; no x_max, no
  "fix_fingers");
- the chosen x_min has the smallest D (the first one on a tie);
- α is reported with its standard error (α − 1)/√n and the tail size n = #{λ ≥ x_min}, and left NaN,
  with a reason, when that tail holds fewer than ``min_tail`` = :data:`MIN_TAIL` (10) eigenvalues.

**The minimum tail, against WeightWatcher 0.7.7.** WeightWatcher's standard fit (``WWFit``, used when at
least 20 eigenvalues exceed 1e-5) has no minimum tail: the KS scan may settle on x_min = the
second-largest eigenvalue and report α from a tail of 2, with σ = (α − 1)/√2; only its small-sample fit
(fewer than 20 eigenvalues, ``SMALL_N_CUTOFF``) asks for a tail of ``k_min`` = 8, and ``analyze()``'s
``min_evals`` (8) counts a layer's eigenvalues, not its tail. spectra keeps WeightWatcher's x_min (so α
agrees with it wherever both report one; tests/test_esd.py) but does not report α from fewer than 10
tail eigenvalues: below that the MLE's bias (E[α̂ − 1] = (α − 1)·n/(n − 1) at a known x_min) exceeds
10 % and its standard error exceeds a third of α − 1 (±0.6 at α = 3), too wide to place a layer in
WeightWatcher's bands (α < 2 very heavy-tailed / over-trained, 2–6 typical of well-trained layers,
> 6 under-trained). Ten is a floor, not a recommendation: Clauset et al. find α̂ reliable from about 50
tail points, which is why ``num_tail`` and ``alpha_stderr`` stand beside every α.

**Goodness of fit** (:func:`power_law_pvalue`, ``spectra probe maturity --pvalue``): Clauset et al.'s
§4.1 semi-parametric bootstrap. Each synthetic sample has as many values as the fit saw (n); each value
is, with probability n_tail/n, a draw from the fitted power law above x_min, else one of the observed
values below x_min drawn uniformly; the sample is fitted by the same x_min scan, and p is the share of
synthetic KS distances at or above the observed D. A small p (≤ 0.1, their rule) rules the power law out;
a large p only says it is plausible at this many points.

All functions take σ of shape (b, p) (one row per matrix, any order, float64 work on σ's device) and
return (b,) tensors; the x_min scan is vectorised: α for every candidate from reversed cumulative sums
of ln λ, D for every candidate in blocks of one tensor operation each.

The Marchenko–Pastur bulk is fitted in :mod:`spectra.metrics.marchenko_pastur`; :func:`esd_fit` gathers
every statistic of both fits.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from spectra.metrics.marchenko_pastur import MP_BANDWIDTH, mp_fit
from spectra.metrics.spectral import effective_rank, stable_rank

EVALS_THRESH = 1e-5  # WeightWatcher: eigenvalues at or below it are left out of the power-law fit
MIN_EVALS = 50  # Martin & Mahoney's rule of thumb; WeightWatcher itself fits from 20 (fewer: another fit)
MIN_TAIL = 10  # fewer eigenvalues at or above x_min: α is NaN (WeightWatcher: none; see the module docstring)
PVALUE_SAMPLES = 1000  # synthetic samples of the goodness-of-fit bootstrap (p to about ±0.01 near 0.1)
FLAT_RTOL = 1e-6  # λ_max / λ_min − 1 below this is a flat spectrum (float rounding, not a tail)
BLOCK_ELEMENTS = 1 << 24  # work-tensor size per block of the KS scan

# Our names → WeightWatcher's ``analyze()`` columns (``mp_fit=True`` for the MP ones).
WW_COLUMNS = {
    "alpha": "alpha", "alpha_stderr": "sigma", "ks_distance": "D", "xmin": "xmin",
    "num_tail": "num_pl_spikes", "alpha_weighted": "alpha_weighted", "lambda_max": "lambda_max",
    "log_spectral_norm": "log_spectral_norm", "log_norm": "log_norm", "stable_rank": "stable_rank",
    "spectral_entropy": "entropy", "mp_sigma": "sigma_mp", "mp_bulk_max": "bulk_max",
    "mp_bulk_min": "bulk_min", "num_spikes": "num_spikes", "mp_softrank": "mp_softrank",
}  # fmt: skip


def esd_eigenvalues(sigma: Tensor, p: int | None = None) -> Tensor:
    """λ = σ² in float64, ascending, zero-padded to ``p`` values per row (p = min(N, M) of the matrix)."""
    if sigma.ndim != 2:
        raise ValueError(f"esd: singular values must have shape (b, p); got {tuple(sigma.shape)}")
    lam = sigma.to(torch.float64).square()
    if p is not None and p > lam.shape[-1]:
        lam = torch.cat([lam.new_zeros(lam.shape[0], p - lam.shape[-1]), lam], dim=-1)
    return lam.sort(dim=-1).values


def power_law_candidates(lam: Tensor, eval_floor: float = EVALS_THRESH) -> tuple[Tensor, Tensor]:
    """α and KS distance D for every candidate x_min = λ_i (λ ascending, shape (b, p)).

    α_i = 1 + n_i / (Σ_{j≥i} ln λ_j − n_i ln λ_i) with n_i = p − i (Clauset et al. eq. 3.1);
    D_i = max_{j≥i} |1 − (λ_j/λ_i)^(1−α_i) − (j−i)/n_i|. Candidates that cannot fit — λ_i ≤ eval_floor,
    the largest eigenvalue, or a tail of equal values (Σ ln = 0, α = ∞) — get α = NaN and D = +∞.
    """
    b, p = lam.shape
    valid = lam > eval_floor
    loglam = torch.where(valid, lam, torch.ones_like(lam)).log()
    n = torch.arange(p, 0, -1, dtype=lam.dtype, device=lam.device)  # n_i = p − i
    tail_sum = loglam.flip(-1).cumsum(-1).flip(-1)  # Σ_{j≥i} ln λ_j
    excess = tail_sum - n * loglam  # Σ_{j≥i} ln(λ_j/λ_i) ≥ 0
    ok = valid & (excess > 0)
    ok[:, -1] = False
    alpha = torch.where(ok, 1 + n / torch.where(ok, excess, torch.ones_like(excess)), torch.nan)
    D = torch.full_like(lam, math.inf)
    first = int(valid.int().argmax(-1).min()) if bool(valid.any()) else p  # no candidate before it
    block = max(1, BLOCK_ELEMENTS // max(1, b * p))
    j = torch.arange(p, device=lam.device)
    for c0 in range(first, p - 1, block):
        c1 = min(c0 + block, p - 1)
        i = torch.arange(c0, c1, device=lam.device)
        a = alpha[:, c0:c1].nan_to_num(2.0).unsqueeze(-1)  # (b, c, 1)
        log_ratio = loglam[:, None, c0:] - loglam[:, c0:c1, None]  # ln(λ_j/λ_i), (b, c, p − c0)
        offset = (j[None, c0:] - i[:, None]).to(lam.dtype)  # j − i
        cdf_emp = offset / n[c0:c1, None]
        dist = (1 - torch.exp(log_ratio * (1 - a)) - cdf_emp).abs()
        dist = torch.where(offset >= 0, dist, torch.zeros_like(dist))
        D[:, c0:c1] = torch.where(ok[:, c0:c1], dist.amax(-1), math.inf)
    return alpha, D


def power_law_fit(
    lam: Tensor,
    eval_floor: float = EVALS_THRESH,
    min_evals: int = MIN_EVALS,
    flat_rtol: float = FLAT_RTOL,
    min_tail: int = MIN_TAIL,
) -> tuple[dict[str, Tensor], list[str]]:
    """Clauset–Shalizi–Newman power-law fit of the ESD tail, x_min at the minimum KS distance.

    λ ascending (b, p). Returns α, its standard error (α − 1)/√n (n = eigenvalues from x_min up), D,
    x_min, and num_tail = #{λ ≥ x_min}; all NaN with a reason where the fit is undefined: fewer than
    ``min_evals`` eigenvalues above ``eval_floor``, or a flat spectrum (λ_max/λ_min − 1 ≤ ``flat_rtol``);
    α and its standard error NaN with a reason (D, x_min and num_tail kept, to show why) when the tail
    holds fewer than ``min_tail`` eigenvalues (see the module docstring for the choice of 10).
    """
    p = lam.shape[-1]
    alphas, Ds = power_law_candidates(lam, eval_floor)
    best = Ds.argmin(-1, keepdim=True)  # the first minimum, as numpy's argmin
    D = Ds.gather(-1, best).squeeze(-1)
    alpha = alphas.gather(-1, best).squeeze(-1)
    xmin = lam.gather(-1, best).squeeze(-1)
    n_tail = (lam >= xmin[:, None]).sum(-1).to(lam.dtype)
    n_fit = (p - best.squeeze(-1)).to(lam.dtype)
    num_evals = (lam > eval_floor).sum(-1)
    low = torch.where(lam > eval_floor, lam, math.inf).amin(-1)
    flat = lam[:, -1] <= low * (1 + flat_rtol)
    reasons, short = [], []
    rows = zip(num_evals.tolist(), flat.tolist(), D.isfinite().tolist(), n_tail.tolist(), strict=True)
    for count, is_flat, fitted, tail in rows:
        short.append(False)
        if count < min_evals:
            reasons.append(f"power law: {count} eigenvalues above {eval_floor:g}; needs {min_evals}")
        elif is_flat or not fitted:
            reasons.append("power law: flat spectrum (all eigenvalues equal), no tail to fit")
        elif tail < min_tail:
            reasons.append(f"power law: tail of {int(tail)} eigenvalues (λ ≥ x_min); α needs {min_tail}")
            short[-1] = True
        else:
            reasons.append("")
    bad = torch.tensor([r != "" and not s for r, s in zip(reasons, short, strict=True)], device=lam.device)
    no_alpha = torch.tensor([r != "" for r in reasons], device=lam.device)
    nan = torch.full_like(alpha, math.nan)
    out = {
        "alpha": torch.where(no_alpha, nan, alpha),
        "alpha_stderr": torch.where(no_alpha, nan, (alpha - 1) / n_fit.sqrt()),
        "ks_distance": torch.where(bad, nan, D),
        "xmin": torch.where(bad, nan, xmin),
        "num_tail": torch.where(bad, nan, n_tail),
    }
    return out, reasons


def power_law_pvalue(
    lam: Tensor,
    alpha: Tensor,
    xmin: Tensor,
    D: Tensor,
    *,
    samples: int = PVALUE_SAMPLES,
    seed: int = 0,
    eval_floor: float = EVALS_THRESH,
) -> Tensor:
    """Goodness of fit of each fitted power law: Clauset, Shalizi & Newman (2009) §4.1.

    λ ascending (b, p) as fitted, with the fit's α, x_min and KS distance D (b,). For each matrix, with
    x the n eigenvalues above ``eval_floor`` and n_tail = #{x ≥ x_min}: ``samples`` synthetic samples of n
    values, each value with probability n_tail/n drawn from the fitted power law above x_min,
    x_min·(1 − u)^(−1/(α − 1)) with u uniform on [0, 1), else drawn uniformly from the observed
    x < x_min; each sample fitted by the same x_min scan (:func:`power_law_candidates`), giving D_s.
    p = #{D_s ≥ D} / samples. NaN where α is NaN. Seeded: each matrix's draws start from ``seed``, so a
    matrix gets the same p alone or in any batch.
    The estimate's own standard error is √(p(1 − p)/samples) (about ±0.01 at p = 0.1 for 1000 samples).
    """
    if samples < 1:
        raise ValueError(f"power_law_pvalue: samples must be ≥ 1; got {samples}")
    gen = torch.Generator(device=lam.device)
    out = torch.full((lam.shape[0],), math.nan, dtype=torch.float64, device=lam.device)
    for k in range(lam.shape[0]):
        a, x0, d = float(alpha[k]), float(xmin[k]), float(D[k])
        if not (math.isfinite(a) and math.isfinite(x0) and math.isfinite(d)):
            continue
        gen.manual_seed(seed)
        x = lam[k][lam[k] > eval_floor].to(torch.float64)
        below = x[x < x0]
        n, n_tail = len(x), int((x >= x0).sum())
        u = torch.rand(samples, n, generator=gen, dtype=torch.float64, device=lam.device)
        tail = (x0 * (1 - u).pow(-1 / (a - 1))).clamp_max(torch.finfo(torch.float64).max)  # α near 1
        if len(below):
            pick = torch.rand(samples, n, generator=gen, dtype=torch.float64, device=lam.device)
            body = below[torch.randint(len(below), (samples, n), generator=gen, device=lam.device)]
            synthetic = torch.where(pick < n_tail / n, tail, body)
        else:
            synthetic = tail
        Ds = power_law_candidates(synthetic.sort(-1).values, eval_floor)[1].amin(-1)
        out[k] = (Ds >= d).to(torch.float64).mean()
    return out


def spectral_entropy(lam: Tensor, n: int | None = None) -> Tensor:
    """Normalised spectral entropy H = −Σ p_i ln p_i / ln r, p_i = λ_i/Σλ, r the numerical rank
    #{σ_i > σ_max·n·ε} (n the larger dimension of the matrix, default the number of λ), as
    WeightWatcher's ``entropy`` column (which adds 1e-10 to every p_i). 1 for a flat spectrum, lower
    as the spectrum concentrates; NaN for rank ≤ 1."""
    s = lam.clamp_min(0).sqrt()
    tol = s.amax(-1, keepdim=True) * (n or s.shape[-1]) * torch.finfo(torch.float64).eps
    rank = (s > tol).sum(-1).to(lam.dtype)
    prob = lam / lam.sum(-1, keepdim=True)
    h = -torch.special.xlogy(prob, prob).sum(-1)
    return torch.where(rank > 1, h / rank.clamp_min(2).log(), math.nan)


def esd_power_law(
    sigma: Tensor, shape: tuple[int, int], min_evals: int = MIN_EVALS, min_tail: int = MIN_TAIL
) -> dict[str, Tensor]:
    """:func:`power_law_fit` of each matrix's ESD λ = σ² (α, alpha_stderr, ks_distance, xmin, num_tail),
    NaN where the fit is undefined (fewer than ``min_evals`` eigenvalues, a flat spectrum, a tail under
    ``min_tail``, non-finite σ). The metric registry reads α, its standard error and the tail size of
    one σ tensor in turn: the last two fits are kept (by the tensor's identity and version), so each σ
    is fitted once."""
    try:
        version = sigma._version
    except RuntimeError:  # an inference-mode tensor has no version counter (the engine never writes σ)
        version = None
    key = (id(sigma), version, tuple(shape), min_evals, min_tail)
    for ref, k, value in _FITS:
        if ref() is sigma and k == key:
            return value
    finite = torch.isfinite(sigma).all(-1)
    lam = esd_eigenvalues(torch.where(finite[:, None], sigma.to(torch.float64), 0.0), min(shape))
    fit = power_law_fit(lam, min_evals=min_evals, min_tail=min_tail)[0]
    fit = {name: torch.where(finite, v, math.nan) for name, v in fit.items()}
    _FITS.insert(0, (weakref.ref(sigma), key, fit))
    del _FITS[2:]  # W_t's and W0's spectra of one batch
    return fit


_FITS: list[tuple[weakref.ref, tuple, dict[str, Tensor]]] = []


def esd_alpha(sigma: Tensor, shape: tuple[int, int], min_evals: int = MIN_EVALS) -> Tensor:
    """The power-law exponent α of each matrix's ESD (:func:`esd_power_law`), NaN where undefined."""
    return esd_power_law(sigma, shape, min_evals)["alpha"]


def esd_fit(
    sigma: Tensor,
    shape: tuple[int, int],
    *,
    eval_floor: float = EVALS_THRESH,
    min_evals: int = MIN_EVALS,
    flat_rtol: float = FLAT_RTOL,
    mp_bandwidth: float = MP_BANDWIDTH,
    min_tail: int = MIN_TAIL,
    pvalue_samples: int = 0,
    seed: int = 0,
) -> tuple[dict[str, Tensor], list[str]]:
    """Every heavy-tailed ESD statistic of a batch of same-shape matrices, from their singular values.

    ``sigma`` (b, p): singular values of b matrices of ``shape`` (N, M); fewer than min(N, M) per row
    means the rest are zero. With λ = σ² (unnormalised):

    - power law (:func:`power_law_fit`): ``alpha``, ``alpha_stderr`` = (α−1)/√n, ``ks_distance`` D,
      ``xmin``, ``num_tail`` = #{λ ≥ x_min} (α NaN below ``min_tail``); ``alpha_pvalue``, the
      goodness-of-fit p of :func:`power_law_pvalue` with ``pvalue_samples`` synthetic samples (NaN
      when 0, the default: the bootstrap costs ``pvalue_samples`` fits per matrix);
    - ``alpha_weighted`` α̂ = α·log10 λ_max; ``lambda_max``; ``log_spectral_norm`` = log10 λ_max
      (= 2·log10 σ_max: WeightWatcher's "spectral norm" is λ_max); ``log_norm`` = log10 Σλ = log10 ‖W‖_F²;
      ``stable_rank`` = Σλ/λ_max;
    - Marchenko–Pastur (:func:`mp_fit`): ``mp_sigma``, ``mp_bulk_max`` λ₊ and ``mp_bulk_min`` λ₋ (units of
      λ), ``num_spikes`` above λ₊ (with a Tracy–Widom margin), ``mp_softrank`` = λ₊/λ_max;
    - ``spectral_entropy`` (:func:`spectral_entropy`) and ``effective_rank`` exp(−Σ q ln q), q = σ/Σσ;
    - ``num_evals`` = #{λ > eval_floor}.

    All values are float64 tensors of shape (b,). Returns them and one string per matrix: "" when every
    value is defined, else why some are NaN (too few eigenvalues, flat spectrum, zero matrix, NaN/Inf).
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"esd_fit: shape must be (N, M) with N, M ≥ 1; got {shape}")
    p = min(shape)
    if sigma.ndim != 2 or sigma.shape[-1] > p:
        raise ValueError(
            f"esd_fit: singular values must be (b, ≤{p}) for shape {tuple(shape)}; got {tuple(sigma.shape)}"
        )
    finite = torch.isfinite(sigma).all(-1)
    nonzero = (sigma.abs() > 0).any(-1) & finite
    clean = torch.where(
        (finite & nonzero)[:, None],
        sigma.to(torch.float64).abs(),
        torch.ones_like(sigma, dtype=torch.float64),
    )
    lam = esd_eigenvalues(clean, p)
    out, reasons = power_law_fit(lam, eval_floor, min_evals, flat_rtol, min_tail)
    out["alpha_pvalue"] = torch.full_like(lam[:, -1], math.nan)
    if pvalue_samples > 0:
        fit = (out["alpha"], out["xmin"], out["ks_distance"])
        out["alpha_pvalue"] = power_law_pvalue(
            lam, *fit, samples=pvalue_samples, seed=seed, eval_floor=eval_floor
        )
    lam_max = lam[:, -1]
    out["alpha_weighted"] = out["alpha"] * lam_max.log10()
    out["lambda_max"] = lam_max
    out["log_spectral_norm"] = lam_max.log10()
    out["log_norm"] = lam.sum(-1).log10()
    out["stable_rank"] = stable_rank(lam.sqrt())
    out.update(mp_fit(lam, shape, mp_bandwidth))
    out["spectral_entropy"] = spectral_entropy(lam, max(shape))
    out["effective_rank"] = effective_rank(lam.sqrt())
    out["num_evals"] = (lam > eval_floor).sum(-1).to(torch.float64)
    for k, (is_finite, is_nonzero) in enumerate(zip(finite.tolist(), nonzero.tolist(), strict=True)):
        if not is_finite:
            reasons[k] = "non-finite singular values"
        elif not is_nonzero:
            reasons[k] = "zero matrix"
    bad = ~(finite & nonzero)
    if bool(bad.any()):
        out = {name: torch.where(bad, math.nan, v) for name, v in out.items()}
    return out, reasons
