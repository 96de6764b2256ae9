"""Accuracy over k samples: Avg@k and the unbiased Pass@k estimator.

With n samples of one problem of which c are correct:

- Avg@k (mean accuracy): c / n, averaged over problems (the expected accuracy of one sample; the studies
  report it with n = k samples per problem);
- Pass@k (Chen et al., 2021): the probability that at least one of k samples drawn without replacement
  from the n is correct, 1 − C(n−c, k) / C(n, k), averaged over problems. Computed as the product
  1 − Π_{i=n−c+1}^{n} (1 − k/i), which is exact and stable for large n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem: 1 − C(n−c, k) / C(n, k) (0 ≤ c ≤ n, 1 ≤ k ≤ n)."""
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: c = {c} correct out of n = {n} samples; expected 0 ≤ c ≤ n")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: k = {k} with n = {n} samples; expected 1 ≤ k ≤ n")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Pass@k averaged over problems; ``correct[i]`` holds the n_i sample outcomes of problem i."""
    return float(np.mean([pass_at_k(len(c), int(sum(c)), k) for c in correct]))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Avg@k: the mean over problems of the fraction of correct samples, (1/P) Σ_i c_i / n_i."""
    return float(np.mean([sum(c) / len(c) for c in correct]))
