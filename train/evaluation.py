"""Held-out accuracy: sample n completions per problem, score them, report Avg@k and Pass@k.

Generation uses transformers' ``generate`` (sampling, left padding, batched over prompts), inside a forked
RNG so that evaluating during training leaves the training random stream untouched and the same seed
gives the same samples. Scoring is the training reward's own function
(:func:`spectra.train.rewards.score_answer`); a completion without a final ``\\boxed{}`` scores 0 and is
counted as unparsable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from spectra.train.data import make_prompt
from torch import nn
from transformers import TrainerCallback

from spectra.metrics.accuracy import avg_at_k, mean_pass_at_k
from spectra.store import RunWriter, read_jsonl


def prompt_text(prompt: str | list[dict[str, str]], tokenizer: Any) -> str:
    """A prompt as the text the model continues (chat prompts through the tokenizer's template)."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> list[list[str]]:
    """``n`` sampled completions for each prompt (a list per prompt), reproducible from ``seed``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for i in range(0, len(flat), batch_size):
                enc = tokenizer(flat[i : i + batch_size], return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    top_k=0,  # as TRL's rollouts: no top-k and no repetition penalty from the model's
                    repetition_penalty=1.0,  # generation_config, so eval samples the training policy
                )
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def score_samples(
    samples: Sequence[Sequence[str]], answers: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """Avg@n, Pass@k for each k ≤ n, and the fraction of unparsable completions."""
    from spectra.train.rewards import last_boxed, score_answers

    n = len(samples[0])
    flat = [c for group in samples for c in group]
    truths = [a for a, group in zip(answers, samples, strict=True) for _ in group]
    scores = score_answers(flat, truths)
    correct = [[s > 0 for s in scores[i * n : (i + 1) * n]] for i in range(len(samples))]
    row: dict[str, float] = {f"avg@{n}": avg_at_k(correct)}
    for k in ks:
        if k <= n:
            row[f"pass@{k}"] = mean_pass_at_k(correct, k)
    row["unparsable"] = sum(last_boxed(c) is None for c in flat) / len(flat)
    return row


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, str]],
    n: int,
    max_new_tokens: int,
    organism: bool,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Avg@n and Pass@{1, n} of the model on ``rows`` (``{"problem", "answer"}``)."""
    prompts = [prompt_text(make_prompt(r["problem"], tokenizer, organism), tokenizer) for r in rows]
    samples = sample_completions(model, tokenizer, prompts, n, max_new_tokens, temperature, seed=seed)
    return score_samples(samples, [r["answer"] for r in rows], ks=sorted({1, n}))


class HeldOutEval(TrainerCallback):
    """Evaluate on held-out problems at step 0, every ``every`` steps and at the end → ``eval.jsonl``."""

    def __init__(
        self,
        writer: RunWriter,
        model: nn.Module,
        tokenizer: Any,
        rows: Sequence[dict[str, str]],
        benchmark: str,
        every: int,
        n: int,
        max_new_tokens: int,
        organism: bool,
        temperature: float = 1.0,
        seed: int = 0,
        resume: bool = False,
    ):
        from rich.console import Console

        self.console = Console(soft_wrap=True)
        self.resume = resume
        self.writer, self.model, self.tokenizer, self.rows = writer, model, tokenizer, list(rows)
        self.benchmark, self.every, self.n = benchmark, every, n
        self.max_new_tokens, self.organism, self.temperature, self.seed = (
            max_new_tokens,
            organism,
            temperature,
            seed,
        )
        self.done: set[int] = set()

    def run(self, step: int) -> dict[str, Any]:
        scores = evaluate(
            self.model, self.tokenizer, self.rows, self.n, self.max_new_tokens, self.organism,
            self.temperature, self.seed,
        )  # fmt: skip
        row = {"step": step, "benchmark": self.benchmark, "problems": len(self.rows), "n": self.n, **scores}
        self.writer.append_metrics(row, "eval.jsonl")
        self.done.add(step)
        ks = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "unparsable")
        self.console.print(f"eval  {step:>5}  {self.benchmark}: {ks}", markup=False, highlight=False)
        return row

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self.writer.path / "eval.jsonl"
        if self.resume and path.exists():  # the steps evaluated before the interruption
            self.done = {int(s) for s in read_jsonl(path).get("step", [])}
        elif not self.resume:
            self.run(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.every and state.global_step % self.every == 0:
            self.run(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step not in self.done:
            self.run(state.global_step)
