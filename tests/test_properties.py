"""Property tests: invariances the metric functions must have (hypothesis), and the declared
properties of every metric in the registry (parametrised over it)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra import metrics as M
from spectra.base import compute_base_spectrum
from spectra.engine import EngineConfig, Item, analyze_items
from spectra.metrics import registry
from spectra.operators import Dense, LowRank
from spectra.svd import dense_svd
from spectra.synthetic import orthonormal

dims = st.integers(min_value=3, max_value=24)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
SETTINGS = settings(max_examples=40, deadline=None)


def spectral_summary(delta: torch.Tensor) -> torch.Tensor:
    s = dense_svd(delta).S
    return torch.stack(
        [
            M.effective_rank(s),
            M.stable_rank(s),
            M.participation_ratio(s),
            M.rank_at(s).double(),
            M.spectral_concentration(s, 1),
            M.frobenius_norm(s),
        ]
    )


@SETTINGS
@given(m=dims, n=dims, seed=seeds)
def test_spectral_metrics_are_orthogonally_invariant(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    Q1, Q2 = orthonormal(m, m, generator=g), orthonormal(n, n, generator=g)
    torch.testing.assert_close(
        spectral_summary(Q1 @ delta @ Q2), spectral_summary(delta), rtol=1e-8, atol=1e-10
    )


@SETTINGS
@given(m=dims, n=dims, seed=seeds, c=st.floats(min_value=1e-3, max_value=1e3))
def test_shape_metrics_are_scale_invariant(m, n, seed, c):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    a, b = spectral_summary(delta), spectral_summary(c * delta)
    torch.testing.assert_close(b[:5], a[:5], rtol=1e-8, atol=1e-10)  # ranks and E_1: invariant
    torch.testing.assert_close(b[5], c * a[5], rtol=1e-10, atol=0)  # the norm scales


@SETTINGS
@given(m=dims, n=dims, seed=seeds, c=st.floats(min_value=1e-3, max_value=1e3))
def test_alignment_is_scale_invariant_and_rotates_with_the_base(m, n, seed, c):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n) // 2 + 1
    U, V = orthonormal(m, k, generator=g), orthonormal(n, k, generator=g)
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    rho = M.principal_alignment(delta, U, V)
    torch.testing.assert_close(M.principal_alignment(c * delta, U, V), rho, rtol=1e-10, atol=1e-12)
    Q1, Q2 = orthonormal(m, m, generator=g), orthonormal(n, n, generator=g)
    torch.testing.assert_close(
        M.principal_alignment(Q1 @ delta @ Q2.T, Q1 @ U, Q2 @ V), rho, rtol=1e-8, atol=1e-12
    )
    assert 0.0 <= rho.item() <= 1.0 + 1e-12


@SETTINGS
@given(d=st.integers(min_value=4, max_value=20), seed=seeds)
def test_principal_angles_are_symmetric_and_bounded(d, seed):
    g = torch.Generator().manual_seed(seed)
    k = d // 2
    A, B = orthonormal(d, k, generator=g), orthonormal(d, k, generator=g)
    torch.testing.assert_close(M.principal_angles(A, B), M.principal_angles(B, A), rtol=1e-6, atol=1e-6)
    ang = M.principal_angles(A, B)
    assert ang.min().item() >= 0 and ang.max().item() <= 90 + 1e-9


# ---------------------------------------------------------------------------------------------------
# Every registered metric, parametrised over the registry (as scikit-learn's test_common is over its
# scorers): its declared range, how it scales with ΔW, rotation invariance, empty for a zero update,
# the same alone as in a batch. A new metric gets these checks by being registered.
# ---------------------------------------------------------------------------------------------------


KS = (1, 4)
CONFIG = EngineConfig(ks=KS, device="cpu", base_keep=8)
CASES = [(seed, m, n) for seed, (m, n) in enumerate([(12, 9), (9, 14), (16, 16), (70, 60)])]


def _w0(m, n, g):
    return torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)


def _rows(ops, w0):
    base = compute_base_spectrum(w0, CONFIG.keep)
    return analyze_items([Item(f"m{i}", op, w0, base) for i, op in enumerate(ops)], CONFIG)


@pytest.fixture(scope="module")
def scenarios():
    """Per case: rows of a dense and a low-rank update, of 7.3× each, of each rotated (Q₁ΔWQ₂), the
    zero update, and every row computed alone."""
    out = []
    for seed, m, n in CASES:
        g = torch.Generator().manual_seed(seed)
        w0 = _w0(m, n, g)
        dense = 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
        B, A = 0.05 * torch.randn(m, 3, generator=g, dtype=torch.float64), torch.randn(3, n, generator=g)
        Q1, Q2 = orthonormal(m, m, generator=g), orthonormal(n, n, generator=g)
        ops = [Dense(dense), Dense(7.3 * dense), Dense(Q1 @ dense @ Q2), LowRank(B, A.double(), 2.0),
               LowRank(7.3 * B, A.double(), 2.0), Dense(torch.zeros(m, n, dtype=torch.float64))]  # fmt: skip
        batch = _rows(ops, w0)
        alone = [_rows([op], w0)[0] for op in ops]
        out.append({"m": m, "n": n, "batch": batch, "alone": alone})
    return out


def _columns(metric):
    return [col for _, _, col in registry.expand([metric], KS, CONFIG.rank_fraction)]


def _applicable(metric, sc):
    return all(col in sc["batch"][0] for col in _columns(metric))


NAMES = [m.name for m in registry.selected()]


@pytest.mark.parametrize("name", NAMES)
def test_metric_stays_in_its_declared_range(name, scenarios):
    metric = registry.METRICS[name]
    for sc in scenarios:
        upper = min(sc["m"], sc["n"]) if metric.upper == "rank" else metric.upper
        for row in sc["batch"][:5]:
            for col in _columns(metric):
                v = row[col]
                if math.isnan(v):
                    assert metric.optional, f"{col} is NaN for a nonzero update"
                    continue
                assert metric.lower is None or v >= metric.lower - 1e-9, (col, v)
                assert upper is None or v <= upper + 1e-9, (col, v)


@pytest.mark.parametrize("name", [m.name for m in registry.selected() if m.scale_degree is not None])
def test_metric_scales_as_declared(name, scenarios):
    metric = registry.METRICS[name]
    for sc in scenarios:
        for one, scaled in ((0, 1), (3, 4)):  # dense and low-rank, each against 7.3 × itself
            for col in _columns(metric):
                a, b = sc["batch"][one][col], sc["batch"][scaled][col]
                assert b == pytest.approx(a * 7.3**metric.scale_degree, rel=1e-8, abs=1e-12), col


@pytest.mark.parametrize("name", [m.name for m in registry.selected() if m.rotation_invariant])
def test_metric_of_the_spectrum_is_rotation_invariant(name, scenarios):
    metric = registry.METRICS[name]
    for sc in scenarios:
        for col in _columns(metric):
            assert sc["batch"][2][col] == pytest.approx(sc["batch"][0][col], rel=1e-8, abs=1e-12), col


@pytest.mark.parametrize("name", NAMES)
def test_metric_is_empty_for_a_zero_update_exactly_when_it_measures_shape(name, scenarios):
    metric = registry.METRICS[name]
    for sc in scenarios:
        row = sc["batch"][5]
        assert row["status"] == "ok"
        for col in _columns(metric):
            if metric.shape:
                assert math.isnan(row[col]), col
            elif not metric.optional:
                assert math.isfinite(row[col]), col


@pytest.mark.parametrize("name", NAMES)
def test_metric_is_the_same_alone_and_in_a_batch(name, scenarios):
    metric = registry.METRICS[name]
    for sc in scenarios:
        for batched, alone in zip(sc["batch"], sc["alone"], strict=True):
            for col in _columns(metric):
                a, b = batched[col], alone[col]
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), col


def test_every_metric_is_tested_here():
    """Each registered metric's columns appear in the engine's rows (a metric whose stage is never
    enabled would escape the checks above)."""
    row = _rows([Dense(torch.eye(5, 4, dtype=torch.float64))], _w0(5, 4, torch.Generator().manual_seed(0)))[0]
    assert {c for m in registry.METRICS.values() for c in _columns(m)} <= set(row)


def test_docs_list_every_metric():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert doc.read_text() == registry.markdown(), (
        "docs/metrics.md is stale: spectra metrics > docs/metrics.md"
    )
