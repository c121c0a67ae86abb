"""Statistics on constructed data where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moola_engine.core.data import stratified_folds
from moola_engine.experiments import stats


def test_identical_pair_gives_zero_difference_and_no_significance() -> None:
    a = np.linspace(0.5, 0.7, 12)
    res = stats.paired_difference(a, a.copy())
    assert res.diff.mean == 0.0 and res.diff.lo == 0.0 and res.diff.hi == 0.0
    assert res.p == 1.0 and res.test == "wilcoxon-none"
    assert math.isnan(res.mde)  # no spread in the differences: the design says nothing about power


def test_planted_effect_is_found_and_covered() -> None:
    rng = np.random.default_rng(3)
    b = rng.uniform(0.5, 0.6, 20)
    a = b + 0.05 + rng.normal(0, 0.01, 20)
    res = stats.paired_difference(a, b)
    assert res.p < 0.001 and res.test == "wilcoxon-exact"
    assert 0 < res.diff.lo < 0.05 < res.diff.hi
    assert res.mde < 0.05  # this design can see an effect of this size


def test_no_effect_is_not_significant_and_the_mde_says_what_could_hide() -> None:
    rng = np.random.default_rng(4)
    b = rng.uniform(0.5, 0.6, 10)
    a = b + rng.normal(0, 0.05, 10)
    res = stats.paired_difference(a, b)
    assert res.p > 0.05 and res.diff.lo < 0 < res.diff.hi
    expected = (stats.t_quantile(0.975, 9) + stats.t_quantile(0.8, 9)) * res.sd / math.sqrt(10)
    assert res.mde == pytest.approx(expected)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent() -> None:
    rng = np.random.default_rng(5)
    hits = 0
    for i in range(200):
        lo, hi = stats.bootstrap_ci(rng.normal(1.0, 1.0, 30), n_boot=1000, seed=i)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_needs_two_values_and_is_deterministic() -> None:
    assert all(math.isnan(v) for v in stats.bootstrap_ci([0.5]))
    assert stats.bootstrap_ci([1, 2, 3, 4], seed=1) == stats.bootstrap_ci([1, 2, 3, 4], seed=1)


def test_wilcoxon_known_values() -> None:
    # all six differences positive: the most extreme of 2**6 sign patterns, two-sided p = 2/64
    w = stats.wilcoxon_signed_rank([1, 2, 3, 4, 5, 6])
    assert (w.statistic, w.p, w.method) == (21.0, 2 / 64, "exact")
    assert stats.wilcoxon_signed_rank([1, 2, 3, 4, 5]).p == 2 / 32  # five pairs can never reach p < 0.05
    assert stats.min_wilcoxon_p(5) == 0.0625 and stats.min_wilcoxon_p(6) == 0.03125
    # zeros are dropped (Wilcoxon's convention)
    assert stats.wilcoxon_signed_rank([0, 0, 1, 2, 3, 4, 5, 6]).p == 2 / 64


def test_wilcoxon_matches_scipy() -> None:
    sp = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(6)
    for n in (4, 9, 17, 40):
        d = rng.normal(0.2, 1.0, n)
        assert stats.wilcoxon_signed_rank(d).p == pytest.approx(sp.wilcoxon(d, method="exact").pvalue, rel=1e-9)
    d = np.round(rng.normal(0.3, 1.0, 35), 1)  # ties: normal approximation with tie correction
    ours = stats.wilcoxon_signed_rank(d)
    assert ours.method == "normal"
    assert ours.p == pytest.approx(sp.wilcoxon(d, method="approx").pvalue, rel=1e-9)


def test_t_quantiles_match_tables() -> None:
    assert stats.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert stats.t_quantile(0.8, 9) == pytest.approx(0.883404, abs=1e-6)
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
    assert stats.t_quantile(0.025, 30) == pytest.approx(-2.042272, abs=1e-6)


def test_mde_shrinks_with_sample_size() -> None:
    assert stats.min_detectable_effect(1.0, 10) == pytest.approx((2.262157 + 0.883404) / math.sqrt(10), abs=1e-5)
    assert stats.min_detectable_effect(1.0, 40) < stats.min_detectable_effect(1.0, 10)
    assert math.isnan(stats.min_detectable_effect(1.0, 1))


def test_majority_rate() -> None:
    assert stats.majority_rate([0, 0, 0, 1]) == 0.75
    assert math.isnan(stats.majority_rate([]))


def test_stratified_folds_partition_and_pair() -> None:
    y = np.array([0] * 30 + [1] * 12)
    tests = []
    for f in range(3):
        tr, va, te = stratified_folds(y, 3, f, 0.2, seed=7)
        assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
        assert len(tr) + len(va) + len(te) == len(y)
        assert sorted(np.bincount(y[te]).tolist()) == [4, 10]  # each class split evenly over the folds
        tests.append(te)
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(y)))  # every row tested exactly once
    assert np.array_equal(stratified_folds(y, 3, 1, 0.2, seed=7)[2], tests[1])  # same seed, same partition
    assert not np.array_equal(stratified_folds(y, 3, 1, 0.2, seed=8)[2], tests[1])


def test_scipy_bootstrap_keeps_the_resample_stream_of_the_hand_written_one() -> None:
    # stats.py used to draw rng.integers(0, n, (n_boot, n)) and take np.quantile of the means: the SciPy version must
    # give the same interval for the same seed, so the demo's published intervals do not move
    x = np.random.default_rng(11).normal(0.6, 0.1, 24)
    rng = np.random.default_rng(5)
    means = x[rng.integers(0, x.size, size=(2000, x.size))].mean(axis=1)
    expected = np.quantile(means, [0.025, 0.975])
    assert stats.bootstrap_ci(x, n_boot=2000, seed=5) == pytest.approx(tuple(expected), abs=1e-12)


def test_t_cdf_inverts_t_quantile() -> None:
    for df in (1, 4, 30):
        for q in (0.025, 0.5, 0.8, 0.975):
            assert stats.t_cdf(stats.t_quantile(q, df), df) == pytest.approx(q, abs=1e-12)
    with pytest.raises(ValueError, match="quantile must be in"):
        stats.t_quantile(1.0, 5)
