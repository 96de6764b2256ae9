"""`spectra eval`: the benchmark registry, scoring and Pass@k, a run's weights at a step, the command.

The model is the quickly warm-started organism saved to disk (conftest.organism_dir) and runs trained on
it for three steps; hub datasets are replaced by small files in each benchmark's own column layout,
read through the same loader (``datasets.load_dataset``) as the hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
import torch
from _requires import require

require("trl")

import datasets
from spectra.cli.main import app
from spectra.train import TrainConfig
from spectra.train.config import EvalError
from spectra.train.data import MATH_TEMPLATE
from spectra.train.eval.benchmarks import (
    BENCHMARKS,
    benchmark_name,
    encode_prompt,
    get_benchmark,
    load_problems,
)
from spectra.train.eval.config import EvalConfig
from spectra.train.eval.evaluation import Scored, score_completions
from spectra.train.eval.run import run_eval
from spectra.train.eval.run_model import DamagedStep, apply_delta, load_target, resolve_target
from spectra.train.eval.sampling import (
    Sampling,
    SeededSampling,
    VLLMSampler,
    choose_backend,
    row_seed,
    sample_completions,
)
from spectra.train.trainer import prepare
from typer.testing import CliRunner

import spectra
from spectra.figures import eval_series

runner = CliRunner()

# One row per registered benchmark in the column layout (and value types) of its hub dataset.
LAYOUTS = {
    "aime24": [
        {"id": 60, "problem": "Find $x$ if $x+1=205$.", "solution": "So $x=\\boxed{204}$.", "answer": "204",
         "url": "https://aops", "year": "2024"},
        {"id": 61, "problem": "Compute $2\\cdot 3$.", "solution": "$\\boxed{6}$", "answer": "6",
         "url": "https://aops", "year": "2024"},
    ],
    "aime25": [{"problem": "What is $7 \\cdot 10$?", "answer": "70", "id": "0"}],
    "amc": [{"id": 0, "problem": "What is $71 \\cdot 2$?", "answer": 142.0, "url": "https://aops"}],
    "math500": [
        {"problem": "Simplify $\\frac{28}{6}$.", "solution": "It is $\\boxed{\\frac{14}{3}}$.",
         "answer": "\\frac{14}{3}", "subject": "Prealgebra", "level": 2, "unique_id": "test/algebra/1.json"},
    ],
    "hmmt25": [{"problem_idx": 1, "problem": "Compute $\\sqrt{16}$.", "answer": "4", "problem_type": []}],
    "minerva": [{"question": "A star's mass is $2 M_\\odot$; give it in solar masses.", "answer": "2"}],
}  # fmt: skip


def hub_file(tmp_path, name: str, rows: list[dict], suffix: str = ".parquet") -> str:
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_registry_reads_each_benchmarks_own_layout(name, tmp_path):
    rows = LAYOUTS[name]
    local = dataclasses.replace(BENCHMARKS[name], source=hub_file(tmp_path, name, rows))
    problems = load_problems(local)
    column = BENCHMARKS[name].problem_column
    assert [p["problem"] for p in problems] == [r[column] for r in rows]
    # the answer column, not the solution; AMC's float 142.0 reads as "142.0" and scores equal to 142
    assert [p["answer"] for p in problems] == [str(r["answer"]) for r in rows]
    scored = score_completions(
        [[f"so \\boxed{{{r['answer']}}}."] for r in rows], [p["answer"] for p in problems]
    )
    assert all(c == [True] for c in scored.correct)
    if name == "amc":
        assert score_completions([["\\boxed{142}"]], [problems[0]["answer"]]).correct == [[True]]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_registry_asks_the_hub_for_its_id_and_split(name, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(LAYOUTS[bench.name])

    bench = BENCHMARKS[name]
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_problems(bench, limit=1)) == 1
    assert calls == [(bench.source, None, bench.split)]


def test_an_unreachable_hub_says_how_to_read_the_cache(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(spectra.SpectraError, match=r"Couldn't reach .*; without network, HF_HUB_OFFLINE=1"):
        load_problems(BENCHMARKS["math500"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # already offline: the hint would not help
    with pytest.raises(spectra.SpectraError, match=r"LocalEntryNotFoundError\)\)$"):
        load_problems(BENCHMARKS["math500"])


def test_organism_is_a_benchmark_and_local_files_work_the_same_way(tmp_path):
    organism = load_problems(get_benchmark("organism"))
    assert len(organism) == 512 and organism[0]["answer"] == str(eval(organism[0]["problem"]))
    assert load_problems(get_benchmark("Organism"), limit=5) == organism[:5]
    path = hub_file(tmp_path, "mine", [{"question": "1+1", "final_answer": "2"}], ".jsonl")
    bench = get_benchmark(path)
    assert (bench.name, bench.template) == ("mine", "math")
    assert load_problems(bench) == [{"problem": "1+1", "answer": "2"}]
    # training's held-out evaluations and spectra eval file results under the same names
    assert (
        benchmark_name("HuggingFaceH4/MATH-500") == "math500" == get_benchmark("HuggingFaceH4/MATH-500").name
    )
    assert benchmark_name(path) == "mine" and benchmark_name("someone/their_set:main") == "their_set"


def test_registry_errors_are_one_line_and_say_what_is_expected(tmp_path):
    with pytest.raises(EvalError, match="unknown benchmark; expected one of aime24, aime25"):
        get_benchmark("aime2099")
    wrong = hub_file(tmp_path, "minerva", [{"problem": "x", "answer": "1"}])  # problem, not question
    with pytest.raises(
        spectra.SpectraError, match="has no column 'question' \\(the registry's minerva problem"
    ):
        load_problems(dataclasses.replace(BENCHMARKS["minerva"], source=wrong))
    odd = hub_file(tmp_path, "odd", [{"text": "x", "label": "1"}], ".jsonl")
    with pytest.raises(spectra.SpectraError, match="no problem column; expected one of problem, question"):
        load_problems(get_benchmark(odd))
    with pytest.raises(EvalError, match="--template"):
        get_benchmark("math500", template="{question}")


def test_templates_and_tokenization_as_in_training(organism_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism_dir)
    text = lambda bench, problem: tok.decode(encode_prompt(bench, problem, tok))  # noqa: E731
    assert text(get_benchmark("organism"), "2+3").endswith("2+3=")
    math = text(get_benchmark("math500"), "What is 2+3?")
    assert "2+3?" in math and "\\boxed{}" in math  # this tokenizer keeps no spaces
    custom = encode_prompt(get_benchmark("math500", template="Q: {problem} A:"), "2+3", tok)
    assert custom == tok("Q: 2+3 A:")["input_ids"]
    # a chat template that writes the BOS itself: the ids are the template's, as TRL's rollouts get them
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    ids = encode_prompt(get_benchmark("math500"), "1+1", tok)
    trl = tok.apply_chat_template(
        [[{"role": "user", "content": MATH_TEMPLATE.format(problem="1+1")}]],
        tokenize=True, add_generation_prompt=True, return_dict=True,
    )["input_ids"][0]  # fmt: skip
    assert ids == list(trl) and ids.count(tok.bos_token_id) == 1


# ------------------------------------------------------------------------------------ scoring, Pass@k


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_summary_matches_brute_force_enumeration():
    gen = torch.Generator().manual_seed(0)
    correct = [[bool(x) for x in (torch.rand(6, generator=gen) < p)] for p in (0.0, 0.2, 0.5, 0.9, 1.0)]
    parsed = [[True] * 6 for _ in correct]
    parsed[1][0] = parsed[3][5] = False
    summary = Scored(correct, parsed).summary([1, 2, 3, 6])
    for k in (1, 2, 3, 6):
        assert summary[f"pass@{k}"] == pytest.approx(
            sum(brute_pass_at_k(c, k) for c in correct) / 5, abs=1e-12
        )
    assert summary["avg@6"] == pytest.approx(sum(sum(c) / 6 for c in correct) / 5)
    assert summary["unparsable"] == pytest.approx(2 / 30)


def test_unparsable_answers_score_zero_and_are_counted():
    texts = [
        ["\\boxed{5}", "5", "\\boxed{}", "\\boxed{5"],
        ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "x", "y"],
    ]
    scored = score_completions(texts, ["5", "1/2"])
    assert scored.correct == [[True, False, False, False], [True, True, False, False]]
    assert scored.parsed == [[True, False, False, False], [True, True, False, False]]


# ------------------------------------------------------------------------------------------- backends


def test_backend_choice_without_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # find_spec still sees an installed vllm: hide it too
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "vllm" else object())
    assert choose_backend("auto") == "transformers"
    with pytest.raises(EvalError, match="--backend vllm: vllm is not installed"):
        choose_backend("vllm")
    with pytest.raises(EvalError, match="expected one of auto, vllm, transformers"):
        choose_backend("tgi")


def test_backend_choice_with_vllm(monkeypatch):
    """auto: vLLM only where a GPU is seen; vllm by name: also vLLM's CPU build, else a one-line error."""
    from spectra.train.eval import sampling

    real = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "vllm" and choose_backend("transformers") == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend("auto") == "transformers"
    monkeypatch.setattr(sampling, "vllm_on_cpu", lambda: True)
    assert choose_backend("vllm") == "vllm"
    monkeypatch.setattr(sampling, "vllm_on_cpu", lambda: False)
    with pytest.raises(EvalError, match="--backend vllm: this vLLM needs a CUDA GPU"):
        choose_backend("vllm")


def test_vllm_sampler_asks_n_per_prompt_with_a_seed_each(monkeypatch, tmp_path):
    """Our side of vLLM's API (LLM, SamplingParams, generate): order, per-prompt seeds, progress."""
    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen["init"] = kw

            def shutdown(timeout=None):
                seen["shutdown"] = timeout

            self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=shutdown))

        def collective_rpc(self, method, kwargs=None):
            if kwargs["weights_path"].endswith("broken"):
                raise RuntimeError("Worker failed with error 'NotImplementedError'")
            seen.setdefault("order", []).append((method, kwargs))

        def reset_prefix_cache(self):
            seen.setdefault("order", []).append(("reset_prefix_cache", None))

        def generate(self, prompts, params, use_tqdm=True):
            seen.setdefault("calls", []).append(len(prompts))
            out = []
            for p, sp in zip(prompts, params, strict=True):
                first = p["prompt_token_ids"][0]
                texts = [f"{first}|{sp.seed}|{i}" for i in range(sp.n)]
                outputs = [  # a stopped completion's token_ids end with the end token
                    types.SimpleNamespace(
                        text=t,
                        finish_reason="length" if i else "stop",
                        token_ids=[5] * (sp.max_tokens - 1 + i),
                    )
                    for i, t in enumerate(texts)
                ]
                out.append(types.SimpleNamespace(outputs=outputs))
            return out

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model_dir = tmp_path / "x"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    sampler = VLLMSampler(model_dir, torch.bfloat16, seed=3, max_model_len=1000)
    assert seen["init"]["dtype"] == "bfloat16" and seen["init"]["trust_remote_code"] is False
    assert seen["init"]["max_model_len"] == 128  # capped at the model's context: vLLM refuses more
    done = []
    prompts = [[100 + i, 7, 8] for i in range(5)]  # token ids, given to vLLM as TokensPrompt dicts
    got = sampler.sample(prompts, Sampling(n=2, max_tokens=9, seed=3), chunk=2, progress=done.append)
    assert seen["calls"] == [2, 2, 1] and done == [2, 2, 1]
    assert [g[0].split("|")[0] for g in got.texts] == [str(100 + i) for i in range(5)]
    assert all(len(g) == 2 for g in got.texts) and got.truncated == [[False, True]] * 5
    assert got.tokens == [[7, 9]] * 5
    seeds = sorted(int(g[0].split("|")[1]) for g in got.texts)
    # a seed per prompt, far apart: vLLM seeds sample k of a request with seed + k
    assert all(b - a > 1000 for a, b in itertools.pairwise(seeds))
    greedy = sampler.sample(prompts[:1], Sampling(n=4, max_tokens=9, temperature=0.0))
    assert len(greedy.texts[0]) == 4 and len(set(greedy.texts[0])) == 1  # vLLM refuses n > 1 when greedy
    monkeypatch.setattr("spectra.train.eval.sampling._reloads_in_place", lambda: True)
    assert sampler.reload(tmp_path / "step10")
    # the new weights in place, then the KV blocks cached under the old ones dropped
    assert seen["order"] == [
        ("reload_weights", {"weights_path": str(tmp_path / "step10"), "is_checkpoint_format": True}),
        ("reset_prefix_cache", None),
    ]
    with pytest.warns(UserWarning, match="could not reload the weights in place"):
        assert not sampler.reload(tmp_path / "broken")  # a failed reload: the caller builds anew
    monkeypatch.setattr("spectra.train.eval.sampling._reloads_in_place", lambda: False)
    assert not sampler.reload(tmp_path / "step20") and len(seen["order"]) == 2  # vLLM < 0.16
    sampler.close()
    # the engine process is ended (given 30 s to exit), not left to the GC
    assert seen["shutdown"] == 30 and sampler.llm is None


def test_one_vllm_engine_across_steps_rebuilt_only_when_it_must(monkeypatch, tmp_path):
    """`--step all` on vLLM: the first step builds the engine, later ones reload in place; a change of
    precision, or a vLLM that cannot reload, builds a new one; each step's weights folder outlives only
    its own step."""
    from spectra.train.eval import sampling_session

    log = []

    class Engine:
        def __init__(self, model_dir, dtype, **kw):
            self.dir = Path(model_dir)
            log.append(("new", dtype))

        def reload(self, model_dir):
            assert Path(model_dir).is_dir() and self.dir.is_dir()  # the old folder is still there
            self.dir = Path(model_dir)
            log.append(("reload", can_reload))
            return can_reload

        def close(self):
            log.append(("close", None))

    class Saved:  # a model or tokenizer: save_pretrained writes a file
        def save_pretrained(self, path, **kw):
            (Path(path) / type(self).__name__).write_text("x")

    monkeypatch.setattr(sampling_session, "VLLMSampler", Engine)
    logged = []
    sampler = sampling_session.SamplingSession(
        "vllm", tmp_path, torch.device("cpu"), seed=0, log=logged.append
    )
    can_reload = True
    folders = []
    for dtype in (torch.float32, torch.float32, torch.bfloat16):
        sampler.load(Saved(), Saved(), dtype, 128)
        folders.append(sampler.vllm.dir)
    can_reload = False
    sampler.load(Saved(), Saved(), torch.bfloat16, 128)
    assert log == [
        ("new", torch.float32), ("reload", True),  # one engine for the first two steps
        ("close", None), ("new", torch.bfloat16),  # another precision: another engine
        ("reload", False), ("close", None), ("new", torch.bfloat16),  # this vLLM cannot reload
    ]  # fmt: skip
    assert [f.is_dir() for f in folders] == [False, False, False]  # earlier steps' folders removed
    assert [m.split(" (")[0] for m in logged].count("vLLM: weights reloaded in place") == 1
    last = sampler.vllm.dir
    sampler.close()
    assert log[-1] == ("close", None) and not last.exists()

    def fails(self, model_dir, dtype, **kw):  # e.g. not enough memory for the engine
        failed.append(Path(model_dir))
        raise RuntimeError("Engine core initialization failed")

    failed = []
    monkeypatch.setattr(Engine, "__init__", fails)
    with pytest.raises(RuntimeError, match="initialization failed"):
        sampler.load(Saved(), Saved(), torch.float32, 128)
    assert not failed[0].exists()  # the weights saved for it are removed too


# ------------------------------------------------------------------------------- a run's weights

#: One of each stored form: factored (LoRA, PiSSA's residual base, AdaLoRA's masked core, VeRA's shared
#: matrices), on W0 (DoRA, IA3), vectors (LayerNorm tuning), dense (QuanTA, full fine-tuning).
METHODS = ("lora", "pissa", "adalora", "vera", "dora", "ia3", "lntuning", "quanta", "full")


@pytest.fixture(scope="module")
def trained(organism_dir, tmp_path_factory):
    """Sessions of a few methods trained three steps (reward = length mod 3, so the weights move)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(
        "spectra.train.rewards.accuracy_reward",
        lambda completions, **kw: [len(str(c)) % 3 for c in completions],
    )
    out = tmp_path_factory.mktemp("runs")
    sessions = {}
    for method in METHODS:
        cfg = TrainConfig(
            model=str(organism_dir), method=method, rank=4, alpha=8, dropout=0.0, quanta_d=3,
            num_generations=4, batch_size=2, max_steps=3, max_completion_length=40, lr=1e-2, delta_every=2,
            eval_every=2,
            eval_dataset="organism", eval_problems=8, eval_k=4, precision="fp32", out=str(out), name=method,
        )  # fmt: skip
        session = prepare(cfg)
        session.train()
        sessions[method] = session
    mp.undo()
    return sessions


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["12+34=", "705+296="], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("method", METHODS)
def test_a_run_at_its_last_step_is_the_trained_model(method, trained):
    session = trained[method]
    tokenizer, model, weights = load_target(resolve_target(str(session.run_dir)), 3, torch.float32)
    expected = logits(session.model, session.tokenizer)
    torch.testing.assert_close(logits(model, tokenizer), expected, atol=2e-4, rtol=1e-4)
    assert ("trainer checkpoint" in weights.note) == (method == "full") and weights.complete
    _, base, _ = load_target(resolve_target(str(session.run_dir)), 0, torch.float32)
    assert (logits(base, tokenizer) - expected).abs().max() > 1e-3  # the update did change the model


def test_full_fine_tuning_without_a_checkpoint_says_what_is_missing(trained):
    _, _, weights = load_target(resolve_target(str(trained["full"].run_dir)), 0, torch.float32)
    assert weights.complete and "base values" not in weights.note  # step 0: nothing has moved yet
    run = trained["full"].run_dir
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")  # no complete weights at step 2 any more
    _, _, weights = load_target(resolve_target(str(run)), 2, torch.float32)
    assert not weights.complete and "embeddings, norms and head at their base values" in weights.note


def test_a_peft_adapter_checkpoint_is_merged(trained, tmp_path):
    session = trained["lora"]
    adapter = shutil.copytree(session.run_dir / "checkpoints" / "checkpoint-3", tmp_path / "adapter")
    target = resolve_target(str(adapter))  # outside its run: PEFT's own load and merge
    assert target.run is None and target.adapter_dir == adapter
    tokenizer, model, weights = load_target(target, None, torch.float32)
    assert "PEFT adapter" in weights.note
    torch.testing.assert_close(
        logits(model, tokenizer), logits(session.model, session.tokenizer), atol=2e-4, rtol=1e-4
    )


def test_eval_samples_what_the_trained_model_samples(trained, tmp_path):
    """Same prompts, seed and batch: the rebuilt run and the live PEFT model write the same completions."""
    session = trained["lora"]
    rows = run_eval(
        EvalConfig(
            str(session.run_dir), ("organism",), n=4, limit=8, out=str(tmp_path), save_completions=True
        ),
        log=lambda _: None,
    )
    saved = [
        json.loads(line)
        for line in (tmp_path / "organism-step000003-n4-T1-seed0-first8.completions.jsonl")
        .read_text()
        .splitlines()
    ]
    bench = get_benchmark("organism")
    prompts = [encode_prompt(bench, r["problem"], session.tokenizer) for r in saved]
    live = sample_completions(
        session.model, session.tokenizer, prompts, Sampling(4, bench.max_tokens, seed=session.cfg.seed)
    ).texts
    same = sum(
        a == b
        for r, group in zip(saved, live, strict=True)
        for a, b in zip(r["completions"], group, strict=True)
    )
    assert same >= 31, f"only {same} of 32 completions agree"
    (row,) = rows
    assert row["step"] == 3 and row["seed"] == session.cfg.seed
    assert row["unparsable_count"] == sum(p["unparsable"] for p in row["per_problem"])
    assert row["avg@4"] == pytest.approx(sum(p["correct"] for p in row["per_problem"]) / 32)
    assert row["dtype"] == "float32" and row["weights_complete"] and row["limit"] == 8
    assert row["problems_total"] == 512 and row["truncated"] == pytest.approx(
        sum(t for r in saved for t in r["truncated"]) / 32
    )
    assert saved[0]["prompt"].endswith("=") and len(saved[0]["boxed"]) == 4
    tokens = [t for r in saved for t in r["tokens"]]
    assert row["tokens_mean"] == pytest.approx(sum(tokens) / 32, abs=0.01)


def test_seeded_sampling_draws_from_the_tempered_top_p_distribution():
    """Gumbel-max over many row seeds: frequencies match softmax(logits / T) truncated to the top-p set,
    and one row's draws do not depend on the rows beside it."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    temperature, top_p, rows = 0.7, 0.9, 20_000
    chain = LogitsProcessorList([
        TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p),
        SeededSampling([row_seed(5, i, 0) for i in range(rows)], torch.device("cpu")),
    ])  # fmt: skip
    picks = chain(None, logits.float().expand(rows, -1).clone()).argmax(-1)
    p = torch.softmax(logits / temperature, 0)
    keep = (torch.cumsum(p, 0) - p) < top_p  # the smallest head of the sorted probabilities reaching top-p
    expected = torch.where(keep, p, 0.0) / p[keep].sum()
    observed = torch.bincount(picks, minlength=len(logits)).double() / rows
    assert not keep.all() and (observed[~keep] == 0).all()
    assert torch.allclose(observed, expected, atol=0.015), (observed, expected)
    alone = SeededSampling([row_seed(5, 7, 0)], torch.device("cpu"))(None, logits.float()[None])
    beside = SeededSampling([row_seed(5, i, 0) for i in range(6, 9)], torch.device("cpu"))(
        None, logits.float().expand(3, -1).clone()
    )
    assert torch.equal(alone[0], beside[1])
    assert len({row_seed(0, 1, 0), row_seed(0, 0, 1), row_seed(1, 0, 0)}) == 3


def test_the_models_generation_config_does_not_change_what_is_sampled(organism_dir, tmp_path):
    """As TRL's rollouts: temperature and top-p only; a shipped generation_config with its own sampling
    (Qwen's instruct models set top_k 20 and repetition_penalty 1.05) is not applied on top."""
    from spectra.train.checkpoint import load_pretrained

    chatty = tmp_path / "chatty"
    shutil.copytree(organism_dir, chatty)
    config = json.loads((chatty / "generation_config.json").read_text())
    config |= {"do_sample": True, "temperature": 0.3, "top_k": 2, "top_p": 0.5, "repetition_penalty": 1.5}
    (chatty / "generation_config.json").write_text(json.dumps(config))
    sampling = Sampling(n=2, max_tokens=40, seed=4)
    texts = []
    for folder in (organism_dir, chatty):
        tok, model = load_pretrained(folder, torch.float32, str(folder))
        ids = [encode_prompt(get_benchmark("organism"), p, tok) for p in ("12+34", "500+499", "7+8")]
        texts.append(sample_completions(model, tok, ids, sampling).texts)
    assert texts[0] == texts[1]


def test_lengths_and_truncation_count_up_to_the_end_token():
    """A generated pad token is a token like any other; rows end at the generation_config's end token
    (one of a list) and are padded after it; a row without one that fills max_tokens is cut off."""
    from transformers import BatchEncoding

    pad_id, eos, other_eos = 0, 1, 2
    rows = [[5, 6, eos, pad_id], [5, pad_id, 6, 7], [other_eos, pad_id, pad_id, pad_id], [5, 6, 7, eos]]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = types.SimpleNamespace(eos_token_id=[eos, other_eos])

        def generate(self, input_ids, **kw):
            return torch.cat([input_ids, torch.tensor(rows[: len(input_ids)])], dim=1)

    class Tokenizer:
        eos_token_id, pad_token_id = eos, pad_id

        def pad(self, batch, **kw):
            return BatchEncoding({"input_ids": torch.tensor(batch["input_ids"])})

        def batch_decode(self, new, **kw):
            return [" ".join(map(str, r)) for r in new.tolist()]

    prompts = [[9, 9]] * 4
    got = sample_completions(Model(), Tokenizer(), prompts, Sampling(n=1, max_tokens=4, temperature=0.0))
    assert got.tokens == [[2], [4], [0], [3]]
    assert got.truncated == [[False], [True], [False], [False]]


def test_greedy_draws_once_and_counts_it_n_times(organism_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism_dir)
    model = AutoModelForCausalLM.from_pretrained(organism_dir)
    ids = [encode_prompt(get_benchmark("organism"), p, tok) for p in ("12+34", "500+499")]
    greedy = sample_completions(model, tok, ids, Sampling(n=3, max_tokens=40, temperature=0.0))
    assert all(len(set(g)) == 1 and len(g) == 3 for g in greedy.texts)
    once = sample_completions(model, tok, ids, Sampling(n=1, max_tokens=40, temperature=0.0))
    assert [g[0] for g in greedy.texts] == [g[0] for g in once.texts]
    short = sample_completions(model, tok, ids, Sampling(n=1, max_tokens=2, temperature=0.0))
    assert short.truncated == [[True], [True]] and short.tokens == [[2], [2]]
    for text, cut, length in zip(greedy.texts, greedy.truncated, greedy.tokens, strict=True):
        assert length[0] == (40 if cut[0] else len(tok(text[0], add_special_tokens=False)["input_ids"]))


def test_a_bf16_merge_reports_what_it_rounds_away(trained):
    session = trained["lora"]
    target = resolve_target(str(session.run_dir))
    _, _, exact = load_target(target, 3, torch.float32)
    _, model, rounded = load_target(target, 3, torch.bfloat16)
    assert exact.rounded_away == 0.0 and 0.0 < rounded.rounded_away < 1.0
    assert next(model.parameters()).dtype == torch.bfloat16


def test_a_trainer_checkpoint_inside_a_run_is_the_run_at_that_step(trained):
    run_dir = trained["milora"].run_dir if "milora" in trained else trained["lora"].run_dir
    target = resolve_target(str(run_dir / "checkpoints" / "checkpoint-2"))
    assert target.run is not None and target.step == 2
    result = runner.invoke(app, ["eval", str(run_dir / "checkpoints" / "checkpoint-2"), "--step", "all"])
    assert result.exit_code == 1 and "a trainer checkpoint is one step" in result.output


def test_an_incomplete_model_directory_is_refused(organism_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(organism_dir, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "q_proj" not in k}, broken / "model.safetensors")
    result = runner.invoke(app, ["eval", str(broken), "-b", "organism"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "has no weights for" in result.output and "q_proj" in result.output


def test_a_bf16_stored_update_merges_as_the_float64_sum_rounded_once(tmp_path):
    """ΔW is made from its bf16 factors in float64 and added to W0 in float64, then cast once: the merged
    weight is the float64 reference W0 + s·B·A correctly rounded to the model's dtype (B·A multiplied in
    bf16 is off by ~1e-3 relative, and rounding ΔW before the add rounds twice)."""
    from spectra.operators import LowRank

    gen = torch.Generator().manual_seed(0)
    B = (0.05 * torch.randn(48, 8, generator=gen)).bfloat16()
    A = torch.randn(8, 64, generator=gen).bfloat16()
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    w0 = model[0].weight.detach().clone()
    writer = spectra.RunWriter(tmp_path / "tiny")
    writer.write_config({"name": "tiny", "method": "lora", "model": "tiny"})
    writer.write_base_weights({"0": w0})
    writer.write_delta(3, {"0": LowRank(B, A, 2.0)})
    reference = w0.double() + 2.0 * (B.double() @ A.double())
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with spectra.load_run(tmp_path / "tiny") as run:
            assert apply_delta(model, run, 3)[0] == 1
        merged = model[0].weight.detach()
        assert merged.dtype == dtype and torch.equal(merged, reference.to(dtype)), dtype
        model[0].weight.data.copy_(w0)


@pytest.fixture(scope="module")
def written_run(organism_dir, tmp_path_factory) -> Path:
    """A LoRA run on the organism written directly (no training): ΔW of every q_proj and v_proj at steps
    0, 1 and 2."""
    from safetensors.torch import load_file

    from spectra.operators import LowRank

    weights = load_file(organism_dir / "model.safetensors")
    ends = ("q_proj.weight", "v_proj.weight")
    names = sorted(k.removesuffix(".weight") for k in weights if k.endswith(ends))
    run_dir = tmp_path_factory.mktemp("written") / "lora"
    writer = spectra.RunWriter(run_dir)
    writer.write_config(
        {"name": "lora", "method": "lora", "model": str(organism_dir), "model_path": str(organism_dir)}
    )
    writer.write_base_weights({n: weights[f"{n}.weight"] for n in names})
    gen = torch.Generator().manual_seed(0)
    for step in (0, 1, 2):
        updates = {}
        for n in names:
            m, k = weights[f"{n}.weight"].shape
            B, A = torch.randn(m, 2, generator=gen), torch.randn(2, k, generator=gen)
            updates[n] = LowRank(step * 1e-2 * B, A)
        writer.write_delta(step, updates)
    return run_dir


def _set_entry(path: Path, dataset: str, value: float) -> str:
    with h5py.File(path, "r+") as f:
        g = f["modules"][sorted(f["modules"])[0]]
        data = g[dataset][...]
        data.flat[0] = value
        g[dataset][...] = data
        return g.attrs["name"]


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _modules_a_dataset(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        del f["modules"]
        f["modules"] = [1, 2, 3]


def _other_step(path: Path) -> None:
    path.unlink()
    path.symlink_to("step_000002.h5")  # the file says step 2


def _dangling(path: Path) -> None:
    path.unlink()
    path.symlink_to("gone.h5")


def _rewrite(path: Path, change: Callable[[dict], None]) -> str:
    """Write the step again through the store's writer with ``change`` applied to its updates."""
    with spectra.load_run(path.parent.parent) as run:
        updates = dict(run.deltas(1))
    name = sorted(updates)[0]
    change(updates)
    path.unlink()
    spectra.RunWriter(path.parent.parent).write_delta(1, updates)
    return name


def _wrong_shape(updates: dict) -> None:
    name = sorted(updates)[0]
    op = updates[name]
    updates[name] = type(op)(op.B, torch.ones(op.A.shape[0], op.A.shape[1] + 1), op.scale)


def _lacks_a_module(updates: dict) -> None:
    del updates[sorted(updates)[0]]


#: Ways to damage a step's delta file; each returns the module its error must name (None: the file's).
DAMAGES: dict[str, Callable[[Path], str | None]] = {
    "fifo": _fifo,
    "missing": _dangling,
    "truncated": _truncate,
    "modules-not-a-group": _modules_a_dataset,
    "another-steps-file": _other_step,
    "nan": lambda path: _set_entry(path, "B", float("nan")),
    "inf": lambda path: _set_entry(path, "A", float("inf")),
    "wrong-shape": lambda path: _rewrite(path, _wrong_shape),
    "lacks-a-module": lambda path: _rewrite(path, _lacks_a_module),
}


#: Run in its own process (a reader blocked on a FIFO inside h5py holds the GIL): after a grace period,
#: open the FIFO for writing every second, which wakes a reader blocked on it, and say so once.
_UNBLOCK = """
import os, sys, time
time.sleep(float(sys.argv[2]))
fired = False
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))
        if not fired:
            print("fired", flush=True)
            fired = True
    except OSError:  # no reader waiting, or not a FIFO
        pass
    time.sleep(1.0)
"""


class _Unblock:
    """A watchdog that wakes a reader blocked on the FIFO ``path``: a test that would hang fails instead
    (``fired`` says whether it had to)."""

    def __init__(self, path: Path, after: float = 60.0):
        self.path, self.after, self.fired = path, after, False

    def __enter__(self) -> _Unblock:
        args = [sys.executable, "-c", _UNBLOCK, str(self.path), str(self.after)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.fired = "fired" in self.proc.communicate()[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_step_is_reported_and_skipped_or_alone_an_error(damage, written_run, tmp_path):
    """`--step all`: the damaged step is one line naming its file (and module), the others are evaluated.
    That step alone: a one-line error, exit 1, nothing written. Never a hang (a FIFO named like a delta
    file), never another step's weights under this step's name."""
    run = shutil.copytree(written_run, tmp_path / "run", symlinks=True)
    path = run / "deltas" / "step_000001.h5"
    module = DAMAGES[damage](path)
    out = tmp_path / "out"
    args = ["eval", str(run), "-b", "organism", "--n", "1", "--limit", "2", "--out", str(out)]
    with _Unblock(path) as watchdog:
        every = runner.invoke(app, [*args, "--step", "all"], env={"COLUMNS": "400"})
        alone = runner.invoke(app, [*args, "--step", "1"], env={"COLUMNS": "400"})
    assert not watchdog.fired, "a FIFO named like a delta file blocked spectra eval"
    assert every.exit_code == 0, every.output
    [line] = [line for line in every.output.splitlines() if "step 1" in line]
    assert "skipped" in line and "step_000001.h5" in line and (module is None or repr(module) in line), line
    written = [f"organism-step{s:06d}-n1-T1-seed0-first2.json" for s in (0, 2)]
    assert sorted(p.name for p in out.iterdir()) == written
    assert [json.loads(r)["step"] for r in (run / "eval.jsonl").read_text().splitlines()] == [0, 2]
    assert alone.exit_code == 1, alone.output
    assert "Traceback" not in alone.output and len(alone.output.strip().splitlines()) == 1, alone.output
    assert "step_000001.h5" in alone.output and (module is None or repr(module) in alone.output)
    assert sorted(p.name for p in out.iterdir()) == written
    assert len((run / "eval.jsonl").read_text().splitlines()) == 2  # nothing appended


def test_no_undamaged_step_is_an_error(written_run, tmp_path):
    run = shutil.copytree(written_run, tmp_path / "run")
    for step in (0, 1, 2):
        _truncate(run / "deltas" / f"step_{step:06d}.h5")
    with pytest.raises(DamagedStep, match=r"no step can be evaluated; step 0: .*step_000000.h5"):
        run_eval(EvalConfig(str(run), ("organism",), n=1, limit=2, steps="all"), log=lambda text: None)
    assert not (run / "eval").exists() and not (run / "eval.jsonl").exists()


# ------------------------------------------------------------------------------------------ the command


def test_eval_of_every_step_reproduces_the_runs_own_held_out_curve(trained):
    """`spectra eval RUN --step all` with the training eval's settings redraws the training's eval.jsonl."""
    run_dir = trained["lora"].run_dir
    before = spectra.load_run(run_dir).eval
    result = runner.invoke(app, ["eval", str(run_dir), "--n", "4", "--limit", "8", "--step", "all"])
    assert result.exit_code == 0, result.output
    assert "step" in result.output and "avg@4" in result.output and "pass@4" in result.output
    after = spectra.load_run(run_dir).eval
    added = after.iloc[len(before) :].set_index("step")
    assert list(added.index) == [0, 2, 3] and set(added["source"]) == {"spectra eval"}
    training = before[before["source"].isna()] if "source" in before else before  # training's own evals
    assert list(training["step"]) == [0, 2, 3]
    for _, row in training.iterrows():
        assert abs(added.loc[row["step"], "avg@4"] - row["avg@4"]) <= 2 / 32, row["step"]
        assert abs(added.loc[row["step"], "tokens_mean"] - row["tokens_mean"]) <= 2 * 40 / 32, row["step"]
    names = {p.name for p in (run_dir / "eval").glob("*.json")}
    assert names >= {f"organism-step{s:06d}-n4-T1-seed0-first8.json" for s in (0, 2, 3)}
    # spectra analyze draws one series per (benchmark, n): the re-evaluated steps replace the training's
    ((bench, rows, avg, passes),) = list(eval_series(after))
    assert (bench, avg, passes[-1], list(rows["step"])) == ("organism", "avg@4", "pass@4", [0, 2, 3])
    # with no option at all, the run's held-out set is evaluated as training evaluated it
    result = runner.invoke(app, ["eval", str(run_dir), "--step", "2"])
    assert result.exit_code == 0, result.output
    row = spectra.load_run(run_dir).eval.iloc[-1]
    assert (row["step"], row["n"], row["problems"], row["max_tokens"]) == (2, 4, 8, 40)
    assert abs(row["avg@4"] - training.set_index("step").loc[2, "avg@4"]) <= 2 / 32


def test_eval_is_reproducible_from_its_seed(organism_dir, tmp_path):
    def completions(seed: int, out: str, limit: int = 6, batch: int = 256) -> list[list[str]]:
        args = ["eval", str(organism_dir), "-b", "organism", "--n", "3", "--limit", str(limit),
                "--seed", str(seed), "--batch-size", str(batch), "--save-completions",
                "--out", str(tmp_path / out)]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        lines = (tmp_path / out / f"organism-n3-T1-seed{seed}-first{limit}.completions.jsonl").read_text()
        lines = lines.splitlines()
        return [json.loads(line)["completions"] for line in lines]

    first = completions(1, "a")
    assert first == completions(1, "b")
    assert first != completions(2, "c")
    rng = torch.random.get_rng_state()
    fewer = completions(1, "d", limit=4, batch=5)  # other batches, fewer problems: the same samples
    assert torch.equal(rng, torch.random.get_rng_state())  # the global stream is never drawn from
    same = sum(a == b for x, y in zip(first[:4], fewer, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 11, f"only {same} of 12 completions unchanged by --limit and --batch-size"
    result = json.loads((tmp_path / "a" / "organism-n3-T1-seed1-first6.json").read_text())
    assert result["step"] is None and result["problems"] == 6 and result["n"] == 3 and result["ks"] == [1, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-b", "gsm9k"], "--benchmark gsm9k: unknown benchmark; expected one of aime24"),
        (["-b", "organism", "--n", "4", "--k", "1,8"], "--k 8: larger than --n 4"),
        (["-b", "organism", "--step", "2"], "--step 2: only a run directory has steps to choose"),
        (["-b", "organism", "--top-p", "0"], "--top-p 0.0: expected 0 < top-p ≤ 1"),
        (["-b", "organism", "--seed", "-1"], "--seed -1: expected an integer ≥ 0"),
        (["-b", "organism", "--k", "1,,4"], "--k 1,,4: expected comma-separated integers"),
    ],
)
def test_bad_options_are_one_line_errors(args, message, organism_dir):
    result = runner.invoke(app, ["eval", str(organism_dir), *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


def test_bad_targets_steps_and_datasets_are_one_line_errors(trained, tmp_path):
    run_dir = str(trained["lora"].run_dir)
    result = runner.invoke(app, ["eval", run_dir, "--step", "1"], env={"COLUMNS": "300"})
    assert (
        result.exit_code == 1 and "--step 1:" in result.output and "recorded steps: 0, 2, 3" in result.output
    )
    missing = hub_file(tmp_path, "nocols", [{"text": "2+2", "label": "4"}], ".jsonl")
    result = runner.invoke(app, ["eval", run_dir, "-b", missing], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "no problem column" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path), "-b", "organism"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "neither a run (no run.json)" in result.output
    assert not (trained["lora"].run_dir / "eval" / "nocols-step000003.json").exists()
    result = runner.invoke(app, ["eval", run_dir, "--step", "-4"], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "--step -4: expected a recorded step ≥ 0 (0, 2, 3)" in result.output


def test_no_log_leaves_the_runs_curve_alone(trained, tmp_path):
    run_dir = trained["lora"].run_dir
    before = (run_dir / "eval.jsonl").read_text()
    args = [
        "eval",
        str(run_dir),
        "--n",
        "1",
        "--limit",
        "2",
        "--seed",
        "9",
        "--no-log",
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (run_dir / "eval.jsonl").read_text() == before
    assert [p.name for p in tmp_path.glob("*.json")] == ["organism-step000003-n1-T1-seed9-first2.json"]


def test_evaluations_with_other_settings_are_separate_curves():
    import pandas as pd

    evals = pd.DataFrame(
        [
            {"step": 0, "benchmark": "organism", "n": 4, "problems": 64, "avg@4": 0.5, "pass@4": 0.7},
            {"step": 5, "benchmark": "organism", "n": 4, "problems": 64, "avg@4": 0.6, "pass@4": 0.8},
            {"step": 5, "benchmark": "organism", "n": 4, "problems": 8, "avg@4": 0.1, "temperature": 0.6},
            {"step": 5, "benchmark": "organism", "n": 4, "problems": 64, "avg@4": 0.65, "pass@4": 0.8},
        ]
    )
    series = {label: (list(rows["step"]), list(rows["avg@4"])) for label, rows, _, _ in eval_series(evals)}
    assert series == {
        "organism (64 problems)": ([0, 5], [0.5, 0.65]),  # the step evaluated again: its last row
        "organism (8 problems, T=0.6)": ([5], [0.1]),
    }
