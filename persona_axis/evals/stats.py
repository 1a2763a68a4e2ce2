"""Statistics for the evaluation report: proportions, paired yes/no comparisons, power, correlation.

All intervals are two-sided at `confidence` (default 0.95) with z = Φ⁻¹((1 + confidence) / 2).
Outcomes are paired when item i of one condition answers the same prompt, with the same seed,
as item i of the other (every eval condition does). Bootstrap intervals resample clusters: the
units given one cluster label (all replies to one request) are drawn together, since they are
not independent; without labels every unit is its own cluster.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from persona_axis.errors import PersonaAxisError


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise PersonaAxisError(f"confidence must be in (0, 1), not {confidence}")
    return confidence


def _z(confidence: float) -> float:
    return float(stats.norm.ppf((1 + _check_confidence(confidence)) / 2))


def _paired(base: Sequence[bool], other: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(base) != len(other):
        raise PersonaAxisError(f"paired outcomes differ in length ({len(base)} vs {len(other)}): "
                               "compare conditions that answered the same items")
    if not base:
        raise PersonaAxisError("no paired outcomes to compare: run at least one item per condition")
    return np.asarray(base, dtype=bool), np.asarray(other, dtype=bool)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n.

    With p = k/n: centre = (p + z²/2n) / (1 + z²/n), half-width = z/(1 + z²/n) · √(p(1−p)/n + z²/4n²).
    Stays inside [0, 1] and is not degenerate at k = 0 or k = n.
    """
    if n < 1 or not 0 <= k <= n:
        raise PersonaAxisError(f"a proportion needs 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    z, p = _z(confidence), k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test. only_base: items yes in base and no in other; only_other: the reverse."""

    only_base: int
    only_other: int
    p_value: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(base: Sequence[bool], other: Sequence[bool]) -> McNemar:
    """McNemar's exact test for paired yes/no outcomes (e.g. harmful reply uncapped vs capped).

    Under H0 (same rate) each of the d = b + c discordant pairs is equally likely to go either way,
    so p = min(1, 2 · P[Binomial(d, ½) ≤ min(b, c)]); p = 1 when there are no discordant pairs.
    """
    x, y = _paired(base, other)
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(stats.binom.cdf(min(b, c), b + c, 0.5)))
    return McNemar(only_base=b, only_other=c, p_value=p)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval; None where undefined (e.g. a reduction from a zero base rate)."""

    value: float | None
    low: float | None
    high: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cluster_index(clusters: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    """(cluster number [n] of each unit, number of clusters m); each unit its own cluster when None."""
    if clusters is None:
        return np.arange(n), n
    if len(clusters) != n:
        raise PersonaAxisError(f"{len(clusters)} cluster labels for {n} outcomes: give one label per outcome")
    numbers: dict[Hashable, int] = {}
    return np.array([numbers.setdefault(c, len(numbers)) for c in clusters], dtype=np.int64), len(numbers)


def _draws(m: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, m]: the clusters drawn, with replacement, in each of n_boot resamples (numpy PCG64, seed)."""
    return np.random.default_rng(seed).integers(0, m, size=(n_boot, m))


def _totals(values: np.ndarray, index: np.ndarray, m: int) -> np.ndarray:
    """Per-cluster sums [m] of unit values [n]."""
    return np.bincount(index, weights=values.astype(np.float64), minlength=m)


def _interval(value: float, resampled: np.ndarray, confidence: float) -> Estimate:
    """value with the (1 ∓ confidence)/2 quantiles of its resampled values."""
    alpha = (1 - _check_confidence(confidence)) / 2
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    return Estimate(float(value), float(low), float(high))


def bootstrap_rate(outcomes: Sequence[bool], clusters: Sequence[Hashable] | None = None, confidence: float = 0.95,
                   n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """The yes-rate k/n of outcomes [n] with a percentile interval from resampling clusters.

    Each resample draws m clusters with replacement and pools their units: rate = Σ yes / Σ units.
    """
    x = np.asarray(outcomes, dtype=bool)
    if x.size == 0:
        raise PersonaAxisError("no outcomes to estimate a rate from: score at least one reply")
    index, m = _cluster_index(clusters, len(x))
    draws = _draws(m, n_boot, seed)
    resampled = _totals(x, index, m)[draws].sum(1) / np.bincount(index, minlength=m)[draws].sum(1)
    return _interval(x.mean(), resampled, confidence)


def relative_reduction(base: Sequence[bool], other: Sequence[bool], confidence: float = 0.95,
                       n_boot: int = 10_000, seed: int = 0, clusters: Sequence[Hashable] | None = None) -> Estimate:
    """Relative reduction 1 − p_other / p_base of a yes-rate, with a paired percentile-bootstrap interval.

    Each of `n_boot` resamples draws the m clusters (`clusters`: one label per pair; default: each
    pair alone) with replacement, keeping pairs together, and recomputes the reduction on the
    pooled pairs; the interval is the (1 ∓ confidence)/2 quantiles. Resamples whose base rate is 0
    (reduction undefined) are left out. value, low and high are None when the observed base rate
    is 0. 0.6 means 60 % fewer yes; negative means more.
    """
    _check_confidence(confidence)
    x, y = _paired(base, other)
    if not x.any():
        return Estimate(None, None, None)
    index, m = _cluster_index(clusters, len(x))
    draws = _draws(m, n_boot, seed)
    base_k, other_k = _totals(x, index, m)[draws].sum(1), _totals(y, index, m)[draws].sum(1)
    keep = base_k > 0
    return _interval(1.0 - y.mean() / x.mean(), 1.0 - other_k[keep] / base_k[keep], confidence)


def rate_difference(first: Sequence[bool], second: Sequence[bool], first_clusters: Sequence[Hashable],
                    second_clusters: Sequence[Hashable], confidence: float = 0.95, n_boot: int = 10_000,
                    seed: int = 0) -> Estimate:
    """p_first − p_second of two sets of outcomes that share clusters (e.g. jailbreak and plain replies to one request).

    Each resample draws the clusters of both sets together (their union, with replacement) and
    recomputes both pooled rates; resamples that leave either set empty are left out.
    """
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.size == 0 or b.size == 0:
        raise PersonaAxisError("a rate difference needs outcomes on both sides: score replies of both kinds")
    index, m = _cluster_index([*first_clusters, *second_clusters], len(a) + len(b))
    ia, ib = index[: len(a)], index[len(a):]
    draws = _draws(m, n_boot, seed)
    na, nb = np.bincount(ia, minlength=m)[draws].sum(1), np.bincount(ib, minlength=m)[draws].sum(1)
    keep = (na > 0) & (nb > 0)
    ka, kb = _totals(a, ia, m)[draws].sum(1), _totals(b, ib, m)[draws].sum(1)
    resampled = ka[keep] / na[keep] - kb[keep] / nb[keep]
    return _interval(a.mean() - b.mean(), resampled, confidence)


def youden_index(sensitivity: float, specificity: float) -> float:
    """se + sp − 1, the factor by which a judge shrinks every difference in rates; refused unless positive."""
    youden = sensitivity + specificity - 1
    if not (0 <= sensitivity <= 1 and 0 <= specificity <= 1 and youden > 0):
        raise PersonaAxisError(f"judge sensitivity and specificity must lie in [0, 1] and sum to more than 1 "
                               f"(got {sensitivity}, {specificity}): a judge at chance detects nothing")
    return youden


@functools.lru_cache(maxsize=64)
def _mcnemar_thresholds(n: int, alpha: float) -> np.ndarray:
    """[n + 1]: for c reverse pairs, the fewest only-base pairs b > c at which the exact test rejects (n + 1: none).

    The p-value 2 · P[Binomial(b + c, ½) ≤ c] falls as b grows, so each threshold is found by bisection.
    """
    c = np.arange(n + 1)
    lo, hi = c + 1, n - c  # b ranges over c + 1 .. n − c
    rejects = lambda b: 2.0 * stats.binom.cdf(c, b + c, 0.5) <= alpha  # noqa: E731
    possible = (lo <= hi) & rejects(np.maximum(hi, lo))
    hi = np.where(possible, hi, lo)
    while (lo < hi).any():
        mid = (lo + hi) // 2
        ok = rejects(mid)
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    return np.where(possible, lo, n + 1)


def mcnemar_power(n: int, only_base: float, only_other: float, alpha: float = 0.05) -> float:
    """Exact power of `mcnemar_exact` at `alpha` to detect a reduction: P(p ≤ alpha and b > c).

    Each of n pairs is independently only-base (yes in base, no in other) with probability
    `only_base`, only-other with `only_other`, concordant otherwise. Summed exactly over the
    reverse count c ~ Binomial(n, only_other) and b | c ~ Binomial(n − c, only_base / (1 − only_other)).
    """
    if n < 1 or only_base < 0 or only_other < 0 or only_base + only_other > 1 or only_other >= 1:
        raise PersonaAxisError(f"power needs n >= 1 and pair shares with only_base + only_other <= 1 "
                               f"(got n={n}, {only_base}, {only_other})")
    c = np.arange(n + 1)
    threshold = _mcnemar_thresholds(n, alpha)
    tail = stats.binom.sf(threshold - 1, n - c, min(1.0, only_base / (1.0 - only_other)))
    return float((stats.binom.pmf(c, n, only_other) * np.where(threshold <= n - c, tail, 0.0)).sum())


def min_detectable_reduction(n: int, base_rate: float, reverse_flips: float = 0.0, *, sensitivity: float = 1.0,
                             specificity: float = 1.0, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest relative reduction r of a true yes-rate that the exact McNemar test detects with `power` at `alpha`.

    Model of the n pairs (independent): the base condition's true rate is `base_rate` (p0); the other
    condition removes yes from a share r · p0 of pairs beyond the yes it adds, so its true rate is
    p0 (1 − r). The judge sees yes with probability `sensitivity` when true and 1 − `specificity`
    when false: observed rates are p · se + (1 − p)(1 − sp), so the observed difference is
    (se + sp − 1) · r · p0. `reverse_flips` is the observed share of pairs going no → yes (as
    measured: judge noise is already in it); the observed only-base share is then reverse_flips +
    (se + sp − 1) · r · p0, which cannot exceed the observed base rate (only-base pairs are base
    yes), nor r exceed 1. Power (mcnemar_power) rises with r, so r is found by bisection to 1e-6.
    None when no r in (0, 1] reaches `power` (e.g. reverse flips near the base rate) or p0 is 0.
    Given an observed base rate q0 = p0 · se + (1 − p0)(1 − sp), the observed difference is
    r (q0 − 1 + sp): sensitivity then cancels, and only false positives dilute the effect.
    """
    youden = youden_index(sensitivity, specificity)
    if not (0 <= base_rate <= 1 and 0 <= reverse_flips <= 1 and 0 < alpha < 1 and 0 < power < 1):
        raise PersonaAxisError(f"need 0 <= base_rate <= 1, 0 <= reverse_flips <= 1, alpha and power in (0, 1) "
                               f"(got {base_rate}, {reverse_flips}, {alpha}, {power})")
    if n < 1 or base_rate == 0:
        return None
    observed_base = base_rate * sensitivity + (1 - base_rate) * (1 - specificity)
    per_r = youden * base_rate  # observed difference per unit of r
    top = min(1.0, (observed_base - reverse_flips) / per_r)
    reaches = lambda r: mcnemar_power(n, reverse_flips + per_r * r, reverse_flips, alpha) >= power  # noqa: E731
    if top <= 0 or not reaches(top):
        return None
    lo, hi = 0.0, top
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def rogan_gladen(observed: float, sensitivity: float = 1.0, specificity: float = 1.0) -> float:
    """True rate behind an observed one, (q + sp − 1) / (se + sp − 1), clipped to [0, 1]."""
    return min(1.0, max(0.0, (observed + specificity - 1) / youden_index(sensitivity, specificity)))


@dataclass(frozen=True)
class Correlation:
    """Pearson r with its Fisher-z interval and two-sided p-value; r is None when either input is constant."""

    r: float | None
    low: float | None
    high: float | None
    p_value: float | None
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pearson(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Correlation:
    """Pearson correlation of x [n] and y [n] (y may be 0/1: the point-biserial r), n >= 4.

    r = Σ(x−x̄)(y−ȳ) / √(Σ(x−x̄)² Σ(y−ȳ)²); interval tanh(atanh(r) ± z/√(n−3)) (Fisher z);
    p-value from t = r √((n−2)/(1−r²)) with n−2 degrees of freedom.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise PersonaAxisError(f"correlation needs two equal-length lists (got {a.shape} and {b.shape})")
    n = len(a)
    if n < 4:
        raise PersonaAxisError(f"a correlation interval needs at least 4 pairs, got {n}: evaluate more items")
    z = _z(confidence)
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0:
        return Correlation(None, None, None, None, n)
    r = max(-1.0, min(1.0, float(da @ db) / denom))
    if abs(r) == 1.0:
        return Correlation(r, r, r, 0.0, n)
    centre, half = math.atanh(r), z / math.sqrt(n - 3)
    t = r * math.sqrt((n - 2) / (1 - r * r))
    p = float(2 * stats.t.sf(abs(t), n - 2))
    return Correlation(r, math.tanh(centre - half), math.tanh(centre + half), p, n)
