"""The unbiased pass@k estimator and the intervals over problems, against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igrpo_megatron.evaluation.passk import (
    difference_interval,
    mean_interval,
    pass_at_k,
    per_problem_pass_at_k,
)

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                   # c / n = 2/5
    (5, 2, 2, 0.7),                   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 1, 2, 0.5),                   # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),                 # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (10, 3, 5, 1 - 21 / 252),         # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.91667
    (4, 1, 4, 1.0),                   # k = n: the one correct sample is always drawn
    (64, 1, 64, 1.0),                 # k = n again, AIME-sized
    (8, 0, 8, 0.0),                   # k = n but nothing correct
    (8, 0, 1, 0.0),                   # none correct
    (8, 8, 1, 1.0),                   # all correct
    (8, 8, 8, 1.0),
    (64, 63, 2, 1.0),                 # n - c = 1 < k = 2: every pair holds a correct one
    (1000, 1, 1, 0.001),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_exact_where_a_float_product_loses_digits():
    # n = 2000, c = 2, k = 1000: 1 - C(1998,1000)/C(2000,1000) = 1 - (1000*999)/(2000*1999) = 0.7501250625...
    exact = 1 - Fraction(1000 * 999, 2000 * 1999)
    assert pass_at_k(2000, 2, 1000) == float(exact)
    # Tiny probabilities survive: c = 1, k = 1, n = 10**6 gives exactly 1e-6.
    assert pass_at_k(10**6, 1, 1) == 1e-6


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (0, 0, 1), (4, -1, 1)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_exact_fraction_and_is_monotone(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    got = pass_at_k(n, c, k)
    assert abs(got - float(exact)) <= 1e-15
    if k < n:
        assert pass_at_k(n, c, k + 1) >= got  # more draws never hurt
    if c < n:
        assert pass_at_k(n, c + 1, k) >= got  # more correct samples never hurt


def test_per_problem_pass_at_k_and_pass_at_1_is_sample_accuracy():
    flags = [[True, False, False, False], [True, True, False, False], [False] * 4]
    # pass@1: 1/4, 2/4, 0; pass@2: 1 - C(3,2)/C(4,2) = 0.5, 1 - 1/6 = 0.8333, 0
    assert per_problem_pass_at_k(flags, 1) == [0.25, 0.5, 0.0]
    assert per_problem_pass_at_k(flags, 2) == pytest.approx([0.5, 5 / 6, 0.0])


def test_normal_interval_hand_values():
    values = [0.5, 0.5, 0.75, 0.25]
    # mean 0.5; deviations 0, 0, .25, -.25 -> s^2 = 0.125 / 3; se = sqrt(s^2 / 4) = 0.1020621
    iv = mean_interval(values, confidence=0.95, method="normal")
    se = math.sqrt(0.125 / 3 / 4)
    assert iv.value == 0.5 and iv.stderr == pytest.approx(se)
    assert iv.ci_low == pytest.approx(0.5 - Z95 * se) and iv.ci_high == pytest.approx(0.5 + Z95 * se)
    assert iv.ci_low == pytest.approx(0.29996, abs=1e-5)


def test_normal_interval_is_clipped_and_degenerate_cases():
    iv = mean_interval([0.0, 0.0, 0.0, 1.0])  # mean .25, se = sqrt(.25/4)=.25 -> [-.24, .74] clipped at 0
    assert iv.ci_low == 0.0 and iv.ci_high == pytest.approx(0.25 + Z95 * 0.25)
    flat = mean_interval([0.0] * 30)  # every problem 0: no spread, the interval is the point
    assert (flat.value, flat.ci_low, flat.ci_high) == (0.0, 0.0, 0.0)
    assert math.isnan(mean_interval([]).value)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0] * 6 + [0.0] * 24  # mean 0.2
    a = mean_interval(values, method="bootstrap", resamples=500, seed=3)
    b = mean_interval(values, method="bootstrap", resamples=500, seed=3)
    assert a == b
    assert a.ci_low < 0.2 < a.ci_high and a.ci_low >= 0.0
    # Close to the normal interval for this mild case: 0.2 +- 1.96 * 0.0743 = [0.054, 0.346]
    assert abs(a.ci_low - 0.054) < 0.06 and abs(a.ci_high - 0.346) < 0.06


def test_paired_difference_interval_hand_values():
    a = [0, 0, 0, 0, 1]
    b = [1, 1, 1, 1, 1]
    # diffs 1,1,1,1,0: mean .8, s^2 = (4*.04 + .64)/4 = 0.2, se = sqrt(.2/5) = 0.2 -> [.408, 1.192 -> 1]
    d = difference_interval(a, b, paired=True)
    assert d.value == pytest.approx(0.8)
    assert d.ci_low == pytest.approx(0.8 - Z95 * 0.2) and d.ci_high == 1.0
    assert d.excludes(0.0)
    same = difference_interval(a, a, paired=True)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0) and not same.excludes(0.0)


def test_unpaired_difference_combines_standard_errors():
    a = [0.0, 1.0, 0.0, 1.0]  # mean .5, s^2 = 1/3, se^2 = 1/12
    b = [1.0, 1.0, 1.0, 1.0]  # mean 1, se 0
    d = difference_interval(a, b, paired=False)
    assert d.value == pytest.approx(0.5) and d.stderr == pytest.approx(math.sqrt(1 / 12))
    assert d.ci_low == pytest.approx(0.5 - Z95 * math.sqrt(1 / 12))
    with pytest.raises(ValueError, match="equally many"):
        difference_interval([0.0], [0.0, 1.0], paired=True)
