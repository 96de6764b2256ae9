"""Spectral metrics on spectra with known answers, against float64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spectra import metrics as M
from spectra.synthetic import with_spectrum


def np_erank(s: np.ndarray) -> float:
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rank_one_update_has_erank_one_and_full_concentration(gen):
    u, v = (
        torch.randn(30, 1, generator=gen, dtype=torch.float64),
        torch.randn(1, 20, generator=gen, dtype=torch.float64),
    )
    s = torch.linalg.svdvals(u @ v)
    assert M.effective_rank(s).item() == pytest.approx(1.0, abs=1e-6)
    assert M.spectral_concentration(s, 1).item() == pytest.approx(1.0, abs=1e-12)
    assert M.stable_rank(s).item() == pytest.approx(1.0, abs=1e-12)
    assert M.participation_ratio(s).item() == pytest.approx(1.0, abs=1e-12)
    assert M.rank_at(s, 0.9).item() == 1


def test_isotropic_update_has_erank_n(gen):
    n = 17
    X, _, _ = with_spectrum(torch.full((n,), 3.0, dtype=torch.float64), 25, n, generator=gen)
    s = torch.linalg.svdvals(X)
    assert M.effective_rank(s).item() == pytest.approx(n, rel=1e-10)
    assert M.stable_rank(s).item() == pytest.approx(n, rel=1e-10)
    assert M.participation_ratio(s).item() == pytest.approx(n, rel=1e-10)
    assert M.rank_at(s, 0.9).item() == math.ceil(0.9 * n)
    assert M.spectral_concentration(s, [1, 5]).tolist() == pytest.approx([1 / n, 5 / n], rel=1e-10)


def test_metrics_match_float64_references_on_a_decaying_spectrum():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    sn = s.numpy()
    assert M.effective_rank(s).item() == pytest.approx(np_erank(sn), rel=1e-12)
    assert M.stable_rank(s).item() == pytest.approx((sn**2).sum() / 25.0, rel=1e-12)
    assert M.participation_ratio(s).item() == pytest.approx((sn**2).sum() ** 2 / (sn**4).sum(), rel=1e-12)
    energy = np.cumsum(sn**2) / (sn**2).sum()
    assert M.rank_at(s, 0.9).item() == int(np.argmax(energy >= 0.9) + 1)
    assert M.spectral_concentration(s, [1, 2, 3]).tolist() == pytest.approx(energy[:3].tolist(), rel=1e-12)
    assert M.frobenius_norm(s).item() == pytest.approx(np.sqrt((sn**2).sum()), rel=1e-12)
    assert M.spectral_norm(s).item() == 5.0


def test_rank_at_exact_threshold_counts_the_value_reaching_it():
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)  # energies 9/10, 1/10
    assert M.rank_at(s, 0.9).item() == 1
    assert M.rank_at(s, 0.95).item() == 2


def test_zero_update_gives_zero_ranks_and_nan_free_values():
    s = torch.zeros(5, dtype=torch.float64)
    assert M.effective_rank(s).item() == 0
    assert M.stable_rank(s).item() == 0
    assert M.participation_ratio(s).item() == 0
    assert M.rank_at(s).item() == 0


def test_zero_padding_does_not_change_spectral_metrics():
    s = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    padded = torch.cat([s, torch.zeros(40, dtype=torch.float64)])
    for f in (M.effective_rank, M.stable_rank, M.participation_ratio, M.rank_at, M.frobenius_norm):
        assert f(s).item() == pytest.approx(f(padded).item(), rel=1e-12)


def test_relative_update_size_and_spectrum_drift():
    s0 = torch.tensor([4.0, 3.0], dtype=torch.float64)
    sd = torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert M.relative_update_size(sd, s0).item() == pytest.approx(0.5 / 5.0)
    st = torch.tensor([4.0, 3.0 + 0.5], dtype=torch.float64)
    assert M.spectrum_drift(st, s0).item() == pytest.approx(0.5 / 5.0)
    with pytest.raises(ValueError, match="spectra of length"):
        M.spectrum_drift(st[:1], s0)


def test_batched_inputs_reduce_the_last_dimension():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert M.effective_rank(s).tolist() == pytest.approx([1.0, 2.0])
    assert M.spectral_concentration(s, 1).tolist() == pytest.approx([1.0, 0.5])
