"""The analysis engine against independent float64 references, and its handling of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import spectra
from spectra import metrics as M
from spectra.engine import EngineConfig, plan_chunks
from spectra.operators import Dense, LowRank
from spectra.synthetic import base_weights
from spectra.writer import RunWriter

KS = (1, 4, 8)


def reference_row(w0: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """Every metric from plain float64 LAPACK SVDs of W0, ΔW and W_t (the naive way)."""
    w0, delta = w0.double(), delta.double()
    U0, S0, V0h = torch.linalg.svd(w0, full_matrices=False)
    V0 = V0h.T
    s = torch.linalg.svdvals(delta)
    Ut, St, _Vth = torch.linalg.svd(w0 + delta, full_matrices=False)
    fro2 = delta.square().sum()
    out = {
        "fro_norm": s.norm().item(),
        "erank": M.effective_rank(s).item(),
        "stable_rank": M.stable_rank(s).item(),
        "relative_size": (s.norm() / S0.norm()).item(),
        "rank90": M.rank_at(s).item(),
        "nss": ((St - S0).norm() / S0.norm()).item(),
        "intruders": M.intruder_dimensions(Ut[:, :10], U0[:, :64]).item(),
    }
    for k in KS:
        out[f"E_{k}"] = (s[:k].square().sum() / fro2).item()
        out[f"rho_{k}"] = ((U0[:, :k].T @ delta @ V0[:, :k]).square().sum() / fro2).item()
        out[f"rho_left_{k}"] = ((U0[:, :k].T @ delta).square().sum() / fro2).item()
        out[f"rho_minor_{k}"] = ((U0[:, -k:].T @ delta @ V0[:, -k:]).square().sum() / fro2).item()
        cos = torch.linalg.svdvals(U0[:, :k].T @ Ut[:, :k]).clamp(max=1)
        out[f"angle_left_{k}"] = math.degrees(math.acos(cos.min().item()))
    return out


@pytest.fixture
def mixed_run(tmp_path):
    shapes = {
        "model.layers.0.self_attn.q_proj": (24, 24),
        "model.layers.1.self_attn.q_proj": (24, 24),
        "model.layers.0.mlp.down_proj": (24, 40),
        "model.layers.0.mlp.up_proj": (40, 24),
    }
    w0 = base_weights(shapes, seed=3)
    g = torch.Generator().manual_seed(5)
    w = RunWriter(tmp_path / "mixed")
    w.write_config({"model": "synthetic", "method": "mixed"})
    w.write_base_weights(w0)
    ops = {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        if i % 2 == 0:
            ops[name] = LowRank(
                0.05 * torch.randn(m, 3, generator=g), 0.05 * torch.randn(3, n, generator=g), 2.0
            )
        else:
            ops[name] = Dense(0.01 * torch.randn(m, n, generator=g))
    w.write_delta(10, ops)
    return w.path, w0, ops


def test_engine_matches_naive_float64_reference(mixed_run):
    path, w0, ops = mixed_run
    df = spectra.load_run(path).analyze(ks=KS, device="cpu")
    assert (df["status"] == "ok").all() and len(df) == 4
    for _, row in df.iterrows():
        ref = reference_row(w0[row["module"]], ops[row["module"]].to(dtype=torch.float64).to_dense())
        for key, want in ref.items():
            tol = 1e-6 if not key.startswith("angle") else 1e-4
            assert row[key] == pytest.approx(want, rel=tol, abs=1e-9), (row["module"], key)
    layer_proj = df.set_index("module").loc["model.layers.1.self_attn.q_proj", ["layer", "proj"]].tolist()
    assert layer_proj == [1, "q_proj"]


def test_factored_and_dense_paths_agree(tmp_path):
    shapes = {"l.0.w": (30, 20)}
    w0 = base_weights(shapes)
    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(30, 4, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(4, 20, generator=g, dtype=torch.float64),
    )
    results = []
    for op in (LowRank(B, A, 0.5), Dense(0.5 * B @ A)):
        w = RunWriter(tmp_path / type(op).__name__)
        w.write_config({})
        w.write_base_weights(w0)
        w.write_delta(1, {"l.0.w": op})
        results.append(spectra.load_run(w.path).analyze(ks=(1, 4), device="cpu").iloc[0])
    fact, dense = results
    assert fact["kind"] == "lowrank" and dense["kind"] == "dense"
    for col in (
        "fro_norm",
        "erank",
        "E_1",
        "E_4",
        "rho_4",
        "rho_minor_4",
        "stable_rank",
        "nss",
        "angle_left_4",
    ):
        assert fact[col] == pytest.approx(dense[col], rel=1e-6, abs=1e-10), col
    assert fact["rank90"] == dense["rank90"]


def test_chunking_does_not_change_results(lora_run):
    run = spectra.load_run(lora_run)
    whole = run.analyze(device="cpu")
    tiny = run.analyze(device="cpu", max_batch_bytes=1)  # one module per batch
    cols = ["fro_norm", "erank", "rho_8", "nss", "angle_left_8", "bf16_sparsity"]
    a = whole.sort_values(["step", "module"])[cols].to_numpy()
    b = tiny.sort_values(["step", "module"])[cols].to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_plan_chunks_respects_the_budget():
    chunks = plan_chunks([3, 3, 3, 3, 3], budget=7)
    assert chunks == [[0, 1], [2, 3], [4]]
    assert plan_chunks([10, 1], budget=5) == [[0], [1]]  # an oversized item stands alone


def test_topk_mode_gives_the_same_angles_without_nss(lora_run):
    run = spectra.load_run(lora_run)
    full = run.analyze(device="cpu", ks=(1, 4))
    topk = run.analyze(device="cpu", ks=(1, 4), wt="topk")
    assert "nss" not in topk.columns or topk["nss"].isna().all()
    np.testing.assert_allclose(topk["intruders"], full["intruders"])
    np.testing.assert_allclose(topk["angle_left_4"], full["angle_left_4"], atol=0.05)  # degrees


def test_damaged_file_and_bad_modules_are_flagged_and_the_rest_analysed(mixed_run):
    path, _w0, ops = mixed_run
    w = RunWriter(path)
    bad = {**ops}
    nan = ops["model.layers.0.self_attn.q_proj"].to_dense().clone()
    nan[0, 0] = float("nan")
    bad["model.layers.0.self_attn.q_proj"] = Dense(nan)
    bad["model.layers.1.self_attn.q_proj"] = Dense(torch.zeros(5, 5))
    w.write_delta(20, bad)
    damaged = w.write_delta(30, ops)
    damaged.write_bytes(damaged.read_bytes()[:200])
    df = spectra.load_run(path).analyze(ks=KS, device="cpu")
    status = df.set_index(["step", "module"])["status"]
    assert (df[df["step"] == 10]["status"] == "ok").all()
    assert status[(20, "model.layers.0.self_attn.q_proj")] == "nonfinite"
    assert status[(20, "model.layers.1.self_attn.q_proj")] == "shape_mismatch"
    assert status[(20, "model.layers.0.mlp.up_proj")] == "ok"
    step30 = df[df["step"] == 30]
    assert step30["status"].tolist() == ["unreadable"]
    assert "step_000030.h5" in step30["error"].iloc[0]
    assert df.loc[df["status"] != "ok", "fro_norm"].isna().all()


def test_vector_parameters_get_norms_only(tmp_path):
    w = RunWriter(tmp_path / "ln")
    w.write_config({})
    w.write_base_weights({"model.layers.0.input_layernorm": torch.full((8,), 2.0)})
    w.write_delta(1, {"model.layers.0.input_layernorm": spectra.VectorDelta(torch.full((8,), 0.5))})
    row = spectra.load_run(w.path).analyze(device="cpu").iloc[0]
    assert row["kind"] == "vector" and row["fro_norm"] == pytest.approx(0.5 * 8**0.5)
    assert row["relative_size"] == pytest.approx(0.25)


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="wt"):
        EngineConfig(wt="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ks"):
        EngineConfig(ks=(0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(lora_run):
    run = spectra.load_run(lora_run)
    cpu, gpu = run.analyze(device="cpu"), run.analyze(device="cuda")
    cols = ["fro_norm", "erank", "rho_8", "nss", "bf16_sparsity"]
    np.testing.assert_allclose(cpu[cols].to_numpy(), gpu[cols].to_numpy(), rtol=1e-6, atol=1e-9)


def test_bf16_factors_are_analysed_in_float64(tmp_path):
    shapes = {"l.0.w": (32, 24)}
    w0 = base_weights(shapes)
    run0 = RunWriter(tmp_path / "bf16")
    run0.write_config({})
    run0.write_base_weights(w0)
    base = spectra.load_run(run0.path).base_spectrum("l.0.w")
    # an update almost entirely inside W0's top-8 subspace, stored in bf16
    B = (base.U[:, :8].float() @ torch.randn(8, 4, generator=torch.Generator().manual_seed(0))).bfloat16()
    A = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)) @ base.V[:, :8].T.float()).bfloat16()
    op = LowRank(B, A, 64 / 4**0.5)
    run0.write_delta(1, {"l.0.w": op})
    row = spectra.load_run(run0.path).analyze(ks=(8,), device="cpu").iloc[0]
    ref = M.principal_alignment(
        op.to(dtype=torch.float64).to_dense(), base.U[:, :8].double(), base.V[:, :8].double()
    )
    assert row["rho_8"] <= 1.0 and row["off_principal_8"] >= 0.0
    assert row["rho_8"] == pytest.approx(ref.item(), rel=1e-6)
    s = torch.linalg.svdvals(op.to(dtype=torch.float64).to_dense())
    assert row["fro_norm"] == pytest.approx(s.norm().item(), rel=1e-9)


def test_zero_update_has_zero_angles_and_no_drift(tmp_path):
    shapes = {"l.0.w": (40, 30)}
    w = RunWriter(tmp_path / "zero")
    w.write_config({})
    w.write_base_weights(base_weights(shapes))
    w.write_delta(0, {"l.0.w": LowRank(torch.zeros(40, 2), torch.zeros(2, 30))})
    for wt in ("full", "topk"):
        row = spectra.load_run(w.path).analyze(ks=(1, 8), device="cpu", wt=wt).iloc[0]
        assert row["angle_left_8"] < 1e-4 and row["angle_right_8"] < 1e-4, wt  # degrees
        assert row["intruders"] == 0
    assert row["fro_norm"] == 0 and math.isnan(row["rho_8"])


def test_topk_results_do_not_depend_on_chunking(lora_run):
    run = spectra.load_run(lora_run)
    a = run.analyze(device="cpu", wt="topk").sort_values(["step", "module"])
    b = run.analyze(device="cpu", wt="topk", max_batch_bytes=1).sort_values(["step", "module"])
    np.testing.assert_allclose(a["angle_left_8"], b["angle_left_8"], rtol=0, atol=1e-9)


def test_intruders_are_exact_when_every_w0_vector_is_kept(tmp_path):
    """Boost W0's 30th direction into the top 10: not an intruder against all of W0's vectors, but
    one against its top 20 only; the intruder_basis column says which was used."""
    from spectra.synthetic import with_spectrum

    s = 1.0 / torch.arange(1, 41, dtype=torch.float64).sqrt()
    W0, U, V = with_spectrum(s, 50, 40, generator=torch.Generator().manual_seed(2))
    w = RunWriter(tmp_path / "intr")
    w.write_config({})
    w.write_base_weights({"l.0.w": W0.float()})
    w.write_delta(1, {"l.0.w": LowRank(U[:, 29:30].float(), 3.0 * V[:, 29:30].T.float())})
    run = spectra.load_run(w.path)
    exact = run.analyze(device="cpu", ks=(1,), base_keep=40).iloc[0]
    assert exact["intruder_basis"] == 40 and exact["intruders"] == 0
    (w.path / "base" / "spectra.h5").unlink()
    approx = spectra.load_run(w.path).analyze(device="cpu", ks=(1,), base_keep=20).iloc[0]
    assert approx["intruder_basis"] == 20 and approx["intruders"] == 1


def test_rank_deficient_base_keeps_the_minor_subspace_orthogonal_to_its_range(tmp_path):
    from spectra.base import compute_base_spectrum
    from spectra.synthetic import with_spectrum

    s = torch.cat([torch.linspace(2, 1, 20), torch.zeros(10)]).double()
    W0 = with_spectrum(s, 36, 30, generator=torch.Generator().manual_seed(4))[0]
    spec = compute_base_spectrum(W0, keep=8)
    Um = spec.U_minor.double()
    torch.testing.assert_close(Um.T @ Um, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (spec.U[:, :8].double().T @ Um).abs().max().item() < 1e-6
    assert (W0.T @ Um).abs().max().item() < 1e-6  # left vectors of σ = 0 lie outside W0's range


def test_malformed_module_is_flagged_not_fatal(mixed_run):
    import h5py

    path, _w0, ops = mixed_run
    p = RunWriter(path).write_delta(40, ops)
    with h5py.File(p, "a") as f:
        g = f["modules/model.layers.0.self_attn.q_proj"]
        del g["B"]
        g.create_dataset("B", data=np.ones((25, 3), np.float32))
    df = spectra.load_run(path).analyze(ks=KS, device="cpu", steps=[40]).set_index("module")
    assert df.loc["model.layers.0.self_attn.q_proj", "status"] == "unreadable"
    assert "declares shape" in df.loc["model.layers.0.self_attn.q_proj", "error"]
    assert (df.drop("model.layers.0.self_attn.q_proj")["status"] == "ok").all()


def test_zero_base_vector_gives_nan_relative_size(tmp_path):
    w = RunWriter(tmp_path / "ln0")
    w.write_config({})
    w.write_base_weights({"model.layers.0.norm.bias": torch.zeros(4)})
    w.write_delta(1, {"model.layers.0.norm.bias": spectra.VectorDelta(torch.ones(4))})
    row = spectra.load_run(w.path).analyze(device="cpu").iloc[0]
    assert row["status"] == "ok" and row["fro_norm"] == 2.0 and math.isnan(row["relative_size"])
