"""Rank collapse as the study defines it: a performance verdict decided against the reward's noise, with
the geometry at the onset and at the end and its named signature beside it."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import spectra
from spectra.metrics import CollapseRule, detect_collapse
from spectra.metrics.collapse import (
    heldout_falls,
    judge,
    numerical_rank,
    performance_verdict,
    rank_normalised_concentration,
    reward_falls,
    signature,
)
from spectra.operators import LowRank
from spectra.synthetic import base_weights, orthonormal
from spectra.writer import RunWriter


def rewards(values, start=1):
    return pd.DataFrame({"step": list(range(start, start + len(values))), "reward": values})


def evals(scores, steps, problems=64):
    return pd.DataFrame(
        {"step": steps, "benchmark": "organism", "avg@4": scores, "problems": problems, "n": 4}
    )


def noisy(level_then_fall, seed=0, sd=0.05):
    """A reward at one level, then another, with Gaussian noise of ``sd`` per step."""
    g = np.random.default_rng(seed)
    return [v + g.normal(0, sd) for v in level_then_fall]


# ---------------------------------------------------------------------------------- the reward's noise


def test_a_lucky_first_batch_is_not_a_peak():
    """0.4, 0.1, 0.1, 0.15, 0.2, 0.18: the old rule's running peak of a partial window (0.4) called this a
    fall by half; full windows (0.19, 0.146) differ by less than 3 standard errors."""
    r = rewards([0.4, 0.1, 0.1, 0.15, 0.2, 0.18])
    falls = reward_falls(r, CollapseRule())
    assert falls["mean"].isna().sum() == 4  # no mean of a partial window
    assert falls["peak"].iloc[-1] == pytest.approx(np.mean([0.4, 0.1, 0.1, 0.15, 0.2]))
    assert not falls["fell"].any()
    v = performance_verdict(r, None, CollapseRule())
    assert v.collapsed is False and v.step is None
    per_step = pd.DataFrame({"step": [0, 3, 6]})
    assert not detect_collapse(per_step, r)["collapsed"].any()


def test_the_noise_and_the_standard_error_follow_the_formula():
    x = [0.5, 0.7, 0.4, 0.6, 0.5, 0.1, 0.0, 0.1]
    out = reward_falls(rewards(x), CollapseRule(reward_window=3))
    t = len(x)
    sigma = math.sqrt(sum((b - a) ** 2 for a, b in itertools.pairwise(x)) / (2 * (t - 1)))
    assert out["se"].iloc[-1] == pytest.approx(sigma * math.sqrt(2 / 3), rel=1e-12)
    means = [np.mean(x[i - 2 : i + 1]) for i in range(2, t)]
    assert out["mean"].iloc[2:].tolist() == pytest.approx(means)
    assert out["peak"].iloc[-1] == pytest.approx(max(means))


@pytest.mark.parametrize("offset", [-3.0, 0.0, 1.0])
def test_the_verdict_does_not_depend_on_where_zero_is(offset):
    fall = noisy([0.8] * 10 + [0.1] * 12, seed=1)
    dip = noisy([0.8] * 10 + [0.76] * 12, seed=2)  # a fall within 3 standard errors (3 × 0.032)
    rule = CollapseRule()
    base = performance_verdict(rewards(fall), None, rule)
    moved = performance_verdict(rewards([v + offset for v in fall]), None, rule)
    assert base.collapsed is True and (moved.collapsed, moved.step) == (base.collapsed, base.step)
    assert performance_verdict(rewards([v + offset for v in dip]), None, rule).collapsed is False
    # a floor in the reward's units moves with it: the same verdict again
    floored = CollapseRule(reward_floor=0.0 + offset)
    assert performance_verdict(rewards([v + offset for v in fall]), None, floored).collapsed is True


def test_the_floor_asks_for_a_fall_most_of_the_way_down():
    # 0.9 → 0.6 with little noise: beyond 3 standard errors, but a third of the way to the floor 0
    r = rewards(noisy([0.9] * 10 + [0.6] * 10, seed=3, sd=0.02))
    assert performance_verdict(r, None, CollapseRule()).collapsed is True
    assert performance_verdict(r, None, CollapseRule(reward_floor=0.0)).collapsed is False


def test_a_fall_that_recovers_is_not_a_collapse_and_the_onset_is_the_last_fall():
    rule = CollapseRule()
    recovered = noisy([0.8] * 10 + [0.1] * 8 + [0.8] * 10, seed=4)
    assert performance_verdict(rewards(recovered), None, rule).collapsed is False
    again = noisy([0.8] * 10 + [0.1] * 8 + [0.8] * 10 + [0.05] * 10, seed=5)
    v = performance_verdict(rewards(again), None, rule)
    assert v.collapsed and 28 < v.step <= 33, v  # the last fall (steps 29–38), not the first one


def test_no_reward_and_no_evaluation_give_no_verdict_never_a_flag():
    per_step = pd.DataFrame({"step": [0, 10], "e1_median": [0.9, 0.95]})
    out = detect_collapse(per_step, None)
    assert not out["collapsed"].any()
    assert performance_verdict(None, None, CollapseRule()).collapsed is None
    record = judge(per_step, None)
    assert record["collapsed"] is None and record["signature"] is None and "no verdict" in record["reason"]


# ---------------------------------------------------------------------------- held-out accuracy


def test_held_out_accuracy_decides_where_measured():
    # the training reward alone cannot tell: one batch at 0.33, then zeros (a full window of 0.066)
    r = rewards([0.328] + [0.0] * 19)
    assert performance_verdict(r, None, CollapseRule()).collapsed is False
    e = evals([0.516, 0.0, 0.0], [0, 10, 20])
    v = performance_verdict(r, e, CollapseRule())
    assert v.collapsed and v.step == 10 and v.by == "held-out" and "avg@4 0 fell from 0.516" in v.reason
    # a held-out dip within its standard error (√(a(1 − a)/64) ≈ 0.05 each) is not a collapse …
    assert performance_verdict(r, evals([0.80, 0.72], [0, 20]), CollapseRule()).collapsed is False
    # … and the held-out verdict wins over the reward's where both are measured
    falling = rewards(noisy([0.8] * 10 + [0.1] * 10, seed=6))
    assert performance_verdict(falling, evals([0.6, 0.62], [0, 20]), CollapseRule()).collapsed is False


def test_held_out_standard_error_is_the_bound_over_problems():
    out = heldout_falls(evals([0.5, 0.2], [0, 10], problems=100), CollapseRule())
    want = math.sqrt(0.25 / 100 + 0.16 / 100)
    assert out["se"].iloc[-1] == pytest.approx(want) and out["fell"].tolist() == [False, True]
    other = pd.concat(
        [evals([0.5, 0.5], [0, 10]), evals([0.9, 0.0], [0, 10]).assign(n=16)]
    )  # another setting
    assert heldout_falls(other, CollapseRule())["fell"].tolist() == [False, False]


# ---------------------------------------------------------------------------------- the geometry


def test_rank_normalised_concentration_known_answers():
    s = torch.tensor(
        [[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1e-12, 0.0, 0.0]], dtype=torch.float64
    )
    assert numerical_rank(s).tolist() == [3, 4, 1]  # 1e-12·σ₁ is rounding, not a direction
    got = rank_normalised_concentration(s)
    assert got[0].item() == pytest.approx((4 / 6 - 1 / 3) / (2 / 3)) and got[1].item() == 0.0
    assert math.isnan(got[2].item()) and math.isnan(rank_normalised_concentration(s[:1, :1]).item())
    # against a float64 reference on a random rank-5 update, whatever else shares its batch
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 20, generator=g, dtype=torch.float64
    )
    sigma = torch.linalg.svdvals(delta)
    e1 = float(sigma[0] ** 2 / (sigma**2).sum())
    assert rank_normalised_concentration(sigma).item() == pytest.approx((e1 - 0.2) / 0.8, rel=1e-12)


def _lowrank(m, n, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    U, V = orthonormal(m, len(sigma), generator=g), orthonormal(n, len(sigma), generator=g)
    return LowRank((U * torch.tensor(sigma, dtype=torch.float64)).float(), V.T.float(), 1.0)


def _run(tmp_path, name, sigma, size, reward, heldout=None, steps=(0, 10, 20)):
    """A run whose every module's ΔW has the given singular values scaled to ``size``·‖W0‖ at the last
    step, with a metrics.jsonl of ``reward`` and (if given) an eval.jsonl."""
    shapes = {f"model.layers.{i}.self_attn.{p}": (48, 40) for i in range(2) for p in ("q_proj", "v_proj")}
    w = RunWriter(tmp_path / name)
    w.write_config({"name": name, "method": "lora", "rank": len(sigma), "seed": 0})
    w0 = base_weights(shapes)
    w.write_base_weights(w0)
    for step in steps:
        mods = {}
        for j, (module, (m, n)) in enumerate(shapes.items()):
            op = _lowrank(m, n, sigma, j)
            target = size * (step + 1) / (steps[-1] + 1) * float(torch.linalg.matrix_norm(w0[module]))
            mods[module] = LowRank(op.B * target / float(np.linalg.norm(sigma)), op.A, 1.0)
        w.write_delta(step, mods)
    for step, value in enumerate(reward, 1):
        w.append_metrics({"step": step, "reward": value})
    if heldout is not None:
        with open(w.path / "eval.jsonl", "w") as f:
            for step, score in heldout:
                f.write(json.dumps({"step": step, "benchmark": "organism", "avg@4": score, "problems": 64,
                                    "n": 4}) + "\n")  # fmt: skip
    return w.path


@pytest.mark.parametrize("sigma", [[1.0], [1.0, 1e-3]])
def test_rank_one_and_two_updates_are_never_concentrated(tmp_path, sigma):
    """E_1 ≥ 1/r for a rank-r update: at r ≤ 2 the old test (E_1 ≥ 0.5) held by construction."""
    fall = noisy([0.8] * 8 + [0.02] * 12, seed=7)
    run = _run(tmp_path, f"r{len(sigma)}", sigma, 0.02, fall)
    summary = spectra.pipeline.analyze_run(run, save=False).summary
    record = summary["collapse"]
    assert record["collapsed"] and record["signature"] != "concentrated", record
    norm = summary["steps"][-1]["median"].get("E_1_norm")
    assert (norm is None) if len(sigma) == 1 else norm == pytest.approx(1.0, abs=1e-5)


def test_a_concentrated_collapse_is_named_so(tmp_path):
    sigma = [1.0] + [0.05] * 7  # rank 8, one direction: C = (E_1 − 1/8)/(7/8) ≈ 0.98
    run = _run(tmp_path, "conc", sigma, 0.02, noisy([0.8] * 8 + [0.02] * 12, seed=8))
    record = spectra.pipeline.analyze_run(run, save=False).summary["collapse"]
    assert record["collapsed"] and record["signature"] == "concentrated"
    assert record["end"]["e1_norm_median"] > 0.9 and record["end"]["rank_median"] == 8


def test_a_warm_started_run_at_zero_reward_from_its_first_steps_collapses_large(tmp_path):
    """Like the organism's LoRA r128 α = 2r cliff (reward 0.33 at step 1, then 0; held-out Avg@4 0.52 →
    0): collapsed from the first evaluation after the fall, its update spread (C ≈ 0) and large."""
    sigma = list(np.linspace(1.0, 0.6, 16))
    run = _run(
        tmp_path, "cliff", sigma, 0.2, [0.328] + [0.0] * 19, heldout=[(0, 0.516), (10, 0.0), (20, 0.0)]
    )
    a = spectra.pipeline.analyze_run(run, save=False)
    record = a.summary["collapse"]
    assert record["collapsed"] and record["step"] == 10 and record["by"] == "held-out"
    assert record["onset"]["step"] == 10 and record["end"]["step"] == 20
    assert record["signature"] == "large" and record["onset"]["e1_norm_median"] < 0.2
    assert a.summary["collapsed_steps"] == [10, 20] and a.per_step["collapsed"].tolist() == [
        False,
        True,
        True,
    ]
    # against healthy runs of relative size 0.05 it is large too; against 0.1 (3 × 0.1 > 0.2) it is not
    onset, end = record["onset"], record["end"]
    assert signature(onset, end, a.rule, healthy_size=0.05)[0] == "large"
    assert signature(onset, end, a.rule, healthy_size=0.1)[0] == "neither"


def test_the_early_warning_is_the_old_concentration_test_and_never_a_flag():
    per_step = pd.DataFrame({"step": [0, 10, 20], "e1_median": [0.2, 0.7, 0.8], "erank_median": [9, 2, 1.5]})
    steady = rewards(noisy([0.6] * 25, seed=9))
    out = detect_collapse(per_step, steady, CollapseRule(e1_min=0.5))
    assert out["warning"].tolist() == [False, True, True] and not out["collapsed"].any()
    out = detect_collapse(per_step, steady, CollapseRule(e1_min=0.5, erank_max=1.8))
    assert out["warning"].tolist() == [False, False, True]
    assert not detect_collapse(per_step, steady)["warning"].any()  # off by default


def test_bad_constants_and_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"CollapseRule.e1_min must be in \(0, 1\] or unset, got 0"):
        CollapseRule(e1_min=0)
    with pytest.raises(ValueError, match=r"CollapseRule.z must be > 0"):
        CollapseRule(z=0)
    with pytest.raises(ValueError, match="erank_median"):
        detect_collapse(
            pd.DataFrame({"step": [0], "e1_median": [0.1]}), None, CollapseRule(e1_min=0.5, erank_max=3.0)
        )


def test_the_analysis_applies_the_runs_own_collapse_options(lora_run):
    """spectra analyze, spectra sweep and the live alarm judge with one rule: the run's --collapse-*."""
    from spectra.errors import RunDirError
    from spectra.pipeline import analyze_run

    config = json.loads((lora_run / "run.json").read_text())
    assert analyze_run(lora_run, save=False).rule == CollapseRule()  # none recorded: the defaults
    config |= {"collapse_e1": 0.3, "collapse_erank": None, "collapse_window": 2, "collapse_reward_drop": 0.4,
               "collapse_z": 2.5, "collapse_reward_floor": 0.0}  # fmt: skip
    (lora_run / "run.json").write_text(json.dumps(config))
    want = CollapseRule(e1_min=0.3, reward_drop=0.4, reward_window=2, z=2.5, reward_floor=0.0)
    assert analyze_run(lora_run, save=False).rule == want
    assert analyze_run(lora_run, rule=CollapseRule(), save=False).rule == CollapseRule()  # asked for: wins
    (lora_run / "run.json").write_text(json.dumps(config | {"collapse_e1": 7}))
    with pytest.raises(
        RunDirError, match=r"run.json: CollapseRule.e1_min must be in \(0, 1\] or unset, got 7"
    ):
        analyze_run(lora_run, save=False)


def test_run_collapse_reads_the_analysis_and_the_logged_reward(lora_run):
    w = RunWriter(lora_run)
    for step, reward in enumerate(noisy([0.6] * 6 + [0.0] * 6, seed=10, sd=0.02), 1):
        w.append_metrics({"step": step, "reward": reward})
    run = spectra.load_run(lora_run)
    analysis = run.analyze(device="cpu", ks=(1, 4))
    flags = run.collapse(analysis).set_index("step")["collapsed"].to_dict()
    assert flags == {0: False, 5: False, 10: True}
