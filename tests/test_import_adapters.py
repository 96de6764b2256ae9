"""PEFT adapter folders → exact ΔW (spectra.train.importing.adapters), checked against PEFT's own merge.

For each tuner: a tiny Llama (float32 safetensors) gets the adapter from PEFT, its weights are made
non-trivial with a seeded generator, PEFT saves it; then ``read_adapter``'s ΔW must equal PEFT's
``merge_and_unload()`` weight − W0 for every adapted module, and every other weight must be untouched.

Tolerances. The reference merge runs in float64 (the reloaded PeftModel is cast with ``.double()`` before
merging), from the same float32 stored values read_adapter forms ΔW from in float64: the two differ only
by float64 rounding, so ``TIGHT`` = 1e-12 · max|W0| (≈ 10⁴ ulp of the largest entry). PiSSA/OLoRA/MiLoRA
and the dense fallback are bounded by float32 instead: PEFT stores the residual base W0 − s·B0·A0 (and the
fallback merges) in float32, one or two roundings of entries ≤ max|W0| + max|ΔW|; ``F32`` allows 16 ulp of
float32 of that (a wrong B0·A0 or a transposed factor errs by O(|W0|), 10⁵ times more).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from _requires import require
from safetensors.torch import load_file, save_file
from spectra.train.checkpoint import BaseCheckpoint
from spectra.train.importing.adapters import AdapterUpdate, is_adapter_folder, read_adapter
from spectra.train.importing.errors import SourceError

from spectra.codecs import Stored
from spectra.operators import Dense, DoRA, LowRank, Scaled, VectorDelta, from_stored

peft = require("peft")
transformers = require("transformers")

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama: q 32×32, k/v 16×32, up/gate 48×32, down 32×48, lm_head 64×32 (untied)."""
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("adapters") / "base"
    model.save_pretrained(path, safe_serialization=True)
    return path


def _load(base_dir: Path):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def _perturb(model, seed: int, scale: float = 0.05, only: tuple[str, ...] = ()) -> None:
    """Add seeded noise to every trainable parameter (or those whose name contains one of ``only``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (not only or any(o in name for o in only)):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _save(base_dir: Path, out: Path, config, seed: int = 1, **kw) -> Path:
    model = peft.get_peft_model(_load(base_dir), config)
    _perturb(model, seed)
    model.save_pretrained(out, **kw)
    return out


def _merged(model) -> dict[str, torch.Tensor]:
    """Every parameter of PEFT's merge, in float64, named as the base model names it."""
    merged = model.double().merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


def _reference(base_dir: Path, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own reading of the saved folder onto the original base, merged in float64."""
    return _merged(peft.PeftModel.from_pretrained(_load(base_dir), folder))


def _dense(update: AdapterUpdate, name: str, base: BaseCheckpoint) -> torch.Tensor:
    """The record's ΔW in float64; DoRA/IA3 records are read back through their stored form with W0."""
    op = update.delta.modules[name]
    if isinstance(op, VectorDelta):
        return op.delta.to(F64)
    if isinstance(op, (DoRA, Scaled)):
        module, param = update.base_tensors[name]
        op = from_stored(op.to_stored(), base.get(module, param))
    return op.to_dense()


def _check(
    update: AdapterUpdate, base_dir: Path, merged: dict[str, torch.Tensor], tol: str = "tight"
) -> float:
    """read_adapter's ΔW equals merged − W0 for every record; every other base tensor is unchanged.
    Returns the largest error relative to max|W0| (for the report)."""
    base = BaseCheckpoint(base_dir)
    assert update.delta.modules, "no module read"
    seen, worst, largest = set(), 0.0, 0.0
    for name, (module, param) in update.base_tensors.items():
        key = f"{module}.{param}"
        w0 = base.get(module, param).to(F64)
        want = merged[key] - w0
        got = _dense(update, name, base)
        assert got.shape == w0.shape
        scale = float(w0.abs().max())
        atol = 1e-12 * scale if tol == "tight" else 16 * EPS32 * (scale + float(want.abs().max()))
        err = float((got - want).abs().max())
        assert err <= atol, f"{name}: |ΔW − (merged − W0)| = {err:.3g} > {atol:.3g}"
        worst, largest = max(worst, err / scale), max(largest, float(want.abs().max()) / atol)
        seen.add(key)
    assert largest > 1e3, "the updates are too small to test anything"
    assert set(update.delta.modules) == set(update.base_tensors)
    for key, value in merged.items():  # every other module: absent from the update, and untouched by PEFT
        if key not in seen:
            module, param = key.rsplit(".", 1)
            assert torch.equal(value, base.get(module, param).to(F64)), f"{key} changed but was not read"
    return worst


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_with_rank_and_alpha_patterns_and_modules_to_save(base_dir, tmp_path):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        init_lora_weights=False,
        modules_to_save=["lm_head"],
    )
    folder = _save(base_dir, tmp_path / "lora", config)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "lora"
    assert update.base_model == str(base_dir)
    assert update.config["rank_pattern"] == {"v_proj": 2}
    ops = update.delta.modules
    assert isinstance(ops["model.layers.0.self_attn.v_proj"], LowRank)
    assert ops["model.layers.0.self_attn.v_proj"].rank_bound == 2  # rank_pattern
    assert ops["model.layers.1.self_attn.q_proj"].scale == pytest.approx(3 / 4)  # alpha_pattern
    assert ops["model.layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 4)
    assert isinstance(ops["lm_head"], Dense)  # modules_to_save: the saved copy − W0
    assert len(ops) == 2 * 3 + 1
    _check(update, base_dir, _reference(base_dir, folder))


def test_rslora_scale_is_alpha_over_root_r(base_dir, tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj"], use_rslora=True, init_lora_weights=False
    )
    folder = _save(base_dir, tmp_path / "rslora", config)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "rslora"
    assert update.delta.modules["model.layers.0.self_attn.k_proj"].scale == pytest.approx(8 / 2)
    _check(update, base_dir, _reference(base_dir, folder))


def test_dora_with_its_magnitude_against_w0(base_dir, tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False
    )
    folder = _save(base_dir, tmp_path / "dora", config)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "dora"
    op = update.delta.modules["model.layers.1.mlp.down_proj"]
    assert isinstance(op, DoRA) and op.w0.shape == (32, 48) and op.magnitude.shape == (32,)
    assert "w0" not in op.to_stored().tensors  # W0 stays in BASE, as the recorder writes DoRA
    _check(update, base_dir, _reference(base_dir, folder))


# --------------------------------------------------------------------------- PiSSA, OLoRA, MiLoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_pissa_and_olora_rebuild_the_initial_factors(base_dir, tmp_path, init):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    model = peft.get_peft_model(_load(base_dir), config)
    _perturb(model, seed=2, scale=0.01)
    folder = tmp_path / init
    model.save_pretrained(folder)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == init
    op = update.delta.modules["model.layers.0.mlp.up_proj"]
    assert isinstance(op, LowRank) and op.B0 is not None and op.rank_bound == 6
    # PEFT rebuilds the residual on loading: its merge onto the original W0 is W0 + s·(B·A − B0·A0)
    _check(update, base_dir, _reference(base_dir, folder), tol="f32")
    # the recomputed B0 is sign-aligned with the trained B: B − B0 is the small trained change
    assert float((op.B - op.B0).abs().max()) < 0.1


def test_converted_pissa_is_lora_of_rank_2r_and_agrees_with_unconverted(base_dir, tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj"], init_lora_weights="pissa")
    model = peft.get_peft_model(_load(base_dir), config)
    model.peft_config["default"].init_lora_weights = True  # PEFT's documented conversion recipe
    model.save_pretrained(tmp_path / "pissa_init")
    model.peft_config["default"].init_lora_weights = "pissa"
    _perturb(model, seed=3, scale=0.01)
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init")
    )
    base = BaseCheckpoint(base_dir)
    converted = read_adapter(tmp_path / "converted", base)
    assert converted.method == "lora"
    assert converted.delta.modules["model.layers.1.self_attn.v_proj"].rank_bound == 6
    _check(converted, base_dir, _reference(base_dir, tmp_path / "converted"))
    plain = read_adapter(tmp_path / "plain", base)
    for name in converted.delta.modules:
        a, b = converted.delta.modules[name].to_dense(), plain.delta.modules[name].to_dense()
        assert torch.allclose(a, b, rtol=0, atol=16 * EPS32 * float(base.get(name).abs().max()))


def test_milora_rebuilds_the_minor_triplets(base_dir, tmp_path):
    from spectra.train.methods.milora import milora_init

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    model = peft.get_peft_model(_load(base_dir), config)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            milora_init(module)
    _perturb(model, seed=4, scale=0.01)
    folder = tmp_path / "milora"
    model.save_pretrained(folder)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = "milora"  # PEFT has no MiLoRA; spectra reads this name
    cfg_path.write_text(json.dumps(cfg))
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "milora"
    _check(update, base_dir, _merged(copy.deepcopy(model)), tol="f32")  # the in-memory residual model


# ------------------------------------------------------------------------------------ AdaLoRA


def test_adalora_with_rank_masks_from_rank_pattern(base_dir, tmp_path):
    config = peft.AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], tinit=0, tfinal=1,
        total_step=5, deltaT=1,
    )  # fmt: skip
    model = peft.get_peft_model(_load(base_dir), config)
    _perturb(model, seed=5, scale=0.1, only=("lora_E",))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(1, 6):  # the rank allocator really runs: rank_pattern masks some triplets
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    folder = tmp_path / "adalora"
    model.save_pretrained(folder)
    pattern = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and any(not all(m) for m in pattern.values())
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "adalora"
    for key, mask in pattern.items():
        op = update.delta.modules[key.removesuffix(".lora_E")]
        assert op.B.shape[-1] == 6  # back to init_r, as the recorder stores AdaLoRA
        assert (op.mid != 0).tolist() == mask  # the mask is mid != 0
        assert op.scale == pytest.approx(8 / (6 + 1e-5))
    _check(update, base_dir, _reference(base_dir, folder))


# --------------------------------------------------------------------------------------- VeRA


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_shared_projections_saved_or_regenerated(base_dir, tmp_path, save_projection):
    config = peft.VeraConfig(
        r=4, target_modules=["q_proj", "up_proj"], save_projection=save_projection, projection_prng_key=7
    )
    folder = _save(base_dir, tmp_path / "vera", config, seed=6)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "vera"
    assert update.delta.shared["vera_A"].shape == (4, 32) and update.delta.shared["vera_B"].shape == (48, 4)
    op = update.delta.modules["model.layers.0.self_attn.q_proj"]
    assert op.row is not None and op.mid is not None and op.shape == (32, 32)
    _check(update, base_dir, _reference(base_dir, folder))


# ---------------------------------------------------------------------------------- IA3, LN tuning


def test_ia3_rows_and_feedforward_columns(base_dir, tmp_path):
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    folder = _save(base_dir, tmp_path / "ia3", config, seed=7)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "ia3"
    assert update.delta.modules["model.layers.0.self_attn.k_proj"].axis == "row"
    assert update.delta.modules["model.layers.0.mlp.down_proj"].axis == "column"
    _check(update, base_dir, _reference(base_dir, folder))


def test_layernorm_tuning_vector_deltas(base_dir, tmp_path):
    config = peft.LNTuningConfig(target_modules=["input_layernorm", "norm"])
    folder = _save(base_dir, tmp_path / "ln", config, seed=8)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "lntuning"
    assert set(update.delta.modules) == {
        "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"
    }  # fmt: skip
    assert update.base_tensors["model.norm.weight"] == ("model.norm", "weight")
    _check(update, base_dir, _reference(base_dir, folder))


# ------------------------------------------------------------------------------ dense fallback


def test_other_tuner_through_peft_merge_as_dense(base_dir, tmp_path):
    config = peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    folder = _save(base_dir, tmp_path / "loha", config, seed=9)
    update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "peft:loha"
    assert all(isinstance(op, Dense) for op in update.delta.modules.values())
    assert len(update.delta.modules) == 4
    _check(update, base_dir, _reference(base_dir, folder), tol="f32")


def test_lora_layout_outside_the_factored_readers_falls_back_to_peft_merge(base_dir, tmp_path):
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    folder = _save(base_dir, tmp_path / "embedding", config, seed=10)
    with pytest.warns(UserWarning, match="LoRA on an embedding.*dense merge"):
        update = read_adapter(folder, BaseCheckpoint(base_dir))
    assert update.method == "lora"
    assert isinstance(update.delta.modules["model.embed_tokens"], Dense)
    assert len(update.delta.modules) == 3
    _check(update, base_dir, _reference(base_dir, folder), tol="f32")


# --------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def lora_folder(base_dir, tmp_path_factory) -> Path:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    return _save(base_dir, tmp_path_factory.mktemp("bad") / "lora", config)


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_is_adapter_folder(lora_folder, base_dir):
    assert is_adapter_folder(lora_folder)
    assert not is_adapter_folder(base_dir)


def test_pickled_weights_only_are_refused(lora_folder, base_dir, tmp_path):
    folder = _copy(lora_folder, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(SourceError, match=r"adapter_model\.bin.*safetensors"):
        read_adapter(folder, BaseCheckpoint(base_dir))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('["LORA"]', "peft_type"),
        ('{"peft_type": "NOT_A_TUNER"}', "unknown peft_type 'NOT_A_TUNER'"),
        ('{"peft_type": "LORA", "lora_alpha": 4}', "no 'r'"),
        ('{"peft_type": "LORA", "r": "two", "lora_alpha": 4}', "'r' is 'two'; expected int"),
    ],
)
def test_malformed_config_is_one_line_naming_the_file(lora_folder, base_dir, tmp_path, text, match):
    folder = _copy(lora_folder, tmp_path)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(SourceError, match=match) as info:
        read_adapter(folder, BaseCheckpoint(base_dir))
    assert "adapter_config.json" in str(info.value) and "\n" not in str(info.value)


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_tensor_shape_that_does_not_fit_the_base_weight(lora_folder, base_dir, tmp_path):
    folder = _copy(lora_folder, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, torch.zeros(2, 31)))
    with pytest.raises(SourceError, match=rf"adapter_model\.safetensors: tensor {key} has shape \(2, 31\)"):
        read_adapter(folder, BaseCheckpoint(base_dir))


def test_tensor_of_a_module_the_base_lacks(lora_folder, base_dir, tmp_path):
    folder = _copy(lora_folder, tmp_path)
    key = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, torch.zeros(2, 32)))
    with pytest.raises(SourceError, match=r"layers\.9\.self_attn\.q_proj.*base model"):
        read_adapter(folder, BaseCheckpoint(base_dir))


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq"])
def test_unconverted_adapter_on_an_unrebuildable_residual_is_refused(lora_folder, base_dir, tmp_path, init):
    folder = _copy(lora_folder, tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="path_initial_model_for_weight_conversion"):
        read_adapter(folder, BaseCheckpoint(base_dir))


def test_records_round_trip_through_their_stored_form(lora_folder, base_dir):
    update = read_adapter(lora_folder, BaseCheckpoint(base_dir))
    for op in update.delta.modules.values():
        stored = op.to_stored()
        assert isinstance(stored, Stored)
        assert torch.equal(from_stored(stored).to_dense(), op.to_dense())


def test_recomputed_initial_factors_are_sign_aligned_with_the_trained_ones():
    """Another machine's SVD may flip a triplet's signs: B0·A0 is the same, and the alignment makes B − B0
    the small trained change again (LowRank then forms s·(B − B0)·A + s·B0·(A − A0) without cancellation)."""
    from spectra.train.importing.tuners import _align_signs

    g = torch.Generator().manual_seed(11)
    B0, A0 = torch.randn(8, 3, generator=g), torch.randn(3, 5, generator=g)
    B = B0 + 1e-3 * torch.randn(8, 3, generator=g)
    flip = torch.tensor([1.0, -1.0, -1.0])
    B0f, A0f = _align_signs(B0 * flip, A0 * flip.unsqueeze(-1), B)
    assert torch.allclose(B0f @ A0f, B0 @ A0, rtol=0, atol=1e-6)
    assert torch.equal(B0f, B0) and torch.equal(A0f, A0)


def test_steps_of_another_method_are_skipped_so_run_json_names_the_one_they_hold(
    lora_folder, base_dir, tmp_path
):
    import warnings

    from spectra.train.importing.run import SourceWarning, import_run

    import spectra

    dora = _save(
        base_dir,
        tmp_path / "dora",
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run_dir = import_run(str(base_dir), [str(lora_folder), str(dora)], tmp_path / "runs", "mixed")
    run = spectra.load_run(run_dir)
    assert run.steps == [1] and run.config["method"] == "lora"
    assert any(issubclass(w.category, SourceWarning) and "one method" in str(w.message) for w in said)
    with pytest.warns(SourceWarning, match="one method"):  # full weights after an adapter: the same
        run_dir = import_run(str(base_dir), [str(dora), str(base_dir)], tmp_path / "runs", "mixed2")
    assert spectra.load_run(run_dir).config["method"] == "dora"


def test_an_adapter_that_does_not_fit_base_names_the_base_it_was_trained_on(lora_folder, tmp_path):
    from spectra.train.importing.run import import_run

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    other = tmp_path / "other-base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(other, safe_serialization=True)
    with pytest.raises(SourceError, match=r"has shape .* \(the adapter was trained on '.*base', not on BASE"):
        import_run(str(other), [str(lora_folder)], tmp_path / "runs", "x")
    assert not (tmp_path / "runs" / "x").exists()
