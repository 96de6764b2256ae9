"""Verifiable rewards: math-verify on the final ``\\boxed{}`` answer, and a format reward.

The accuracy reward of a completion is 1.0 when math-verify (``math_verify.parse`` and
``math_verify.verify``) says that the content of its last ``\\boxed{...}`` equals the ground truth,
and 0.0 otherwise: no boxed answer, an unbalanced one, one that does not parse, a wrong one, one
longer than :data:`MAX_ANSWER_CHARS`, or one whose check runs past the timeout.

It is strict where math-verify is lenient: an equation, inequality or other relation is judged as a
relation (``\\boxed{0 = 1628}`` is not 1628; ``\\boxed{x = 1628}`` is), and exact numbers, scientific
notation included (``19.65\\times 10^{2}``, ``1.965e3``), are compared exactly before math-verify is
asked. The rules are in :mod:`spectra.train.answers`; math-verify runs in a worker process with
timeouts that work from any thread (:mod:`spectra.train.math_worker`).

This module holds the scoring entry points (:func:`judge_answers`, :func:`score_answers`,
:func:`score_answer`) and the TRL reward functions (:func:`accuracy_reward`, :func:`format_reward`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from spectra.train.answers import (
    MAX_ANSWER_CHARS,
    has_final_boxed_answer,
    last_boxed,
    prepare,
    truth_answer,
)
from spectra.train.math_worker import (
    WORKER_MEMORY_LIMIT,
    WORKER_START_TIMEOUT,
    shutdown_worker,
    verify_pairs,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_CHARS",
    "REWARD_COUNTS",
    "WORKER_MEMORY_LIMIT",
    "WORKER_START_TIMEOUT",
    "Completion",
    "Judgement",
    "accuracy_reward",
    "completion_text",
    "format_reward",
    "has_final_boxed_answer",
    "judge_answers",
    "last_boxed",
    "score_answer",
    "score_answers",
    "shutdown_worker",
]

DEFAULT_TIMEOUT = 5.0
"""Seconds math-verify may spend on one answer before it scores 0."""

# A completion is a string (standard datasets) or a list of chat messages (conversational datasets).
Completion = str | Sequence[Mapping[str, Any]]

# ---------------------------------------------------------------------------------------------------
# Scoring: cheap checks in the caller, math-verify in the worker
# ---------------------------------------------------------------------------------------------------


class Judgement(NamedTuple):
    """The verdict on one completion: its score, and whether its final answer could be read at all."""

    score: float  # 1.0 correct, 0.0 otherwise
    parsed: bool  # False: no closed \boxed{}, an empty or over-long one, one math-verify reads as
    #               nothing, or one whose check ran past the timeout


def judge_answers(
    completions: Sequence[str | None], truths: Sequence[str], timeout: float = DEFAULT_TIMEOUT
) -> list[Judgement]:
    """Score each completion against its ground truth and say whether its answer parsed (a completion
    that is not a string scores 0 and is unparsable).

    The answers that need math-verify go to the worker process in one round-trip. ``timeout`` applies
    per item: math-verify may spend up to ``timeout`` seconds on each answer (time spent waiting for
    the lock or for a worker to start is not counted), so a batch of n hostile answers takes about
    n · timeout seconds, and an answer that times out scores 0 without affecting the others.
    """
    if len(completions) != len(truths):
        raise ValueError(f"judge_answers: {len(completions)} completions but {len(truths)} truths")
    if timeout <= 0:
        raise ValueError(f"judge_answers: timeout must be positive, got {timeout}")
    verdicts: list[Judgement | None] = []
    pairs: list[tuple[str, str]] = []
    for completion, truth in zip(completions, truths, strict=True):
        if not isinstance(completion, str):  # not text: scored 0, unparsable
            verdicts.append(Judgement(0.0, False))
            continue
        prepared = prepare(last_boxed(completion), truth_answer(truth))
        if prepared.score is None:
            verdicts.append(None)
            pairs.append((prepared.answer, prepared.truth))
        else:
            verdicts.append(Judgement(prepared.score, prepared.parsed))
    verified = iter(verify_pairs(pairs, timeout) if pairs else [])
    return [Judgement(*next(verified)) if v is None else v for v in verdicts]


def score_answers(
    completions: Sequence[str], truths: Sequence[str], timeout: float = DEFAULT_TIMEOUT
) -> list[float]:
    """Accuracy of each completion against its ground truth: 1.0 or 0.0 (see :func:`score_answer` and
    :func:`judge_answers`)."""
    return [j.score for j in judge_answers(completions, truths, timeout)]


def score_answer(completion: str, truth: str, timeout: float = DEFAULT_TIMEOUT) -> float:
    """1.0 if the last ``\\boxed{}`` answer of ``completion`` equals ``truth``, else 0.0.

    ``truth`` may be a bare answer (``85``, ``\\frac{1}{2}``, ``x^2+1``), a ``$...$`` formula or a text
    with a boxed answer. Relations and exact numbers are decided first by the rules of
    :mod:`spectra.train.answers`; otherwise both sides are parsed as the content of a ``\\boxed{}`` with
    math-verify's LaTeX extraction, and ``verify(gold, answer)`` decides (numbers to 6 decimal places,
    symbolic equality, sets, intervals, ...). Returns 0.0 when there is no boxed answer, when it does not
    parse, when it is longer than MAX_ANSWER_CHARS, or when math-verify runs for more than ``timeout``
    seconds; works from any thread or process.
    """
    return score_answers([completion], [truth], timeout)[0]


# ---------------------------------------------------------------------------------------------------
# TRL reward functions
# ---------------------------------------------------------------------------------------------------


def _message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return ""


def completion_text(completion: Any) -> str | None:
    """The text to score: the string itself, or the content of the last assistant message (a chat
    message is a mapping; a conversation a list of them). None for anything else (a number, bytes,
    a list of non-messages): it is scored 0 and counted as unparsable, never an exception."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    if not isinstance(completion, Sequence) or isinstance(completion, (bytes, bytearray)):
        return None
    if not all(isinstance(m, Mapping) for m in completion):
        return None
    messages = [m for m in completion if m.get("role", "assistant") == "assistant"]
    return _message_text(messages[-1].get("content")) if messages else ""


#: Completions the TRL reward functions scored, and how many of those were unparsable (no final
#: ``\\boxed{}`` answer math-verify could read, or not a string or chat message at all), since import.
REWARD_COUNTS: dict[str, int] = {"completions": 0, "unparsable": 0, "malformed": 0}


def accuracy_reward(completions: Sequence[Completion], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: ``score_answer(completion, str(answer))`` for each completion, 1.0 or 0.0.

    TRL calls it as ``reward_func(prompts=..., completions=..., completion_ids=..., **columns)``; the
    dataset's ``answer`` column holds the ground truth. Completions may be strings or, for
    conversational datasets, lists of message dicts; anything else scores 0 and is counted as
    unparsable (:data:`REWARD_COUNTS`). Logged by TRL as "accuracy".
    """
    texts = [completion_text(c) for c in completions]
    truths = ["" if a is None else str(a) for a in answer]  # a missing truth scores 0
    judged = judge_answers(texts, truths)  # a text of None (not a completion) scores 0, unparsable
    REWARD_COUNTS["completions"] += len(texts)
    REWARD_COUNTS["malformed"] += sum(t is None for t in texts)
    REWARD_COUNTS["unparsable"] += sum(not j.parsed for j in judged)
    return [j.score for j in judged]


def format_reward(completions: Sequence[Completion], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 if :func:`has_final_boxed_answer` holds for the completion, else 0.0
    (0.0 for a completion that is not a string or chat message).

    Logged by TRL as "format".
    """
    texts = [completion_text(c) for c in completions]
    return [1.0 if t is not None and has_final_boxed_answer(t) else 0.0 for t in texts]


accuracy_reward.__name__ = "accuracy"
format_reward.__name__ = "format"
