"""Held-out accuracy: sample n completions per problem, score them, report Avg@k and Pass@k.

Generation is :mod:`spectra.train.eval.sampling` (here transformers' ``generate``, each sample from its own
seeded random stream, so that evaluating during training leaves the training random stream untouched and
the same seed gives the same samples). Scoring is the training reward's own function
(:func:`spectra.train.rewards.judge_answers`); a completion without a final ``\\boxed{}``, or with one
math-verify cannot read, scores 0 and is counted as unparsable.

:class:`HeldOutEval` evaluates during training (``eval.jsonl``); `spectra eval` after it
(:mod:`spectra.train.eval.run`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spectra.train.data import make_prompt, prompt_ids
from spectra.train.eval.sampling import Sampling, sample_completions
from torch import nn
from transformers import TrainerCallback

from spectra.metrics.accuracy import avg_at_k, mean_pass_at_k
from spectra.store import read_jsonl
from spectra.writer import RunWriter


@dataclass
class Scored:
    """Per problem, the outcome of each of its n samples: correct, and whether its answer parsed."""

    correct: list[list[bool]]
    parsed: list[list[bool]]

    @property
    def n(self) -> int:
        return len(self.correct[0]) if self.correct else 0

    def summary(self, ks: Sequence[int]) -> dict[str, float]:
        """Avg@n, Pass@k for each k ≤ n, and the fraction of completions whose answer did not parse."""
        n = self.n
        row: dict[str, float] = {f"avg@{n}": avg_at_k(self.correct)}
        for k in sorted(set(ks)):
            if k <= n:
                row[f"pass@{k}"] = mean_pass_at_k(self.correct, k)
        flat = [p for group in self.parsed for p in group]
        row["unparsable"] = (len(flat) - sum(flat)) / len(flat) if flat else 0.0
        return row


def score_completions(samples: Sequence[Sequence[str]], answers: Sequence[str]) -> Scored:
    """Judge every completion of every problem with the training reward's own scorer
    (:func:`spectra.train.rewards.judge_answers`: math-verify on the last ``\\boxed{}``)."""
    from spectra.train.rewards import judge_answers

    sizes = [len(group) for group in samples]
    flat = [c for group in samples for c in group]
    truths = [a for a, group in zip(answers, samples, strict=True) for _ in group]
    verdicts = iter(judge_answers(flat, truths))
    judged = [[next(verdicts) for _ in range(size)] for size in sizes]
    return Scored([[j.score > 0 for j in g] for g in judged], [[j.parsed for j in g] for g in judged])


def score_samples(
    samples: Sequence[Sequence[str]], answers: Sequence[str], ks: Sequence[int]
) -> dict[str, float]:
    """Avg@n, Pass@k for each k ≤ n, and the fraction of unparsable completions."""
    return score_completions(samples, answers).summary(ks)


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
    """Avg@n and Pass@{1, n} of the model on ``rows`` (``{"problem", "answer"}``), the fraction of
    unparsable and of truncated completions, and their mean length in tokens."""
    prompts = [prompt_ids(make_prompt(r["problem"], tokenizer, organism), tokenizer) for r in rows]
    sampling = Sampling(n=n, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
    samples = sample_completions(model, tokenizer, prompts, sampling)
    return score_samples(samples.texts, [r["answer"] for r in rows], ks=sorted({1, n})) | samples.summary()


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
        row = {
            "step": step, "benchmark": self.benchmark, "problems": len(self.rows), "n": self.n, **scores,
            "temperature": self.temperature, "top_p": 1.0, "max_tokens": self.max_new_tokens,
            "seed": self.seed,
        }  # fmt: skip
        self.writer.append_metrics(row, "eval.jsonl")
        self.done.add(step)
        ks = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k.startswith(("avg@", "pass@")))
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
