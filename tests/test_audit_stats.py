"""Statistics of the membership-inference privacy audit: AUC, Clopper-Pearson, empirical epsilon."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats
from sklearn.metrics import roc_auc_score

from dplora_core.privacy.audit import (
    EmpiricalEpsilon,
    clopper_pearson,
    epsilon_lower_bound,
    max_certifiable_epsilon,
    roc_auc,
)

DELTA = 1e-5

finite_scores = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=40
)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of mu-GDP at delta (Dong, Roth, Su 2019, Corollary 2.13), by root finding.

    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) is decreasing in eps.
    """

    def excess(eps: float) -> float:
        return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)) - delta

    return float(optimize.brentq(excess, 0.0, 100.0))


# --- roc_auc ---------------------------------------------------------------------------------


def test_auc_of_perfectly_separated_scores_is_one() -> None:
    assert roc_auc([10.0, 11.0, 12.0], [1.0, 2.0, 3.0, 4.0]) == 1.0


def test_auc_of_reversed_scores_is_zero() -> None:
    assert roc_auc([1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]) == 0.0


def test_auc_of_identical_distributions_is_near_half() -> None:
    rng = np.random.default_rng(20240601)
    n = 5000
    members, nonmembers = rng.normal(size=n), rng.normal(size=n)
    # Under the null the Mann-Whitney AUC has sd sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.0058 here;
    # 5 sd (~0.029) fails a correct implementation with probability < 1e-6.
    tolerance = 5 * math.sqrt((2 * n + 1) / (12 * n * n))
    assert abs(roc_auc(members, nonmembers) - 0.5) < tolerance


def test_auc_counts_all_ties_as_half() -> None:
    assert roc_auc([3.0, 3.0, 3.0], [3.0, 3.0]) == 0.5


def test_auc_counts_partial_ties_as_half() -> None:
    # Pairs (member, nonmember): (1,2)->0, (1,3)->0, (2,2)->1/2, (2,3)->0, so AUC = 0.5/4.
    assert roc_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.125)


def test_auc_matches_sklearn_on_random_data_with_ties() -> None:
    rng = np.random.default_rng(7)
    members = np.round(rng.normal(0.3, 1.0, size=317), 1)  # rounding creates many ties
    nonmembers = np.round(rng.normal(0.0, 1.0, size=211), 1)
    labels = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    expected = roc_auc_score(labels, np.r_[members, nonmembers])
    assert roc_auc(members, nonmembers) == pytest.approx(expected, abs=1e-12)


def test_auc_rejects_empty_scores() -> None:
    with pytest.raises(ValueError, match="member_scores"):
        roc_auc([], [1.0])


def test_auc_rejects_nan_scores() -> None:
    with pytest.raises(ValueError, match="finite"):
        roc_auc([1.0], [float("nan")])


# --- clopper_pearson -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [
        (5, 10, (0.1871, 0.8129)),  # standard exact-interval table values
        (1, 10, (0.0025, 0.4450)),
        (0, 10, (0.0, 0.3085)),
    ],
)
def test_clopper_pearson_matches_table_values(successes: int, trials: int, expected: tuple[float, float]) -> None:
    lower, upper = clopper_pearson(successes, trials, confidence=0.95)
    assert (round(lower, 4), round(upper, 4)) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(), trials=st.integers(2, 300), confidence=st.floats(0.5, 0.999))
def test_clopper_pearson_bounds_solve_the_binomial_tail_equations(
    data: st.DataObject, trials: int, confidence: float
) -> None:
    # Definition (Clopper and Pearson 1934), checked with the binomial distribution rather than beta:
    # P(Bin(n, upper) <= k) = alpha/2 and P(Bin(n, lower) >= k) = alpha/2 for 0 < k < n.
    successes = data.draw(st.integers(1, trials - 1))
    alpha = 1 - confidence
    lower, upper = clopper_pearson(successes, trials, confidence=confidence)
    assert stats.binom.cdf(successes, trials, upper) == pytest.approx(alpha / 2, rel=1e-6)
    assert stats.binom.sf(successes - 1, trials, lower) == pytest.approx(alpha / 2, rel=1e-6)


def test_clopper_pearson_zero_successes_has_closed_form() -> None:
    n, alpha = 50, 0.05
    assert clopper_pearson(0, n, confidence=1 - alpha) == pytest.approx((0.0, 1 - (alpha / 2) ** (1 / n)))


def test_clopper_pearson_all_successes_has_closed_form() -> None:
    n, alpha = 50, 0.05
    assert clopper_pearson(n, n, confidence=1 - alpha) == pytest.approx(((alpha / 2) ** (1 / n), 1.0))


@pytest.mark.parametrize(("successes", "trials"), [(-1, 10), (11, 10), (0, 0)])
def test_clopper_pearson_rejects_impossible_counts(successes: int, trials: int) -> None:
    with pytest.raises(ValueError):
        clopper_pearson(successes, trials, confidence=0.95)


# --- epsilon_lower_bound ---------------------------------------------------------------------


def test_identical_distributions_give_near_zero_epsilon() -> None:
    rng = np.random.default_rng(11)
    scores = rng.normal(size=4000)
    # Same distribution, so the true privacy loss of this "attack" is 0; with 2000 per side the
    # Clopper-Pearson widths swamp sampling noise, and only the optimism of maximising over
    # thresholds could push the bound above 0 (by far less than 0.1).
    assert epsilon_lower_bound(scores[:2000], scores[2000:], delta=DELTA).epsilon < 0.1


def test_perfect_separation_reaches_the_maximum_certifiable_epsilon() -> None:
    m = 64
    # Independent of the module's helpers: 0 errors on each side -> upper bound u from clopper_pearson.
    u = clopper_pearson(0, m, confidence=0.95)[1]
    expected = math.log((1 - DELTA - u) / u)
    result = epsilon_lower_bound(np.arange(m) + 100.0, np.arange(m, dtype=float), delta=DELTA)
    assert result.epsilon == pytest.approx(expected, rel=1e-9)
    assert 2.7 < result.epsilon < 2.9  # ~ log(m / log(2 / alpha)): a 64-canary audit cannot show more


def test_perfect_separation_reports_the_separating_attack() -> None:
    result = epsilon_lower_bound([5.0, 6.0, 7.0], [1.0, 2.0], delta=DELTA)
    assert (result.threshold, result.tpr, result.fpr, result.members, result.nonmembers) == (5.0, 1.0, 0.0, 3, 2)


def test_perfect_separation_bound_increases_with_canaries() -> None:
    epsilons = [
        epsilon_lower_bound(np.arange(m) + m, np.arange(m, dtype=float), delta=DELTA).epsilon
        for m in (4, 8, 16, 32, 64, 128, 256)
    ]
    assert all(b > a for a, b in itertools.pairwise(epsilons))


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_bound_does_not_exceed_gaussian_dp_epsilon(mu: float) -> None:
    # Scores N(mu, 1) vs N(0, 1) are exactly the mu-GDP trade-off, so no attack on them can beat
    # the mechanism's true epsilon (up to the 5% failure probability; the data is seeded).
    rng = np.random.default_rng(int(mu * 100))
    result = epsilon_lower_bound(rng.normal(mu, 1.0, size=2000), rng.normal(0.0, 1.0, size=2000), delta=DELTA)
    assert 0.0 < result.epsilon <= gaussian_dp_epsilon(mu, DELTA)


def test_bound_matches_a_direct_loop_over_thresholds() -> None:
    rng = np.random.default_rng(3)
    members = np.round(rng.normal(1.0, 1.0, size=40), 1)
    nonmembers = np.round(rng.normal(0.0, 1.0, size=30), 1)
    best = 0.0
    for t in np.unique(np.r_[members, nonmembers]):
        fpr_ub = clopper_pearson(int(np.sum(nonmembers >= t)), nonmembers.size, confidence=0.95)[1]
        fnr_ub = clopper_pearson(int(np.sum(members < t)), members.size, confidence=0.95)[1]
        for num, den in ((1 - DELTA - fpr_ub, fnr_ub), (1 - DELTA - fnr_ub, fpr_ub)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    assert best > 0.0
    assert epsilon_lower_bound(members, nonmembers, delta=DELTA).epsilon == pytest.approx(best, rel=1e-9)


def test_higher_confidence_gives_a_smaller_bound() -> None:
    members, nonmembers = np.arange(50) + 50.0, np.arange(50, dtype=float)
    lenient = epsilon_lower_bound(members, nonmembers, delta=DELTA, confidence=0.9).epsilon
    strict = epsilon_lower_bound(members, nonmembers, delta=DELTA, confidence=0.99).epsilon
    assert strict < lenient


@settings(max_examples=200, deadline=None)
@given(members=finite_scores, nonmembers=finite_scores, delta=st.sampled_from([0.0, 1e-5, 0.1]))
def test_bound_is_nonnegative_and_at_most_the_maximum_certifiable(
    members: list[float], nonmembers: list[float], delta: float
) -> None:
    result = epsilon_lower_bound(members, nonmembers, delta=delta)
    cap = max_certifiable_epsilon(len(members), len(nonmembers), delta=delta)
    assert 0.0 <= result.epsilon <= cap + 1e-12
    assert math.isfinite(result.epsilon)


def test_bound_rejects_delta_of_one() -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound([1.0], [0.0], delta=1.0)


def test_describe_is_one_line_with_the_audit_parameters() -> None:
    result = EmpiricalEpsilon(
        epsilon=0.0, threshold=0.0, tpr=0.5, fpr=0.5, confidence=0.95, members=64, nonmembers=64, delta=1e-5
    )
    assert result.describe() == (
        "empirical epsilon lower bound 0.00 (95% Clopper-Pearson, 64 vs 64 canaries, delta 1e-05)"
    )
