"""Rollouts are sampled with adapter dropout off (issue 13 §1), while the training forward keeps it.

Every method's update is zero at initialisation (LoRA-like B = 0, DoRA's magnitude = ‖W0‖, PiSSA/MiLoRA's
residual base + B0·A0 = W0, VeRA's/AdaLoRA's zero scales, IA3's ones, …), so the policy that samples the
first step's rollouts *is* the base model. With the same seed, every method must therefore sample the
same step-1 completions as full fine-tuning (no adapter, no dropout), and so get the same step-1 reward.
With dropout applied while sampling they differ: PiSSA's/MiLoRA's adapter carries W0's own components,
so dropping its inputs damages the model; for the other methods the dropout masks still draw from the
random stream that sampling uses. A large dropout (0.3) makes the test sharp. (Checked once by hand:
every registered method's eval-mode logits at initialisation equal the base model's bit for bit, except
PiSSA's and MiLoRA's; IA3 and LN tuning have no dropout, so they pass with or without the fix.)

PiSSA's and MiLoRA's residual W0 − s·B0·A0 plus s·B0·A0 is W0 only up to float32 rounding (logits differ
by ~1e-6), which could in principle flip a sampled token; on the tiny organism they are identical.
"""

from __future__ import annotations

import pytest
import torch
from _requires import require

require("trl")

from spectra.train.methods import method_names
from spectra.train.trainer import prepare
from test_train import tiny


class _Sampled(Exception):
    """Raised by the recording reward: the test needs step 1's rollouts, not its update."""


def step_one_rollouts(organism_dir, tmp_path, method: str) -> tuple[list[str], list[float]]:
    """Step 1's completions (one generation batch: 4 prompts × 4 samples of ≤ 8 tokens) and their rewards.

    Also checks that the policy is back in train mode after sampling (the training forward that follows
    keeps the adapter's dropout)."""
    from spectra.train import rewards

    seen: list[str] = []
    scores: list[float] = []
    accuracy = rewards.accuracy_reward
    model: list[torch.nn.Module] = []

    def recording_reward(completions, **kwargs):
        seen.extend(completions)
        scores.extend(accuracy(completions, **kwargs))
        assert all(m.training for m in model[0].modules() if isinstance(m, torch.nn.Dropout))
        raise _Sampled

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("spectra.train.rewards.accuracy_reward", recording_reward)
        cfg = tiny(
            organism_dir, tmp_path, method, dropout=0.3, max_steps=1, batch_size=4,
            max_completion_length=8, delta_every=0, save_every=100,
        )  # fmt: skip
        session = prepare(cfg)
        model.append(session.model)
        with pytest.raises(_Sampled):
            session.train()
    return seen, scores


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Sample on one CPU thread: the tiny model's matrices are too small to share out, and on a machine
    shared with other processes two threads were 20× slower than one (1 s against 20 s a method)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_rollouts(organism_dir, tmp_path_factory):
    """Full fine-tuning's step-1 rollouts: the base model itself samples them."""
    return step_one_rollouts(organism_dir, tmp_path_factory.mktemp("full"), "full")


@pytest.mark.parametrize("method", [m for m in method_names() if m != "full"])
def test_step_one_rollouts_are_the_base_models(method, organism_dir, tmp_path, base_rollouts):
    completions, reward = step_one_rollouts(organism_dir, tmp_path, method)
    base_completions, base_reward = base_rollouts
    assert len(completions) == len(base_completions) == 16
    same = sum(a == b for a, b in zip(completions, base_completions, strict=True))
    assert same == len(completions), f"{method}: {same} of 16 step-1 rollouts are the base model's"
    assert sum(reward) / len(reward) == sum(base_reward) / len(base_reward)  # the step-1 reward


def test_eval_mode_gives_each_module_its_flag_back_also_on_error():
    from spectra.train.grpo import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Dropout(0.5))
    model[2].eval()  # a module kept in eval mode on purpose stays so
    with pytest.raises(RuntimeError, match="generation failed"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("generation failed")
    assert [m.training for m in model.modules()] == [True, True, True, False]
