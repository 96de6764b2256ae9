"""Seeds and uncertainty (spectra.stats): replicate groups, the Student-t interval of the mean and the
seeds' range (with their coverage), the bootstrap interval against known answers and scipy's bootstrap,
the seed-noise verdict, and the comparison of runs that differ only by seed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from spectra.cli.main import app
from typer.testing import CliRunner

from spectra.pipeline import analyze_run
from spectra.report import write_comparison
from spectra.stats import (
    bootstrap_ci,
    bootstrap_means,
    difference_ci,
    distinguishing_keys,
    mean_over_seeds,
    seed_groups,
    seed_range,
    t_interval,
    weighted_quantiles,
    within_noise,
)
from spectra.synthetic import write_synthetic_run


def test_two_values_have_the_known_bootstrap_distribution():
    # resamples of (0, 1): means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    means, weights = bootstrap_means([0.0, 1.0])
    dist = {float(m): float(w) for m, w in zip(means, weights, strict=True)}
    assert dist == pytest.approx({0.0: 0.25, 0.5: 0.5, 1.0: 0.25})
    ci = bootstrap_ci([0.0, 1.0])
    assert (ci.mean, ci.low, ci.high, ci.n) == (0.5, 0.0, 1.0, 2)
    # a 40 % interval holds only the middle atom
    middle = bootstrap_ci([0.0, 1.0], confidence=0.4)
    assert middle.low == middle.high == 0.5


@pytest.mark.parametrize("n", [3, 5, 7])
def test_exact_distribution_has_the_bootstrap_mean_and_variance(n):
    # E*[x̄*] = x̄ and Var*[x̄*] = σ̂²/n with σ̂² the plug-in variance (ddof 0): known answers
    x = np.random.default_rng(n).normal(size=n)
    means, weights = bootstrap_means(x)
    assert len(means) == math.comb(2 * n - 1, n) and weights.sum() == pytest.approx(1.0)
    assert np.sum(weights * means) == pytest.approx(x.mean())
    assert np.sum(weights * (means - x.mean()) ** 2) == pytest.approx(x.var() / n)


@pytest.mark.parametrize("n", [5, 12])  # exact (126 atoms) and Monte Carlo (12 values: 1.35 M atoms)
def test_interval_matches_scipy_percentile_bootstrap(n):
    x = np.random.default_rng(7).gamma(2.0, size=n)
    ours = bootstrap_ci(x, resamples=10_000 if n < 10 else 200_000)
    ref = scipy_stats.bootstrap(
        (x,), np.mean, method="percentile", n_resamples=200_000, rng=np.random.default_rng(1)
    ).confidence_interval
    spread = x.std() / math.sqrt(n)
    assert ours.low == pytest.approx(ref.low, abs=0.03 * spread)
    assert ours.high == pytest.approx(ref.high, abs=0.03 * spread)
    assert ours.mean == pytest.approx(x.mean())


def test_one_value_has_no_interval_and_nan_is_left_out():
    assert str(bootstrap_ci([0.42])) == "0.42" and bootstrap_ci([0.42]).low is None
    assert bootstrap_ci([1.0, float("nan"), 3.0]).n == 2
    assert bootstrap_ci([]).n == 0 and str(bootstrap_ci([])) == "—"
    assert bootstrap_ci([2.0, 2.0, 2.0]).low == bootstrap_ci([2.0, 2.0, 2.0]).high == 2.0


@pytest.mark.parametrize("values", [[0.5, 0.6], [0.61, 0.64, 0.70], [1.0, 3.0, 2.0, 7.0, 4.0]])
def test_t_interval_is_scipys_student_t_interval_of_the_mean(values):
    x = np.array(values)
    want = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    got = t_interval(values)
    assert (got.low, got.high) == pytest.approx(want, rel=1e-12) and got.mean == pytest.approx(x.mean())
    assert t_interval([0.42]).low is None and t_interval([]).n == 0
    assert (t_interval([2.0, 2.0]).low, t_interval([2.0, 2.0]).high) == (2.0, 2.0)
    assert (seed_range(values).low, seed_range(values).high) == (min(values), max(values))


@pytest.mark.parametrize(("seeds", "range_cover"), [(2, 0.5), (3, 0.75)])
def test_a_t_interval_covers_the_mean_at_95_percent_and_the_seeds_range_does_not(seeds, range_cover):
    """Why a table's "95 %" is Student-t: with 2 or 3 seeds the range (= the percentile bootstrap's interval)
    covers the true mean 1 − 2·2⁻ⁿ of the time (50 %, 75 %)."""
    rng = np.random.default_rng(seeds)
    draws = rng.normal(size=(4000, seeds))
    t_cover = np.mean([t_interval(d).contains(0.0) for d in draws])
    r_cover = np.mean([seed_range(d).contains(0.0) for d in draws])
    b_cover = np.mean([bootstrap_ci(d).contains(0.0) for d in draws[:400]])
    assert abs(t_cover - 0.95) < 0.015 and abs(r_cover - range_cover) < 0.03 and b_cover < 0.8


def test_weighted_quantiles_invert_the_distribution_function():
    v, w = np.array([3.0, 1.0, 2.0]), np.array([0.5, 0.25, 0.25])
    assert weighted_quantiles(v, w, [0.0, 0.25, 0.26, 0.5, 0.51, 1.0]) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_within_noise_separates_overlapping_from_distinct_seeds():
    assert within_noise([0.50, 0.60, 0.55], [0.52, 0.58, 0.62]) is True
    assert within_noise([0.50, 0.52, 0.51], [0.80, 0.82, 0.81]) is False
    assert within_noise([0.5], [0.6, 0.7]) is None
    d = difference_ci([1.0, 2.0], [0.0, 0.0])  # all the spread on one side: Welch with ν = 1
    assert d.mean == 1.5 and d.low == pytest.approx(1.5 - 12.706204736 * 0.5) and d.high > 7.8
    assert (lambda c: (c.low, c.high))(difference_ci([0.3, 0.3], [0.1, 0.1])) == pytest.approx((0.2, 0.2))


@pytest.mark.parametrize(
    ("a", "b"), [([0.61, 0.64, 0.70], [0.52, 0.55, 0.49, 0.58]), ([1.0, 3.0], [0.0, 0.5, 0.2])]
)
def test_difference_interval_is_scipys_welch_interval(a, b):
    want = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    got = difference_ci(a, b, confidence=0.9)
    assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-12)


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_equal_configurations_are_called_different_at_most_at_the_nominal_rate(seeds):
    """Two configurations with no real difference, normal seed noise: the verdict "beyond the seed
    noise" comes out in about 5 % of 4000 trials (the percentile bootstrap said so in 19–31 %)."""
    rng = np.random.default_rng(seeds)
    false = sum(within_noise(rng.normal(size=seeds), rng.normal(size=seeds)) is False for _ in range(4000))
    assert false / 4000 < 0.065


def test_seed_groups_ignore_the_seed_and_bookkeeping_keys():
    configs = [
        {"method": "lora", "rank": 8, "seed": 0, "name": "a", "versions": {"torch": "1"}},
        {"method": "lora", "rank": 16, "seed": 0, "name": "b"},
        {"method": "lora", "rank": 8, "seed": 1, "name": "c", "versions": {"torch": "2"}},
    ]
    assert seed_groups(configs) == [[0, 2], [1]]
    # the same configuration and seed, or no seed recorded: not replicates
    assert seed_groups([configs[0], dict(configs[0], name="again")]) == [[0], [1]]
    assert seed_groups([{"method": "full", "name": "a"}, {"method": "full", "name": "b"}]) == [[0], [1]]
    assert distinguishing_keys([configs[0], configs[1]]) == ["rank"]


def test_mean_over_seeds_aligns_steps_and_bands():
    a = pd.DataFrame({"step": [0, 10], "E_1": [0.1, 0.3]})
    b = pd.DataFrame({"step": [0, 10, 20], "E_1": [0.3, 0.5, 0.9]})
    m = mean_over_seeds([a, b], "step", ["E_1"], interval="range")
    assert list(m["step"]) == [0, 10, 20]
    assert list(m["E_1"]) == pytest.approx([0.2, 0.4, 0.9])
    assert list(m["E_1_lo"][:2]) == pytest.approx([0.1, 0.3])
    assert list(m["E_1_hi"][:2]) == pytest.approx([0.3, 0.5])
    assert math.isnan(m["E_1_lo"].iloc[2]) and list(m["E_1_n"]) == [2, 2, 1]
    t = mean_over_seeds([a, b], "step", ["E_1"])  # the default: Student-t, 12.7 × s/√2 each side
    assert t["E_1_lo"].iloc[0] == pytest.approx(0.2 - 12.706204736 * 0.1)
    with pytest.raises(ValueError, match="interval must be one of t, range"):
        mean_over_seeds([a, b], "step", ["E_1"], interval="bootstrap")


def _seeded_run(path, shapes, seed: int, rank: int, avg: float):
    writer = write_synthetic_run(path, shapes, steps=(0, 5), rank=rank, seed=seed)
    for step in range(1, 6):
        writer.append_metrics({"step": step, "reward": avg + 0.01 * step})
    row = {"step": 5, "benchmark": "organism", "n": 4, "avg@4": avg, "pass@4": avg}
    writer.append_metrics(row, "eval.jsonl")
    return path


SHAPES = {"model.layers.0.self_attn.q_proj": (24, 24), "model.layers.0.mlp.up_proj": (48, 24)}


def test_compare_groups_seeds_into_mean_and_interval(tmp_path):
    small_shapes = SHAPES
    runs = [
        _seeded_run(tmp_path / "r4-s0", small_shapes, 0, 4, 0.50),
        _seeded_run(tmp_path / "r4-s1", small_shapes, 1, 4, 0.60),
        _seeded_run(tmp_path / "r2-s0", small_shapes, 0, 2, 0.52),
        _seeded_run(tmp_path / "r2-s1", small_shapes, 1, 2, 0.58),
        _seeded_run(tmp_path / "r1", small_shapes, 0, 1, 0.10),
    ]
    table, files = write_comparison([analyze_run(r) for r in runs], tmp_path / "cmp")
    assert len(table) == 5  # compare.csv: one row per run, as without seeds
    seeds = pd.read_csv(tmp_path / "cmp" / "compare_seeds.csv")
    assert list(seeds["seeds"]) == [2, 2, 1]
    assert list(seeds["configuration"][:2]) == ["alpha 8.0, rank 4 (2 seeds)", "alpha 4.0, rank 2 (2 seeds)"]
    assert seeds["organism avg@4"].tolist() == pytest.approx([0.55, 0.55, 0.10])
    # two seeds: the Student-t interval of the mean, 0.55 ± 12.7 · 0.0707/√2 (not their range)
    assert seeds.loc[0, "organism avg@4 ci_low"] == pytest.approx(0.55 - 12.706204736 * 0.05)
    assert seeds.loc[0, "organism avg@4 ci_high"] == pytest.approx(0.55 + 12.706204736 * 0.05)
    assert pd.isna(seeds.loc[2, "organism avg@4 ci_low"])  # one seed: the value as it is
    verdicts = list(seeds["within seed noise of best"])
    assert verdicts[2] == "one seed" and sorted(verdicts[:2]) == ["yes", "—"]
    page = files[-1].read_text()
    assert "within the seed noise" in page and "Student-t 95 %" in page and "bootstrap" not in page
    assert '"name":"alpha 8.0, rank 4 (2 seeds): \\u0394W"' in page  # one curve per configuration
    # the command prints the seed table and the verdicts
    r = CliRunner().invoke(app, ["compare", *map(str, runs), "--out", str(tmp_path / "cmp2")])
    assert r.exit_code == 0, r.output
    assert "mean [Student-t 95 % interval]" in r.output and "0.55 [-0.0" in r.output
    assert "within the seed noise" in r.output and "no noise estimate" in r.output


def test_compare_without_replicates_writes_no_seed_table(tmp_path):
    small_shapes = SHAPES
    runs = [_seeded_run(tmp_path / n, small_shapes, 0, r, 0.5) for n, r in (("a", 4), ("b", 2))]
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare_seeds.csv").write_text("stale")
    _, files = write_comparison([analyze_run(r) for r in runs], tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "compare_seeds.csv").exists()
    assert "seed noise" not in files[-1].read_text()
