"""Regression tests for the metric defects an independent review found (issue 13 §2), each against an
independent reference: float64 (or 80-bit long double) arithmetic on matrices built here."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import spectra
from spectra import metrics as M
from spectra.engine import EngineConfig
from spectra.metrics.collapse import CollapseRule, detect_collapse
from spectra.operators import DoRA, LowRank
from spectra.pipeline import analyze_run
from spectra.synthetic import base_weights, orthonormal, with_spectrum
from spectra.writer import RunWriter


def _pissa_like(m, n, r, eps, seed, dtype=torch.float32):
    """PiSSA's stored factors: B0, A0 of W0's size and B = B0 + δB, A = A0 + δA with |δ| = eps."""
    g = torch.Generator().manual_seed(seed)
    B0 = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype)
    A0 = torch.randn(r, n, generator=g, dtype=torch.float64).to(dtype)
    dB = (eps * torch.randn(m, r, generator=g, dtype=torch.float64)).to(dtype)
    dA = (eps * torch.randn(r, n, generator=g, dtype=torch.float64)).to(dtype)
    return B0 + dB, A0 + dA, B0, A0


def _exact_delta(B, A, B0, A0, s):
    """s·(BA − B0A0) in 80-bit long double from the stored values (the independent reference)."""
    Bl, Al, B0l, A0l = (np.asarray(t.double().numpy(), dtype=np.longdouble) for t in (B, A, B0, A0))
    return s * ((Bl - B0l) @ Al + B0l @ (Al - A0l))


@pytest.mark.parametrize("seed", range(6))
def test_pissa_alignment_stays_in_unit_interval_for_tiny_updates(seed):
    m, n, r, s = 48, 40, 4, 2.0
    B, A, B0, A0 = _pissa_like(m, n, r, 1e-6, seed)
    op = LowRank(B, A, s, B0=B0, A0=A0)
    exact = _exact_delta(B, A, B0, A0, s)
    # the reference: ρ_k of the exact ΔW against W0-like orthonormal bases, in long double
    g = torch.Generator().manual_seed(100 + seed)
    U, V = orthonormal(m, 8, generator=g), orthonormal(n, 8, generator=g)
    Ul, Vl = (np.asarray(t.numpy(), dtype=np.longdouble) for t in (U, V))
    ref_two = ((Ul.T @ exact @ Vl) ** 2).sum() / (exact**2).sum()
    ref_left = ((Ul.T @ exact) ** 2).sum() / (exact**2).sum()
    curves = M.alignment_curves(op, U, V)
    assert 0.0 <= curves["two_sided"][-1].item() <= 1.0 + 1e-9
    assert 0.0 <= curves["left"][-1].item() <= 1.0 + 1e-9
    assert curves["two_sided"][-1].item() == pytest.approx(float(ref_two), rel=1e-6, abs=1e-12)
    assert curves["left"][-1].item() == pytest.approx(float(ref_left), rel=1e-6)
    # ‖ΔW‖_F² and the dense ΔW themselves: no cancellation
    assert op.frobenius_sq().item() == pytest.approx(float((exact**2).sum()), rel=1e-9)
    np.testing.assert_allclose(
        op.to_dense().numpy(), exact.astype(np.float64), rtol=0, atol=1e-9 * np.abs(exact).max()
    )


def test_pissa_alignment_through_the_engine_is_bounded(tmp_path):
    shapes = {"l.0.w": (48, 40)}
    w = RunWriter(tmp_path / "pissa")
    w.write_config({})
    w.write_base_weights(base_weights(shapes))
    B, A, B0, A0 = _pissa_like(48, 40, 4, 3e-6, 0)
    w.write_delta(1, {"l.0.w": LowRank(B, A, 2.0, B0=B0, A0=A0)})
    row = spectra.load_run(w.path).analyze(device="cpu", ks=(1, 8)).iloc[0]
    for col in ("rho_1", "rho_8", "rho_left_8", "rho_right_8", "rho_minor_8", "off_principal_8"):
        assert -1e-9 <= row[col] <= 1 + 1e-9, (col, row[col])


def test_ks_without_one_still_summarises_and_flags_collapse(lora_run):
    a = analyze_run(lora_run, EngineConfig(ks=(8,), device="cpu"), save=False)
    assert "E_1" in a.table.columns and a.table["E_1"].notna().any()
    assert "E_1" in a.summary["steps"][-1]["median"]
    assert a.per_step["collapsed"].dtype == bool
    assert len(spectra.load_run(lora_run).collapse(a.table)) == 3


def test_intruders_depend_only_on_the_arguments_given(tmp_path):
    shapes = {"l.0.w": (150, 140)}  # more than 2 × 64 singular vectors
    w = RunWriter(tmp_path / "hist")
    w.write_config({})
    w0 = base_weights(shapes)
    w.write_base_weights(w0)
    g = torch.Generator().manual_seed(3)
    w.write_delta(
        1, {"l.0.w": LowRank(0.3 * torch.randn(150, 16, generator=g), torch.randn(16, 140, generator=g))}
    )
    fresh = spectra.load_run(w.path).analyze(device="cpu").iloc[0]
    assert fresh["intruder_basis"] == 64
    spectra.load_run(w.path).analyze(device="cpu", base_keep=10**9)  # the cache grows to every vector
    again = spectra.load_run(w.path).analyze(device="cpu").iloc[0]
    assert again["intruder_basis"] == 64
    cols = [c for c in fresh.index if c not in ("error",)]
    pd.testing.assert_series_equal(again[cols], fresh[cols], check_names=False)


def _rewards(values):
    return pd.DataFrame({"step": range(len(values)), "reward": values})


@pytest.mark.parametrize("shift", [0.0, 1.0, -3.0])
def test_collapse_rule_works_for_any_reward_range(shift):
    """Issue 23 changed this test: the former rule's scale max(|peak|, peak − first) depended on where zero
    is (flagged at offsets 0 and +1, not at −3); the verdict is now the same wherever zero is."""
    per_step = pd.DataFrame({"step": [0, 10, 20], "e1_median": [0.9, 0.9, 0.9]})
    falling = [v + shift for v in [-0.2] * 5 + [-0.93] * 16]  # −0.2 → −0.93, shifted
    out = detect_collapse(per_step, _rewards(falling), CollapseRule(reward_window=3))
    assert out["collapsed"].tolist() == [False, True, True]
    steady = [v + shift for v in [-0.2] * 21]
    assert not detect_collapse(per_step, _rewards(steady), CollapseRule(reward_window=3))["collapsed"].any()


def test_collapse_rule_on_rewards_that_climbed_from_negative():
    per_step = pd.DataFrame({"step": [0, 20, 40], "e1_median": [0.9, 0.9, 0.9]})
    # −1 → +0.2 (peak) → −0.5: a fall of 0.7, beyond 3 standard errors of the window means (≈ 0.28)
    r = [-1.0] * 5 + [0.2] * 15 + [-0.5] * 25
    out = detect_collapse(per_step, _rewards(r), CollapseRule(reward_window=3))
    assert out["collapsed"].tolist() == [False, False, True]
    # the same curve with a floor at −1 (the reward's lowest value): 0.7 ≥ 0.5 × 1.2, flagged too
    floored = detect_collapse(per_step, _rewards(r), CollapseRule(reward_window=3, reward_floor=-1.0))
    assert floored["collapsed"].tolist() == [False, False, True]


def test_topk_angles_match_the_full_svd_on_a_flat_spectrum(tmp_path):
    m, n = 96, 80
    g = torch.Generator().manual_seed(0)
    s = torch.linspace(1.0, 0.9, min(m, n), dtype=torch.float64)  # flat: top-32 subspace barely separated
    w0 = with_spectrum(s, m, n, generator=g)[0].float()
    w = RunWriter(tmp_path / "flat")
    w.write_config({})
    w.write_base_weights({"l.0.w": w0})
    w.write_delta(
        1, {"l.0.w": LowRank(0.05 * torch.randn(m, 8, generator=g), torch.randn(8, n, generator=g))}
    )
    run = spectra.load_run(w.path)
    full = run.analyze(device="cpu", ks=(8, 32), wt="full").iloc[0]
    topk = run.analyze(device="cpu", ks=(8, 32), wt="topk").iloc[0]
    for col in ("angle_left_8", "angle_right_8", "angle_left_32", "angle_right_32"):
        assert topk[col] == pytest.approx(full[col], rel=1e-6, abs=1e-6), col
    assert topk["intruders"] == full["intruders"] and math.isnan(topk["nss"])


def test_to_dense_is_float64_from_bf16_factors_and_small_differences():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(30, 4, generator=g).bfloat16(), torch.randn(4, 20, generator=g).bfloat16()
    dense = LowRank(B, A, 0.5).to_dense()
    assert dense.dtype == torch.float64
    torch.testing.assert_close(dense, 0.5 * B.double() @ A.double(), rtol=1e-15, atol=0)
    # DoRA at 5e-7·‖W0‖: W' − W0 in float64 against an 80-bit reference
    w0 = torch.randn(30, 20, generator=g)
    Bd, Ad = 1e-7 * torch.randn(30, 4, generator=g), torch.randn(4, 20, generator=g)
    mag = torch.linalg.vector_norm(w0.double(), dim=1).float()
    op = DoRA(w0, mag, Bd, Ad, 1.0)
    W, Bl, Al, ml = (np.asarray(t.double().numpy(), dtype=np.longdouble) for t in (w0, Bd, Ad, mag))
    V = W + Bl @ Al
    ref = ml[:, None] * V / np.sqrt((V**2).sum(axis=1, keepdims=True)) - W
    got = op.to_dense().numpy()
    assert got.dtype == np.float64
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-6  # float32 arithmetic: ~5 %


def test_base_vectors_are_stored_in_float64_and_small_angles_resolve(tmp_path):
    shapes = {"l.0.w": (40, 32)}
    w = RunWriter(tmp_path / "f64")
    w.write_config({})
    w.write_base_weights(base_weights(shapes))
    w.write_delta(1, {"l.0.w": LowRank(1e-7 * torch.ones(40, 1), torch.ones(1, 32))})
    run = spectra.load_run(w.path)
    row = run.analyze(device="cpu", ks=(1, 8)).iloc[0]
    with h5py.File(w.path / "base" / "spectra.h5") as f:
        assert f["modules/l.0.w/U"].dtype == np.float64 and f.attrs["precision"] == "float64"
    # the exact angle of a 1e-7 relative rank-1 tilt is ~1e-5°; float32 vectors would floor it at ~2e-6°
    exact = M.max_principal_angle(
        torch.linalg.svd(run.w0("l.0.w").double()).U[:, :8],
        torch.linalg.svd(run.w0("l.0.w").double() + 1e-7 * torch.ones(40, 32, dtype=torch.float64)).U[:, :8],
    )
    assert row["angle_left_8"] == pytest.approx(exact.item(), rel=1e-4)


def test_old_float32_base_spectra_are_recomputed(tmp_path):
    shapes = {"l.0.w": (24, 20)}
    w = RunWriter(tmp_path / "old")
    w.write_config({})
    w.write_base_weights(base_weights(shapes))
    run = spectra.load_run(w.path)
    run.ensure_base_spectra()
    with h5py.File(w.path / "base" / "spectra.h5", "a") as f:
        del f.attrs["precision"]  # as written by spectra 0.1 (float32 vectors)
    run = spectra.load_run(w.path)
    assert run.base_spectrum("l.0.w").U.dtype == torch.float64
    with h5py.File(w.path / "base" / "spectra.h5") as f:
        assert f.attrs["precision"] == "float64"
