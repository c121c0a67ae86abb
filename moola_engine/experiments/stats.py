"""Statistics for an ablation: intervals, paired tests and the smallest effect a design can see.

SciPy does the statistics (``scipy.stats.bootstrap``, ``wilcoxon``, ``t``);
this module chooses the methods and conventions and keeps the NaN handling.
Every function takes per-run values in a fixed order, so a paired comparison
pairs the runs of the same seed and fold.

* :func:`bootstrap_ci`: percentile bootstrap interval of the mean.
* :func:`wilcoxon_signed_rank`: two-sided Wilcoxon signed-rank test (exact
  null distribution without ties, normal approximation with tie correction
  otherwise; zero differences are dropped, Wilcoxon's convention).
* :func:`paired_difference`: mean difference, its bootstrap interval, the
  Wilcoxon p-value and the minimum detectable effect.
* :func:`min_detectable_effect`: the true mean difference a paired t-test of
  this size detects with the given power, from the observed spread of the
  differences; a null result cannot rule out effects smaller than this.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import attrs
import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8
N_BOOT = 10_000
_EXACT_MAX_N = 50


@attrs.frozen(kw_only=True)
class Estimate:
    """Mean of ``n`` per-run values and its bootstrap interval (NaN bounds when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_json(self) -> dict[str, float | int | None]:
        return {"mean": _num(self.mean), "lo": _num(self.lo), "hi": _num(self.hi), "n": self.n}


@attrs.frozen(kw_only=True)
class Wilcoxon:
    statistic: float
    """W+: the sum of the ranks of the positive differences."""
    p: float
    n: int
    """Non-zero differences (the ones the test uses)."""
    method: str
    """``exact``, ``normal`` (ties or n > 50) or ``none`` (no non-zero difference)."""


@attrs.frozen(kw_only=True)
class Paired:
    """``a - b`` over pairs: mean, interval, Wilcoxon p, SD of the differences, minimum detectable effect."""

    diff: Estimate
    p: float
    test: str
    sd: float
    mde: float
    n: int

    def to_json(self) -> dict[str, object]:
        return {**self.diff.to_json(), "p": _num(self.p), "test": self.test, "sd": _num(self.sd),
                "mde": _num(self.mde)}


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


# --------------------------------------------------------------------------- intervals


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN, NaN with fewer than two values).

    Deterministic in ``seed``.  The percentile bootstrap undercovers somewhat for
    very small samples (n < 10): read its interval as a floor on the uncertainty.
    """
    arr = _clean(values)
    if arr.size < 2:
        return math.nan, math.nan
    # scipy draws the resamples as rng.integers(0, n, (n_boot, n)), as this function always did: same intervals
    res = sps.bootstrap((arr,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                        vectorized=True, **{_RNG_ARG: np.random.default_rng(seed)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


_RNG_ARG = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"  # scipy < 1.15


def estimate(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
             seed: int = 0) -> Estimate:
    arr = _clean(values)
    lo, hi = bootstrap_ci(arr, level=level, n_boot=n_boot, seed=seed)
    return Estimate(mean=float(arr.mean()) if arr.size else math.nan, lo=lo, hi=hi, n=int(arr.size))


# --------------------------------------------------------------------------- Wilcoxon


def wilcoxon_signed_rank(diffs: Sequence[float] | np.ndarray) -> Wilcoxon:
    """Two-sided Wilcoxon signed-rank test of ``diffs`` against a median of zero (``scipy.stats.wilcoxon``).

    Exact null distribution for up to 50 non-zero differences without ties, else the normal approximation
    with tie correction and no continuity correction.  The statistic reported is W+ (scipy's two-sided
    statistic is min(W+, W-))."""
    d = _clean(diffs)
    d = d[d != 0.0]
    n = int(d.size)
    if n == 0:
        return Wilcoxon(statistic=0.0, p=1.0, n=0, method="none")
    w_plus = float(sps.rankdata(np.abs(d))[d > 0].sum())
    ties = np.unique(np.abs(d)).size < n
    method = "exact" if n <= _EXACT_MAX_N and not ties else "normal"
    p = float(sps.wilcoxon(d, zero_method="wilcox", correction=False, alternative="two-sided",
                           method="exact" if method == "exact" else "approx").pvalue)
    return Wilcoxon(statistic=w_plus, p=min(1.0, p) if math.isfinite(p) else 1.0, n=n, method=method)


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value the exact test can give with ``n`` non-zero pairs (2 / 2**n)."""
    return 1.0 if n <= 0 else min(1.0, 2.0 / 2**n)


# --------------------------------------------------------------------------- Student t (for the MDE)


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    return float(sps.t.cdf(t, df))


def t_quantile(q: float, df: float) -> float:
    """Inverse of :func:`t_cdf`."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    return float(sps.t.ppf(q, df))


def min_detectable_effect(sd: float, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test of ``n`` pairs detects with ``power``.

    ``(t[1 - alpha/2, n-1] + t[power, n-1]) * sd / sqrt(n)``, the usual
    approximation (it ignores the noncentral t's skew).  NaN when n < 2 or the
    differences have no spread (then the design says nothing about power).
    The Wilcoxon test has about 95% of the t-test's efficiency on normal data,
    so its own detectable effect is a few percent larger.
    """
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    df = n - 1
    return (t_quantile(1.0 - alpha / 2.0, df) + t_quantile(power, df)) * sd / math.sqrt(n)


# --------------------------------------------------------------------------- paired comparison


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                      n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA, power: float = POWER) -> Paired:
    """``a - b`` pair by pair (same seed and fold); pairs with a NaN on either side are dropped."""
    a_arr = np.asarray(a, dtype=np.float64)
    b_arr = np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired values differ in length: {a_arr.shape} vs {b_arr.shape}")
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    d = a_arr[keep] - b_arr[keep]
    diff = estimate(d, n_boot=n_boot, seed=seed)
    w = wilcoxon_signed_rank(d)
    sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
    return Paired(diff=diff, p=w.p, test=f"wilcoxon-{w.method}", sd=sd,
                  mde=min_detectable_effect(sd, int(d.size), alpha=alpha, power=power), n=int(d.size))


def majority_rate(y: Sequence[int] | np.ndarray) -> float:
    """Share of the most frequent class: the accuracy of always predicting it on this set."""
    arr = np.asarray(y).ravel()
    if arr.size == 0:
        return math.nan
    return float(np.unique(arr, return_counts=True)[1].max() / arr.size)
