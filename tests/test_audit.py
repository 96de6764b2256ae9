"""``spectra audit``: one case per finding, each built to have it, and a clean adapter that has none.

Adapters are made by PEFT on a tiny Llama (3 layers, float32 safetensors) and saved as a user's script
would save them; runs are written with :class:`spectra.RunWriter` with known records. Every case asserts
the finding's level and check, and the modules it names.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _requires import require
from safetensors.torch import load_file, save_file
from spectra.cli.main import app
from spectra.train.audit import Finding, audit, has_errors, to_json
from spectra.train.importing.errors import SourceError
from typer.testing import CliRunner

from spectra import RunWriter
from spectra.operators import LowRank

peft = require("peft")
transformers = require("transformers")

Q = "model.layers.{}.self_attn.q_proj"
V = "model.layers.{}.self_attn.v_proj"
LAYERS = 3


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama: 3 layers, q 32×32, v 16×32, float32 safetensors."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("audit") / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _model(base_dir: Path):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def _adapter(base_dir: Path, out: Path, config, train: bool = True, scale: float = 0.05) -> Path:
    """PEFT's adapter on the base, its trainable parameters moved by seeded noise (``train``), saved."""
    model = peft.get_peft_model(_model(base_dir), config)
    if train:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def _lora(**kw):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def _by(findings: list[Finding], check: str, level: str | None = None) -> list[Finding]:
    return [f for f in findings if f.check == check and (level is None or f.level == level)]


def _all(fmt: str) -> set[str]:
    return {fmt.format(i) for i in range(LAYERS)}


def test_clean_adapter_has_no_error(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "clean", _lora(lora_dropout=0.0))
    subject, findings = audit(folder)
    assert subject.kind == "adapter" and subject.found_method == "lora" and len(subject.modules) == 2 * LAYERS
    assert not has_errors(findings), findings
    assert not [f for f in findings if f.level == "warning"], findings
    result = CliRunner().invoke(app, ["audit", str(folder)])
    assert result.exit_code == 0, result.output
    assert "6 adapted modules" in result.output


def test_lora_alpha_zero_is_a_dead_adapter(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "alpha0", _lora(lora_alpha=0))
    _, findings = audit(folder)
    (dead,) = _by(findings, "dead", "error")
    assert "scale 0" in dead.evidence and set(dead.modules) == _all(Q) | _all(V)
    result = CliRunner().invoke(app, ["audit", str(folder)])
    assert result.exit_code == 1 and "lora_alpha" in result.output


def test_b_still_zero_is_a_dead_adapter(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "untrained", _lora(), train=False)
    _, findings = audit(folder)
    (dead,) = _by(findings, "dead", "error")
    assert "lora_B is still exactly 0" in dead.evidence and len(dead.modules) == 2 * LAYERS
    assert not _by(findings, "bf16"), "an update that is 0 is dead, not lost to bf16"


def test_adalora_never_reallocated(base_dir, tmp_path):
    config = peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=20, tinit=2, tfinal=2, target_modules=["q_proj"]
    )
    folder = _adapter(base_dir, tmp_path / "adalora", config)
    assert json.loads((folder / "adapter_config.json").read_text()).get("rank_pattern") is None
    _, findings = audit(folder)
    (ada,) = _by(findings, "adalora", "error")
    assert "update_and_allocate" in ada.evidence and set(ada.modules) == _all(Q)


def test_adalora_reallocated_is_not_flagged(base_dir, tmp_path):
    config = peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=20, tinit=2, tfinal=2, target_modules=["q_proj"]
    )
    folder = _adapter(base_dir, tmp_path / "adalora", config)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {f"{Q.format(i)}.lora_E": [True, False, True, True] for i in range(LAYERS)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(folder / "adapter_model.safetensors")  # PEFT saves the kept triplets only
    keep = torch.tensor([True, False, True, True])
    for key in list(tensors):
        if key.endswith(("lora_A", "lora_E")):
            tensors[key] = tensors[key][keep].contiguous()
        elif key.endswith("lora_B"):
            tensors[key] = tensors[key][:, keep].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    _, findings = audit(folder)
    assert not _by(findings, "adalora")


def test_dora_asked_plain_lora_found(base_dir, tmp_path):
    ckpt = tmp_path / "out" / "checkpoint-10"
    _adapter(base_dir, ckpt, _lora())
    (tmp_path / "out" / "run.json").write_text(json.dumps({"method": "dora", "rank": 4}))
    subject, findings = audit(ckpt)
    assert subject.kind == "checkpoint" and subject.asked.method == "dora"
    (wrong,) = _by(findings, "method", "error")
    assert "asked dora" in wrong.evidence and "magnitude" in wrong.evidence
    # the same request given on the command line, for an adapter with no configuration beside it
    bare = _adapter(base_dir, tmp_path / "bare", _lora())
    _, findings = audit(bare, method="dora")
    assert _by(findings, "method", "error")
    _, findings = audit(bare, method="lora")
    assert not _by(findings, "method")


def test_targets_asked_vs_adapted(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "targets", _lora())
    _, findings = audit(folder, targets=["q_proj", "k_proj"])
    (missing,) = _by(findings, "targets", "error")
    assert set(missing.modules) == {f"model.layers.{i}.self_attn.k_proj" for i in range(LAYERS)}
    (extra,) = _by(findings, "targets", "warning")
    assert set(extra.modules) == _all(V)


def test_frozen_weight_nudged_in_a_full_checkpoint(base_dir, tmp_path):
    ckpt = _adapter(base_dir, tmp_path / "checkpoint-5", _lora(lora_dropout=0.0))
    model = _model(base_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    model.save_pretrained(ckpt, safe_serialization=True)  # the full weights beside the adapter
    subject, findings = audit(ckpt)
    (frozen,) = _by(findings, "frozen", "error")
    assert frozen.modules == ("model.layers.1.mlp.down_proj.weight",)
    assert subject.frozen_checked > 10  # every tensor outside the adapter was compared
    # an untouched copy beside the adapter is not a finding
    _model(base_dir).save_pretrained(ckpt, safe_serialization=True)
    _, findings = audit(ckpt)
    assert not _by(findings, "frozen")


def _trainer_state(folder: Path, rows: list[dict]) -> None:
    history = [{"step": i + 1, **row} for i, row in enumerate(rows)]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": len(rows), "log_history": history}))


def test_no_learning_signal_and_dropout_under_a_foreign_grpo(base_dir, tmp_path):
    ckpt = _adapter(base_dir, tmp_path / "checkpoint-3", _lora(lora_dropout=0.05))
    _trainer_state(ckpt, [{"frac_reward_zero_std": 1.0, "reward": 0.0, "loss": 0.0}] * 3)
    _, findings = audit(ckpt)
    (signal,) = _by(findings, "learning_signal", "error")
    assert "every advantage is 0" in signal.evidence and "too hard" in signal.evidence
    (dropout,) = _by(findings, "dropout", "warning")
    assert "0.05" in dropout.evidence
    # truncation named as the cause when every completion was clipped
    _trainer_state(ckpt, [{"frac_reward_zero_std": 1.0, "reward": 0.0, "completions/clipped_ratio": 1.0}] * 3)
    _, findings = audit(ckpt)
    assert "max_completion_length" in _by(findings, "learning_signal", "error")[0].evidence
    # one step with a signal: no finding
    _trainer_state(ckpt, [{"frac_reward_zero_std": 1.0, "reward": 0.0}, {"frac_reward_zero_std": 0.5}])
    _, findings = audit(ckpt)
    assert not _by(findings, "learning_signal")


def test_folder_of_checkpoints_that_did_not_change(base_dir, tmp_path):
    out = tmp_path / "grpo-out"
    first = _adapter(base_dir, out / "checkpoint-1", _lora(lora_dropout=0.0))
    shutil.copytree(first, out / "checkpoint-2")
    (out / "training_args.json").write_text("not json")  # a file of that name that is no request
    subject, findings = audit(out)
    assert subject.kind == "checkpoint" and subject.steps == [1, 2]
    (still,) = _by(findings, "dead", "warning")
    assert len(still.modules) == 2 * LAYERS and "received no gradient" in still.evidence
    _adapter(base_dir, out / "checkpoint-2", _lora(lora_dropout=0.0), scale=0.1)
    _, findings = audit(out)
    assert not _by(findings, "dead")


def test_outlier_module(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "outlier", _lora(lora_dropout=0.0))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = f"base_model.model.{Q.format(2)}.lora_B.weight"
    tensors[key] = tensors[key] * 200
    save_file(tensors, folder / "adapter_model.safetensors")
    _, findings = audit(folder)
    (out,) = _by(findings, "outlier")
    assert out.level == "warning" and out.modules == (Q.format(2),)


# ---------------------------------------------------------------------------------------------- runs


def _run(path: Path, records: dict[int, dict[str, LowRank]], w0: dict[str, torch.Tensor], **config) -> Path:
    writer = RunWriter(path)
    writer.write_config({"name": path.name, "method": "lora", **config})
    writer.write_base_weights(w0)
    for step, modules in records.items():
        writer.write_delta(step, modules)
    return path


def _w0(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {Q.format(i): 0.02 * torch.randn(16, 8, generator=g) for i in range(n)}


def _factors(seed: int, scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(16, 2, generator=g), scale * torch.randn(2, 8, generator=g)


def test_run_dora_asked_lowrank_recorded_and_dead_modules(tmp_path):
    w0 = _w0()
    step1 = {m: LowRank(*_factors(i), scale=2.0) for i, m in enumerate(w0)}
    step2 = {m: LowRank(*_factors(10 + i), scale=2.0) for i, m in enumerate(w0)}
    step2[Q.format(0)] = LowRank(torch.zeros(16, 2), _factors(0)[1], scale=2.0)  # B never moved
    step2[Q.format(1)] = step1[Q.format(1)]  # nothing changed between the records
    run = _run(tmp_path / "run", {1: step1, 2: step2}, w0, method="dora")
    _, findings = audit(run)
    assert "records of form lowrank" in _by(findings, "method", "error")[0].evidence
    (dead,) = _by(findings, "dead", "error")
    assert dead.modules == (Q.format(0),)
    (still,) = _by(findings, "dead", "warning")
    assert still.modules == (Q.format(1),) and "step 1 and 2" in still.evidence


def test_run_adalora_masks_never_changed(tmp_path):
    w0 = _w0()
    mid = torch.tensor([0.5, 0.25])
    recs = {
        s: {m: LowRank(*_factors(s + i), mid=mid * s, scale=1.0) for i, m in enumerate(w0)} for s in (1, 2)
    }
    run = _run(tmp_path / "ada", recs, w0, method="adalora")
    _, findings = audit(run)
    assert set(_by(findings, "adalora", "error")[0].modules) == set(w0)
    recs[2][Q.format(0)] = LowRank(*_factors(2), mid=torch.tensor([0.5, 0.0]), scale=1.0)  # one pruned
    run = _run(tmp_path / "ada2", recs, w0, method="adalora")
    _, findings = audit(run)
    assert not _by(findings, "adalora")


def test_run_update_lost_in_bf16_and_no_signal(tmp_path):
    w0 = _w0()
    recs = {1: {m: LowRank(*_factors(i, scale=1e-5), scale=1.0) for i, m in enumerate(w0)}}
    run = _run(tmp_path / "tiny", recs, w0)
    for step in (1, 2, 3):
        RunWriter(run).append_metrics({"step": step, "reward": 1.0, "frac_reward_zero_std": 1.0})
    _, findings = audit(run)
    (lost,) = _by(findings, "bf16", "error")
    assert "bf16_sparsity = 1" in lost.evidence and set(lost.modules) == set(w0)
    (signal,) = _by(findings, "learning_signal", "error")
    assert "metrics.jsonl" in signal.evidence and "too easy" in signal.evidence
    assert not _by(findings, "dropout"), "spectra's own trainer samples without dropout"


def test_run_of_a_users_grpo_script_targets_and_dropout(base_dir, tmp_path):
    w0 = {m: t for m, t in _w0(LAYERS).items()}
    recs = {1: {m: LowRank(*_factors(i), scale=2.0) for i, m in enumerate(w0)}}
    config = {"target_modules": ["q_proj", "v_proj"], "model_path": str(base_dir), "dropout": 0.05}
    run = _run(tmp_path / "cb", recs, w0, recorded_by="SpectraCallback", trainer="GRPOTrainer", **config)
    RunWriter(run).append_metrics({"step": 1, "reward": 0.5, "frac_reward_zero_std": 0.25})
    _, findings = audit(run)
    (missing,) = _by(findings, "targets", "error")
    assert set(missing.modules) == _all(V)
    assert _by(findings, "dropout", "warning") and not _by(findings, "learning_signal")
    spectra_own = _run(tmp_path / "own", recs, w0, trainer="GRPOTrainer", **config)
    _, findings = audit(spectra_own)
    assert not _by(findings, "dropout"), "spectra's own trainer samples without dropout"


# ------------------------------------------------------------------------------ report, CLI, bad input


def test_json_report_and_exit_codes(base_dir, tmp_path):
    folder = _adapter(base_dir, tmp_path / "untrained", _lora(), train=False)
    result = CliRunner().invoke(app, ["audit", str(folder), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["format"] == "spectra-audit/1" and report["ok"] is False
    assert report["target"]["kind"] == "adapter" and report["target"]["method_found"] == "lora"
    assert report["counts"]["error"] == sum(f["level"] == "error" for f in report["findings"]) >= 1
    first = report["findings"][0]
    assert set(first) == {"level", "check", "evidence", "modules"} and first["level"] == "error"
    assert len(first["modules"]) == 2 * LAYERS  # every module in JSON, not the table's abbreviation
    assert to_json([], {"path": "x"})["ok"] is True


def test_bad_targets_are_one_line(base_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such folder" in result.output and "Traceback" not in result.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["audit", str(tmp_path / "junk")])
    assert result.exit_code == 2 and "expected a run directory" in result.output.replace("\n", " ")
    folder = _adapter(base_dir, tmp_path / "orphan", _lora())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="pass --base PATH"):
        audit(folder)
    result = runner.invoke(app, ["audit", str(folder)])
    assert result.exit_code == 2 and "--base" in result.output
    subject, _ = audit(folder, base=str(base_dir))  # given BASE, it is read
    assert len(subject.modules) == 2 * LAYERS and all(math.isfinite(m.relative) for m in subject.modules)


def test_a_sparse_update_of_a_bf16_model_is_not_lost_to_bf16(tmp_path):
    """An imported bf16 RL pair leaves most entries exactly unchanged (sparsity_in_rl's 70-95 %) and
    changes the rest by bf16-representable steps: nothing is lost, so no bf16 finding; a dense update
    below bf16's resolution still is one."""
    from spectra.operators import Dense

    w0 = {m: w.to(torch.bfloat16).float() for m, w in _w0().items()}
    g = torch.Generator().manual_seed(3)
    recs = {}
    for m, w in w0.items():
        changed = torch.rand(w.shape, generator=g) < 0.05
        new = torch.where(changed, (w * 1.5).to(torch.bfloat16).float(), w)
        recs[m] = Dense((new.double() - w.double()).float())
    _, findings = audit(_run(tmp_path / "pair", {1: recs}, w0, method="full"))
    assert not _by(findings, "bf16"), [f.evidence for f in findings]
    tiny = {
        m: Dense(torch.where(torch.rand(w.shape, generator=g) < 0.05, w * 1e-5, 0 * w)) for m, w in w0.items()
    }
    (lost,) = _by(audit(_run(tmp_path / "tiny", {1: tiny}, w0, method="full"))[1], "bf16", "error")
    assert set(lost.modules) == set(w0)


def test_full_fine_tuning_with_some_tensors_unchanged_warns_and_all_unchanged_is_an_error(tmp_path):
    """A public bf16 RL pair often leaves its norms exactly unchanged (updates below bf16's resolution)."""
    from spectra.operators import Dense

    w0 = _w0()
    moved = {m: Dense(0.01 * w) for m, w in w0.items()}
    moved[Q.format(0)] = Dense(torch.zeros_like(w0[Q.format(0)]))
    _, findings = audit(_run(tmp_path / "some", {1: moved}, w0, method="full"))
    (frozen,) = _by(findings, "dead")
    assert frozen.level == "warning" and frozen.modules == (Q.format(0),)
    none = {m: Dense(torch.zeros_like(w)) for m, w in w0.items()}
    (dead,) = _by(audit(_run(tmp_path / "none", {1: none}, w0, method="full"))[1], "dead")
    assert dead.level == "error" and set(dead.modules) == set(w0)


def test_an_output_folder_with_its_final_adapter_reads_its_checkpoints_and_their_log(base_dir, tmp_path):
    """TRL's scripts end with trainer.save_model(output_dir): the final adapter sits beside checkpoint-N/,
    whose trainer_state.json holds the log; the audit reads both (the log's no-signal finding included)."""
    out = tmp_path / "grpo-out"
    ckpt = _adapter(base_dir, out / "checkpoint-2", _lora(lora_dropout=0.0))
    _trainer_state(ckpt, [{"frac_reward_zero_std": 1.0, "reward": 0.0}] * 2)
    for f in ckpt.iterdir():
        if f.name != "trainer_state.json":
            shutil.copy(f, out / f.name)
    subject, findings = audit(out)
    assert subject.kind == "checkpoint" and subject.steps == [2] and subject.global_step == 2
    assert _by(findings, "learning_signal", "error")
    _adapter(base_dir, out, _lora(lora_dropout=0.0), scale=0.1)  # trained on after the last checkpoint
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    subject, findings = audit(out)
    assert subject.steps == [2, 3] and not _by(findings, "dead")
