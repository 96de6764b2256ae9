"""`spectra train --resume` after a SIGKILL in the middle of a trainer checkpoint save (issue 13 §4).

A training subprocess kills itself (SIGKILL, no clean-up of any kind) while transformers'
``Trainer._save_checkpoint`` writes ``checkpoint-4``: once after the weights are written and before
the optimizer state, once half-way through ``trainer_state.json`` (the last file of a checkpoint).
The resumed run must start from the newest complete checkpoint (``checkpoint-2``), report and remove
the partial one, and end with every step exactly once in ``metrics.jsonl`` and ``deltas/``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _requires import require

require("trl")

from spectra.train.trainer import _complete, prepare
from test_train import tiny

import spectra

KILL_AT = 4  # the step whose checkpoint save is killed

# Run in a subprocess: trains the tiny run and SIGKILLs itself inside checkpoint-4's save.
SCRIPT = """
import json, os, signal, sys
import torch
import transformers
from transformers.trainer_callback import TrainerState
from spectra.train import TrainConfig
from spectra.train.trainer import train

where = {where!r}
if where == "after_weights":  # the folder holds the model's weights only
    original = transformers.Trainer._save_optimizer_and_scheduler
    def save_optimizer(self, output_dir):
        if self.state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    transformers.Trainer._save_optimizer_and_scheduler = save_optimizer
else:  # half of trainer_state.json, the checkpoint's last file
    original = TrainerState.save_to_json
    def save_state(self, json_path):
        if self.global_step == {kill_at}:
            text = json.dumps({{"global_step": self.global_step, "log_history": []}})
            with open(json_path, "w") as f:
                f.write(text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, json_path)
    TrainerState.save_to_json = save_state

import spectra.train.rewards
spectra.train.rewards.accuracy_reward = lambda completions, **kw: [len(str(c)) % 3 * 1.0 for c in completions]
torch.set_num_threads(1)  # as the test (see one_thread)
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


@pytest.fixture
def one_thread():
    """Train on one CPU thread: the tiny model's matrices are too small to share out, and on a machine
    shared with other processes two threads are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("where", ["after_weights", "in_trainer_state"])
def test_resume_after_a_kill_during_a_checkpoint_save(where, organism_dir, tmp_path, monkeypatch, one_thread):
    def length_reward(completions, **kwargs):  # as in the subprocess: non-zero advantages at every step
        return [float(len(str(c)) % 3) for c in completions]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", length_reward)
    cfg = tiny(organism_dir, tmp_path, "lora", max_steps=5, delta_every=1, save_every=2)
    script = SCRIPT.format(kill_at=KILL_AT, where=where)
    killed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cfg.to_dict())], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # really SIGKILLed, not an exception
    run_dir = tmp_path / "lora"
    partial = run_dir / "checkpoints" / f"checkpoint-{KILL_AT}"
    assert partial.is_dir() and (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert spectra.load_run(run_dir).steps == [0, 1, 2, 3, 4]  # step 4 was recorded before its save

    with pytest.warns(UserWarning, match=rf"partial checkpoint.*checkpoint-{KILL_AT}"):
        session = prepare(cfg, resume=True)
    assert session.resume_from is not None and session.resume_from.name == "checkpoint-2"
    assert not partial.exists()  # removed with the abandoned tail
    assert spectra.load_run(run_dir).steps == [0, 1, 2]
    session.train()

    run = spectra.load_run(run_dir)
    assert run.steps == [0, 1, 2, 3, 4, 5]  # every recorded step once (delta_every=1)
    assert sorted(p.name for p in (run_dir / "deltas").iterdir()) == [
        f"step_{s:06d}.h5" for s in range(6)
    ]  # no duplicate or leftover files
    assert list(run.metrics["step"]) == [1, 2, 3, 4, 5]  # strictly increasing and complete
    assert _complete(run_dir / "checkpoints" / f"checkpoint-{KILL_AT}")  # saved again, to the end
