"""The embedded model organism: a tiny Qwen2 model that half-knows three-digit addition.

``spectra train`` with no options needs a model that trains on a laptop CPU in minutes and whose reward
visibly rises under RLVR. This module builds one from nothing, deterministically from a seed, and caches
it under the user's cache directory, so that the trainer loads it through the same
``from_pretrained`` code path as any hub model.

The task. Add two three-digit numbers, column by column, then box the answer::

    prompt      347+588=
    completion  7+8=15,4+8+1=13,3+5+1=9,\\boxed{935}<eos>

Each step adds one column (units first); a carry from the previous column is written as ``+1``; the
boxed answer is the last step's sum followed by the units digits of the earlier steps, read backwards.
The answer is checked by exact match of the last ``\\boxed{}``
(:func:`spectra.train.rewards.last_boxed`), or by math-verify.

The warm start. The model is trained briefly (supervised, loss on the completion only) on *noisy*
traces: each carry is forgotten with probability :data:`CARRY_DROP` (``4+8=12`` instead of
``4+8+1=13``), a realistic systematic error. The model learns both behaviours and, sampling at
temperature 1, writes the carry only part of the time, so its held-out accuracy is well between zero and
one (about 0.46 for seed 0; greedy decoding always forgets, about 0.27: the problems without a carry),
and the groups of a GRPO step get mixed rewards: RL has a signal from the first step and sharpens the
carry decision quickly (LoRA r=8, lr 2e-4, 100 GRPO steps: 0.48 → 0.96 sampled, 1.0 greedy).

The tokenizer is character level (printable ASCII, newline and tab, plus ``<pad>``, ``<eos>``,
``<unk>``; no BOS), built with ``tokenizers`` and wrapped in a fast transformers tokenizer; decoding
reproduces the text exactly. The organism directory holds safetensors weights, ``config.json``,
``generation_config.json``, the tokenizer files and ``organism.json`` (recipe and measured accuracy).

Public API: :data:`ORGANISM_VERSION`, :func:`organism_prompt`, :func:`organism_problems`,
:func:`cache_dir`, :func:`build_organism`, plus :data:`MAX_COMPLETION_TOKENS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import string
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
import transformers
from spectra.train.rewards import last_boxed
from tokenizers import Regex, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "CARRY_DROP",
    "DEFAULT_SFT_STEPS",
    "MAX_COMPLETION_TOKENS",
    "ORGANISM_VERSION",
    "build_organism",
    "cache_dir",
    "organism_problems",
    "organism_prompt",
]

log = logging.getLogger(__name__)

ORGANISM_VERSION: int = 1
"""Bumped whenever the recipe (task, tokenizer, model, SFT, evaluation) changes; part of the cache name."""

DEFAULT_SFT_STEPS: int = 600
"""Optimizer steps of the supervised warm start of the default organism."""

CARRY_DROP: float = 0.6
"""Probability that a supervised trace forgets a carry (independently at each carry)."""

MAX_COMPLETION_TOKENS: int = 40
"""Enough new tokens for any completion of the task (the longest is 37 characters plus ``<eos>``)."""

OPERAND_RANGE: tuple[int, int] = (100, 999)
"""Both operands are drawn uniformly from this inclusive range (always three digits)."""

TEST_FRACTION_PER_MILLE: int = 100
"""Share (per mille) of the unordered operand pairs held out for the test split."""

DEFAULT_N: dict[str, int] = {"train": 8192, "test": 512}
"""Number of problems :func:`organism_problems` returns when ``n`` is None."""

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
_CHARS: str = "".join(c for c in string.printable if c not in "\r\x0b\x0c")  # ASCII, space, \t, \n

# The model: dimensions that factor into small primes (QuanTA splits them into three axes).
_MODEL: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # explicit, so config.head_dim exists: k/v out = 2·32 = 64
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": True,
}

# The supervised warm start.
_SFT: dict[str, Any] = {
    "batch_size": 64,
    "lr": 2e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
}

# The accuracy measurement stored in organism.json.
_EVAL: dict[str, int] = {"test_problems": 256, "samples": 4, "greedy_problems": 256}

_ORGANISM_JSON = "organism.json"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    _ORGANISM_JSON,
)


# ----------------------------------------------------------------------------------------------- task


def organism_prompt(problem: str) -> str:
    """The organism's prompt for ``problem`` (e.g. ``"347+588"`` → ``"347+588="``)."""
    return f"{problem}="


def _solution(a: int, b: int, drop: list[bool] | None = None) -> tuple[str, int]:
    """The column-by-column trace for ``a+b`` and the answer it arrives at.

    ``drop[i]`` forgets the carry into column ``i`` (``i ≥ 1``) if there is one; without ``drop`` the
    trace is correct. The answer is the boxed number, wrong exactly when a carry was forgotten.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i, (x, y) in enumerate(zip(da, db, strict=True)):
        if carry and drop is not None and drop[i]:
            carry = 0
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
        digits.append(str(total % 10))
        carry = total // 10
    answer = str(total) + "".join(reversed(digits[:-1]))
    return ",".join(steps) + ",\\boxed{" + answer + "}", int(answer)


def _split_of(a: int, b: int) -> str:
    """``"test"`` or ``"train"``, by a stable hash of the unordered operand pair (a+b and b+a agree)."""
    lo, hi = sorted((a, b))
    h = int.from_bytes(hashlib.blake2b(f"{lo},{hi}".encode(), digest_size=8).digest(), "big")
    return "test" if h % 1000 < TEST_FRACTION_PER_MILLE else "train"


def _pairs(split: str, rng: random.Random) -> Iterator[tuple[int, int]]:
    """An endless stream of operand pairs of ``split``, drawn uniformly with replacement."""
    lo, hi = OPERAND_RANGE
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if _split_of(a, b) == split:
            yield a, b


def _row(a: int, b: int) -> dict[str, str]:
    problem = f"{a}+{b}"
    solution, answer = _solution(a, b)
    assert answer == a + b
    return {
        "problem": problem,
        "answer": str(answer),
        "prompt": organism_prompt(problem),
        "solution": solution,
    }


def organism_problems(
    split: Literal["train", "test"], n: int | None = None, seed: int = 0
) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split`` (default 8192 train, 512 test), deterministic in ``seed``.

    Each row is ``{"problem": "347+588", "answer": "935", "prompt": "347+588=", "solution":
    "7+8=15,4+8+1=13,3+5+1=9,\\boxed{935}"}``. Train and test are disjoint as sets of unordered operand
    pairs (about 10 % of the pairs are test); the test set for a given seed is fixed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"organism_problems: split must be 'train' or 'test', got {split!r}")
    n = DEFAULT_N[split] if n is None else n
    if n < 0:
        raise ValueError(f"organism_problems: n must be ≥ 0, got {n}")
    lo, hi = OPERAND_RANGE
    share = TEST_FRACTION_PER_MILLE if split == "test" else 1000 - TEST_FRACTION_PER_MILLE
    limit = (hi - lo + 1) ** 2 * share // 2000  # half the ordered pairs: rejection sampling stays cheap
    if n > limit:
        raise ValueError(f"organism_problems: n={n} is too many distinct {split} problems (at most {limit})")
    rng = random.Random(f"organism-{split}-{seed}")
    seen: set[tuple[int, int]] = set()
    rows = []
    for pair in _pairs(split, rng):
        if len(rows) == n:
            break
        if pair not in seen:
            seen.add(pair)
            rows.append(_row(*pair))
    return rows


# ------------------------------------------------------------------------------------------ tokenizer


def _make_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer: one token per character, exact decoding, left padding, no BOS."""
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *_CHARS])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, never insert spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=_MODEL["max_position_embeddings"],
    )


# ------------------------------------------------------------------------------------------------ model


def _make_model(tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 (float32) whose special-token ids match ``tok``."""
    config = Qwen2Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        **_MODEL,
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=MAX_COMPLETION_TOKENS,
    )
    return model


def _sft_batch(
    tok: PreTrainedTokenizerFast, pairs: list[tuple[int, int]], rng: random.Random
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (completion and ``<eos>`` only) for noisy traces."""
    seqs, n_prompt = [], []
    for a, b in pairs:
        drop = [rng.random() < CARRY_DROP for _ in range(len(str(a)))]
        solution, _ = _solution(a, b, drop)
        prompt_ids = tok.encode(organism_prompt(f"{a}+{b}"), add_special_tokens=False)
        completion_ids = [*tok.encode(solution, add_special_tokens=False), tok.eos_token_id]
        seqs.append(prompt_ids + completion_ids)
        n_prompt.append(len(prompt_ids))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for r, (seq, p) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        labels[r, p : len(seq)] = torch.tensor(seq[p:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sft(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, steps: int, seed: int) -> list[float]:
    """The supervised warm start on noisy traces of train problems; returns the loss per step."""
    cfg = _SFT
    rng = random.Random(f"organism-sft-{seed}")
    stream = _pairs("train", rng)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"]
    )

    def lr_factor(step: int) -> float:
        if step < cfg["warmup_steps"]:
            return (step + 1) / cfg["warmup_steps"]
        progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, steps - cfg["warmup_steps"]))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    for step in range(steps):
        batch = _sft_batch(tok, [next(stream) for _ in range(cfg["batch_size"])], rng)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log.info("organism SFT step %d/%d loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def _accuracy(
    model: Qwen2ForCausalLM,
    tok: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    samples: int,
    do_sample: bool,
    batch_size: int = 256,
) -> float:
    """Exact-match accuracy of the last boxed answer, over ``samples`` generations per problem."""
    prompts = [r["prompt"] for r in rows for _ in range(samples)]
    answers = [r["answer"] for r in rows for _ in range(samples)]
    correct = 0
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            do_sample=do_sample,
            temperature=1.0 if do_sample else None,
            top_k=0 if do_sample else None,
            top_p=1.0 if do_sample else None,
            max_new_tokens=MAX_COMPLETION_TOKENS,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(last_boxed(t) == a for t, a in zip(texts, answers[i : i + batch_size], strict=True))
    return correct / len(prompts)


def _evaluate(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, seed: int) -> dict[str, Any]:
    """Held-out accuracy at temperature 1 (several samples per problem) and greedy."""
    ev = _EVAL
    test = organism_problems("test", max(ev["test_problems"], ev["greedy_problems"]), seed=0)
    torch.manual_seed(seed)
    sampled = _accuracy(model, tok, test[: ev["test_problems"]], ev["samples"], do_sample=True)
    greedy = _accuracy(model, tok, test[: ev["greedy_problems"]], 1, do_sample=False)
    return {"sampled_t1": sampled, "greedy": greedy, **ev}


# ------------------------------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """The cache: ``$SPECTRA_CACHE``, else ``$XDG_CACHE_HOME/spectra``, else ``~/.cache/spectra``."""
    if os.environ.get("SPECTRA_CACHE"):
        return Path(os.environ["SPECTRA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "spectra"
    return Path.home() / ".cache" / "spectra"


def _name(seed: int, sft_steps: int) -> str:
    name = f"organism-v{ORGANISM_VERSION}-seed{seed}"
    return name if sft_steps == DEFAULT_SFT_STEPS else f"{name}-sft{sft_steps}"


def _is_complete(path: Path, seed: int, sft_steps: int) -> bool:
    """Whether ``path`` is a finished organism of this recipe (all files there, organism.json matching)."""
    if not all((path / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        meta = json.loads((path / _ORGANISM_JSON).read_text())
    except (OSError, ValueError):
        return False
    expected = {"version": ORGANISM_VERSION, "seed": seed, "sft_steps": sft_steps}
    return all(meta.get(k) == v for k, v in expected.items())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-"


def _reap_stale_tmp(root: Path, name: str) -> None:
    """Remove temporary build dirs of ``name`` left by dead processes on this host (killed builds)."""
    prefix = _tmp_prefix(name)
    for p in root.glob(prefix + "*"):
        pid_str = p.name[len(prefix) :].split("-", 1)[0]
        if not pid_str.isdigit():
            continue
        try:
            os.kill(int(pid_str), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass  # exists but not ours to signal: leave it alone


@contextlib.contextmanager
def _preserve_torch_state() -> Iterator[None]:
    """Leave torch's global RNG and grad mode as they were."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        yield


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _build(path: Path, seed: int, sft_steps: int) -> None:
    """Build the organism into the (empty) directory ``path``; ``organism.json`` is written last."""
    t0 = time.perf_counter()
    with _preserve_torch_state():
        torch.manual_seed(seed)
        tok = _make_tokenizer()
        model = _make_model(tok)
        losses = _sft(model, tok, sft_steps, seed)
        sft_seconds = time.perf_counter() - t0
        accuracy = _evaluate(model, tok, seed)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "version": ORGANISM_VERSION,
        "seed": seed,
        "sft_steps": sft_steps,
        "task": {
            "description": "three-digit addition, column by column, answer in \\boxed{}",
            "example_prompt": organism_prompt("347+588"),
            "example_solution": _solution(347, 588)[0],
            "operand_range": list(OPERAND_RANGE),
            "carry_drop": CARRY_DROP,
            "max_completion_tokens": MAX_COMPLETION_TOKENS,
        },
        "config": {"model": _MODEL, "sft": _SFT, "parameters": n_params, "vocab_size": len(tok)},
        "sft": {"final_loss": _mean(losses[-20:]), "seconds": round(sft_seconds, 2)},
        "accuracy": accuracy,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (path / _ORGANISM_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def build_organism(
    seed: int = 0, root: Path | None = None, force: bool = False, sft_steps: int | None = None
) -> Path:
    """Build (once) and return the directory of the model organism for ``seed``.

    The directory, ``root/organism-v{ORGANISM_VERSION}-seed{seed}`` (``-sft{steps}`` appended for a
    non-default ``sft_steps``; ``root`` defaults to :func:`cache_dir`), loads with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. A complete one is
    reused unless ``force``. The build runs in a temporary sibling directory that is renamed into place
    only when finished, so a killed build never leaves a directory that passes for a finished one; two
    concurrent builds both finish and the first rename wins. Torch's global RNG state is left unchanged.
    """
    sft_steps = DEFAULT_SFT_STEPS if sft_steps is None else sft_steps
    if sft_steps < 0:
        raise ValueError(f"build_organism: sft_steps must be ≥ 0, got {sft_steps}")
    root = Path(cache_dir() if root is None else root).expanduser()
    name = _name(seed, sft_steps)
    final = root / name
    if not force and _is_complete(final, seed, sft_steps):
        return final

    root.mkdir(parents=True, exist_ok=True)
    _reap_stale_tmp(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{os.getpid()}-", dir=root))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the finished cache entry is an ordinary dir
    try:
        log.info("building the model organism %s (seed %d, %d SFT steps)", final, seed, sft_steps)
        _build(tmp, seed, sft_steps)
        if final.exists() and (force or not _is_complete(final, seed, sft_steps)):
            # Replace a stale/incomplete/forced-out directory: move it aside first, then delete it.
            trash = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(name)}{os.getpid()}-old-", dir=root))
            final.rename(trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_complete(final, seed, sft_steps):  # lost a race to something that is not an organism
                raise
            log.info("another process finished %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
