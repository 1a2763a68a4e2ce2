"""Eval statistics against hand-computed values and scipy's own implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from persona_axis.errors import PersonaAxisError
from persona_axis.evals.stats import (
    bootstrap_rate,
    mcnemar_exact,
    pearson,
    rate_difference,
    relative_reduction,
    wilson_interval,
)


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


def _copies(values: list[bool], k: int) -> tuple[list[bool], list[str]]:
    """Each outcome k times in a row, the copies sharing one cluster label (replies of one request)."""
    return [v for v in values for _ in range(k)], [f"r{i}" for i in range(len(values)) for _ in range(k)]


def test_bootstrap_rate_resamples_clusters_whole() -> None:
    rng = np.random.default_rng(3)
    outcomes = list(rng.random(30) < 0.3)
    alone = bootstrap_rate(outcomes)
    assert alone.value == pytest.approx(np.mean(outcomes)) and alone.low < alone.value < alone.high
    assert bootstrap_rate(outcomes, [f"c{i}" for i in range(30)]) == alone  # one unit per cluster: the same draws
    copied, clusters = _copies(outcomes, 4)
    assert bootstrap_rate(copied, clusters) == alone  # identical replies of one request add nothing
    naive = bootstrap_rate(copied)  # treated as independent, the copies fake a 4x larger sample
    assert naive.high - naive.low < 0.7 * (alone.high - alone.low)
    wilson = stats.binomtest(sum(outcomes), 30).proportion_ci(method="wilson")
    assert abs(alone.low - wilson.low) < 0.06 and abs(alone.high - wilson.high) < 0.06  # near Wilson for iid
    with pytest.raises(PersonaAxisError):
        bootstrap_rate([])
    with pytest.raises(PersonaAxisError, match="cluster labels"):
        bootstrap_rate([True, False], ["a"])


def test_relative_reduction_by_clusters() -> None:
    base = [True] * 10 + [False] * 10
    other = [True] * 4 + [False] * 16
    alone = relative_reduction(base, other)
    (b, clusters), (o, _) = _copies(base, 3), _copies(other, 3)
    clustered = relative_reduction(b, o, clusters=clusters)
    assert clustered == alone  # a request's replies are drawn together
    naive = relative_reduction(b, o)
    assert clustered.low is not None and naive.low is not None and naive.high is not None
    assert naive.low > clustered.low and naive.high - naive.low < clustered.high - clustered.low


def test_rate_difference_draws_both_sides_of_a_cluster_together() -> None:
    harm = [True, False, True, True, False, False, True, False]
    requests = [f"r{i}" for i in range(len(harm))]
    assert rate_difference(harm, harm, requests, requests).to_json() == {"value": 0.0, "low": 0.0, "high": 0.0}
    jailbreak, plain = [True, True, True, False, True, True], [False, True, False, False, False, True]
    pairs = [f"q{i}" for i in range(6)]
    lift = rate_difference(jailbreak, plain, pairs, pairs)
    assert lift.value == pytest.approx(5 / 6 - 2 / 6)
    assert lift.low is not None and lift.high is not None and lift.low <= lift.value <= lift.high
    # two jailbreak forms per request, both harmful where the one form was: same rates, same draws per request
    twice = rate_difference([v for v in jailbreak for _ in range(2)], plain, [q for q in pairs for _ in range(2)], pairs)
    assert twice == lift
    apart = rate_difference(jailbreak, plain, pairs, [f"other{i}" for i in range(6)])  # unpaired: wider
    assert apart.low is not None and apart.high is not None and apart.high - apart.low > lift.high - lift.low
    with pytest.raises(PersonaAxisError):
        rate_difference([], plain, [], pairs)
