"""`spectra train` end to end on the CPU: every method through TRL's GRPOTrainer, resume, bad input.

The model is a quickly warm-started organism (few SFT steps) saved to disk and loaded back through the
same ``from_pretrained`` path as a hub model. The accuracy reward is replaced by one that varies within
every group (so that advantages, and hence gradients, are non-zero whatever the tiny model answers).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from _requires import require

require("trl")

from spectra.train import TrainConfig, TrainConfigError
from spectra.train.methods import method_names
from spectra.train.trainer import prepare, train

import spectra
from spectra.operators import VectorDelta


@pytest.fixture
def varied_reward(monkeypatch):
    """Reward = completion length mod 3 (varies within a group): non-zero advantages at every step."""

    def length_reward(completions, **kwargs):
        return [float(len(str(c)) % 3) for c in completions]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", length_reward)


def tiny(organism_dir, tmp_path, method: str, **kw) -> TrainConfig:
    values = dict(
        model=str(organism_dir),
        method=method,
        rank=4,
        alpha=8,
        dropout=0.0,
        quanta_d=3,
        num_generations=4,
        batch_size=2,
        max_steps=3,
        max_completion_length=12,
        lr=1e-2,
        delta_every=2,
        eval_every=0,
        out=str(tmp_path),
        name=method,
    )
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_records_its_merge(method, organism_dir, tmp_path, varied_reward):
    session = prepare(tiny(organism_dir, tmp_path, method))
    run_dir = session.train()

    run = spectra.load_run(run_dir)
    assert run.steps == [0, 2, 3]
    assert run.config["method"] == method and run.config["rank"] == 4
    # the last record, read back from its file, equals the method's own merge minus W0 (from the checkpoint)
    merged = session.method.merged_weights(session.model)
    targets = session.method.base_tensors(session.model)
    moved = 0.0
    with run.open_delta(3) as d:
        assert set(d.modules) == set(merged)
        for key in d.modules:
            rec, w0 = run.read_module(d, key)
            module, param = targets[key]
            torch.testing.assert_close(w0, session.base.get(module, param))  # base/ holds the checkpoint's W0
            expected = merged[key].double() - w0.double()
            got = rec.delta if isinstance(rec, VectorDelta) else rec.to_dense()
            torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4)
            moved = max(moved, expected.abs().max().item())
    assert moved > 1e-4, f"{method}: three optimizer steps left the weights where they were"
    with run.open_delta(0) as d:  # step 0: no update yet
        for key in d.modules:
            rec, _ = run.read_module(d, key)
            got = rec.delta if isinstance(rec, VectorDelta) else rec.to_dense()
            assert got.abs().max().item() < 1e-5, key
    metrics = run.metrics
    assert list(metrics["step"]) == [1, 2, 3] and "reward" in metrics
    if method == "adalora":  # the rank allocation really ran: singular values were masked to exactly 0
        with run.open_delta(3) as d:
            masked = [int((run.read_module(d, k)[0].mid == 0).sum()) for k in d.modules]
        assert sum(masked) > 0


def test_losses_map_onto_trl(organism_dir, tmp_path):
    from spectra.train.trainer import grpo_config

    for loss, scale, mask, eps_high in [("grpo", "group", False, 0.2), ("dapo", "group", True, 0.28),
                                        ("dr_grpo", "none", False, 0.2)]:  # fmt: skip
        cfg = tiny(organism_dir, tmp_path, "lora", loss=loss).resolve()
        args = grpo_config(cfg, tmp_path / "ckpt")
        assert (args.loss_type, args.scale_rewards, args.mask_truncated_completions) == (loss, scale, mask)
        assert args.epsilon_high == pytest.approx(eps_high)
        assert (
            args.num_generations == 4
            and args.per_device_train_batch_size * args.gradient_accumulation_steps == 8
        )
        assert args.lr_scheduler_type == "constant" and args.beta == 0.0


def test_run_json_and_logs(organism_dir, tmp_path, varied_reward):
    run_dir = train(tiny(organism_dir, tmp_path, "lora", eval_every=2, eval_k=2, eval_dataset="organism"))
    config = json.loads((run_dir / "run.json").read_text())
    assert config["loss"] == "dapo" and config["epsilon_high"] == 0.28 and config["schema_version"] == 1
    assert config["versions"]["trl"] and config["model_path"] == str(organism_dir)
    run = spectra.load_run(run_dir)
    ev = run.eval
    assert list(ev["step"]) == [0, 2, 3] and {"avg@2", "pass@1", "pass@2", "unparsable"} <= set(ev.columns)
    assert ((ev["pass@2"] >= ev["pass@1"] - 1e-12) & (ev["avg@2"] <= 1)).all()
    m = run.metrics
    assert {"reward", "reward_std", "record_s"} <= set(m.columns)
    assert any(c.startswith("completions/mean_length") for c in m.columns)


def test_resume_without_a_checkpoint_starts_again(organism_dir, tmp_path, varied_reward):
    cfg = tiny(organism_dir, tmp_path, "lora", max_steps=2, delta_every=1, save_every=100)
    run_dir = train(cfg)
    shutil.rmtree(run_dir / "checkpoints")  # died before its first checkpoint
    session = prepare(dataclasses.replace(cfg, max_steps=None), resume=True)  # steps from run.json
    assert session.cfg.max_steps == 2 and session.cfg.rank == 4
    assert session.resume_from is None and spectra.load_run(run_dir).steps == []
    session.train()
    assert spectra.load_run(run_dir).steps == [0, 1, 2]
    assert list(spectra.load_run(run_dir).metrics["step"]) == [1, 2]


def test_resume_drops_the_abandoned_tail_and_continues(organism_dir, tmp_path, varied_reward):
    cfg = tiny(organism_dir, tmp_path, "lora", max_steps=4, delta_every=1, save_every=2)
    run_dir = train(cfg)
    # pretend the run died after step 4's delta and logs but before checkpoint-4 was saved
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    assert spectra.load_run(run_dir).steps == [0, 1, 2, 3, 4]
    with pytest.raises(TrainConfigError, match="already holds a run"):
        prepare(cfg)
    session = prepare(cfg, resume=True)
    assert session.resume_from is not None and session.resume_from.name == "checkpoint-2"
    assert spectra.load_run(run_dir).steps == [0, 1, 2]  # steps after the checkpoint were removed
    session.train()
    run = spectra.load_run(run_dir)
    assert run.steps == [0, 1, 2, 3, 4]
    steps = list(run.metrics["step"])
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # no duplicated rows
    assert not list((run_dir / "deltas").glob(".*")) and not list((run_dir / "deltas").glob("*.tmp*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "lora2"}, "--method: got 'lora2'; expected one of full, lora"),
        ({"rank": 0}, "--rank: got 0; expected an integer ≥ 1"),
        ({"loss": "ppo"}, "--loss: got 'ppo'; expected one of grpo, dapo, dr_grpo"),
        ({"target_modules": ("attn_c",)}, "--method lora --target-modules attn_c: "),
        ({"beta": 0.04, "method": "pissa"}, "--beta: got 0.04; expected 0 with --method pissa"),
        ({"quanta_d": 9, "method": "quanta"}, "--quanta-d: got 9; expected an integer from 2 to 7"),
        ({"model": "/no/such/model"}, "--model /no/such/model: no such directory"),
        ({"use_vllm": True}, "--use-vllm: vllm is not installed"),
        ({"micro_batch_size": 3}, "--micro-batch-size: got 3; expected a divisor of"),
        ({"temperature": 0.0}, "--temperature: got 0.0; expected a positive sampling temperature"),
        ({"vera_rank": 0, "method": "vera"}, "--vera-rank: got 0; expected an integer ≥ 1"),
        ({"adalora_init_rank": 4, "method": "adalora"}, "--adalora-init-rank: got 4; expected more than"),
        ({"report_to": ("foo",)}, "--report-to: got ('foo',); expected a comma-separated subset of"),
        ({"name": "../escape"}, "--name: got '../escape'; expected a plain directory name"),
        ({"format_reward": -1.0}, "--format-reward: got -1.0; expected a weight ≥ 0"),
        (
            {"target_modules": ("q_proj", "input_layernorm"), "method": "lora"},
            "--method lora --target-modules",
        ),
    ],
)
def test_bad_options_give_one_line_errors(options, message, organism_dir, tmp_path):
    with pytest.raises(TrainConfigError) as err:
        prepare(tiny(organism_dir, tmp_path, options.pop("method", "lora"), **options))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # a run that could not start leaves nothing behind


def test_resume_keeps_the_configuration_and_stops_at_max_steps(organism_dir, tmp_path, varied_reward):
    cfg = tiny(organism_dir, tmp_path, "lora", max_steps=2, delta_every=1)
    train(cfg)
    with pytest.raises(TrainConfigError, match=r"already reached step 2 of its 2; pass a larger"):
        prepare(cfg, resume=True)
    with pytest.raises(
        TrainConfigError, match=r"--lr: 0.5 differs from 0.01 in .*run.json; a resumed run keeps"
    ):
        prepare(dataclasses.replace(cfg, lr=0.5, max_steps=3), resume=True)
    session = prepare(dataclasses.replace(cfg, max_steps=3), resume=True)
    session.train()
    assert spectra.load_run(session.run_dir).steps == [0, 1, 2, 3]
    assert json.loads((session.run_dir / "run.json").read_text())["max_steps"] == 3


def test_dataset_without_the_columns(organism_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question_text": "1+1", "label": "2"}) + "\n")
    with pytest.raises(TrainConfigError, match=r"--dataset .*bad.jsonl: no problem column; expected one of"):
        prepare(tiny(organism_dir, tmp_path, "lora", dataset=str(data)))


def test_local_dataset_with_gsm8k_columns(organism_dir, tmp_path, varied_reward):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"{a}+{a}", "answer": f"add them\n#### {2 * a}"} for a in range(10, 20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    session = prepare(tiny(organism_dir, tmp_path, "lora", dataset=str(data), max_steps=1))
    assert session.trainer.train_dataset[0]["answer"] == "20"
    assert dataclasses.is_dataclass(session.cfg)


def test_parquet_dataset_with_a_solution_column(organism_dir, tmp_path):
    import pandas as pd

    data = tmp_path / "math.parquet"
    pd.DataFrame(
        {"problem": ["1+2", "2+2"], "solution": ["We add: \\boxed{3}.", "So \\boxed{\\frac{8}{2}}"]}
    ).to_parquet(data)
    session = prepare(tiny(organism_dir, tmp_path, "lora", dataset=str(data), max_steps=1))
    assert [r["answer"] for r in session.trainer.train_dataset] == ["3", "\\frac{8}{2}"]


def test_report_to_passes_through_to_tensorboard(organism_dir, tmp_path, varied_reward):
    require("tensorboard")
    from spectra.train.trainer import grpo_config

    assert grpo_config(tiny(organism_dir, tmp_path, "lora").resolve(), tmp_path).report_to == []
    run_dir = train(tiny(organism_dir, tmp_path, "lora", report_to=("tensorboard",), max_steps=1))
    assert list(run_dir.rglob("events.out.tfevents.*")), "no TensorBoard event file was written"


def test_unreachable_hub_ids_are_one_line_errors(organism_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TrainConfigError) as err:
        prepare(tiny(organism_dir, tmp_path, "lora", model="no-such-org/no-such-model"))
    assert str(err.value).startswith("--model no-such-org/no-such-model: could not be fetched from the hub")
    with pytest.raises(TrainConfigError) as err:
        prepare(tiny(organism_dir, tmp_path, "lora", dataset="no-such-org/no-such-set"))
    assert str(err.value).startswith("--dataset no-such-org/no-such-set: could not load split 'train'")
    assert "\n" not in str(err.value)
