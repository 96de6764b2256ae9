"""Seeds and uncertainty: runs that differ only by seed, intervals of their mean, and whether two
configurations differ by more than the seed noise.

Pure numpy/pandas/scipy (the tables layer). Runs are *replicates* when their configurations
(``run.json``) are equal once the seed and the keys that do not change what is trained
(:data:`NOT_CONFIGURATION`) are left out (:func:`seed_groups`). A quantity measured on n replicates
x_1 … x_n is shown as its mean x̄ = Σ x_i / n with one of two intervals, each named for what it is:

- the **Student-t interval of the mean** (:func:`t_interval`), x̄ ± t_{(1+c)/2, n−1} · s/√n (s the
  unbiased standard deviation): the interval a table calls "95 %". It covers the mean at its nominal
  level for normal noise at any n ≥ 2, and is wide when the seeds are few (t_{0.975, 1} = 12.7): that
  width is what 2 or 3 seeds can tell;
- the **range of the seeds** (:func:`seed_range`), [min x_i, max x_i]: what the figures' bands show,
  labelled "range of n seeds", never "95 %" — with 2 seeds it covers the mean half of the time, with 3
  three quarters.

The percentile bootstrap (:func:`bootstrap_ci`, exact for n ≤ 8) is kept for larger samples; with 2 or 3
values it *is* the seeds' range (with n = 2 it spans the two values), so it is never shown as a 95 %
interval of a few seeds. One value has no interval.

Whether two configurations differ by more than the seed noise is a question for a test that keeps its
level at such n: Welch's t-interval of the difference of their means (:func:`difference_ci`,
:func:`within_noise`), with Bonferroni's correction over the comparisons a verdict makes.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

#: run.json keys that do not change what is trained: runs equal in all other keys and different in
#: these (and the seed) are replicates of one configuration.
NOT_CONFIGURATION = (
    "seed", "name", "out", "path", "model_path", "versions", "report_to", "logging_steps", "save_every",
    "base_copy_limit_mb", "monitor_every", "monitor_modules",
)  # fmt: skip
CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its bootstrap interval (``low``, ``high``; None for n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def __str__(self) -> str:
        if self.n == 0 or math.isnan(self.mean):
            return "—"
        if self.low is None or self.high is None:
            return f"{self.mean:.3g}"
        return f"{self.mean:.3g} [{self.low:.3g}, {self.high:.3g}]"

    def contains(self, value: float) -> bool | None:
        """Whether ``value`` lies in [low, high]; None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= value <= self.high


def configuration_key(config: Mapping[str, Any], ignore: Sequence[str] = NOT_CONFIGURATION) -> str:
    """The configuration of a run without its seed and without the keys in ``ignore``, as sorted JSON
    (two runs are replicates when their keys are equal)."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    return json.dumps(kept, sort_keys=True, default=str)


def seed_groups(
    configs: Sequence[Mapping[str, Any]], ignore: Sequence[str] = NOT_CONFIGURATION
) -> list[list[int]]:
    """Indices of ``configs`` grouped by :func:`configuration_key`, groups and members in the order of
    their first appearance: ``[[0, 2], [1]]`` when runs 0 and 2 differ only by seed. Runs are grouped
    only when each records a ``seed`` and no two share one: runs of equal configuration and seed (or
    without a recorded seed) are not replicates, each stays a group of its own."""
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(configuration_key(config, ignore), []).append(i)
    out: list[list[int]] = []
    for members in groups.values():
        seeds = [json.dumps(configs[i].get("seed"), default=str) for i in members]
        distinct = all("seed" in configs[i] for i in members) and len(set(seeds)) == len(seeds)
        out += [members] if distinct else [[i] for i in members]
    return sorted(out, key=lambda g: g[0])


def distinguishing_keys(
    configs: Sequence[Mapping[str, Any]], ignore: Sequence[str] = NOT_CONFIGURATION
) -> list[str]:
    """The configuration keys whose values differ between ``configs`` (seed and ``ignore`` left out), in
    the order of the first config's keys: what tells the seed groups apart."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys and k not in ignore]
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    return x[np.isfinite(x)]


def bootstrap_means(
    values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap distribution of the mean of ``values`` as ``(means, weights)`` (weights sum to 1).

    Exact while the number of distinct resamples, the multisets C(2n − 1, n), is at most ``resamples``:
    each multiset with counts c_j has mean Σ c_j x_j / n and probability n!/(∏ c_j!)/nⁿ. Beyond, it is
    ``resamples`` draws of n indices from a generator seeded with ``seed``, each of weight 1/resamples.
    """
    x = _clean(values)
    n = len(x)
    if n == 0:
        raise ValueError("bootstrap_means: no finite value")
    if exact(n, resamples):
        counts, weights = _multisets(n)
        return counts @ x / n, weights
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return x[draws].mean(axis=1), np.full(resamples, 1.0 / resamples)


@functools.cache
def _multisets(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset of n draws from n values as counts (rows), and its probability n!/(∏ c_j!)/nⁿ."""
    counts = np.array(
        [np.bincount(c, minlength=n) for c in itertools.combinations_with_replacement(range(n), n)]
    )
    log_w = math.lgamma(n + 1) - np.sum([[math.lgamma(c + 1) for c in row] for row in counts], axis=1)
    weights = np.exp(log_w - n * math.log(n))
    counts.flags.writeable = weights.flags.writeable = False  # cached: shared by every call
    return counts, weights / weights.sum()


def exact(n: int, resamples: int = RESAMPLES) -> bool:
    """Whether :func:`bootstrap_means` enumerates the n-value distribution exactly (C(2n − 1, n) atoms at
    most ``resamples``)."""
    return math.comb(2 * n - 1, n) <= resamples


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    """The q-quantiles of a discrete distribution: the smallest value whose cumulative weight reaches q
    (the inverse of the distribution function, numpy's ``inverted_cdf``)."""
    order = np.argsort(values, kind="stable")
    v, cdf = values[order], np.cumsum(weights[order])
    cdf /= cdf[-1]
    # a tolerance for the rounding of the cumulative sum: a cdf of 0.0249999… reaches 0.025
    return [float(v[min(int(np.searchsorted(cdf, q - 1e-12)), len(v) - 1)]) for q in qs]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of the finite ``values`` and its percentile-bootstrap interval at ``confidence``: the
    (1 − c)/2 and (1 + c)/2 quantiles of :func:`bootstrap_means`. No interval for fewer than 2 values."""
    x = _clean(values)
    if len(x) == 0:
        return Interval(math.nan, None, None, 0)
    if len(x) == 1:
        return Interval(float(x[0]), None, None, 1)
    means, weights = bootstrap_means(x, resamples, seed)
    low, high = weighted_quantiles(means, weights, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(x.mean()), low, high, len(x))


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """The mean of the finite ``values`` and its Student-t interval x̄ ± t_{(1+c)/2, n−1}·s/√n (s the
    unbiased standard deviation). No interval for fewer than 2 values; a zero-width one when they are
    all equal."""
    from scipy.stats import t as student_t

    x = _clean(values)
    if len(x) == 0:
        return Interval(math.nan, None, None, 0)
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, None, None, 1)
    half = float(student_t.ppf((1 + confidence) / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def seed_range(values: Sequence[float] | np.ndarray) -> Interval:
    """The mean of the finite ``values`` and their range [min, max] (a band to draw, labelled "range of
    n seeds"; not a confidence interval). No range for fewer than 2 values."""
    x = _clean(values)
    if len(x) == 0:
        return Interval(math.nan, None, None, 0)
    if len(x) == 1:
        return Interval(float(x[0]), None, None, 1)
    return Interval(float(x.mean()), float(x.min()), float(x.max()), len(x))


#: The intervals :func:`mean_over_seeds` can give: Student-t of the mean, or the seeds' range.
INTERVALS = {"t": t_interval, "range": seed_range}


def difference_ci(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> Interval:
    """mean(a) − mean(b) and Welch's t-interval of that difference at ``confidence``:

        d ± t_{(1+c)/2, ν} · √(s_a²/n_a + s_b²/n_b),
        ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))

    (s² the unbiased variances). Not the bootstrap: with the 2–5 seeds a study affords, the percentile
    bootstrap of a difference calls equal configurations different far more often than 1 − c (31 % at
    2 seeds each, 19 % at 3, in simulation), while Welch's interval keeps its level for normal noise
    and is wide when the seeds are few — "cannot tell" is then the honest answer. When neither side
    varies the interval is the difference itself. ``n`` is the smaller count; no interval when either
    has fewer than 2 values."""
    from scipy.stats import t as student_t

    x, y = _clean(a), _clean(b)
    n = min(len(x), len(y))
    if n == 0:
        return Interval(math.nan, None, None, 0)
    diff = float(x.mean() - y.mean())
    if n < 2:
        return Interval(diff, None, None, n)
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, n)
    dof = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = float(student_t.ppf((1 + confidence) / 2, dof)) * se
    return Interval(diff, diff - half, diff + half, n)


def within_noise(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> bool | None:
    """Whether mean(a) and mean(b) differ by no more than the seed noise: Welch's interval of the
    difference (:func:`difference_ci`) contains 0. None when either has fewer than 2 values."""
    return difference_ci(a, b, confidence).contains(0.0)


def mean_over_seeds(
    frames: Sequence[pd.DataFrame], on: str | Sequence[str], columns: Sequence[str] | None = None,
    confidence: float = CONFIDENCE, interval: str = "t",
) -> pd.DataFrame:  # fmt: skip
    """Replicates' tables (one per seed, rows keyed by ``on``, e.g. the step) → one table: per key and
    column, the mean over the replicates that have a finite value (``<column>``), its interval
    (``<column>_lo``, ``<column>_hi``; NaN with one value) and the count (``<column>_n``).

    ``columns``: the numeric columns to average (default: every numeric column but ``on``).
    ``interval``: "t" (the Student-t interval of the mean at ``confidence``) or "range" (the seeds'
    range, for bands)."""
    if interval not in INTERVALS:
        raise ValueError(f"mean_over_seeds: interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    keys = [on] if isinstance(on, str) else list(on)
    parts = [f.assign(_replicate=i) for i, f in enumerate(frames) if len(f)]
    if not parts:
        return pd.DataFrame(columns=keys)
    both = pd.concat(parts, ignore_index=True)
    if columns is None:
        columns = [c for c in both.select_dtypes("number").columns if c not in keys and c != "_replicate"]
    columns = [c for c in columns if c in both.columns]
    rows = []
    for key, g in both.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for c in columns:
            values = pd.to_numeric(g[c], errors="coerce").to_numpy(dtype=float)
            ci = t_interval(values, confidence) if interval == "t" else seed_range(values)
            row[c] = ci.mean
            row[f"{c}_lo"] = math.nan if ci.low is None else ci.low
            row[f"{c}_hi"] = math.nan if ci.high is None else ci.high
            row[f"{c}_n"] = ci.n
        rows.append(row)
    return pd.DataFrame(rows)
