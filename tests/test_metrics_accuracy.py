"""Avg@k and the unbiased Pass@k estimator against brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import pytest

from spectra.metrics.accuracy import avg_at_k, mean_pass_at_k, pass_at_k


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_mean_and_large_n_is_stable():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert 0 < pass_at_k(1000, 1, 10) < 1 and pass_at_k(1000, 1, 10) == pytest.approx(0.01)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0


def test_averages_over_problems_and_bad_arguments():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k = 5 with n = 4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c = 5 correct out of n = 4"):
        pass_at_k(4, 5, 1)
