"""QuanTA (spectra.train.methods.quanta): axes, exact zero init, forward = W0 + ΔW, merge, rank, training."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from _requires import require
from spectra.train.methods.quanta import (
    QuantaConfig,
    QuantaLinear,
    apply_quanta,
    factorize,
    gate_shapes,
    load_quanta_state_dict,
    merge_quanta,
    quanta_modules,
    quanta_state_dict,
)
from torch import nn

# ---------------------------------------------------------------------------------------------- helpers


def _layer(n_in: int, n_out: int, d: int = 3, seed: int = 0, **kw) -> QuantaLinear:
    """A float64 QuantaLinear on a random base layer with bias."""
    torch.manual_seed(seed)
    return QuantaLinear(nn.Linear(n_in, n_out, dtype=torch.float64), d, **kw).double()


def _perturb(module: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quanta_modules(module).values():
            for gate in layer.gates.values():
                gate.add_(scale * torch.randn(gate.shape, generator=gen, dtype=gate.dtype))


def _embedded_gate(gate: np.ndarray, sizes: list[int], i: int, j: int) -> np.ndarray:
    """A gate on axes (i, j) as an explicit matrix on the whole flattened state (identity elsewhere),
    built entry by entry: an independent check of the einsum bookkeeping."""
    new_sizes = list(sizes)
    new_sizes[i], new_sizes[j] = gate.shape[0], gate.shape[1]
    m = np.zeros((math.prod(new_sizes), math.prod(sizes)))
    for src in itertools.product(*(range(s) for s in sizes)):
        for a, b in itertools.product(range(gate.shape[0]), range(gate.shape[1])):
            dst = list(src)
            dst[i], dst[j] = a, b
            m[np.ravel_multi_index(dst, new_sizes), np.ravel_multi_index(src, sizes)] = gate[
                a, b, src[i], src[j]
            ]
    return m


def _dense_by_kronecker(layer: QuantaLinear, which: str) -> np.ndarray:
    sizes = list(layer.in_axes)
    total = np.eye(layer.in_features)
    for (i, j), key in zip(itertools.combinations(range(layer.d), 2), layer._keys, strict=True):
        gate = (layer.gates[key] if which == "gates" else getattr(layer.init_gates, key)).detach().numpy()
        total = _embedded_gate(gate, sizes, i, j) @ total
        sizes[i], sizes[j] = gate.shape[0], gate.shape[1]
    assert sizes == list(layer.out_axes)
    return total


@pytest.fixture(scope="module")
def qwen2_config():
    transformers = require("transformers")
    return transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
    )


def _qwen2(config, seed: int = 0) -> nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------- axes


@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [
        (4096, 3, (16, 16, 16)),
        (896, 3, (8, 8, 14)),
        (4864, 3, (16, 16, 19)),
        (64, 3, (4, 4, 4)),
        (32, 3, (2, 4, 4)),
        (4096, 4, (8, 8, 8, 8)),
        (64, 4, (2, 2, 4, 4)),
        (12, 2, (3, 4)),
    ],
)
def test_factorize_known_dims(n, d, expected):
    assert factorize(n, d) == expected


@pytest.mark.parametrize("d", [2, 3, 4])
def test_factorize_is_the_most_balanced_split(d):
    for n in range(2, 300):
        divisors = [k for k in range(2, n + 1) if n % k == 0]
        heads = [t for t in itertools.product(divisors, repeat=d - 1) if n % math.prod(t) == 0]
        splits = [(*t, n // math.prod(t)) for t in heads if n // math.prod(t) >= 2]
        if not splits:
            with pytest.raises(ValueError):
                factorize(n, d)
            continue
        got = factorize(n, d)
        assert math.prod(got) == n and len(got) == d and list(got) == sorted(got) and min(got) >= 2
        assert max(got) == min(max(t) for t in splits)
        assert min(got) == max(min(t) for t in splits if max(t) == max(got))


def test_factorize_refuses_primes_and_says_which_d_works():
    with pytest.raises(ValueError, match=r"131 has 1 prime factor"):
        factorize(131, 3)
    with pytest.raises(ValueError, match=r"use d ≤ 2"):
        factorize(2 * 131, 3)


def test_layer_error_names_module_and_dimension():
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj'.*in_features=131"):
        QuantaLinear(nn.Linear(131, 64), 3, name="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match=r"out_features=262.*use d ≤ 2"):
        QuantaLinear(nn.Linear(64, 262), 3, name="x")


def test_parameter_counts_vs_lora():
    """The module docstring's example: 4096 × 4096 at d = 3 is 3 · 16⁴ parameters, fewer than LoRA r = 32."""
    axes = factorize(4096, 3)
    quanta = sum(math.prod(s) for s in gate_shapes(axes, axes))
    assert quanta == 3 * 16**4 == 196_608
    assert quanta < 32 * (4096 + 4096)
    layer = _layer(64, 32)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == sum(math.prod(s) for s in gate_shapes((4, 4, 4), (2, 4, 4))) == 256 + 128 + 256


def test_gate_shapes_map_each_axis_at_its_last_gate():
    assert gate_shapes((4, 4, 8), (2, 3, 5)) == [(4, 4, 4, 4), (2, 8, 4, 8), (3, 5, 4, 8)]


# ---------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize(("n_in", "n_out"), [(64, 64), (64, 32), (32, 128)])
def test_at_init_update_is_exactly_zero(n_in, n_out):
    layer = _layer(n_in, n_out)
    x = torch.randn(5, 3, n_in, dtype=torch.float64)
    assert torch.equal(layer.delta_weight(torch.float64), torch.zeros(n_out, n_in, dtype=torch.float64))
    assert torch.equal(layer(x), layer.base_layer(x))
    assert all(g.abs().max() > 0 for g in layer.gates.values())  # the gates themselves are random


def test_zero_update_is_exact_in_bfloat16_too():
    torch.manual_seed(0)
    base = nn.Linear(64, 64, dtype=torch.bfloat16)
    layer = QuantaLinear(base, 3).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize(
    ("n_in", "n_out", "d"), [(64, 64, 3), (64, 32, 3), (32, 96, 3), (96, 64, 3), (64, 64, 4), (48, 36, 2)]
)
def test_forward_equals_dense_update(n_in, n_out, d):
    layer = _layer(n_in, n_out, d)
    _perturb(layer)
    x = torch.randn(2, 7, n_in, dtype=torch.float64)
    delta = layer.delta_weight(torch.float64)
    assert delta.abs().max() > 1e-3
    expected = x @ (layer.base_layer.weight + delta).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n_in", "n_out"), [(64, 64), (32, 48)])
def test_delta_weight_matches_explicit_gate_matrices(n_in, n_out):
    """ΔW = T − T_init with each gate written out as a full matrix (identity on the other axes)."""
    layer = _layer(n_in, n_out)
    _perturb(layer)
    expected = _dense_by_kronecker(layer, "gates") - _dense_by_kronecker(layer, "init")
    np.testing.assert_allclose(layer.delta_weight(torch.float64).numpy(), expected, rtol=0, atol=1e-12)


def test_delta_weight_is_float32_by_default_and_detached():
    layer = _layer(64, 32)
    _perturb(layer)
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32 and not delta.requires_grad
    torch.testing.assert_close(delta, layer.delta_weight(torch.float64).float())


def test_update_is_high_rank():
    """64 × 64 with axes 4·4·4: 3 · 4⁴ = 768 parameters, what a rank-6 LoRA has; ΔW reaches full rank."""
    layer = _layer(64, 64, in_axes=(4, 4, 4), out_axes=(4, 4, 4))
    n_params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    lora_rank = n_params // (64 + 64)
    assert (n_params, lora_rank) == (768, 6)
    _perturb(layer)
    rank = torch.linalg.matrix_rank(layer.delta_weight(torch.float64)).item()
    assert rank > lora_rank
    assert rank == 64


def test_merged_weight_minus_w0_is_delta_weight():
    layer = _layer(96, 64)
    _perturb(layer)
    w0 = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(
        layer.merged_weight() - w0, layer.delta_weight(torch.float64), rtol=0, atol=1e-12
    )


def test_dropout_only_touches_the_adapter_path():
    torch.manual_seed(0)
    layer = QuantaLinear(nn.Linear(64, 64, dtype=torch.float64), 3, dropout=0.5).double()
    x = torch.randn(8, 64, dtype=torch.float64)
    assert torch.equal(layer.train()(x), layer.base_layer(x))  # ΔW = 0: dropout has nothing to drop yet
    _perturb(layer)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(
        layer(x),
        x @ (layer.base_layer.weight + layer.delta_weight(torch.float64)).T + layer.base_layer.bias,
        rtol=0,
        atol=1e-12,
    )


# ---------------------------------------------------------------------------------------------- on Qwen2


def test_apply_quanta_on_qwen2_starts_at_the_base_model_and_trains_only_gates(qwen2_config):
    model = _qwen2(qwen2_config)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    assert apply_quanta(model, QuantaConfig()) is model
    layers = quanta_modules(model)
    assert len(layers) == 2 * 7
    assert layers["model.layers.0.self_attn.k_proj"].out_axes == (2, 4, 4)  # 64 → 32: out ≠ in
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)

    model.train()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        is_gate = ".gates." in name
        assert p.requires_grad == is_gate, name
        assert (p.grad is not None) == is_gate, name
        if is_gate:
            assert p.grad.abs().max() > 0, name
    assert all(not b.requires_grad for name, b in model.named_buffers() if "init_gates" in name)


def test_merge_gives_the_unmerged_outputs(qwen2_config):
    model = apply_quanta(
        _qwen2(qwen2_config).double(), QuantaConfig(target_modules=["q_proj", "k_proj", "down_proj"])
    )
    model.double()
    _perturb(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids).logits
        merged_model = merge_quanta(copy.deepcopy(model))
        assert quanta_modules(merged_model) == {}
        assert type(merged_model.model.layers[1].self_attn.k_proj) is nn.Linear
        merged = merged_model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-10)
    greedy = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(model.generate(ids[:, :3], **greedy), merged_model.generate(ids[:, :3], **greedy))


def test_adapter_state_dict_roundtrip_through_safetensors(qwen2_config, tmp_path):
    from safetensors.torch import load_file, save_file

    trained = apply_quanta(_qwen2(qwen2_config), QuantaConfig(target_modules=["v_proj", "up_proj"]))
    _perturb(trained)
    save_file(quanta_state_dict(trained), tmp_path / "adapter.safetensors")
    fresh = _qwen2(qwen2_config)  # same base (seed 0), different random gates
    torch.manual_seed(99)
    apply_quanta(fresh, QuantaConfig(target_modules=["v_proj", "up_proj"]))
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert not torch.allclose(fresh(ids).logits, trained(ids).logits)
        load_quanta_state_dict(fresh, load_file(tmp_path / "adapter.safetensors"))
        assert torch.equal(fresh(ids).logits, trained(ids).logits)
    with pytest.raises(ValueError, match="missing"):
        load_quanta_state_dict(fresh, {})

    trained.save_pretrained(tmp_path / "full")  # the whole model (base, gates, initial gates) also saves
    keys = load_file(tmp_path / "full" / "model.safetensors").keys()
    assert "model.layers.1.mlp.up_proj.init_gates.1_2" in keys


def test_apply_quanta_errors_when_nothing_matches(qwen2_config):
    model = _qwen2(qwen2_config)
    with pytest.raises(ValueError, match=r"target_modules=\['qkv'\] matched no nn\.Linear"):
        apply_quanta(model, QuantaConfig(target_modules=["qkv"]))
    assert quanta_modules(model) == {}
    assert all(p.requires_grad for p in model.parameters())  # the failed call froze nothing
    apply_quanta(model, QuantaConfig(target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="already has QuanTA layers"):
        apply_quanta(model, QuantaConfig(target_modules=["o_proj"]))


def test_config_validation():
    with pytest.raises(ValueError, match="d must be"):
        QuantaConfig(d=1)
    with pytest.raises(ValueError, match="dropout"):
        QuantaConfig(dropout=1.0)
