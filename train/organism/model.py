"""The organism's tokenizer, its tiny Qwen2, the supervised warm start and the accuracy measurement.

The tokenizer is character level (printable ASCII, newline and tab, plus ``<pad>``, ``<eos>``,
``<unk>``; no BOS), built with ``tokenizers`` and wrapped in a fast transformers tokenizer; decoding
reproduces the text exactly.

The warm start (:func:`sft`) trains the model briefly (supervised, loss on the completion only) on noisy
traces that forget each carry with probability :data:`~spectra.train.organism.task.CARRY_DROP`, a
realistic systematic error. The model learns both behaviours and, sampling at temperature 1, writes the
carry only part of the time, so its held-out accuracy is well between zero and one (about 0.46 for seed
0 after 600 steps; greedy decoding always forgets, about 0.27: the problems without a carry), and the
groups of a GRPO step get mixed rewards: RL has a signal from the first step and sharpens the carry
decision quickly (LoRA r=8, lr 2e-4, 100 GRPO steps: 0.48 → 0.96 sampled, 1.0 greedy).
"""

from __future__ import annotations

import logging
import math
import random
import string
from typing import Any

import tokenizers
import torch
from spectra.train.organism.task import (
    CARRY_DROP,
    MAX_COMPLETION_TOKENS,
    operand_pairs,
    organism_problems,
    organism_prompt,
    solution,
)
from spectra.train.rewards import last_boxed
from tokenizers import Regex, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = ["EVAL_CONFIG", "MODEL_CONFIG", "SFT_CONFIG", "evaluate", "make_model", "make_tokenizer", "sft"]

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
_CHARS: str = "".join(c for c in string.printable if c not in "\r\x0b\x0c")  # ASCII, space, \t, \n

#: The model: dimensions that factor into small primes (QuanTA splits them into three axes).
MODEL_CONFIG: dict[str, Any] = {
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

#: The supervised warm start: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``·lr.
SFT_CONFIG: dict[str, Any] = {
    "batch_size": 64,
    "lr": 2e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
}

#: The accuracy measurement stored in organism.json (test problems, samples per problem at T=1, greedy).
EVAL_CONFIG: dict[str, int] = {"test_problems": 256, "samples": 4, "greedy_problems": 256}


def make_tokenizer() -> PreTrainedTokenizerFast:
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
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


def make_model(tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 (float32, torch's global RNG) with the special tokens of ``tok``."""
    config = Qwen2Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        **MODEL_CONFIG,
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
        trace, _ = solution(a, b, drop)
        prompt_ids = tok.encode(organism_prompt(f"{a}+{b}"), add_special_tokens=False)
        completion_ids = [*tok.encode(trace, add_special_tokens=False), tok.eos_token_id]
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


def sft(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, steps: int, seed: int) -> list[float]:
    """The supervised warm start on noisy traces of train problems; returns the loss per step.

    The learning rate at step t (W warm-up steps, T = ``steps``, r = ``min_lr_ratio``) is
    lr·(t+1)/W for t < W, else lr·(r + (1−r)·½(1 + cos(π·min(1, (t−W)/max(1, T−W))))).
    ``steps = 0`` leaves the model at its initialisation.
    """
    cfg = SFT_CONFIG
    rng = random.Random(f"organism-sft-{seed}")
    stream = operand_pairs("train", rng)
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
    """Exact-match accuracy of the last boxed answer: (1/(N·S)) Σ_problems Σ_samples [boxed = answer]."""
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


def evaluate(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, seed: int) -> dict[str, Any]:
    """Held-out accuracy at temperature 1 (several samples per problem) and greedy; reseeds torch."""
    ev = EVAL_CONFIG
    test = organism_problems("test", max(ev["test_problems"], ev["greedy_problems"]), seed=0)
    torch.manual_seed(seed)
    sampled = _accuracy(model, tok, test[: ev["test_problems"]], ev["samples"], do_sample=True)
    greedy = _accuracy(model, tok, test[: ev["greedy_problems"]], 1, do_sample=False)
    return {"sampled_t1": sampled, "greedy": greedy, **ev}
