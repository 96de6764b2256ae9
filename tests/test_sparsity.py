"""Update sparsity as "RL finetunes small subnetworks" (sparsity_in_rl) defines it: the share of weights
exactly unchanged (ΔW = 0) and the share with |Δw| ≤ 1e-5, per module and pooled per model by entry
count; known counts on synthetic matrices, float64 references, a bf16 pair, the engine path for dense
and factored operators, and summary.json's per-model value."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import spectra
from spectra import engine as engine_mod
from spectra.base import compute_base_spectrum
from spectra.engine import EngineConfig, Item, analyze_items
from spectra.metrics import registry
from spectra.metrics.precision import (
    NEAR_ZERO_ATOL,
    bf16_update_sparsity,
    near_zero_share,
    pooled_share,
    unchanged_share,
)
from spectra.operators import Dense, LowRank
from spectra.pipeline import analyze_run
from spectra.synthetic import base_weights
from spectra.writer import RunWriter

CONFIG = EngineConfig(ks=(1,), device="cpu", base_keep=4, wt="none")


def _planted(m: int, n: int, counts: dict[str, int], seed: int) -> torch.Tensor:
    """A float64 ΔW whose entries are, at distinct random positions: ``zero`` exact zeros, ``edge`` at
    ±1e-5 exactly (near zero: the bound is inclusive), ``above`` at the next double above 1e-5 (not),
    ``tiny`` at ±1e-9 (near zero, not unchanged), ``nan`` NaN (neither); everything else |Δw| ≥ 0.5."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(m * n, generator=g) < 0.5, -1.0, 1.0).double()
    d = sign * (0.5 + torch.rand(m * n, generator=g, dtype=torch.float64))
    pos = torch.randperm(m * n, generator=g).tolist()
    above = math.nextafter(NEAR_ZERO_ATOL, 1.0)
    values = {"zero": 0.0, "edge": NEAR_ZERO_ATOL, "above": above, "tiny": 1e-9, "nan": math.nan}
    start = 0
    for kind, count in counts.items():
        idx = torch.tensor(pos[start : start + count], dtype=torch.long)
        d[idx] = values[kind] * (1.0 if kind in ("zero", "nan") else sign[idx])
        start += count
    return d.reshape(m, n)


def test_known_counts_on_planted_matrices():
    a = {"zero": 17, "edge": 5, "above": 4, "tiny": 3, "nan": 2}
    b = {"zero": 250, "edge": 0, "above": 9, "tiny": 11, "nan": 0}
    delta = torch.stack([_planted(37, 53, a, 0), _planted(37, 53, b, 1)])
    n = 37 * 53
    assert unchanged_share(delta).tolist() == [17 / n, 250 / n]
    assert near_zero_share(delta).tolist() == [(17 + 5 + 3) / n, (250 + 11) / n]
    assert unchanged_share(delta).dtype == torch.float64
    # a zero update is entirely unchanged, whatever its shape
    zero = torch.zeros(3, 7)
    assert unchanged_share(zero).item() == 1.0 and near_zero_share(zero).item() == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shares_equal_a_float64_numpy_count(seed):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(4, 61, 29, generator=g, dtype=torch.float64) * 3e-5  # straddles the 1e-5 bound
    d[torch.rand(d.shape, generator=g) < 0.6] = 0.0
    ref = d.numpy()
    counts = unchanged_share(d).numpy() * 61 * 29
    near = near_zero_share(d).numpy() * 61 * 29
    assert np.array_equal(np.rint(counts), (ref == 0).sum(axis=(1, 2)))
    assert np.array_equal(np.rint(near), (np.abs(ref) <= 1e-5).sum(axis=(1, 2)))
    assert np.allclose(counts, np.rint(counts), rtol=0, atol=1e-9)  # a share is an exact count / (m·n)


def _bf16_pair(m: int, n: int, changed: int, small_changed: int, seed: int):
    """W0 and W_t stored in bfloat16: ``changed`` entries of magnitude ≥ 0.25 moved one bf16 step up
    (|Δw| ≥ 2⁻⁹ > 1e-5), ``small_changed`` entries of magnitude < 1e-3 moved one step (|Δw| < 1e-5), and
    elsewhere an update below half a bf16 step added and rounded away (the stored values are equal)."""
    g = torch.Generator().manual_seed(seed)
    big = (0.25 + torch.rand(m * n, generator=g)) * torch.where(torch.rand(m * n, generator=g) < 0.5, -1, 1)
    w0 = big.clone()
    pos = torch.randperm(m * n, generator=g)
    small = pos[changed : changed + small_changed]
    w0[small] = 1e-4 * (1 + torch.rand(small_changed, generator=g))
    w0 = w0.to(torch.bfloat16)
    rounded_away = (w0.float() + 1e-4 * w0.float().abs() * torch.rand(m * n, generator=g)).to(torch.bfloat16)
    wt = rounded_away.clone()
    moved = pos[: changed + small_changed]
    wt[moved] = (w0[moved].view(torch.int16) + 1).view(torch.bfloat16)  # one bf16 step further from 0
    return w0.reshape(m, n), wt.reshape(m, n)


def test_bf16_pair_unchanged_exactly_where_the_stored_values_are_equal():
    m, n, changed, small_changed = 48, 40, 123, 31
    w0, wt = _bf16_pair(m, n, changed, small_changed, seed=3)
    assert torch.isfinite(wt).all() and int((wt != w0).sum()) == changed + small_changed
    delta = wt.double() - w0.double()  # the exact difference of the stored values
    assert unchanged_share(delta).item() == (m * n - changed - small_changed) / (m * n)
    assert near_zero_share(delta).item() == (m * n - changed) / (m * n)
    # sparsity_in_rl's own procedure, delta taken in bf16 itself, gives the same zeros
    assert int(((wt - w0) == 0).sum()) == m * n - changed - small_changed
    # stored as the import stores it (float32, exact here) and through the engine: the same counts
    assert torch.equal(delta.float().double(), delta)
    w0_32 = w0.float()
    row = analyze_items([Item("m", Dense(delta.float()), w0_32, compute_base_spectrum(w0_32, 4))], CONFIG)[0]
    assert row["unchanged_share"] == (m * n - changed - small_changed) / (m * n)
    assert row["near_zero_share"] == (m * n - changed) / (m * n)
    # and the other metric, bf16_sparsity, is a different thing: ΔW re-added to W0 in bf16 is kept here
    assert bf16_update_sparsity(w0_32, delta).item() == row["unchanged_share"]
    assert bf16_update_sparsity(w0_32, 0.3 * delta).item() == 1.0  # lost in bf16 …
    assert unchanged_share(0.3 * delta).item() == row["unchanged_share"]  # … but not unchanged


def _lowrank_with_zero_lines(m: int, n: int, rows: list[int], cols: list[int], seed: int) -> LowRank:
    """s·B·A with positive factors ≥ 0.5 (no cancellation: |ΔW_ij| ≥ 0.5·s) except zero rows of B and zero
    columns of A: ΔW_ij = 0 exactly when i ∈ rows or j ∈ cols."""
    g = torch.Generator().manual_seed(seed)
    B = 0.5 + torch.rand(m, 2, generator=g, dtype=torch.float64)
    A = 0.5 + torch.rand(2, n, generator=g, dtype=torch.float64)
    B[rows] = 0.0
    A[:, cols] = 0.0
    return LowRank(B, A, 0.01)


def test_engine_computes_them_for_factored_and_dense_operators_alike():
    m, n, rows, cols = 30, 22, [0, 7, 29], [3, 4]
    op = _lowrank_with_zero_lines(m, n, rows, cols, seed=4)
    w0 = base_weights({"m": (m, n)}, seed=5)["m"]
    base = compute_base_spectrum(w0, 4)
    zero = len(rows) * n + len(cols) * m - len(rows) * len(cols)
    out = analyze_items([Item("f", op, w0, base), Item("d", Dense(op.to_dense()), w0, base)], CONFIG)
    factored = analyze_items([Item("f", op, w0, base)], CONFIG)[0]
    dense = analyze_items([Item("d", Dense(op.to_dense()), w0, base)], CONFIG)[0]
    for row in (*out, factored, dense):
        assert row["status"] == "ok"
        assert row["unchanged_share"] == zero / (m * n)
        assert row["near_zero_share"] == zero / (m * n)  # every nonzero entry is ≥ 0.5·0.01·2 = 0.01


def test_they_cost_nothing_when_not_selected(monkeypatch):
    op = _lowrank_with_zero_lines(20, 12, [1], [2], seed=6)
    w0 = base_weights({"m": (20, 12)}, seed=7)["m"]
    items = [Item("f", op, w0, compute_base_spectrum(w0, 4))]

    def no_dense(self):
        raise AssertionError("the dense ΔW was formed")

    monkeypatch.setattr(engine_mod.Batch, "delta", property(no_dense))
    # not selected by name, or their stage off: ΔW never goes dense, and the columns are absent
    for config in (
        EngineConfig(ks=(1,), device="cpu", base_keep=4, wt="none", metrics=("fro_norm", "erank", "E_1")),
        EngineConfig(ks=(1,), device="cpu", base_keep=4, wt="none", bf16=False),
    ):
        row = analyze_items(items, config)[0]
        assert row["status"] == "ok" and "unchanged_share" not in row and "near_zero_share" not in row
    # selected, the same patched engine must form ΔW (the control: the patch is what stops it)
    with pytest.raises(AssertionError, match="dense ΔW was formed"):
        analyze_items(items, EngineConfig(ks=(1,), device="cpu", base_keep=4, wt="none",
                                          metrics=("unchanged_share",)))  # fmt: skip
    assert {m.name for m in registry.selected(bf16=False)}.isdisjoint({"unchanged_share", "near_zero_share"})


def test_pooled_share_weighs_modules_by_entries():
    # 10 of 100 and 900 of 1000 entries: pooled 910/1100, not the mean of shares 0.5
    assert pooled_share([0.1, 0.9], [100, 1000]) == 910 / 1100
    assert pooled_share([0.1, math.nan, 0.9], [100, 50, 1000]) == 910 / 1100  # a module without a value
    assert math.isnan(pooled_share([], []))
    # exact counts from float64 shares of awkward sizes
    sizes = [4096 * 11008, 151936 * 1536, 3]
    counts = [4096 * 11008 - 12345, 98765431, 1]
    shares = [c / s for c, s in zip(counts, sizes, strict=True)]
    assert pooled_share(shares, sizes) == sum(counts) / sum(sizes)
    assert registry.pooled_columns() == ["unchanged_share", "near_zero_share"]


def test_summary_json_has_the_per_model_share_pooled_by_entries(tmp_path):
    """A run of a small and a large module whose unchanged shares differ: summary.json's per-step
    ``pooled`` is the share of all entries (sparsity_in_rl's per-model figure), next to the median."""
    shapes = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (64, 48)}
    w = RunWriter(tmp_path / "run")
    w.write_config({"name": "run", "method": "full", "model": "synthetic"})
    w0 = {k: v.to(torch.bfloat16).float() for k, v in base_weights(shapes, seed=8).items()}
    w.write_base_weights(w0)
    changed = {"model.layers.0.self_attn.q_proj": 150, "model.layers.0.mlp.up_proj": 300}
    deltas = {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(10 + i)
        wt = w0[name].to(torch.bfloat16).reshape(-1).clone()
        pos = torch.randperm(m * n, generator=g)[: changed[name]]
        wt[pos] = (wt[pos].view(torch.int16) + 1).view(torch.bfloat16)
        deltas[name] = Dense(wt.reshape(m, n).float() - w0[name])  # exact in float32
    w.write_delta(0, {k: Dense(torch.zeros(shapes[k])) for k in shapes})
    w.write_delta(5, deltas)
    analysis = analyze_run(spectra.load_run(tmp_path / "run"), CONFIG)
    summary = json.loads((tmp_path / "run" / "analysis" / "summary.json").read_text())
    by_step = {e["step"]: e for e in summary["steps"]}
    total = sum(m * n for m, n in shapes.values())
    assert by_step[0]["pooled"] == {"unchanged_share": 1.0, "near_zero_share": 1.0}
    pooled = by_step[5]["pooled"]["unchanged_share"]
    assert pooled == (total - sum(changed.values())) / total
    shares = [1 - changed[k] / (m * n) for k, (m, n) in shapes.items()]
    assert by_step[5]["median"]["unchanged_share"] == pytest.approx(sum(shares) / 2, abs=1e-15)
    assert abs(pooled - sum(shares) / 2) > 0.1  # the pooled figure is not the median of modules
    table = analysis.table[analysis.table["step"] == 5].set_index("module")
    for name, (m, n) in shapes.items():
        assert table.loc[name, "unchanged_share"] == 1 - changed[name] / (m * n)


def test_an_imported_bf16_pair_pools_to_the_share_of_equal_stored_values(tmp_path):
    """Through `spectra import` (import_run) and the analysis: a bf16 model pair's per-model
    unchanged_share is the share of stored values that are equal over its 2-D tensors, exactly."""
    from safetensors.torch import save_file
    from spectra.train.importing.run import import_run

    layer = "model.layers.0."
    shapes = {layer + "self_attn.q_proj.weight": (24, 16), layer + "mlp.up_proj.weight": (40, 16)}
    g = torch.Generator().manual_seed(12)
    base, rl = {}, {}
    for name, (m, n) in shapes.items():
        w0 = (torch.randn(m, n, generator=g) / 4).to(torch.bfloat16)
        moved = torch.rand(m, n, generator=g) < (0.1 if "q_proj" in name else 0.6)
        base[name] = w0
        rl[name] = torch.where(moved, w0.view(torch.int16) + 1, w0.view(torch.int16)).view(torch.bfloat16)
    base["model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    rl["model.norm.weight"] = torch.full((16,), 1.5, dtype=torch.bfloat16)  # a vector: not pooled
    for folder, tensors in (("base", base), ("rl", rl)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
        save_file(tensors, str(tmp_path / folder / "model.safetensors"))
    run = import_run(str(tmp_path / "base"), [str(tmp_path / "rl")], tmp_path / "runs", "pair")
    analysis = analyze_run(run, CONFIG)
    equal = sum(int((base[k] == rl[k]).sum()) for k in shapes)
    total = sum(m * n for m, n in shapes.values())
    (entry,) = [e for e in analysis.summary["steps"] if e["step"] == 1]
    assert entry["pooled"]["unchanged_share"] == equal / total
    rows = analysis.table.set_index("module")
    for name in shapes:
        module = name.removesuffix(".weight")
        assert rows.loc[module, "unchanged_share"] == float((base[name] == rl[name]).double().mean())
