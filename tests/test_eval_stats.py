"""Eval statistics against hand-computed values and scipy's own implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from persona_axis.errors import PersonaAxisError
from persona_axis.evals.stats import mcnemar_exact, pearson, relative_reduction, wilson_interval


def test_wilson_matches_hand_values_and_scipy() -> None:
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / 10 / (1 + z2 / 10)))  # 0 of n: upper z²/(n+z²)
    assert wilson_interval(10, 10) == pytest.approx((1 - z2 / 10 / (1 + z2 / 10), 1.0))
    for k, n in [(5, 10), (1, 30), (37, 120)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert wilson_interval(5, 10, confidence=0.5)[1] < wilson_interval(5, 10)[1]
    with pytest.raises(PersonaAxisError):
        wilson_interval(0, 0)
    with pytest.raises(PersonaAxisError):
        wilson_interval(3, 2)


def test_mcnemar_exact() -> None:
    base = [True] * 5 + [False] * 3 + [True] * 4
    other = [False] * 5 + [False] * 3 + [True] * 4  # 5 discordant, all one way
    result = mcnemar_exact(base, other)
    assert (result.only_base, result.only_other) == (5, 0)
    assert result.p_value == pytest.approx(2 * 0.5 ** 5)
    base, other = [True] * 9 + [False] * 4 + [True] * 6, [False] * 9 + [True] * 4 + [True] * 6
    assert mcnemar_exact(base, other).p_value == pytest.approx(stats.binomtest(4, 13, 0.5).pvalue)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0  # no discordant pairs
    assert mcnemar_exact([True, False], [False, True]).p_value == 1.0  # balanced: capped at 1
    with pytest.raises(PersonaAxisError):
        mcnemar_exact([True], [True, False])
    with pytest.raises(PersonaAxisError):
        mcnemar_exact([], [])


def test_relative_reduction_value_and_paired_interval() -> None:
    base = [True] * 10 + [False] * 10
    other = [True] * 4 + [False] * 16
    estimate = relative_reduction(base, other)
    assert estimate.value == pytest.approx(0.6)
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low < 0.6 < estimate.high <= 1.0
    assert relative_reduction(base, other) == estimate  # fixed seed: same interval every time
    assert relative_reduction(base, other, seed=1) != estimate
    same = relative_reduction(base, base)  # pairs move together: every resample gives exactly 0
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    assert relative_reduction(base, [False] * 20).to_json() == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert relative_reduction([False] * 5, [True] * 5).value is None  # no base cases: undefined
    worse = relative_reduction(other, base)
    assert worse.value == pytest.approx(1 - 10 / 4) and worse.high is not None and worse.high < 0


def test_pearson_matches_scipy_with_fisher_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = (x + rng.normal(size=40) > 0).astype(float)  # a binary outcome: the point-biserial case
    ours = pearson(list(x), list(y))
    ref = stats.pearsonr(x, y)
    ci = ref.confidence_interval(0.95)
    assert ours.r == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert (ours.low, ours.high) == pytest.approx((ci.low, ci.high))
    assert ours.low == pytest.approx(math.tanh(math.atanh(ref.statistic) - 1.959963984540054 / math.sqrt(37)))
    assert ours.n == 40
    assert pearson([1, 2, 3, 4], [1, 1, 1, 1]).r is None  # constant outcome: undefined
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]).to_json() == {"r": 1.0, "low": 1.0, "high": 1.0, "p_value": 0.0,
                                                             "n": 4}
    with pytest.raises(PersonaAxisError):
        pearson([1, 2, 3], [1, 2, 3])
    with pytest.raises(PersonaAxisError):
        pearson([1, 2, 3, 4], [1, 2, 3])
