"""Statistics for the evaluation report: proportions, paired yes/no comparisons, correlation.

All intervals are two-sided at `confidence` (default 0.95) with z = Φ⁻¹((1 + confidence) / 2).
Outcomes are paired when item i of one condition answers the same prompt, with the same seed,
as item i of the other (every eval condition does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def relative_reduction(base: Sequence[bool], other: Sequence[bool], confidence: float = 0.95,
                       n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """Relative reduction 1 − p_other / p_base of a yes-rate, with a paired percentile-bootstrap interval.

    Each of `n_boot` resamples draws n item indices with replacement (numpy PCG64, `seed`) and keeps
    the pairs together; the interval is the (1 ∓ confidence)/2 quantiles of the resampled
    reductions. Resamples whose base rate is 0 (reduction undefined) are left out. value, low and
    high are None when the observed base rate is 0. 0.6 means 60 % fewer yes; negative means more.
    """
    alpha = (1 - _check_confidence(confidence)) / 2
    x, y = _paired(base, other)
    if not x.any():
        return Estimate(None, None, None)
    value = 1.0 - y.mean() / x.mean()
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    base_k, other_k = x[idx].sum(axis=1), y[idx].sum(axis=1)
    keep = base_k > 0
    reductions = 1.0 - other_k[keep] / base_k[keep]
    low, high = np.quantile(reductions, [alpha, 1 - alpha])
    return Estimate(float(value), float(low), float(high))


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
