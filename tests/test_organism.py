"""The embedded model organism: task, tokenizer, build → load → generate, cache, atomicity, determinism,
and maturity (the model ids organism, organism@N and random-organism)."""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from _requires import require

require("transformers")
import torch
from safetensors.torch import load_file
from spectra.train.checkpoint import find_model_dir, load_pretrained
from spectra.train.config import ORGANISM_SFT_STEPS, TrainConfigError
from spectra.train.organism import (
    CARRY_DROP,
    DEFAULT_SFT_STEPS,
    MAX_COMPLETION_TOKENS,
    ORGANISM_VERSION,
    build_organism,
    cache_dir,
    organism_problems,
    organism_prompt,
)
from spectra.train.organism import cache as org_cache
from spectra.train.organism import model as org_model
from spectra.train.organism import task as org_task
from spectra.train.rewards import last_boxed
from transformers import AutoModelForCausalLM, AutoTokenizer

QUICK = 20  # SFT steps of the quick, low-quality organisms built by these tests
SMALL_EVAL = {"test_problems": 8, "samples": 2, "greedy_problems": 8}


def _pair(problem: str) -> frozenset[int]:
    a, b = problem.split("+")
    return frozenset((int(a), int(b)))


@pytest.fixture
def small_eval(monkeypatch):
    """Measure accuracy on a handful of problems only: these organisms are for plumbing, not quality."""
    monkeypatch.setattr(org_model, "EVAL_CONFIG", SMALL_EVAL)


@pytest.fixture(scope="module")
def quick_organism(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(org_model, "EVAL_CONFIG", SMALL_EVAL)
        return build_organism(seed=0, root=tmp_path_factory.mktemp("cache"), sft_steps=QUICK)


# ------------------------------------------------------------------------------------------------ task


def test_problems_are_correct_and_well_formed():
    for split in ("train", "test"):
        rows = organism_problems(split, 300)
        assert len(rows) == 300
        assert len({r["problem"] for r in rows}) == 300  # distinct
        for r in rows:
            assert set(r) == {"problem", "answer", "prompt", "solution"}
            a, b = map(int, r["problem"].split("+"))
            assert 100 <= a <= 999 and 100 <= b <= 999
            assert r["answer"] == str(a + b)
            assert r["prompt"] == organism_prompt(r["problem"]) == f"{a}+{b}="
            assert r["solution"].endswith("\\boxed{" + r["answer"] + "}")
            assert last_boxed(r["solution"]) == r["answer"]
            assert len(r["solution"]) + 1 <= MAX_COMPLETION_TOKENS  # + <eos>


def test_trace_adds_column_by_column():
    assert org_task.solution(347, 588)[0] == "7+8=15,4+8+1=13,3+5+1=9,\\boxed{935}"
    assert org_task.solution(947, 588)[0] == "7+8=15,4+8+1=13,9+5+1=15,\\boxed{1535}"
    assert org_task.solution(123, 456)[0] == "3+6=9,2+5=7,1+4=5,\\boxed{579}"
    # Every step of every trace is a true equation, and a carry is written exactly when one is due.
    for r in organism_problems("test", 200):
        steps = r["solution"].split(",")[:-1]
        carry = 0
        for step in steps:
            lhs, rhs = step.split("=")
            terms = list(map(int, lhs.split("+")))
            assert sum(terms) == int(rhs)
            assert len(terms) == 2 + carry
            carry = int(rhs) // 10


def test_forgetting_a_carry_is_the_only_error():
    # Dropped carries change the answer exactly when there was a carry to drop.
    assert org_task.solution(347, 588, [True] * 3) == ("7+8=15,4+8=12,3+5=8,\\boxed{825}", 825)
    assert org_task.solution(123, 456, [True] * 3) == (org_task.solution(123, 456)[0], 579)
    assert org_task.solution(947, 588, [False, False, True]) == (
        "7+8=15,4+8+1=13,9+5=14,\\boxed{1435}",
        1435,
    )


def test_splits_are_disjoint_fixed_and_seeded():
    train = organism_problems("train", 5000)
    test = organism_problems("test")
    assert len(test) == org_task.DEFAULT_N["test"]
    assert not {_pair(r["problem"]) for r in train} & {_pair(r["problem"]) for r in test}
    # The split is a property of the unordered pair, so b+a of a test problem is never a train problem.
    for r in test[:50]:
        a, b = map(int, r["problem"].split("+"))
        assert org_task.split_of(a, b) == org_task.split_of(b, a) == "test"
    # Deterministic, prefix-stable in n, and different for a different seed.
    assert organism_problems("test", 64) == test[:64]
    assert organism_problems("train", 100, seed=0) == train[:100]
    assert organism_problems("train", 100, seed=1) != train[:100]
    # About 10 % of the pairs are held out.
    shares = [org_task.split_of(a, b) == "test" for a in range(100, 1000, 7) for b in range(100, 1000, 11)]
    assert 0.08 < sum(shares) / len(shares) < 0.12


def test_problem_arguments_are_validated():
    with pytest.raises(ValueError, match="split"):
        organism_problems("valid", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n"):
        organism_problems("train", -1)
    assert organism_problems("test", 0) == []


def test_tokenizer_round_trip_is_exact():
    tok = org_model.make_tokenizer()
    texts = [r["prompt"] + r["solution"] for r in organism_problems("test", 50)]
    texts += [string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""), "a  b\n\n\tc ", ""]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, nothing added (no BOS/EOS)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 3
    assert tok.bos_token_id is None


def test_tokenizer_batch_decode_skips_padding_and_eos():
    tok = org_model.make_tokenizer()
    assert tok.padding_side == "left"
    enc = tok(["1+2=", "347+588="], return_tensors="pt", padding=True)
    assert enc["input_ids"].shape == (2, 8)
    assert enc["input_ids"][0, :4].tolist() == [tok.pad_token_id] * 4
    assert enc["attention_mask"][0].tolist() == [0] * 4 + [1] * 4
    completion = "7+8=15,\\boxed{15}"
    ids = [tok.pad_token_id, *tok.encode(completion), tok.eos_token_id, tok.pad_token_id]
    assert tok.batch_decode([ids], skip_special_tokens=True) == [completion]


# --------------------------------------------------------------------------------- build, load, generate


def test_build_writes_a_loadable_safetensors_directory(quick_organism):
    path = quick_organism
    assert path.name == f"organism-v{ORGANISM_VERSION}-seed0-sft{QUICK}"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if re.search(r"\.(bin|pt|pth|pkl|pickle)$", n)]
    meta = json.loads((path / "organism.json").read_text())
    assert meta["version"] == ORGANISM_VERSION and meta["seed"] == 0 and meta["sft_steps"] == QUICK
    assert 0.0 <= meta["accuracy"]["sampled_t1"] <= 1.0 and 0.0 <= meta["accuracy"]["greedy"] <= 1.0
    assert meta["config"]["model"]["hidden_size"] == 128
    # No temporary directories are left behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_loads_through_auto_classes_with_matching_special_tokens(quick_organism):
    model = AutoModelForCausalLM.from_pretrained(quick_organism)
    tok = AutoTokenizer.from_pretrained(quick_organism)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert tok.padding_side == "left"
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert model.config.vocab_size == len(tok)
    # All seven projection kinds exist, with dims that factor into small primes.
    kinds = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= kinds
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == model.config.num_key_value_heads * model.config.head_dim
    text = "12+34=4+6=10,\\boxed{1}"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_generate_and_decode_completions(quick_organism):
    model = AutoModelForCausalLM.from_pretrained(quick_organism)
    tok = AutoTokenizer.from_pretrained(quick_organism)
    prompts = ["347+588=", "1+2=", "905+111="]  # different lengths: left padding
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=MAX_COMPLETION_TOKENS)
    prompt_len = enc["input_ids"].shape[1]
    assert out.shape[0] == 3 and out.shape[1] <= prompt_len + MAX_COMPLETION_TOKENS
    assert torch.equal(out[:, :prompt_len], enc["input_ids"])
    completions = tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert all(isinstance(c, str) and "<pad>" not in c and "<eos>" not in c for c in completions)
    # Left padding does not change what the model computes: greedy on a padded batch equals greedy alone.
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=12)
    alone = tok(["1+2="], return_tensors="pt")
    greedy_alone = model.generate(**alone, do_sample=False, max_new_tokens=12)
    assert torch.equal(greedy[1, prompt_len:], greedy_alone[0, alone["input_ids"].shape[1] :])


# ------------------------------------------------------------------------------------ cache and atomicity


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SPECTRA_CACHE")
    assert cache_dir() == tmp_path / "b" / "spectra"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "spectra"


def test_default_root_is_the_cache_dir(monkeypatch, tmp_path, fake_builds):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path))
    path = build_organism(seed=3, sft_steps=QUICK)
    assert fake_builds and org_cache._is_complete(path, 3, QUICK)
    assert path == tmp_path / f"organism-v{ORGANISM_VERSION}-seed3-sft{QUICK}"
    assert org_cache._name(3, DEFAULT_SFT_STEPS) == f"organism-v{ORGANISM_VERSION}-seed3"


def _fake_build(path: Path, seed: int = 0, steps: int = QUICK, complete: bool = True) -> None:
    """Stand-in for the real build: the required files, organism.json (written last) only if ``complete``."""
    for name in org_cache._REQUIRED_FILES[:-1]:
        (path / name).write_text("{}")
    if complete:
        meta = {"version": ORGANISM_VERSION, "seed": seed, "sft_steps": steps}
        (path / "organism.json").write_text(json.dumps(meta))


@pytest.fixture
def fake_builds(monkeypatch) -> list[Path]:
    """Replace the real build by :func:`_fake_build`; the list records the directories built into."""
    calls: list[Path] = []

    def fake(path: Path, seed: int, steps: int) -> None:
        calls.append(path)
        _fake_build(path, seed, steps)

    monkeypatch.setattr(org_cache, "_build", fake)
    return calls


def test_second_build_reuses_the_cache(quick_organism, monkeypatch):
    before = (quick_organism / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt an organism that was already in the cache")

    monkeypatch.setattr(org_cache, "_build", fail)
    assert build_organism(seed=0, root=quick_organism.parent, sft_steps=QUICK) == quick_organism
    assert (quick_organism / "model.safetensors").stat().st_mtime_ns == before


def test_force_rebuilds(tmp_path, fake_builds):
    calls = fake_builds
    first = build_organism(root=tmp_path, sft_steps=QUICK)
    (first / "marker").write_text("old")
    assert build_organism(root=tmp_path, sft_steps=QUICK) == first and len(calls) == 1
    assert build_organism(root=tmp_path, sft_steps=QUICK, force=True) == first and len(calls) == 2
    assert not (first / "marker").exists()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_leftover_temp_dir_is_not_a_finished_organism(tmp_path, fake_builds):
    calls = fake_builds
    name = org_cache._name(0, QUICK)
    # A killed build of another live process, and one of a dead process, both half-written.
    live = tmp_path / f"{org_cache._tmp_prefix(name)}{os.getpid()}-abc"
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"{org_cache._tmp_prefix(name)}{int(proc.stdout)}-xyz"
    for d in (live, dead):
        d.mkdir()
        _fake_build(d, complete=False)
    path = build_organism(root=tmp_path, sft_steps=QUICK)
    assert path == tmp_path / name and calls and calls[0] not in (live, dead)
    assert org_cache._is_complete(path, 0, QUICK)
    assert live.exists()  # another process's build in progress is left alone
    assert not dead.exists()  # a dead process's is cleaned up


def test_incomplete_final_dir_is_rebuilt(tmp_path, fake_builds):
    calls = fake_builds
    final = tmp_path / org_cache._name(0, QUICK)
    final.mkdir()
    _fake_build(final, complete=False)  # everything but organism.json
    assert build_organism(root=tmp_path, sft_steps=QUICK) == final
    assert len(calls) == 1 and org_cache._is_complete(final, 0, QUICK)
    # A directory from another recipe version is not mistaken for this one either.
    meta = json.loads((final / "organism.json").read_text())
    (final / "organism.json").write_text(json.dumps({**meta, "version": ORGANISM_VERSION + 1}))
    assert not org_cache._is_complete(final, 0, QUICK)


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(path, seed, steps):
        _fake_build(path, complete=False)
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(org_cache, "_build", crash)
    with pytest.raises(RuntimeError, match="killed"):
        build_organism(root=tmp_path, sft_steps=QUICK)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- determinism


def test_build_is_deterministic_and_leaves_torch_rng_alone(quick_organism, tmp_path, small_eval):
    state = torch.get_rng_state()
    again = build_organism(seed=0, root=tmp_path / "again", sft_steps=QUICK)
    assert torch.equal(torch.get_rng_state(), state)
    a, b = load_file(quick_organism / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(build_organism(seed=1, root=tmp_path / "other", sft_steps=QUICK) / "model.safetensors")
    assert not all(torch.equal(a[k], other[k]) for k in a)



# -------------------------------------------------------------------------------------------- maturity


def _fail_build(*args, **kwargs):
    raise AssertionError("rebuilt an organism that was already in the cache")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("maturity")


@pytest.fixture
def organism_cache(shared_cache, monkeypatch) -> Path:
    """``find_model_dir`` builds into a temporary cache (never ~/.cache), measuring accuracy cheaply."""
    monkeypatch.setenv("SPECTRA_CACHE", str(shared_cache))
    monkeypatch.setattr(org_model, "EVAL_CONFIG", SMALL_EVAL)
    return shared_cache


def test_model_ids_name_warm_start_lengths_of_one_cache(monkeypatch, tmp_path, fake_builds):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path))
    assert DEFAULT_SFT_STEPS == ORGANISM_SFT_STEPS  # declared once, in spectra.train.config
    name = f"organism-v{ORGANISM_VERSION}-seed0"
    assert find_model_dir("organism") == find_model_dir(f"organism@{ORGANISM_SFT_STEPS}") == tmp_path / name
    assert find_model_dir("random-organism") == find_model_dir("organism@0") == tmp_path / f"{name}-sft0"
    assert find_model_dir("organism@150") == tmp_path / f"{name}-sft150"
    assert len(fake_builds) == 3  # each length built once
    assert json.loads((tmp_path / f"{name}-sft150" / "organism.json").read_text())["sft_steps"] == 150


def test_find_model_dir_builds_and_caches_a_short_warm_start(organism_cache, monkeypatch):
    path = find_model_dir("organism@3")
    assert path == organism_cache / f"organism-v{ORGANISM_VERSION}-seed0-sft3"
    meta = json.loads((path / "organism.json").read_text())
    assert (meta["seed"], meta["sft_steps"], meta["task"]["carry_drop"]) == (0, 3, CARRY_DROP)
    assert meta["accuracy"]["test_problems"] == SMALL_EVAL["test_problems"]
    tok, model = load_pretrained(path, torch.float32, "--model organism@3")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(tok)
    monkeypatch.setattr(org_cache, "_build", _fail_build)
    assert find_model_dir("organism@3") == path  # from the cache


def test_random_organism_is_the_seeds_initialisation(organism_cache):
    path = find_model_dir("random-organism")
    meta = json.loads((path / "organism.json").read_text())
    assert (meta["sft_steps"], meta["sft"]["final_loss"]) == (0, None)
    assert meta["accuracy"]["sampled_t1"] == meta["accuracy"]["greedy"] == 0.0  # untrained: never right
    _, model = load_pretrained(path, torch.float32, "--model random-organism")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = org_model.make_model(org_model.make_tokenizer()).state_dict()
    weights = model.state_dict()
    assert weights.keys() == init.keys()
    assert all(torch.equal(weights[k], init[k]) for k in init)
    short = find_model_dir("organism@3")
    trained = AutoModelForCausalLM.from_pretrained(short).state_dict()
    assert all(not torch.equal(trained[k], init[k]) for k in init)  # three steps of AdamW move every weight
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (path / name).read_bytes() == (short / name).read_bytes()  # the same architecture


@pytest.mark.parametrize("model", ["organism@x", "organism@", "organism@-3", "organism@1.5"])
def test_malformed_organism_ids_are_one_line_errors(model, monkeypatch, tmp_path, fake_builds):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path))
    with pytest.raises(TrainConfigError, match="expected organism@N") as err:
        find_model_dir(model)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--model {model}:")
    assert not fake_builds and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_default_organism_is_half_right(tmp_path):
    """The default recipe: accuracy at temperature 1 well between zero and one (RL has a signal)."""
    path = build_organism(root=tmp_path)
    meta = json.loads((path / "organism.json").read_text())
    assert meta["sft_steps"] == DEFAULT_SFT_STEPS
    assert 0.05 < meta["accuracy"]["sampled_t1"] < 0.95
    assert 0.05 < meta["accuracy"]["greedy"] < 0.95  # greedy never writes the carry: the no-carry problems
