"""Alignment, principal angles, intruders and bf16 sparsity on constructed matrices with exact answers."""

from __future__ import annotations

import math

import pytest
import torch

from spectra import metrics as M
from spectra.operators import LowRank
from spectra.synthetic import orthonormal, with_spectrum

m, n, k = 40, 30, 5


@pytest.fixture
def w0(gen):
    s = torch.linspace(10, 1, min(m, n), dtype=torch.float64)
    return with_spectrum(s, m, n, generator=gen)


def test_update_inside_top_k_subspace_has_rho_one(w0, gen):
    _, U, V = w0
    C = torch.randn(k, k, generator=gen, dtype=torch.float64)
    delta = U[:, :k] @ C @ V[:, :k].T
    assert M.principal_alignment(delta, U[:, :k], V[:, :k]).item() == pytest.approx(1.0, abs=1e-12)
    curves = M.alignment_curves(delta, U[:, :k], V[:, :k])
    assert curves["left"][-1].item() == pytest.approx(1.0, abs=1e-12)
    assert curves["right"][-1].item() == pytest.approx(1.0, abs=1e-12)


def test_update_in_orthogonal_complement_has_rho_zero(w0, gen):
    _, U, V = w0
    C = torch.randn(m - k, n - k, generator=gen, dtype=torch.float64)
    Uc = orthonormal(m, m, generator=gen)
    # complement of span(U_k): project a random basis away from U_k
    P = torch.eye(m, dtype=torch.float64) - U[:, :k] @ U[:, :k].T
    Qc, _ = torch.linalg.qr(P @ Uc[:, : m - k])
    Pv = torch.eye(n, dtype=torch.float64) - V[:, :k] @ V[:, :k].T
    Qv, _ = torch.linalg.qr(Pv @ torch.randn(n, n - k, generator=gen, dtype=torch.float64))
    delta = Qc @ C @ Qv.T
    assert M.principal_alignment(delta, U[:, :k], V[:, :k]).item() == pytest.approx(0.0, abs=1e-12)
    curves = M.alignment_curves(delta, U[:, :k], V[:, :k])
    assert curves["left"][-1].item() == pytest.approx(0.0, abs=1e-12)


def test_left_only_alignment_is_one_sided(w0, gen):
    _, U, V = w0
    # ΔW = U_k · Rᵀ with R random: inside the left principal subspace, not the right one
    delta = U[:, :k] @ torch.randn(k, n, generator=gen, dtype=torch.float64)
    curves = M.alignment_curves(delta, U[:, :k], V[:, :k])
    assert curves["left"][-1].item() == pytest.approx(1.0, abs=1e-12)
    assert curves["right"][-1].item() < 0.6
    assert curves["two_sided"][-1].item() == pytest.approx(curves["right"][-1].item(), rel=1e-10)


def test_alignment_curves_match_a_direct_float64_computation(w0, gen):
    _, U, V = w0
    delta = torch.randn(m, n, generator=gen, dtype=torch.float64)
    curves = M.alignment_curves(delta, U[:, :8], V[:, :8])
    fro2 = delta.square().sum()
    for kk in range(1, 9):
        direct = (U[:, :kk].T @ delta @ V[:, :kk]).square().sum() / fro2
        assert curves["two_sided"][kk - 1].item() == pytest.approx(direct.item(), rel=1e-12)
        assert curves["left"][kk - 1].item() == pytest.approx(
            ((U[:, :kk].T @ delta).square().sum() / fro2).item()
        )


def test_factored_and_dense_alignment_agree(w0, gen):
    _, U, V = w0
    op = LowRank(
        torch.randn(m, 3, generator=gen, dtype=torch.float64),
        torch.randn(3, n, generator=gen, dtype=torch.float64),
        2.0,
    )
    a = M.alignment_curves(op, U[:, :6], V[:, :6])
    b = M.alignment_curves(op.to_dense(), U[:, :6], V[:, :6])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-14)


def test_random_updates_match_the_baselines_on_average(w0):
    _, U, V = w0
    g = torch.Generator().manual_seed(7)
    deltas = torch.randn(4000, m, n, generator=g, dtype=torch.float64)
    curves = M.alignment_curves(deltas, U[:, :k], V[:, :k])
    assert curves["two_sided"][:, -1].mean().item() == pytest.approx(M.alignment_baseline(k, m, n), rel=0.05)
    assert curves["left"][:, -1].mean().item() == pytest.approx(
        M.alignment_baseline(k, m, n, "left"), rel=0.03
    )
    assert curves["right"][:, -1].mean().item() == pytest.approx(
        M.alignment_baseline(k, m, n, "right"), rel=0.03
    )


def test_zero_update_alignment_is_nan():
    U = orthonormal(m, k)
    V = orthonormal(n, k)
    assert math.isnan(M.principal_alignment(torch.zeros(m, n, dtype=torch.float64), U, V).item())


def test_constructed_rotation_gives_known_principal_angles(gen):
    theta = torch.tensor([10.0, 25.0, 40.0], dtype=torch.float64)
    Q = orthonormal(12, 6, generator=gen)
    A = Q[:, :3]
    c, s = torch.cos(torch.deg2rad(theta)), torch.sin(torch.deg2rad(theta))
    B = A * c + Q[:, 3:] * s  # column i rotated by θ_i towards an orthogonal direction
    angles = M.principal_angles(A, B)
    assert angles.tolist() == pytest.approx(theta.tolist(), abs=1e-8)
    assert M.max_principal_angle(A, B).item() == pytest.approx(40.0, abs=1e-8)
    assert M.max_principal_angle(A, A).item() == pytest.approx(0.0, abs=1e-5)


def test_planted_intruder_is_counted(gen):
    d = 20
    U0 = orthonormal(d, d, generator=gen)  # all singular vectors of W0
    Ut = U0[:, :10].clone()
    # replace two vectors by directions spread evenly over U0's basis (|cos| = 1/√d ≈ 0.22 with each)
    spread = U0 @ (torch.ones(d, dtype=torch.float64) / math.sqrt(d))
    Ut[:, 3] = spread
    Ut[:, 7] = U0 @ (torch.tensor([(-1.0) ** i for i in range(d)], dtype=torch.float64) / math.sqrt(d))
    assert M.intruder_dimensions(Ut, U0, eps=0.5).item() == 2
    assert M.intruder_dimensions(U0[:, :10], U0, eps=0.5).item() == 0


def test_bf16_sparsity_counts_entries_below_bf16_resolution():
    w0 = torch.ones(4, 5, dtype=torch.float32)
    delta = torch.zeros(4, 5)
    delta[0, :] = 1e-4  # far below bf16's spacing at 1.0 (2^-7 ≈ 0.0078)
    delta[1, :2] = 0.5  # visible
    assert M.bf16_update_sparsity(w0, delta).item() == pytest.approx(18 / 20)


def test_alignment_baseline_rejects_unknown_side():
    with pytest.raises(ValueError, match="side"):
        M.alignment_baseline(1, 2, 3, "middle")
