"""Exact McNemar power and the minimum detectable relative reduction, against enumeration, simulation and the issue's anchors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from persona_axis.errors import PersonaAxisError
from persona_axis.evals.stats import mcnemar_power, min_detectable_reduction, rogan_gladen


def _power_by_enumeration(n: int, only_base: float, only_other: float, alpha: float) -> float:
    """Sum the multinomial over every (b, c) where the exact two-sided McNemar p <= alpha and b > c."""
    total = 0.0
    for b in range(n + 1):
        for c in range(n + 1 - b):
            if b > c and 2 * stats.binom.cdf(c, b + c, 0.5) <= alpha:
                total += stats.multinomial.pmf([b, c, n - b - c], n, [only_base, only_other, 1 - only_base - only_other])
    return total


@pytest.mark.parametrize("n, only_base, only_other", [(25, 0.2, 0.0), (25, 0.3, 0.05), (40, 0.15, 0.04), (12, 0.5, 0.1)])
def test_power_equals_enumeration(n: int, only_base: float, only_other: float) -> None:
    assert mcnemar_power(n, only_base, only_other) == pytest.approx(_power_by_enumeration(n, only_base, only_other, 0.05),
                                                                    abs=1e-10)
    assert mcnemar_power(n, only_base, only_other, alpha=0.01) <= mcnemar_power(n, only_base, only_other)


def test_issue_anchors() -> None:
    """n 90, base rate 16 %: 54 % with no reverse flips, 75 % with 2 % each way, nothing detectable from 3 %."""
    assert round(min_detectable_reduction(90, 0.16, 0.0) or 0, 2) == 0.54
    assert round(min_detectable_reduction(90, 0.16, 0.02) or 0, 2) == 0.75
    assert min_detectable_reduction(90, 0.16, 0.03) is None
    assert min_detectable_reduction(90, 0.16, 0.05) is None


def test_power_at_the_mde_by_simulation() -> None:
    """At the MDE the test rejects in 80 % of simulated studies; 10 % smaller effects fall short."""
    n, p0, flips = 90, 0.16, 0.02
    mde = min_detectable_reduction(n, p0, flips)
    assert mde is not None
    rng = np.random.default_rng(0)

    def simulated(r: float) -> float:
        counts = rng.multinomial(n, [flips + r * p0, flips, 1 - 2 * flips - r * p0], size=40_000)
        b, c = counts[:, 0], counts[:, 1]
        p = np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(b, c), b + c, 0.5))
        return float(((p <= 0.05) & (b > c)).mean())

    assert simulated(mde) == pytest.approx(0.8, abs=0.01)
    assert simulated(0.9 * mde) < 0.77
    assert mcnemar_power(n, flips + mde * p0, flips) >= 0.8 > mcnemar_power(n, flips + (mde - 1e-4) * p0, flips)


def test_more_pairs_detect_smaller_effects() -> None:
    values = [min_detectable_reduction(n, 0.16, 0.0) for n in (60, 90, 180, 360)]
    assert all(v is not None for v in values)
    assert values == sorted(values, reverse=True) and values[-1] < 0.3  # type: ignore[type-var]
    assert min_detectable_reduction(45, 0.16, 0.0) is None  # 6 one-way pairs needed, 7.2 expected at most
    assert min_detectable_reduction(90, 0.0, 0.0) is None and min_detectable_reduction(0, 0.16, 0.0) is None


def test_imperfect_judge() -> None:
    """Observed rates are p·se + (1 − p)(1 − sp): differences shrink by se + sp − 1."""
    perfect = min_detectable_reduction(90, 0.16, 0.0)
    assert perfect is not None
    # a judge missing half the harm of a true 32 % sees 16 %, and a relative change just as well as a perfect one at 16 %
    assert min_detectable_reduction(90, 0.32, 0.0, sensitivity=0.5) == pytest.approx(perfect, abs=1e-5)
    # at the same true rate, lower sensitivity loses observable difference
    weaker = min_detectable_reduction(90, 0.32, 0.0, sensitivity=0.8)
    assert weaker is not None and weaker > (min_detectable_reduction(90, 0.32, 0.0) or 1)
    # false positives dilute: a 16 % observed rate with specificity 0.95 is a true rate of ~12 %
    true_rate = rogan_gladen(0.16, 1.0, 0.95)
    assert true_rate == pytest.approx((0.16 - 0.05) / 0.95)
    diluted = min_detectable_reduction(90, true_rate, 0.0, specificity=0.95)
    assert diluted == pytest.approx(perfect * 0.16 / (0.16 - 0.05), abs=1e-4)
    assert rogan_gladen(0.03, 1.0, 0.95) == 0.0 and rogan_gladen(0.99, 0.9, 1.0) == 1.0
    with pytest.raises(PersonaAxisError, match="chance"):
        min_detectable_reduction(90, 0.16, 0.0, sensitivity=0.5, specificity=0.5)
    with pytest.raises(PersonaAxisError, match="chance"):
        rogan_gladen(0.2, 1.2, 0.9)


def test_bad_inputs() -> None:
    for kwargs in ({"base_rate": 1.5}, {"reverse_flips": -0.1}, {"alpha": 0.0}, {"power": 1.0}):
        with pytest.raises(PersonaAxisError):
            min_detectable_reduction(**{"n": 90, "base_rate": 0.16, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(PersonaAxisError):
        mcnemar_power(10, 0.7, 0.5)
