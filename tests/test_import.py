"""`spectra import`: base/RL pairs and folders of trainer checkpoints become ordinary runs.

Every pair here is built by the test: a tiny LLaMA saved as safetensors (bf16, sharded), and copies of it
with known updates planted in a few tensors, so that the imported ΔW has a float64 reference.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from spectra.cli.main import app
from spectra.train.importing.errors import SourceError
from spectra.train.importing.run import SourceWarning, import_run
from spectra.train.importing.sources import find_snapshots
from spectra.train.importing.weights import ModelFiles
from typer.testing import CliRunner

import spectra

PLANTED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def _tiny_llama(folder: Path, dtype: torch.dtype = torch.bfloat16, shard: str | None = "20KB") -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _copy_with(base: Path, folder: Path, updates: dict[str, torch.Tensor]) -> Path:
    """A copy of model ``base`` (one file) whose tensors ``name.weight`` get ``+ updates[name]``, rounded
    to the stored dtype; returns the folder."""
    folder.mkdir(parents=True)
    tensors = _tensors(base)
    for module, d in updates.items():
        w = tensors[f"{module}.weight"]
        tensors[f"{module}.weight"] = (w.double() + d).to(w.dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((base / "config.json").read_text())
    return folder


def _planted(
    gen: torch.Generator, shapes: dict[str, tuple[int, int]], rank: int = 2
) -> dict[str, torch.Tensor]:
    out = {}
    for module in PLANTED:
        m, n = shapes[module]
        out[module] = (
            torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
        ).double() * 0.05
    return out


@pytest.fixture
def pair(tmp_path, gen):
    base = _tiny_llama(tmp_path / "base")
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in _tensors(base).items() if v.ndim == 2}
    other = _copy_with(base, tmp_path / "rl", _planted(gen, shapes))
    return base, other


def test_a_bf16_pair_is_the_exact_difference_of_the_stored_values(pair, tmp_path):
    base, other = pair
    assert (base / "model.safetensors.index.json").is_file()  # sharded BASE
    run_dir = import_run(str(base), [str(other)], tmp_path / "runs", "rl")
    run = spectra.load_run(run_dir)
    assert run.steps == [1]
    assert not (run_dir / "base" / "weights.h5").exists()  # W0 is not copied
    pointer = json.loads((run_dir / "base" / "pointer.json").read_text())
    assert all(Path(f).parent == base.resolve() for f in pointer["files"])
    b, o = _tensors(base), _tensors(other)
    moved = []
    for name in run.modules:
        tensor = pointer["names"][name]
        ref = o[tensor].double() - b[tensor].double()  # exact in float64
        got = run.delta(1, name)
        dense = got.to_dense() if hasattr(got, "to_dense") else got.delta.double()
        assert torch.equal(dense.double(), ref), name
        assert torch.equal(run.w0(name), b[tensor])
        if ref.abs().max() > 0:
            moved.append(name)
    assert sorted(moved) == sorted(PLANTED)  # every other module is a zero update


def test_the_analysis_of_an_imported_pair_matches_a_float64_reference(pair, tmp_path):
    base, other = pair
    run = spectra.load_run(import_run(str(base), [str(other)], tmp_path / "runs", "rl"))
    table = run.analyze().set_index("module")
    b, o = _tensors(base), _tensors(other)
    for module in PLANTED:
        d = o[f"{module}.weight"].double() - b[f"{module}.weight"].double()
        s = torch.linalg.svdvals(d)
        p = s / s.sum()
        p = p[p > 0]
        erank = torch.exp(-(p * p.log()).sum()).item()
        rel = (d.norm() / b[f"{module}.weight"].double().norm()).item()
        assert table.loc[module, "erank"] == pytest.approx(erank, rel=1e-5)
        assert table.loc[module, "relative_size"] == pytest.approx(rel, rel=1e-6)
    untouched = table.drop(index=list(PLANTED))
    untouched = untouched[untouched["relative_size"].notna()]
    assert (untouched["relative_size"] == 0).all()


def _trainer_folder(tmp_path: Path, gen: torch.Generator) -> tuple[Path, Path]:
    base = _tiny_llama(tmp_path / "base", shard=None)
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in _tensors(base).items() if v.ndim == 2}
    out = tmp_path / "trl-out"
    history = [{"step": s, "reward": 0.1 * s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    for step in (2, 4):
        ckpt = _copy_with(base, out / f"checkpoint-{step}", _planted(gen, shapes))
        state = {"global_step": step, "log_history": [h for h in history if h["step"] <= step]}
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return base, out


def test_a_folder_of_trainer_checkpoints_is_one_step_each_with_the_trainer_log(tmp_path, gen):
    base, out = _trainer_folder(tmp_path, gen)
    run = spectra.load_run(import_run(str(base), [str(out)], tmp_path / "runs", "trl"))
    assert run.steps == [2, 4]
    assert run.config["method"] == "full"
    assert list(run.metrics["step"]) == [1, 2, 3, 4]
    assert list(run.rewards["reward"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_verl_and_openrlhf_layouts_are_found(tmp_path, gen):
    base = _tiny_llama(tmp_path / "base", shard=None)
    shapes = {k.removesuffix(".weight"): tuple(v.shape) for k, v in _tensors(base).items() if v.ndim == 2}
    verl = tmp_path / "verl"
    _copy_with(base, verl / "global_step_10" / "actor" / "huggingface", _planted(gen, shapes))
    (verl / "global_step_20" / "actor").mkdir(parents=True)  # FSDP shards not merged yet
    found = find_snapshots([str(verl)])
    assert [(s.step, s.path.name) for s in found.snapshots] == [(10, "huggingface")]
    assert "verl.model_merger" in found.skipped[0][1]
    openrlhf = tmp_path / "openrlhf"
    _copy_with(base, openrlhf / "global_step5", _planted(gen, shapes))
    assert [s.step for s in find_snapshots([str(openrlhf)]).snapshots] == [5]


def test_a_checkpoint_missing_a_shard_is_skipped_and_the_others_imported(tmp_path, gen):
    base, out = _trainer_folder(tmp_path, gen)
    broken = out / "checkpoint-3"
    broken.mkdir()
    (broken / "config.json").write_text((base / "config.json").read_text())
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(SourceWarning, match="missing"):
        run_dir = import_run(str(base), [str(out)], tmp_path / "runs", "trl")
    run = spectra.load_run(run_dir)
    assert run.steps == [2, 4]
    assert run.config["imported"]["skipped"][0]["path"].endswith("checkpoint-3")


def test_several_sources_are_one_step_each_in_the_order_given(pair, tmp_path, gen):
    base, other = pair
    shapes = {k: tuple(v.shape) for k, v in _tensors(base).items()}
    third = _copy_with(base, tmp_path / "rl2", {m: torch.zeros(shapes[f"{m}.weight"]) for m in PLANTED})
    run = spectra.load_run(import_run(str(base), [str(other), str(third)], tmp_path / "runs", "two", step=5))
    assert run.steps == [5, 6]
    assert run.delta(6, PLANTED[0]).to_dense().abs().max() == 0


def test_different_architectures_name_the_first_tensor_that_differs(tmp_path):
    base = _tiny_llama(tmp_path / "base")
    other = tmp_path / "other"
    other.mkdir()
    tensors = _tensors(base)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    save_file(tensors, other / "model.safetensors")
    (other / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \[8, 8\]"):
        import_run(str(base), [str(other)], tmp_path / "runs", "x")
    assert not (tmp_path / "runs" / "x").exists()


def test_tensors_in_one_model_only_warn_and_strict_refuses(pair, tmp_path):
    base, other = pair
    tensors = _tensors(other)
    tensors["extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, other / "model.safetensors")
    with pytest.warns(SourceWarning, match=r"extra\.weight \(SOURCE only\)"):
        import_run(str(base), [str(other)], tmp_path / "runs", "loose")
    with pytest.raises(SourceError, match="--strict"):
        import_run(str(base), [str(other)], tmp_path / "runs", "strict", strict=True)
    assert not (tmp_path / "runs" / "strict").exists()


def test_the_same_import_again_is_a_no_op_and_another_into_its_name_is_refused(pair, tmp_path):
    base, other = pair
    run_dir = import_run(str(base), [str(other)], tmp_path / "runs", "rl")
    delta = run_dir / "deltas" / "step_000001.h5"
    mtime = delta.stat().st_mtime_ns
    assert import_run(str(base), [str(other)], tmp_path / "runs", "rl") == run_dir
    assert delta.stat().st_mtime_ns == mtime
    with pytest.raises(SourceError, match="already holds another run"):
        import_run(str(base), [str(other)], tmp_path / "runs", "rl", step=3)


def test_an_import_killed_midway_leaves_nothing_that_reads_as_a_run(pair, tmp_path, monkeypatch):
    base, other = pair
    from spectra.train.importing import pair as pair_module

    def killed(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr("spectra.train.importing.run.pair_updates", killed)
    with pytest.raises(KeyboardInterrupt):
        import_run(str(base), [str(other)], tmp_path / "runs", "rl")
    assert list((tmp_path / "runs").iterdir()) == []
    monkeypatch.setattr("spectra.train.importing.run.pair_updates", pair_module.pair_updates)
    assert spectra.load_run(import_run(str(base), [str(other)], tmp_path / "runs", "rl")).steps == [1]


def test_non_finite_values_flag_their_module_not_the_run(pair, tmp_path):
    base, other = pair
    tensors = _tensors(other)
    w = tensors[f"{PLANTED[0]}.weight"].clone()
    w[0, 0] = float("nan")
    tensors[f"{PLANTED[0]}.weight"] = w
    save_file(tensors, other / "model.safetensors")
    table = spectra.load_run(import_run(str(base), [str(other)], tmp_path / "runs", "nan")).analyze()
    rows = table.set_index("module")
    assert rows.loc[PLANTED[0], "status"] != "ok"
    assert rows.loc[PLANTED[1], "status"] == "ok"


def test_rows_are_read_in_blocks_without_loading_the_tensor(pair):
    base, _ = pair
    files = ModelFiles(base)
    name = "model.embed_tokens.weight"
    whole = _tensors(base)[name]
    assert torch.equal(files.rows(name, 3, 7), whole[3:7])
    assert torch.equal(files.get(name), whole)


def test_the_command_line_imports_and_says_what_to_run_next(pair, tmp_path):
    base, other = pair
    result = CliRunner().invoke(
        app, ["import", str(base), str(other), "--out", str(tmp_path), "--name", "cli"]
    )
    assert result.exit_code == 0, result.output
    assert "run written to" in result.output and "spectra analyze" in result.output
    again = CliRunner().invoke(
        app, ["import", str(base), str(other), "--out", str(tmp_path), "--name", "cli"]
    )
    assert again.exit_code == 0 and "already imported, nothing to do" in again.output
    bad = CliRunner().invoke(app, ["import", str(base), str(tmp_path / "nowhere")])
    assert bad.exit_code != 0
    assert bad.output.strip().count("\n") == 0 and "nowhere" in bad.output


def test_a_warning_free_import_of_an_identical_model_is_all_zero(tmp_path):
    base = _tiny_llama(tmp_path / "base", shard=None)
    same = _copy_with(base, tmp_path / "same", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", SourceWarning)
        run = spectra.load_run(import_run(str(base), [str(same)], tmp_path / "runs", "same"))
    assert all(run.delta(1, m).to_dense().abs().max() == 0 for m in run.modules if "proj" in m)


@pytest.fixture(scope="module")
def trained(organism_dir, tmp_path_factory):
    """spectra's own runs (LoRA, full fine-tuning), three steps: their trainer checkpoints are a TRL output
    folder (checkpoint-2, checkpoint-3) to import, and their recorded ΔW the reference."""
    from spectra.train.config import TrainConfig
    from spectra.train.trainer import prepare

    mp = pytest.MonkeyPatch()
    mp.setattr(
        "spectra.train.rewards.accuracy_reward",
        lambda completions, **kw: [len(str(c)) % 3 for c in completions],
    )
    out = tmp_path_factory.mktemp("trained")
    runs = {}
    for method in ("lora", "full"):
        cfg = TrainConfig(
            model=str(organism_dir), method=method, rank=4, alpha=8, dropout=0.0, num_generations=4,
            batch_size=2, max_steps=3, max_completion_length=24, lr=1e-2, delta_every=2, eval_every=0,
            monitor_every=0, precision="fp32", out=str(out), name=method,
        )  # fmt: skip
        session = prepare(cfg)
        session.train()
        runs[method] = session
    mp.undo()
    return runs


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_trl_checkpoint_folder_imports_the_recorded_updates(method, trained, organism_dir, tmp_path):
    session = trained[method]
    recorded = spectra.load_run(session.run_dir)
    imported = spectra.load_run(
        import_run(str(organism_dir), [str(session.run_dir / "checkpoints")], tmp_path, method)
    )
    assert imported.steps == [2, 3]
    assert imported.config["method"] == method
    assert set(recorded.modules) <= set(imported.modules)
    for step in imported.steps:
        for module in recorded.modules:
            want = recorded.delta(step, module).to_dense()
            got = imported.delta(step, module).to_dense()
            torch.testing.assert_close(got, want, atol=1e-6 * max(1.0, float(want.abs().max())), rtol=0)
    assert "reward" in imported.metrics.columns  # TRL's log, from trainer_state.json


def test_an_imported_pair_evaluates_as_the_model_it_came_from(trained, organism_dir, tmp_path):
    import shutil

    from spectra.train.eval.run_model import load_target, resolve_target

    # outside its run folder, the checkpoint is just a model (inside, `spectra eval` reads it as the run)
    ckpt = shutil.copytree(trained["full"].run_dir / "checkpoints" / "checkpoint-3", tmp_path / "rl")
    run_dir = import_run(str(organism_dir), [str(ckpt)], tmp_path, "pair")
    tokenizer, model, weights = load_target(resolve_target(str(run_dir)), 1, torch.float32)
    assert weights.complete
    _, direct, _ = load_target(resolve_target(str(ckpt)), None, torch.float32)
    batch = tokenizer(["12+34=", "705+296="], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, direct(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "w0", "wt", "stored"),
    [
        (torch.bfloat16, 1.0, 1.0078125, torch.bfloat16),  # one bf16 ulp: bf16 holds it
        (torch.bfloat16, 1.0, 512.0, torch.float32),  # 511 needs nine significant bits, bf16 has eight
        (torch.float32, 1.0, 1.0 + 2**-23, torch.bfloat16),  # 2⁻²³ is a power of two
        (torch.float32, 2**-30, 1.0 + 2**-23, torch.float64),  # float32 cannot hold 1 + 2⁻²³ − 2⁻³⁰
        (torch.bfloat16, 2**-16, 1.0, torch.float32),  # exponents 16 apart, the difference still exact
        (torch.bfloat16, 2**-30, 1.0078125, torch.float64),  # 31 significant bits: float32 rounds
        (torch.bfloat16, -(2.0**127), 2.0**127, torch.float64),  # 2¹²⁸ overflows float32, not float64
    ],
)
def test_each_difference_is_exact_and_stored_in_the_narrowest_type_that_holds_it(
    dtype, w0, wt, stored, tmp_path
):
    from spectra.train.importing.pair import exact_difference

    for folder, value in (("base", w0), ("other", wt)):
        (tmp_path / folder).mkdir()
        t = torch.full((4, 3), value, dtype=torch.float64).to(dtype)
        t[0, 0] = 0.5  # an entry that does not move
        save_file({"w.weight": t}, tmp_path / folder / "model.safetensors")
    base, other = ModelFiles(tmp_path / "base"), ModelFiles(tmp_path / "other")
    d = exact_difference(base, other, "w.weight", block_bytes=12)  # one row per block
    exact = other.get("w.weight").double() - base.get("w.weight").double()
    assert d.dtype == stored
    assert torch.equal(d.double(), exact) and d[0, 0] == 0


def test_a_bad_name_or_step_is_one_line_from_python_and_the_command_line(pair, tmp_path):
    base, other = pair
    for name in ("../escape", ".hidden", "a/b"):
        with pytest.raises(SourceError, match="--name"):
            import_run(str(base), [str(other)], tmp_path / "runs", name)
    with pytest.raises(SourceError, match="--step -1"):
        import_run(str(base), [str(other)], tmp_path / "runs", "x", step=-1)
    with pytest.raises(SourceError, match=r"--out .*config\.json: not a folder"):
        import_run(str(base), [str(other)], base / "config.json", "x")
    for args in (["--name", "../escape"], ["--step", "-1"]):
        result = CliRunner().invoke(
            app, ["import", str(base), str(other), "--out", str(tmp_path / "runs"), *args]
        )
        assert result.exit_code == 1
        assert result.output.strip().count("\n") == 0 and result.output.startswith("error:"), result.output
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


def test_a_checkpoint_skipped_before_reading_is_said_not_only_recorded(tmp_path, gen):
    base, out = _trainer_folder(tmp_path, gen)
    (out / "checkpoint-3" / "actor").mkdir(parents=True)  # e.g. FSDP shards, no HF weights
    with pytest.warns(SourceWarning, match=r"checkpoint-3: skipped: no safetensors model"):
        run_dir = import_run(str(base), [str(out)], tmp_path / "runs", "trl")
    assert spectra.load_run(run_dir).steps == [2, 4]


def test_an_output_folder_with_its_final_weights_is_its_checkpoints_and_then_those(tmp_path, gen):
    """trainer.save_model(output_dir) writes the final weights beside checkpoint-N/: the checkpoints
    are not lost, and the final weights are one more step where trainer_state.json says which."""
    base, out = _trainer_folder(tmp_path, gen)
    for f in (out / "checkpoint-4").iterdir():
        if f.name != "trainer_state.json":
            (out / f.name).write_bytes(f.read_bytes())
    found = find_snapshots([str(out)])
    assert [s.step for s in found.snapshots] == [2, 4]
    assert found.skipped and found.skipped[0][0] == str(out)
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    found = find_snapshots([str(out)])
    assert [(s.step, s.path) for s in found.snapshots][-1] == (5, out)
    assert spectra.load_run(import_run(str(base), [str(out)], tmp_path / "runs", "trl")).steps == [2, 4, 5]


def test_a_tensor_widens_to_float32_when_a_later_block_needs_it(tmp_path):
    from spectra.train.importing.pair import exact_difference

    w0 = torch.ones(5, 3, dtype=torch.bfloat16)
    wt = w0.clone()
    wt[1, 1] = 1.0078125  # rows 0–3 move by at most one bf16 ulp: bf16 holds their ΔW
    wt[4, 2] = 512.0  # row 4's ΔW, 511, needs nine significant bits
    for folder, t in (("base", w0), ("other", wt)):
        (tmp_path / folder).mkdir()
        save_file({"w.weight": t}, tmp_path / folder / "model.safetensors")
    base, other = ModelFiles(tmp_path / "base"), ModelFiles(tmp_path / "other")
    d = exact_difference(base, other, "w.weight", block_bytes=6)  # one row per block
    assert d.dtype == torch.float32
    assert torch.equal(d.double(), wt.double() - w0.double())


def test_the_exponent_gap_test_passes_only_differences_that_float32_holds():
    """``_exponents_close`` lets a bf16 block skip TwoSum: wherever it says yes, fl₃₂(a − b) must be
    a − b exactly (float64 holds every difference of two bf16 values within 2⁴⁴ of each other, and
    finite bf16 values here are drawn so); checked entry by entry on random bit patterns, every
    sign, exponent and fraction, zeros and subnormals included."""
    from spectra.train.importing.pair import _exponents_close

    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**15), 2**15, (2, 200_000), generator=gen, dtype=torch.int32)
    a, b = (x.to(torch.int16).view(torch.bfloat16) for x in bits)
    exponent_a, exponent_b = ((x.view(torch.int16).int() >> 7) & 0xFF for x in (a, b))
    finite = (exponent_a < 255) & (exponent_b < 255)
    s1, s2 = torch.empty(1, dtype=torch.float32), torch.empty(1, dtype=torch.float32)
    said_close = inexact = 0
    for i in torch.nonzero(finite).flatten()[:100_000].tolist():
        x, y = a[i : i + 1], b[i : i + 1]
        close = _exponents_close(x, y, s1, s2)
        exact = (x.float() - y.float()).double() == x.double() - y.double()
        assert exact or not close, (x.item(), y.item())
        said_close += close
        inexact += not bool(exact)
    assert said_close > 5_000 and inexact > 5_000  # both sides of the test were exercised
    assert not _exponents_close(a[:4].half(), b[:4].half(), s1, s2)  # fp16: TwoSum decides
