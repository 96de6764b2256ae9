"""The rank-collapse rule on constructed per-step tables."""

from __future__ import annotations

import pandas as pd
import pytest

from spectra.metrics import CollapseRule, detect_collapse


def table(e1, erank=None):
    d = {"step": [0, 10, 20, 30], "e1_median": e1}
    if erank is not None:
        d["erank_median"] = erank
    return pd.DataFrame(d)


def rewards(values):
    return pd.DataFrame({"step": list(range(len(values))), "reward": values})


def test_flags_only_when_geometry_and_reward_both_fail():
    per_step = table([0.1, 0.6, 0.7, 0.2])
    r = rewards([0.2] * 10 + [0.6] * 5 + [0.1] * 20)  # peak 0.6 at steps 10-14, falls after
    out = detect_collapse(per_step, r, CollapseRule(e1_min=0.5, reward_drop=0.5, reward_window=3))
    assert out["collapsed"].tolist() == [False, False, True, False]
    assert "median E_1" in out.loc[2, "reason"] and "reward" in out.loc[2, "reason"]


def test_geometry_alone_without_reward_unless_required():
    per_step = table([0.1, 0.6, 0.7, 0.2])
    out = detect_collapse(per_step, None)
    assert out["collapsed"].tolist() == [False, True, True, False]
    assert "geometry alone" in out.loc[1, "reason"]
    strict = detect_collapse(per_step, None, CollapseRule(require_reward=True))
    assert not strict["collapsed"].any()


def test_effective_rank_condition_is_applied_when_set():
    per_step = table([0.6, 0.6, 0.6, 0.6], erank=[10.0, 3.0, 1.5, 8.0])
    out = detect_collapse(per_step, None, CollapseRule(erank_max=2.0))
    assert out["collapsed"].tolist() == [False, False, True, False]


def test_bad_thresholds_and_missing_columns_are_named():
    with pytest.raises(ValueError, match="e1_min"):
        CollapseRule(e1_min=0)
    with pytest.raises(ValueError, match="erank_median"):
        detect_collapse(table([0.1] * 4), None, CollapseRule(erank_max=3.0))


def test_run_collapse_reads_analysis_and_logged_reward(lora_run):
    import spectra
    from spectra.writer import RunWriter

    w = RunWriter(lora_run)
    for step, reward in enumerate([0.2, 0.5, 0.6, 0.6, 0.6, 0.5, 0.1, 0.05, 0.0, 0.0, 0.0]):
        w.append_metrics({"step": step, "reward": reward})
    run = spectra.load_run(lora_run)
    analysis = run.analyze(device="cpu", ks=(1, 4))
    # the synthetic LoRA updates are random (E_1 well below 0.5): a strict rule never fires, a lax one
    # fires exactly where the reward has fallen
    assert not run.collapse(analysis)["collapsed"].any()
    lax = run.collapse(analysis, CollapseRule(e1_min=0.01, reward_window=2))
    assert lax.set_index("step")["collapsed"].to_dict() == {0: False, 5: False, 10: True}


def test_the_analysis_applies_the_runs_own_collapse_options(lora_run):
    """spectra analyze, spectra sweep and the live alarm flag with one rule: the run's --collapse-*."""
    import json

    from spectra.errors import RunDirError
    from spectra.pipeline import analyze_run

    config = json.loads((lora_run / "run.json").read_text())
    assert analyze_run(lora_run, save=False).rule == CollapseRule()  # none recorded: the defaults
    config |= {"collapse_e1": 0.3, "collapse_erank": None, "collapse_window": 2, "collapse_reward_drop": 0.4}
    (lora_run / "run.json").write_text(json.dumps(config))
    want = CollapseRule(e1_min=0.3, reward_drop=0.4, reward_window=2)
    assert analyze_run(lora_run, save=False).rule == want
    assert analyze_run(lora_run, rule=CollapseRule(), save=False).rule == CollapseRule()  # asked for: wins
    (lora_run / "run.json").write_text(json.dumps(config | {"collapse_e1": 7}))
    with pytest.raises(RunDirError, match=r"run.json: CollapseRule.e1_min must be in \(0, 1\], got 7"):
        analyze_run(lora_run, save=False)
