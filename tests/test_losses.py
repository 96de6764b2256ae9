"""Every ``--loss`` maps onto TRL's GRPOConfig as the table in train/config.py says, and each new loss
family trains: two tiny steps on the organism, with a non-zero gradient and the loss's own TRL metric."""

from __future__ import annotations

import math

import pytest
from _requires import require

require("trl")

from spectra.train.config import LOSSES, TrainConfig
from spectra.train.trainer import grpo_config, train
from test_train import tiny

import spectra

#: loss → (TRL loss_type, importance_sampling_level, scale_rewards, mask_truncated_completions, ε, ε_high)
EXPECTED = {
    "grpo": ("grpo", "token", "group", False, 0.2, 0.2),
    "dapo": ("dapo", "token", "group", True, 0.2, 0.28),
    "dr_grpo": ("dr_grpo", "token", "none", False, 0.2, 0.2),
    "bnpo": ("bnpo", "token", "group", False, 0.2, 0.2),
    "cispo": ("cispo", "token", "group", False, 0.2, 5.0),
    "sapo": ("sapo", "token", "group", False, 0.2, 0.2),
    "gspo": ("grpo", "sequence", "group", False, 3e-4, 4e-4),
    "luspo": ("luspo", "sequence", "group", False, 3e-4, 4e-4),
    "vespo": ("vespo", "token", "group", False, 0.2, 0.2),
}


@pytest.fixture
def spread_reward(monkeypatch):
    """Rewards 0, 1, 2, 3 within every group of 4 rollouts: non-zero advantages whatever the model says."""

    def reward(completions, **kwargs):
        return [float(i % 4) for i in range(len(completions))]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", reward)


def _config(loss: str, **kw) -> TrainConfig:
    return TrainConfig(model="some/model", loss=loss, batch_size=2, num_generations=4, max_steps=3, **kw)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_maps_onto_trl(loss, tmp_path):
    assert set(LOSSES) == set(EXPECTED)
    args = grpo_config(_config(loss).resolve(), tmp_path / "ckpt")
    level, truncated = args.importance_sampling_level, args.mask_truncated_completions
    assert (args.loss_type, level, args.scale_rewards, truncated) == EXPECTED[loss][:4]
    assert (args.epsilon, args.epsilon_high) == pytest.approx(EXPECTED[loss][4:])
    assert (args.sapo_temperature_pos, args.sapo_temperature_neg) == (1.0, 1.05)  # TRL's, the paper's
    assert (args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg) == (2, 3, 3, 2)


def test_given_clipping_ranges_win_over_the_losses_own():
    cfg = _config("gspo", epsilon=1e-3, epsilon_high=2e-3).resolve()
    assert (cfg.epsilon, cfg.epsilon_high) == (1e-3, 2e-3)
    assert _config("cispo", epsilon_high=3.0).resolve().epsilon_high == 3.0
    assert _config("grpo", epsilon=0.1).resolve().epsilon_high == 0.1  # ε_high follows ε where no own value


#: one loss of each new family, with the TRL metric only that family logs (None: sapo logs no clip ratio)
FAMILIES = {
    "bnpo": "clip_ratio/region_mean",
    "cispo": "cispo_clip_ratio",
    "sapo": None,
    "gspo": "clip_ratio/region_mean",
    "luspo": "clip_ratio/region_mean",
    "vespo": "vespo/phi_seq_mean",
}


@pytest.mark.parametrize("loss", FAMILIES)
def test_each_new_loss_trains(loss, organism_dir, tmp_path, spread_reward):
    cfg = tiny(organism_dir, tmp_path, "lora", loss=loss, batch_size=1, max_steps=2, max_completion_length=8)
    run_dir = train(cfg)  # 2 steps of one prompt × 4 rollouts
    run = spectra.load_run(run_dir)
    assert run.steps == [0, 2] and run.config["loss"] == loss
    m = run.metrics
    assert list(m["step"]) == [1, 2]
    assert all(math.isfinite(g) and g > 0 for g in m["grad_norm"])  # the loss moved the adapter
    clip_columns = {c for c in m.columns if "clip_ratio" in c or c.startswith("vespo/")}
    assert (FAMILIES[loss] in clip_columns) if FAMILIES[loss] else not clip_columns
