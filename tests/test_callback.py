"""SpectraCallback in users' own training scripts (issue 24 §1, §3): TRL's GRPO, SFT and DPO trainers.

The GRPO script below is what a user writes with TRL alone (the organism's task data is the only other
spectra import); its one spectra line is ``callbacks=[SpectraCallback(...)]``. Its ΔW files must equal
those of ``spectra train`` with the same configuration and seed, tensor for tensor.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _requires import require

require("trl")

from spectra.cli.main import app
from spectra.train import CallbackError, SpectraCallback, TrainConfig
from typer.testing import CliRunner

import spectra

runner = CliRunner()
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def length_reward(completions, **kwargs):
    """Varies within a group: non-zero advantages whatever the tiny model answers."""
    return [float(len(str(c)) % 3) for c in completions]


def _model(organism_dir, lora: dict | None = None, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(organism_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(organism_dir, dtype=torch.float32)
    if lora is not None:
        torch.manual_seed(seed)
        config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
        model = get_peft_model(model, LoraConfig(**{**config, **lora}))
    return tokenizer, model


def _read(run_dir, step: int) -> dict[str, dict[str, torch.Tensor]]:
    run = spectra.load_run(run_dir)
    with run.open_delta(step) as d:
        return {m: {k: v for k, v in vars(run.read_module(d, m)[0]).items()
                    if isinstance(v, torch.Tensor)} for m in d.modules}  # fmt: skip


def test_a_trl_grpo_script_with_the_callback_records_what_spectra_train_records(
    organism_dir, tmp_path, monkeypatch
):
    from spectra.train.data import build_dataset
    from spectra.train.organism import organism_problems
    from trl import GRPOConfig, GRPOTrainer

    # spectra train, with the same reward
    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", length_reward)
    cfg = TrainConfig(
        model=str(organism_dir), method="lora", rank=4, alpha=8, dropout=0.0, num_generations=4,
        batch_size=2, max_steps=2, max_completion_length=12, lr=1e-2, delta_every=1, eval_every=0,
        monitor_every=1, out=str(tmp_path), name="spectra-train", seed=0,
    )  # fmt: skip
    spectra.train.train(cfg)

    # the user's script: TRL alone, plus the one line
    tokenizer, model = _model(organism_dir, lora={}, seed=0)
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in organism_problems("train")]
    args = GRPOConfig(
        output_dir=str(tmp_path / "ckpt"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
        lr_scheduler_type="constant", num_generations=4, max_completion_length=12, epsilon_high=0.28,
        mask_truncated_completions=True, seed=0, data_seed=0, logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[length_reward], args=args, processing_class=tokenizer,
        train_dataset=build_dataset(rows, tokenizer, True),
        callbacks=[SpectraCallback(out=tmp_path, name="my-run", delta_every=1, monitor_every=1)],
    )  # fmt: skip
    trainer.train()

    mine, theirs = spectra.load_run(tmp_path / "my-run"), spectra.load_run(tmp_path / "spectra-train")
    assert mine.steps == theirs.steps == [0, 1, 2]
    for step in mine.steps:
        a, b = _read(tmp_path / "my-run", step), _read(tmp_path / "spectra-train", step)
        assert a.keys() == b.keys() and len(a) == 14
        for module in a:
            assert a[module].keys() == b[module].keys()
            for key in a[module]:
                torch.testing.assert_close(a[module][key], b[module][key], rtol=0, atol=0)
    moved = _read(tmp_path / "my-run", 2)
    assert max(t["B"].abs().max().item() for t in moved.values()) > 0  # the steps did train
    config = json.loads((tmp_path / "my-run" / "run.json").read_text())
    assert (config["method"], config["rank"], config["alpha"]) == ("lora", 4, 8)
    assert config["trainer"] == "GRPOTrainer"
    assert config["target_modules"] == sorted(PROJECTIONS) and config["adapted_modules"] == 14
    logged = mine.metrics
    assert logged["geometry/E_1"].notna().sum() == 2  # the live geometry joined the trainer's logs
    torch.testing.assert_close(
        torch.tensor(logged["geometry/E_1"].dropna().to_numpy()),
        torch.tensor(theirs.metrics["geometry/E_1"].dropna().to_numpy()),
    )


def _sft(organism_dir, out, name, lr=1e-2, **callback):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = _model(organism_dir, lora={"use_dora": callback.pop("dora", False)})
    data = Dataset.from_list([{"text": f"{a} + {b} = {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])
    args = SFTConfig(
        output_dir=str(out / "ckpt"), use_cpu=True, bf16=False, max_steps=2, learning_rate=lr,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, max_length=32,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(SpectraCallback(out=out, name=name, **callback))
    trainer.train()
    return out / name


def _dpo(organism_dir, out, name):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, model = _model(organism_dir, lora={})
    data = Dataset.from_list(
        [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"} for a, b in
         [(1, 2), (3, 4), (5, 6), (7, 8)]]
    )  # fmt: skip
    args = DPOConfig(
        output_dir=str(out / "ckpt"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, max_length=32,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(SpectraCallback(out=out, name=name, delta_every=2, monitor_every=1))
    trainer.train()
    return out / name


def test_sft_and_dpo_runs_are_read_by_analyze_and_compare(organism_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sft = _sft(organism_dir, tmp_path, "sft-dora", dora=True, delta_every=2, monitor_every=1)
    assert not [w for w in caught if "have not moved" in str(w.message)]  # an adapter that learns: no word
    assert json.loads((sft / "train_summary.json").read_text())["live_checks"] == {}
    dpo = _dpo(organism_dir, tmp_path, "dpo-lora")
    r = runner.invoke(app, ["analyze", str(sft), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", str(sft), str(dpo), "--out", str(tmp_path / "cmp"), "--device", "cpu"])
    assert r.exit_code == 0 and "left out" not in r.output, r.output  # compare analysed the DPO run
    assert (tmp_path / "cmp" / "compare.csv").exists()
    for run_dir, method, trainer in ((sft, "dora", "SFTTrainer"), (dpo, "lora", "DPOTrainer")):
        config = json.loads((run_dir / "run.json").read_text())
        assert (config["method"], config["trainer"]) == (method, trainer)
        assert spectra.load_run(run_dir).steps == [0, 2]
        summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
        last = next(s for s in summary["steps"] if s["step"] == 2)
        assert last["median"]["relative_size"] > 0, (method, last["median"])


def test_an_adapter_with_lr_0_is_said_not_to_move(organism_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = _sft(organism_dir, tmp_path, "frozen", lr=0.0, delta_every=0, monitor_every=1)
    said = [str(w.message) for w in caught if "have not moved" in str(w.message)]
    assert said and said[0].startswith("spectra: 14 of 14 adapted modules have not moved after 1 steps"), said
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["live_checks"]["not_moved"] == {"step": 2, "modules": 14, "of": 14}


def _begin(callback, model, tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), use_cpu=True, report_to="none")
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_a_model_without_trainable_parameters_is_one_line_and_writes_nothing(organism_dir, tmp_path):
    _, model = _model(organism_dir)
    model.requires_grad_(False)
    with pytest.raises(CallbackError) as e:
        _begin(SpectraCallback(out=tmp_path / "runs", name="x"), model, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "no trainable parameters" in message and "LORA" in message
    assert not (tmp_path / "runs").exists()


def test_an_unknown_peft_tuner_is_one_line_and_writes_nothing(organism_dir, tmp_path):
    from peft import LoHaConfig, get_peft_model

    _, model = _model(organism_dir)
    model = get_peft_model(model, LoHaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CallbackError) as e:
        _begin(SpectraCallback(out=tmp_path / "runs", name="x"), model, tmp_path)
    message = str(e.value)
    assert "\n" not in message and "PEFT tuner is LOHA" in message and "ADALORA" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("lora", "method", "rule"), [
    ({"use_rslora": True}, "rslora", "rslora"),
    ({"init_lora_weights": "pissa_niter_2"}, "pissa", "pissa"),
    ({"init_lora_weights": "olora"}, "olora", "pissa"),
])  # fmt: skip
def test_the_method_is_read_off_the_peft_config(organism_dir, lora, method, rule):
    from spectra.train.callback import find_method

    _, model = _model(organism_dir, lora=lora)
    found = find_method(model)
    assert (found.name, found.method.name, found.config["rank"]) == (method, rule, 4)


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(CallbackError, match=r"delta_every=-1\): expected a whole number"):
        SpectraCallback(out=tmp_path, delta_every=-1)
    with pytest.raises(CallbackError, match="on_collapse='panic'"):
        SpectraCallback(out=tmp_path, on_collapse="panic")


def test_no_learning_signal_is_said_while_every_group_is_flat_and_not_after():
    from spectra.train.live_checks import LiveChecks

    weight = torch.nn.Parameter(torch.ones(3, 2))
    checks = LiveChecks({"layer": [weight]})
    for _ in range(3):
        checks.observe({"frac_reward_zero_std": 1.0, "reward": 0.0})
    with pytest.warns(UserWarning, match=r"no learning signal: .* = 1\) at all 3 logged steps so far"):
        lines = checks.check(3)
    assert len(lines) == 2 and "1 of 1 adapted modules have not moved after 3 steps" in lines[0]
    with torch.no_grad():
        weight[0, 0] += 1e-3
    checks.observe({"frac_reward_zero_std": 0.5})  # one group with a signal: the gradient is not 0
    assert checks.check(4, end=True) == []
    assert checks.summary()["live_checks"]["no_learning_signal"] == {"step": 3, "logged_steps": 3}


def test_a_plain_trainer_and_rloo_record_runs_that_analyze_reads(organism_dir, tmp_path):
    """The callback on transformers' own Trainer (full fine-tuning: no PEFT) and on TRL's RLOOTrainer
    (LoRA); train_summary.json names every recorded step, the last included."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl import RLOOConfig, RLOOTrainer

    tokenizer, model = _model(organism_dir)
    texts = [f"{a} + {b} = {a + b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = Dataset.from_list([tokenizer(t) for t in texts])
    args = TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), use_cpu=True, max_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=2, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.add_callback(SpectraCallback(out=tmp_path, name="plain", delta_every=1, monitor_every=1))
    trainer.train()

    tokenizer, model = _model(organism_dir, lora={})
    prompts = Dataset.from_list([{"prompt": f"{a} + {b} ="} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]])
    args = RLOOConfig(
        output_dir=str(tmp_path / "rloo-ckpt"), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=8, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    rloo = RLOOTrainer(model=model, reward_funcs=[length_reward], args=args, train_dataset=prompts,
                       processing_class=tokenizer)  # fmt: skip
    rloo.add_callback(SpectraCallback(out=tmp_path, name="rloo", delta_every=2, monitor_every=1))
    rloo.train()

    for name, method, trainer_class, steps in (("plain", "full", "Trainer", [0, 1, 2]),
                                               ("rloo", "lora", "RLOOTrainer", [0, 2])):  # fmt: skip
        run_dir = tmp_path / name
        config = json.loads((run_dir / "run.json").read_text())
        assert (config["method"], config["trainer"]) == (method, trainer_class)
        assert spectra.load_run(run_dir).steps == steps
        assert json.loads((run_dir / "train_summary.json").read_text())["recorded_steps"] == steps
        r = runner.invoke(app, ["analyze", str(run_dir), "--device", "cpu"])
        assert r.exit_code == 0, r.output
