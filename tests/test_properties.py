"""Property tests (hypothesis): invariances the metrics must have."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra import metrics as M
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
