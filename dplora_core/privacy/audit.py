"""Statistics of an empirical privacy audit by membership inference (pure functions, no training).

An audit trains with some canary records ("members") and holds out others ("nonmembers"),
scores every canary with an attack (e.g. score = -loss, larger meaning "more likely a member"),
and turns the attack's error rates into a statistically valid *lower* bound on epsilon:
if the attack does better than (epsilon, delta)-DP allows, the mechanism cannot be that private.

The method follows Jagielski, Ullman and Oprea (2020), "Auditing Differentially Private
Machine Learning: How Private is Private SGD?" (NeurIPS), and Nasr, Song, Thakurta,
Papernot and Carlini (2021), "Adversary Instantiation: Lower Bounds for Differentially
Private Machine Learning" (IEEE S&P): Clopper-Pearson confidence bounds on the false positive
and false negative rates of a threshold attack, plugged into the hypothesis-testing
characterisation of DP (Kairouz, Oh and Viswanath 2015, "The Composition Theorem for
Differential Privacy", ICML).

Caveats that the numbers produced here inherit:

* Clopper-Pearson assumes independent Bernoulli trials. Jagielski et al. and Nasr et al. get
  them by training one model per trial. Scoring many canaries from *one* training run is the
  cheap variant; Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training
  Run" (NeurIPS), show that a one-run audit is still valid for canaries included independently
  at random, but with a different (looser) analysis than the one implemented here.
* The bound is a lower bound: a small value says the attack found little, never that the
  mechanism is private. A weak attack (loss thresholding) is far from the optimal one.
* With m canaries per side the largest certifiable epsilon is capped even for a perfect attack
  (see `max_certifiable_epsilon`), roughly log(m / log(2 / (1 - confidence))), so a small
  audit can only ever show a small lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

Scores = Sequence[float] | npt.NDArray[np.floating[Any]] | npt.NDArray[np.integer[Any]]

__all__ = [
    "EmpiricalEpsilon",
    "clopper_pearson",
    "epsilon_lower_bound",
    "max_certifiable_epsilon",
    "roc_auc",
]


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """An empirical epsilon lower bound and the threshold attack that achieved it.

    The attack predicts "member" iff score >= `threshold`; `tpr` and `fpr` are its *observed*
    rates on the audit data (point estimates), whereas `epsilon` uses their Clopper-Pearson
    bounds at `confidence`. `members` and `nonmembers` count the canaries on each side.
    """

    epsilon: float
    threshold: float
    tpr: float
    fpr: float
    confidence: float
    members: int
    nonmembers: int
    delta: float

    def describe(self) -> str:
        """One line, e.g. 'empirical epsilon lower bound 0.00 (95% Clopper-Pearson, 64 vs 64 canaries, delta 1e-05)'."""
        return (
            f"empirical epsilon lower bound {self.epsilon:.2f} "
            f"({self.confidence:.0%} Clopper-Pearson, {self.members} vs {self.nonmembers} canaries, "
            f"delta {self.delta:g})"
        )


def _scores(values: Scores, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: scores must be finite")
    return array


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def roc_auc(member_scores: Scores, nonmember_scores: Scores) -> float:
    """Area under the ROC curve of the attack that predicts "member" for larger scores.

    Equals P(S_member > S_nonmember) + 1/2 P(S_member = S_nonmember) over independent draws,
    i.e. the Mann-Whitney U statistic divided by n_members * n_nonmembers (Mann and Whitney
    1947; Hanley and McNeil 1982, "The Meaning and Use of the Area under a ROC Curve").
    Computed from mid-ranks, so ties count 1/2, in O(n log n).
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    ranks = stats.rankdata(np.concatenate([members, nonmembers]), method="average")
    n1, n0 = members.size, nonmembers.size
    u_statistic = float(np.sum(ranks[:n1])) - n1 * (n1 + 1) / 2.0
    return u_statistic / (n1 * n0)


def clopper_pearson(successes: int, trials: int, *, confidence: float) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson 1934) confidence interval for a binomial proportion.

    With alpha = 1 - confidence, the bounds are the alpha/2 quantile of Beta(k, n - k + 1) and
    the 1 - alpha/2 quantile of Beta(k + 1, n - k); by convention the lower bound is 0 when
    k = 0 and the upper bound is 1 when k = n. Each end is therefore a one-sided bound at level
    1 - alpha/2, and the interval covers the true proportion with probability >= confidence.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, trials={trials}], got {successes}")
    _check_confidence(confidence)
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lower, upper


def _clopper_pearson_upper(successes: npt.NDArray[np.int64], trials: int, confidence: float) -> npt.NDArray[np.float64]:
    """Vectorised upper end of `clopper_pearson` (same formula and conventions)."""
    alpha = 1.0 - confidence
    failures = trials - successes
    upper = stats.beta.ppf(1 - alpha / 2, successes + 1, np.maximum(failures, 1))
    return np.where(failures == 0, 1.0, upper).astype(np.float64)


def _epsilon_from_rates(
    fpr_upper: npt.NDArray[np.float64], fnr_upper: npt.NDArray[np.float64], delta: float
) -> npt.NDArray[np.float64]:
    """max(log((1 - delta - FPR)/FNR), log((1 - delta - FNR)/FPR)) with log(x <= 0) -> -inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(
            (1 - delta - fpr_upper > 0) & (fnr_upper > 0), np.log((1 - delta - fpr_upper) / fnr_upper), -np.inf
        )
        second = np.where(
            (1 - delta - fnr_upper > 0) & (fpr_upper > 0), np.log((1 - delta - fnr_upper) / fpr_upper), -np.inf
        )
    return np.maximum(first, second).astype(np.float64)


def max_certifiable_epsilon(members: int, nonmembers: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest value `epsilon_lower_bound` can return for this many canaries.

    It is reached by a perfect attack (no false positives, no false negatives), whose error
    rates are still only bounded by the Clopper-Pearson upper bounds for 0 errors,
    u_n = 1 - (alpha/2)^(1/n) ~ log(2/alpha)/n. For m canaries per side this is about
    log(m / log(2/alpha)): e.g. 2.8 for m = 64 and 5.6 for m = 1000 at 95% confidence.
    """
    fpr_upper = np.array([clopper_pearson(0, nonmembers, confidence=confidence)[1]])
    fnr_upper = np.array([clopper_pearson(0, members, confidence=confidence)[1]])
    return max(float(_epsilon_from_rates(fpr_upper, fnr_upper, delta)[0]), 0.0)


def epsilon_lower_bound(
    member_scores: Scores, nonmember_scores: Scores, *, delta: float, confidence: float = 0.95
) -> EmpiricalEpsilon:
    """Empirical epsilon lower bound of a threshold membership-inference attack.

    For each candidate threshold t (every distinct observed score) the attack predicts
    "member" iff score >= t. Its false positive rate (nonmembers called members) and false
    negative rate (members missed) are bounded above by the upper ends of two-sided
    Clopper-Pearson intervals at `confidence`. Each upper end fails with probability at most
    (1 - confidence)/2, so by a union bound both hold together with probability >= confidence
    (conservative compared with two one-sided bounds at that level).

    Any (epsilon, delta)-DP mechanism satisfies, for every test between neighbouring datasets,
    FPR + e^epsilon FNR >= 1 - delta and FNR + e^epsilon FPR >= 1 - delta (Kairouz et al. 2015;
    used for auditing by Jagielski et al. 2020 and Nasr et al. 2021). Hence

        epsilon >= max(log((1 - delta - FPR_ub) / FNR_ub), log((1 - delta - FNR_ub) / FPR_ub), 0)

    where a log of a non-positive ratio contributes nothing. The result is the maximum over
    thresholds, floored at 0.

    Choosing the best threshold on the same data that certifies it is common practice but
    slightly optimistic: the stated confidence holds for one pre-chosen threshold, not for
    the maximum over all of them (a held-out threshold selection or a union bound over
    thresholds would restore it). The result can never exceed `max_certifiable_epsilon`
    for these canary counts, roughly log(m) in scale, so a small audit only shows a small
    lower bound.
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    _check_confidence(confidence)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")

    thresholds = np.unique(np.concatenate([members, nonmembers]))
    members_sorted = np.sort(members)
    nonmembers_sorted = np.sort(nonmembers)
    n1, n0 = members.size, nonmembers.size
    false_negatives = np.searchsorted(members_sorted, thresholds, side="left").astype(np.int64)
    false_positives = (n0 - np.searchsorted(nonmembers_sorted, thresholds, side="left")).astype(np.int64)

    fpr_upper = _clopper_pearson_upper(false_positives, n0, confidence)
    fnr_upper = _clopper_pearson_upper(false_negatives, n1, confidence)
    epsilons = _epsilon_from_rates(fpr_upper, fnr_upper, delta)

    best = int(np.argmax(epsilons))
    return EmpiricalEpsilon(
        epsilon=max(float(epsilons[best]), 0.0),
        threshold=float(thresholds[best]),
        tpr=1.0 - int(false_negatives[best]) / n1,
        fpr=int(false_positives[best]) / n0,
        confidence=confidence,
        members=n1,
        nonmembers=n0,
        delta=delta,
    )
