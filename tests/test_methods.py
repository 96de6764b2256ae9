"""Every method of the registry: the recorded ΔW equals the method's own merge minus W0.

A tiny random Qwen2 is saved to disk (so W0 is read back from its safetensors, as in training), the
method is attached, a few AdamW steps are taken on a language-model loss (non-zero gradients), and then
for every adapted module ``record(model).to_dense(W0) == merge(copy) − W0``. The same check through
TRL's GRPOTrainer is in ``test_train.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _requires import require

require("peft")
require("transformers")

from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.config import TrainConfig, TrainConfigError
from spectra.train.methods import METHODS, get_method, method_names
from transformers import Qwen2Config, Qwen2ForCausalLM

from spectra.operators import VectorDelta


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).float()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_qwen2().save_pretrained(path)
    return path


def small_config(method: str) -> TrainConfig:
    return TrainConfig(method=method, rank=4, alpha=8, dropout=0.0, max_steps=6, quanta_d=2).resolve()


def train_steps(model: torch.nn.Module, method, cfg: TrainConfig, steps: int = 4) -> None:
    """A few optimizer steps on next-token loss over random tokens (all gradients non-zero)."""
    opt = method.optimizer(model, cfg) or torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2
    )
    callbacks = method.callbacks(model, cfg)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, 40, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        for cb in callbacks:  # AdaLoRA's rank allocation, as the trainer calls it
            cb.on_optimizer_step(None, type("S", (), {"global_step": step})(), None)
        opt.zero_grad()


def test_registry_lists_every_method_once():
    assert tuple(METHODS) == method_names()
    assert len(METHODS) == 14
    with pytest.raises(TrainConfigError, match="--method: got 'lora2'; expected one of full, lora"):
        get_method("lora2")


@pytest.mark.parametrize("name", method_names())
def test_recorded_delta_matches_the_methods_own_merge(name, model_dir):
    from transformers import AutoModelForCausalLM

    cfg = small_config(name)
    method = get_method(name)
    model = method.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), cfg)
    base = BaseCheckpoint(model_dir)
    train_steps(model, method, cfg)

    delta = method.record(model, base)
    merged = method.merged_weights(model)
    assert delta.modules, f"{name}: nothing recorded"
    assert set(merged) == set(delta.modules)
    moved = 0.0
    for key, rec in delta.modules.items():
        module, param = method.base_tensors(model)[key]
        w0 = base.get(module, param).double()
        expected = merged[key].double() - w0
        if isinstance(rec, VectorDelta):
            got = rec.delta.double()
        else:
            if rec.needs_w0:  # DoRA, IA3: recorded without W0, formed against the checkpoint's
                rec = dataclasses.replace(rec, w0=w0.float())
            got = rec.to_dense().double()
        assert got.shape == expected.shape, key
        scale = expected.abs().max().item() + w0.abs().max().item() * 1e-6
        torch.testing.assert_close(got, expected, atol=2e-6 * max(scale, 1e-3) + 1e-7, rtol=1e-4)
        moved = max(moved, expected.abs().max().item())
    assert moved > 1e-4, f"{name}: the optimizer steps did not change the effective weights"
