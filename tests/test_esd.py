"""Heavy-tailed ESD metrics (spectra.metrics.esd): against weightwatcher 0.7.7 and powerlaw on the same
matrices, on synthetic spectra with known answers, and on degenerate inputs."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from _requires import require
from torch import nn

from spectra import metrics as M
from spectra.metrics import esd, marchenko_pastur


def heavy_tailed(m: int, n: int, mu: float, gen: torch.Generator) -> torch.Tensor:
    """G·diag(c)/√m with Pareto column scales c = u^(−1/μ): an ESD with a power-law tail."""
    c = torch.rand(n, generator=gen, dtype=torch.float64).pow(-1 / mu)
    return torch.randn(m, n, generator=gen, dtype=torch.float64) * c / math.sqrt(m)


def spiked(m: int, n: int, thetas: list[float], gen: torch.Generator) -> torch.Tensor:
    """Gaussian X/√m (a Marchenko–Pastur bulk) plus Σ θ_k u_k v_kᵀ with unit u_k ⟂ u_l, v_k ⟂ v_l."""
    X = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    if thetas:
        k = len(thetas)
        U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
        X = X + U @ torch.diag(torch.tensor(thetas, dtype=torch.float64)) @ V.T
    return X


def ww_singular_values(W: torch.Tensor) -> torch.Tensor:
    """σ as weightwatcher 0.7.7 gets them: SciPy in float64 without CUDA; with CUDA, torch in float32 on
    the GPU, squared in float32 (it then also adds 6e-5, not 1e-10, to each p_i of its entropy)."""
    if torch.cuda.is_available():
        s = torch.linalg.svdvals(W.float().cuda()).cpu()
        return (s * s).double().sqrt()
    return torch.linalg.svdvals(W.double())


def csn_reference(lam: np.ndarray) -> tuple[float, float, float]:
    """The Clauset–Shalizi–Newman x_min scan, one candidate at a time (α, D, x_min)."""
    x = np.sort(lam[lam > esd.EVALS_THRESH])
    best = (math.inf, math.nan, math.nan)
    for i in range(len(x) - 1):
        n = len(x) - i
        alpha = 1 + n / np.log(x[i:] / x[i]).sum()
        D = np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(n) / n).max()
        if D < best[0]:
            best = (D, alpha, x[i])
    return best[1], best[0], best[2]


# ---------------------------------------------------------------- the references, on the same matrices


@pytest.fixture(scope="module")
def ww_model() -> nn.Module:
    """nn.Linear layers with different spectra, float32 as a checkpoint stores them."""
    gen = torch.Generator().manual_seed(7)
    mats = [
        heavy_tailed(120, 300, 1.8, gen),  # Q = 2.5, heavy tail
        heavy_tailed(160, 160, 3.0, gen),  # square (quarter-circle MP fit)
        spiked(400, 100, [3.0, 4.0, 6.0], gen),  # MP bulk + 3 spikes
        spiked(90, 90 * 3, [], gen),  # MP bulk, Q = 3 (the wide side is the input)
    ]
    model = nn.Sequential(*[nn.Linear(W.shape[1], W.shape[0], bias=False) for W in mats])
    for layer, W in zip(model, mats, strict=True):
        layer.weight.data = W.float()
    return model


def _ww_details(model: nn.Module, **kw):
    ww = require("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(**kw)
    assert len(details) == len(model)
    return details


@pytest.mark.slow
def test_power_law_and_norms_match_weightwatcher_and_powerlaw(ww_model):
    """analyze() defaults: same x_min, α to 1e-9 relative (≤ 1e-6 asked), D, α̂, stable rank, norms."""
    powerlaw = require("powerlaw")
    details = _ww_details(ww_model)
    for row, layer in zip(details.itertuples(), ww_model, strict=True):
        W = layer.weight.detach()
        S = ww_singular_values(W)
        out, (reason,) = M.esd_fit(S[None], tuple(W.shape))
        ours = {k: float(v[0]) for k, v in out.items()}
        assert reason == ""
        assert ours["xmin"] == pytest.approx(row.xmin, rel=1e-12)
        assert ours["alpha"] == pytest.approx(row.alpha, rel=1e-9)
        assert ours["alpha_stderr"] == pytest.approx(row.sigma, rel=1e-9)
        assert ours["ks_distance"] == pytest.approx(row.D, abs=1e-10)
        assert ours["num_tail"] == row.num_pl_spikes
        assert ours["alpha_weighted"] == pytest.approx(row.alpha_weighted, rel=1e-9, abs=1e-12)
        assert ours["lambda_max"] == pytest.approx(row.lambda_max, rel=1e-12)
        assert ours["log_spectral_norm"] == pytest.approx(row.log_spectral_norm, rel=1e-12, abs=1e-12)
        assert ours["log_norm"] == pytest.approx(row.log_norm, rel=1e-12)
        assert ours["stable_rank"] == pytest.approx(row.stable_rank, rel=1e-12)
        if not torch.cuda.is_available():
            assert ours["spectral_entropy"] == pytest.approx(row.entropy, abs=1e-6)  # WW: p_i + 1e-10
        # powerlaw: the same MLE at our x_min, and its own x_min scan lands on the same fit
        lam = np.sort(S.square().numpy())
        lam = lam[lam > esd.EVALS_THRESH]
        alpha_range = {"alpha": [1, 100]}  # powerlaw 2.0 keeps α in [0, 3] unless told otherwise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            at_ours = powerlaw.Fit(lam, xmin=ours["xmin"], parameter_ranges=alpha_range, verbose=False)
            scan = powerlaw.Fit(lam, parameter_ranges=alpha_range, verbose=False) if row.Index == 0 else None
        assert ours["alpha"] == pytest.approx(at_ours.power_law.alpha, rel=1e-9)
        assert ours["ks_distance"] == pytest.approx(at_ours.power_law.D, abs=1e-10)
        if scan is not None:  # (powerlaw's own scan is slow: one layer)
            assert (scan.xmin, scan.alpha, scan.D) == pytest.approx(
                (ours["xmin"], ours["alpha"], ours["ks_distance"]), rel=1e-9
            )
        assert (ours["alpha"], ours["ks_distance"], ours["xmin"]) == pytest.approx(
            csn_reference(lam), rel=1e-9
        )


@pytest.mark.slow
def test_marchenko_pastur_fit_matches_weightwatcher(ww_model):
    """analyze(mp_fit=True): the same σ_mp, bulk edges, spikes and MP soft rank (to 1e-9 relative)."""
    details = _ww_details(ww_model, mp_fit=True)
    for row, layer in zip(details.itertuples(), ww_model, strict=True):
        W = layer.weight.detach()
        out, _ = M.esd_fit(ww_singular_values(W)[None], tuple(W.shape))
        ours = {k: float(v[0]) for k, v in out.items()}
        assert ours["mp_sigma"] == pytest.approx(row.sigma_mp, rel=1e-9)
        assert ours["mp_bulk_max"] == pytest.approx(row.bulk_max, rel=1e-9)
        assert ours["mp_bulk_min"] == pytest.approx(row.bulk_min, rel=1e-9, abs=1e-12)
        assert ours["num_spikes"] == row.num_spikes
        assert ours["mp_softrank"] == pytest.approx(row.mp_softrank, rel=1e-9)
    assert list(details.num_spikes)[2:] == [3, 0]  # the planted spikes, and none in the pure bulk


def test_kernel_density_matches_scikit_learn(gen):
    neighbors = require("sklearn.neighbors")
    pts = torch.rand(3, 40, generator=gen, dtype=torch.float64).sort(-1).values * 2
    pts[:, :5] = 0.0  # ties and zeros, as a rank-deficient ESD has
    grid = torch.linspace(-0.2, 2.3, 301, dtype=torch.float64).expand(3, -1).contiguous()
    ours = marchenko_pastur._kde_linear(pts, grid, 0.1)
    for k in range(3):
        kde = neighbors.KernelDensity(kernel="linear", bandwidth=0.1).fit(pts[k].numpy()[:, None])
        ref = np.exp(kde.score_samples(grid[k].numpy()[:, None]))
        np.testing.assert_allclose(ours[k].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_nelder_mead_is_scipy_fmin_step_for_step():
    from scipy import optimize

    centres = torch.tensor([0.3, 1.7, -2.0, 5.0, 0.0], dtype=torch.float64)

    def f(x):  # (b, 1) → (b, 1): a kinked, asymmetric valley per row
        d = x - centres[:, None]
        return torch.where(d > 0, 3 * d, -d) + 0.1 * d * d

    x0 = torch.tensor([1.0, 1.0, 0.5, 40.0, 0.0], dtype=torch.float64)
    ours = marchenko_pastur.nelder_mead_1d(f, x0)
    for k in range(len(x0)):
        ref = optimize.fmin(
            lambda x, k=k: float(f(torch.tensor([[x[0]]]).expand(5, 1))[k, 0]), [float(x0[k])], disp=False
        )
        assert float(ours[k]) == pytest.approx(ref[0], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- synthetic known answers


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_pareto_spectrum_recovers_its_exponent(alpha):
    """λ with density ∝ λ^(−α) on [1, ∞), 16 independent spectra in one batched call: their mean α
    within one standard error (α−1)/√n of the truth (the mean's own error is a quarter of that), and
    every fit within 4 standard errors (over 96 such fits the errors/SE have RMS 1.05)."""
    gen = torch.Generator().manual_seed(int(alpha * 10))
    b, p = 16, 1000
    lam = torch.rand(b, p, generator=gen, dtype=torch.float64).pow(-1 / (alpha - 1))
    out, reasons = M.esd_fit(lam.sqrt(), (p, p))
    assert reasons == [""] * b
    err = (out["alpha"] - alpha).abs()
    assert bool((err <= 4 * out["alpha_stderr"]).all()), err / out["alpha_stderr"]
    se = out["alpha_stderr"].mean().item()
    assert abs(out["alpha"].mean().item() - alpha) <= se
    assert bool((out["num_tail"] >= 100).all())


def test_marchenko_pastur_matrices_have_the_bulk_edge_and_no_spikes(gen):
    """X/√N with Gaussian X (N×M): λ(XᵀX) fills [(1−√(M/N))², (1+√(M/N))²]; no spikes."""
    N, Mdim = 800, 200
    X = torch.randn(4, N, Mdim, generator=gen, dtype=torch.float64) / math.sqrt(N)
    out, _ = M.esd_fit(torch.linalg.svdvals(X), (N, Mdim))
    edge = (1 + math.sqrt(Mdim / N)) ** 2
    assert out["num_spikes"].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(
        out["mp_bulk_max"], torch.full((4,), edge, dtype=torch.float64), rtol=0.05, atol=0
    )
    torch.testing.assert_close(out["mp_softrank"], torch.ones(4, dtype=torch.float64), rtol=0.1, atol=0)
    S = torch.linalg.svdvals(torch.randn(2, 200, 200, generator=gen, dtype=torch.float64) / math.sqrt(200))
    square, _ = M.esd_fit(S, (200, 200))  # Q = 1: the quarter-circle law, edge 4
    assert square["num_spikes"].tolist() == [0, 0]
    torch.testing.assert_close(
        square["mp_bulk_max"], torch.full((2,), 4.0, dtype=torch.float64), rtol=0.05, atol=0
    )


def test_planted_spikes_are_counted(gen):
    thetas = [[], [4.0], [3.0, 4.0, 5.0], [2.5, 3.0, 3.5, 4.0, 6.0]]
    X = torch.stack([spiked(600, 150, t, gen) for t in thetas])
    out, _ = M.esd_fit(torch.linalg.svdvals(X), (600, 150))
    assert out["num_spikes"].tolist() == [0, 1, 3, 5]


def test_batched_equals_one_at_a_time_and_is_float64(gen):
    X = torch.stack([heavy_tailed(100, 250, mu, gen) for mu in (1.5, 2.5, 4.0)]).float()
    S = torch.linalg.svdvals(X)  # float32 in, float64 out
    batched, reasons = M.esd_fit(S, (100, 250))
    for k in range(3):
        single, r = M.esd_fit(S[k : k + 1], (100, 250))
        assert r[0] == reasons[k] == ""
        for name, v in batched.items():
            assert v.dtype == torch.float64
            torch.testing.assert_close(v[k : k + 1], single[name], rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(batched["effective_rank"], M.effective_rank(S.double()), rtol=1e-12, atol=0)


def test_short_spectrum_means_zero_singular_values(gen):
    """A factored operator's ρ nonzero σ: the same answer as the zero-padded full spectrum."""
    s = heavy_tailed(80, 200, 2.0, gen)
    S = torch.linalg.svdvals(s)[None]
    full, _ = M.esd_fit(torch.cat([S, torch.zeros(1, 0, dtype=S.dtype)], -1), (80, 200))
    short, _ = M.esd_fit(S[:, :70], (80, 200))
    padded, _ = M.esd_fit(torch.cat([S[:, :70], torch.zeros(1, 10, dtype=S.dtype)], -1), (80, 200))
    for name in full:
        torch.testing.assert_close(short[name], padded[name], rtol=1e-12, atol=0, equal_nan=True)
    lam = S[0, :70].square().numpy()  # the zeros stay out of the fit
    fit = (short["alpha"].item(), short["ks_distance"].item(), short["xmin"].item())
    assert fit == pytest.approx(csn_reference(lam), rel=1e-9)


# ---------------------------------------------------------------- degenerate inputs


def test_degenerate_spectra_give_nan_and_a_reason(gen):
    p = 60
    good = torch.linalg.svdvals(heavy_tailed(p, 150, 2.0, gen))
    rank10 = torch.cat([good[:10], torch.zeros(p - 10, dtype=good.dtype)])
    near_flat = 1 + 1e-9 * torch.rand(p, generator=gen, dtype=torch.float64)
    flat, zero, nan = torch.ones_like(good), torch.zeros_like(good), torch.full_like(good, math.nan)
    S = torch.stack([good, flat, near_flat, rank10, zero, nan])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning on the way
        out, reasons = M.esd_fit(S, (p, 150))
    assert reasons[0] == ""
    assert "flat" in reasons[1] and "flat" in reasons[2]
    assert "10 eigenvalues" in reasons[3] and "needs 50" in reasons[3]
    assert reasons[4] == "zero matrix" and reasons[5] == "non-finite singular values"
    for name in ("alpha", "ks_distance", "xmin", "alpha_weighted", "alpha_stderr", "num_tail"):
        assert math.isfinite(out[name][0]) and out[name][1:].isnan().all(), name
    # what does not need a tail is still reported, and the good row is untouched by its neighbours
    assert out["stable_rank"][1].item() == pytest.approx(p) and out["stable_rank"][3] > 1
    alone, _ = M.esd_fit(good[None], (p, 150))
    for name, v in alone.items():
        torch.testing.assert_close(out[name][:1], v, rtol=1e-12, atol=0, equal_nan=True)
    assert out["stable_rank"][4:].isnan().all()


def test_too_few_eigenvalues_and_bad_shapes():
    S = torch.linspace(1, 2, 30, dtype=torch.float64)[None]
    out, reasons = M.esd_fit(S, (30, 100))
    assert out["alpha"].isnan().all() and "needs 50" in reasons[0]
    out, reasons = M.esd_fit(S, (30, 100), min_evals=20)
    assert reasons == [""] and out["alpha"].item() > 1
    with pytest.raises(ValueError, match="shape"):
        M.esd_fit(S, (20, 100))  # 30 singular values for a rank-20 shape
    with pytest.raises(ValueError, match=r"must be \(b, "):
        M.esd_fit(S[0], (30, 100))


@pytest.mark.gpu
def test_cuda_matches_cpu(gen):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    S = torch.linalg.svdvals(torch.stack([heavy_tailed(150, 400, mu, gen) for mu in (1.5, 2.5, 3.5)]))
    cpu, _ = M.esd_fit(S, (150, 400))
    gpu, _ = M.esd_fit(S.cuda(), (150, 400))
    for name, v in cpu.items():
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), v, rtol=1e-9, atol=1e-12, equal_nan=True)
    p = M.esd_fit(S.cuda(), (150, 400), pvalue_samples=20)[0]["alpha_pvalue"].cpu()  # CUDA's own stream
    assert torch.equal(p.isnan(), cpu["alpha"].isnan()) and bool(((p >= 0) & (p <= 1))[~p.isnan()].all())


# ---------------------------------------------------------------- the minimum tail and goodness of fit


def test_a_tail_shorter_than_the_minimum_gives_no_alpha_but_keeps_the_fit():
    """A flat bulk with three far outliers: the KS scan settles on the outliers (a tail of 3, as
    WeightWatcher would report it); α and its standard error are NaN with the reason, D, x_min and the
    tail size stay; with min_tail = 3 the same fit gives α, equal to the one-candidate-at-a-time scan."""
    gen = torch.Generator().manual_seed(11)
    bulk = 1 + 0.01 * torch.rand(100, generator=gen, dtype=torch.float64)
    lam = torch.cat([bulk, torch.tensor([40.0, 150.0, 900.0], dtype=torch.float64)])
    out, (reason,) = M.esd_fit(lam.sqrt()[None], (103, 300))
    assert out["num_tail"].item() == 3 and out["xmin"].item() == pytest.approx(40.0, rel=1e-12)
    assert math.isnan(out["alpha"]) and math.isnan(out["alpha_stderr"]) and math.isnan(out["alpha_weighted"])
    assert math.isfinite(out["ks_distance"])
    assert reason == f"power law: tail of 3 eigenvalues (λ ≥ x_min); α needs {esd.MIN_TAIL}"
    assert esd.MIN_TAIL == 10
    low, (ok,) = M.esd_fit(lam.sqrt()[None], (103, 300), min_tail=3)
    assert ok == ""
    assert (low["alpha"].item(), low["ks_distance"].item(), low["xmin"].item()) == pytest.approx(
        csn_reference(lam.numpy()), rel=1e-9
    )
    assert low["alpha_stderr"].item() == pytest.approx((low["alpha"].item() - 1) / math.sqrt(3), rel=1e-12)
    assert esd.esd_power_law(lam.sqrt()[None], (103, 300))["num_tail"].item() == 3  # the registry's path
    S = lam.sqrt()[None].clone()
    before = esd.esd_power_law(S, (103, 300))["xmin"].item()
    S.mul_(2)  # changed in place: fitted again, not read from the cache
    assert esd.esd_power_law(S, (103, 300))["xmin"].item() == pytest.approx(4 * before, rel=1e-12)
    with torch.inference_mode():  # no version counter there: still fitted, and once
        S = lam.sqrt()[None].clone()
        first = esd.esd_power_law(S, (103, 300))
        assert esd.esd_power_law(S, (103, 300)) is first and first["num_tail"].item() == 3


def test_registry_columns_beside_alpha_are_its_fit():
    """alpha_stderr and alpha_num_tail (and W0's) are declared once in the registry and read the same
    fit as α: (α − 1)/√n_tail."""
    from spectra.metrics.registry import METRICS

    gen = torch.Generator().manual_seed(5)
    S = torch.linalg.svdvals(torch.stack([heavy_tailed(120, 200, mu, gen) for mu in (1.5, 3.0)]))

    class Q:  # what the engine hands a metric: the shape and W_t's and W0's full spectra
        m, n, wt_sigma, base_sigma = 120, 200, S, S.flip(0)

    for prefix, sigma in (("alpha", S), ("alpha_base", S.flip(0))):
        alpha = METRICS[prefix].compute(Q, 0)
        se, tail = METRICS[f"{prefix}_stderr"].compute(Q, 0), METRICS[f"{prefix}_num_tail"].compute(Q, 0)
        ref, _ = M.esd_fit(sigma, (120, 200))
        torch.testing.assert_close(alpha, ref["alpha"], rtol=1e-12, atol=0)
        torch.testing.assert_close(tail, ref["num_tail"], rtol=0, atol=0)
        torch.testing.assert_close(se, (alpha - 1) / tail.sqrt(), rtol=1e-12, atol=0)
        assert METRICS[f"{prefix}_num_tail"].integer and METRICS[f"{prefix}_stderr"].optional


def test_pvalue_does_not_reject_a_true_power_law():
    """Clauset et al. §4.1: for data drawn from a power law p is uniform on [0, 1], so over 8 Pareto
    spectra (α = 2.5, 200 eigenvalues) the p-values are not small: median above 0.2, none below 0.01."""
    gen = torch.Generator().manual_seed(2)
    lam = torch.rand(8, 200, generator=gen, dtype=torch.float64).pow(-1 / 1.5)
    out, reasons = M.esd_fit(lam.sqrt(), (200, 200), pvalue_samples=50, seed=0)
    p = out["alpha_pvalue"]
    assert reasons == [""] * 8
    torch.testing.assert_close(p * 50, (p * 50).round(), rtol=0, atol=1e-9)  # a share of 50 samples
    assert p.median().item() > 0.2 and p.min().item() > 0.01, p


def test_pvalue_rejects_an_exponential_tail_with_enough_points():
    """λ = 15 + Exp(mean 8), 800 eigenvalues: its tail bends away from any power law (the local exponent,
    −d ln ρ/d ln λ = λ/8, grows along it), and p ≤ 0.1 (Clauset et al.'s rule for ruling it out). With
    fewer points the test cannot tell (at 400 Exp(1) eigenvalues, p is often above 0.5): the x_min scan
    finds a short top stretch that a power law fits."""
    gen = torch.Generator().manual_seed(3)
    lam = 15 - 8 * torch.rand(2, 800, generator=gen, dtype=torch.float64).log()
    out, reasons = M.esd_fit(lam.sqrt(), (800, 800), pvalue_samples=50, seed=0)
    assert reasons == ["", ""] and bool((out["alpha_pvalue"] <= 0.1).all()), out["alpha_pvalue"]


def test_pvalue_is_seeded_and_nan_without_a_fit():
    gen = torch.Generator().manual_seed(4)
    lam = torch.rand(1, 120, generator=gen, dtype=torch.float64).pow(-1 / 2.0)
    S = torch.cat([lam.sqrt(), torch.ones(1, 120, dtype=torch.float64)])  # the second is flat: no fit
    a, _ = M.esd_fit(S, (120, 300), pvalue_samples=20, seed=7)
    b, _ = M.esd_fit(S, (120, 300), pvalue_samples=20, seed=7)
    assert a["alpha_pvalue"][0].item() == b["alpha_pvalue"][0].item()
    alone, _ = M.esd_fit(S[:1], (120, 300), pvalue_samples=20, seed=7)  # the batch does not change p
    assert alone["alpha_pvalue"].item() == a["alpha_pvalue"][0].item()
    flipped, _ = M.esd_fit(S.flip(0), (120, 300), pvalue_samples=20, seed=7)
    assert flipped["alpha_pvalue"][1].item() == a["alpha_pvalue"][0].item()
    assert 0 <= a["alpha_pvalue"][0].item() <= 1 and math.isnan(a["alpha_pvalue"][1])
    assert M.esd_fit(S, (120, 300))[0]["alpha_pvalue"].isnan().all()  # not asked: not computed
    with pytest.raises(ValueError, match="samples must be"):
        esd.power_law_pvalue(lam, a["alpha"][:1], a["xmin"][:1], a["ks_distance"][:1], samples=0)
