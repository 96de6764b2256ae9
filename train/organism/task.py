"""The organism's task: add two three-digit numbers column by column, then box the answer.

::

    prompt      347+588=
    completion  7+8=15,4+8+1=13,3+5+1=9,\\boxed{935}<eos>

Each step adds one column (units first); a carry from the previous column is written as ``+1``; the
boxed answer is the last step's sum followed by the units digits of the earlier steps, read backwards.
The answer is checked by exact match of the last ``\\boxed{}``
(:func:`spectra.train.rewards.last_boxed`), or by math-verify. The supervised warm start sees *noisy*
traces, each carry forgotten with probability :data:`CARRY_DROP` (``4+8=12`` instead of ``4+8+1=13``).

Train and test problems are disjoint as sets of unordered operand pairs (:func:`split_of`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Literal

__all__ = [
    "CARRY_DROP",
    "DEFAULT_N",
    "MAX_COMPLETION_TOKENS",
    "OPERAND_RANGE",
    "TEST_FRACTION_PER_MILLE",
    "operand_pairs",
    "organism_problems",
    "organism_prompt",
    "solution",
    "split_of",
]

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


def organism_prompt(problem: str) -> str:
    """The organism's prompt for ``problem`` (e.g. ``"347+588"`` → ``"347+588="``)."""
    return f"{problem}="


def solution(a: int, b: int, drop: list[bool] | None = None) -> tuple[str, int]:
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


def split_of(a: int, b: int) -> str:
    """``"test"`` or ``"train"``, by a stable hash of the unordered operand pair (a+b and b+a agree)."""
    lo, hi = sorted((a, b))
    h = int.from_bytes(hashlib.blake2b(f"{lo},{hi}".encode(), digest_size=8).digest(), "big")
    return "test" if h % 1000 < TEST_FRACTION_PER_MILLE else "train"


def operand_pairs(split: str, rng: random.Random) -> Iterator[tuple[int, int]]:
    """An endless stream of operand pairs of ``split``, drawn uniformly with replacement."""
    lo, hi = OPERAND_RANGE
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if split_of(a, b) == split:
            yield a, b


def _row(a: int, b: int) -> dict[str, str]:
    problem = f"{a}+{b}"
    trace, answer = solution(a, b)
    assert answer == a + b
    return {"problem": problem, "answer": str(answer), "prompt": organism_prompt(problem), "solution": trace}


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
    for pair in operand_pairs(split, rng):
        if len(rows) == n:
            break
        if pair not in seen:
            seen.add(pair)
            rows.append(_row(*pair))
    return rows
