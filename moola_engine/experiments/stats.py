"""Statistics for an ablation: intervals, paired tests and the smallest effect a design can see.

Plain numpy and the standard library (no SciPy at run time; the tests compare
against SciPy).  Every function takes per-run values in a fixed order, so a
paired comparison pairs the runs of the same seed and fold.

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

import math
from collections.abc import Sequence
from statistics import NormalDist

import attrs
import numpy as np

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
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def estimate(values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = N_BOOT,
             seed: int = 0) -> Estimate:
    arr = _clean(values)
    lo, hi = bootstrap_ci(arr, level=level, n_boot=n_boot, seed=seed)
    return Estimate(mean=float(arr.mean()) if arr.size else math.nan, lo=lo, hi=hi, n=int(arr.size))


# --------------------------------------------------------------------------- Wilcoxon


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _exact_counts(n: int) -> list[int]:
    """counts[w] = number of sign assignments of ranks 1..n whose positive ranks sum to w."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    top = 0
    for r in range(1, n + 1):
        top += r
        for w in range(top, r - 1, -1):
            counts[w] += counts[w - r]
    return counts


def wilcoxon_signed_rank(diffs: Sequence[float] | np.ndarray) -> Wilcoxon:
    """Two-sided Wilcoxon signed-rank test of ``diffs`` against a median of zero."""
    d = _clean(diffs)
    d = d[d != 0.0]
    n = int(d.size)
    if n == 0:
        return Wilcoxon(statistic=0.0, p=1.0, n=0, method="none")
    ranks = _average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    ties = np.unique(np.abs(d), return_counts=True)[1]
    if n <= _EXACT_MAX_N and (ties == 1).all():
        counts = _exact_counts(n)
        total = 2**n
        w = round(w_plus)
        lower = sum(counts[: w + 1]) / total
        upper = sum(counts[w:]) / total
        return Wilcoxon(statistic=w_plus, p=min(1.0, 2.0 * min(lower, upper)), n=n, method="exact")
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((ties**3 - ties).sum()) / 48.0
    if var <= 0:
        return Wilcoxon(statistic=w_plus, p=1.0, n=n, method="normal")
    z = (w_plus - mean) / math.sqrt(var)
    p = 2.0 * (1.0 - NormalDist().cdf(abs(z)))
    return Wilcoxon(statistic=w_plus, p=min(1.0, p), n=n, method="normal")


def min_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p-value the exact test can give with ``n`` non-zero pairs (2 / 2**n)."""
    return 1.0 if n <= 0 else min(1.0, 2.0 / 2**n)


# --------------------------------------------------------------------------- Student t (for the MDE)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """Inverse of :func:`t_cdf` (bisection; accurate to ~1e-10)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


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
