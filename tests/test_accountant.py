"""Epsilons pinned against an independent implementation (Opacus) and calibration properties."""

from __future__ import annotations

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from dplora_core.privacy.accountant import (
    DpSgdRun,
    PrivacyLedger,
    calibrate_noise_multiplier,
    describe_guarantee,
    make_accountant,
    paper_epsilon,
    paper_noise_multiplier,
    short_guarantee,
)
from dplora_core.privacy.client_level import update_noise_multiplier

CASES = [(0.01, 1.1, 1000), (128 / 870, 0.8, 15), (0.25, 2.0, 30), (256 / 60000, 1.1, 60 * 60000 // 256)]


def ledger_epsilon(kind: str, q: float, sigma: float, steps: int, delta: float = 1e-5) -> float:
    ledger = PrivacyLedger(kind=kind)  # type: ignore[arg-type]
    ledger.record(DpSgdRun(q, sigma, steps))
    return ledger.epsilon(delta=delta)


@pytest.mark.parametrize(("q", "sigma", "steps"), CASES)
def test_rdp_epsilon_matches_opacus(q: float, sigma: float, steps: int) -> None:
    orders = list(make_accountant("rdp").orders)  # type: ignore[attr-defined]
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    reference, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert ledger_epsilon("rdp", q, sigma, steps) == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize(("q", "sigma", "steps"), CASES)
def test_pld_epsilon_matches_opacus_prv(q: float, sigma: float, steps: int) -> None:
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert ledger_epsilon("pld", q, sigma, steps) == pytest.approx(prv.get_epsilon(delta=1e-5), rel=0.02)


def test_pld_is_tighter_than_rdp() -> None:
    for q, sigma, steps in CASES:
        assert ledger_epsilon("pld", q, sigma, steps) < ledger_epsilon("rdp", q, sigma, steps)


def test_composition_over_rounds_equals_one_long_run() -> None:
    split = PrivacyLedger(kind="rdp")
    for _ in range(3):
        split.record(DpSgdRun(0.1, 1.0, 5))
    assert split.epsilon(delta=1e-5) == pytest.approx(ledger_epsilon("rdp", 0.1, 1.0, 15), rel=1e-9)


def test_ledger_state_dict_round_trip() -> None:
    ledger = PrivacyLedger(kind="pld")
    ledger.record(DpSgdRun(0.1, 1.0, 5))
    ledger.record(DpSgdRun(0.2, 1.5, 3))
    restored = PrivacyLedger.from_state_dict(ledger.state_dict())
    assert restored.runs == ledger.runs
    assert restored.epsilon(delta=1e-5) == ledger.epsilon(delta=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(0.5, 16),
    q=st.floats(0.005, 0.5),
    steps=st.integers(1, 200),
    kind=st.sampled_from(["rdp", "pld"]),
)
def test_calibrated_noise_never_overshoots_the_target(target: float, q: float, steps: int, kind: str) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, kind=kind)
    spent = ledger_epsilon(kind, q, sigma, steps)
    assert spent <= target
    assert spent >= 0.97 * target  # and it is not needlessly noisy


def test_calibration_is_monotone_in_epsilon() -> None:
    sigmas = [
        calibrate_noise_multiplier(target_epsilon=e, delta=1e-5, sample_rate=0.1, steps=20, kind="rdp")
        for e in (1, 2, 4, 8)
    ]
    assert sigmas == sorted(sigmas, reverse=True)


def test_guarantee_names_relation_accountant_and_delta() -> None:
    text = describe_guarantee(mode="sample", epsilon=7.9, delta=1e-5, kind="rdp")
    assert "record-level" in text and "RDP accountant" in text and "delta = 1e-05" in text
    assert "no differential privacy" in describe_guarantee(mode="none", epsilon=float("inf"), delta=1e-5, kind="rdp")


@settings(max_examples=6, deadline=None)
@given(
    target=st.floats(0.5, 16),
    q=st.floats(0.01, 0.5),
    steps=st.integers(1, 20),
    rounds=st.integers(1, 6),
    kind=st.sampled_from(["rdp", "pld"]),
)
def test_calibration_over_rounds_matches_the_ledger_round_by_round(
    target: float, q: float, steps: int, rounds: int, kind: str
) -> None:
    """The ledger composes one event per round; after the planned rounds it must not exceed the target."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, rounds=rounds, kind=kind
    )
    ledger = PrivacyLedger(kind=kind)  # type: ignore[arg-type]
    for _ in range(rounds):
        ledger.record(DpSgdRun(q, sigma, steps))
    assert ledger.epsilon(delta=1e-5) <= target


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.1, 1.0, 50), (4 / 4, 5.0, 3), (10 / 1000, 0.9, 200)])
def test_client_level_epsilon_matches_opacus(q: float, z: float, rounds: int) -> None:
    """Mode client: one Poisson-sampled Gaussian per round over clients, composed over rounds."""
    ledger = PrivacyLedger(kind="rdp")
    for _ in range(rounds):
        ledger.record(DpSgdRun(q, z, 1))
    orders = list(make_accountant("rdp").orders)  # type: ignore[attr-defined]
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    reference, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert ledger.epsilon(delta=1e-5) == pytest.approx(reference, rel=1e-3)


@pytest.mark.parametrize(("z", "count_stddev"), [(1.0, 2.0), (2.5, 1.5), (0.7, 10.0)])
def test_adaptive_clipping_split_costs_exactly_the_planned_gaussian(z: float, count_stddev: float) -> None:
    """Andrew et al. 2021: the update sum (z_d) plus the count (sensitivity 1/2, std sigma_b) equal one Gaussian z."""
    z_d = update_noise_multiplier(z, count_stddev)
    assert z_d > z
    both = make_accountant("rdp").compose(
        dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(z_d), dp_accounting.GaussianDpEvent(2 * count_stddev)]
        )
    )
    one = make_accountant("rdp").compose(dp_accounting.GaussianDpEvent(z))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)


def test_adaptive_clipping_rejects_a_count_noise_too_small_for_the_budget() -> None:
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(2.0, 0.5)


@pytest.mark.parametrize(("delta", "sigma"), [(1e-5, 9.6896), (1e-3, 7.5530)])
def test_paper_epsilon_is_the_papers_formula(delta: float, sigma: float) -> None:
    """DP-LoRA (arXiv 2312.17493): sigma >= sqrt(2 ln(1.25/delta)) / epsilon, per iteration; at epsilon 0.5 by
    hand: sqrt(2 ln 125000) / 0.5 = 9.6896 and sqrt(2 ln 1250) / 0.5 = 7.5530."""
    assert paper_noise_multiplier(target_epsilon=0.5, delta=delta) == pytest.approx(sigma, abs=1e-4)
    assert paper_epsilon(noise_multiplier=sigma, delta=delta) == pytest.approx(0.5, abs=1e-5)


@pytest.mark.parametrize("epsilon", [0.2, 0.5, 0.9])
def test_paper_formula_is_a_valid_single_step_bound_below_epsilon_one(epsilon: float) -> None:
    """Where the classical bound holds (epsilon < 1), one Gaussian step at the paper's sigma spends at most
    epsilon by the tight PLD accountant: the paper's per-step number is sound, its composition is not stated."""
    sigma = paper_noise_multiplier(target_epsilon=epsilon, delta=1e-5)
    tight = make_accountant("pld").compose(dp_accounting.GaussianDpEvent(sigma)).get_epsilon(1e-5)
    assert tight <= epsilon


def test_paper_ledger_reports_the_per_iteration_bound_without_composition() -> None:
    ledger = PrivacyLedger(kind="paper")
    for _ in range(50):
        ledger.record(DpSgdRun(0.1, 2.0, 1))
    assert ledger.epsilon(delta=1e-5) == pytest.approx(2.4224, abs=1e-4)  # sqrt(2 ln 125000) / 2, by hand


def test_every_mode_names_its_relation() -> None:
    assert "client-level" in describe_guarantee(mode="client", epsilon=3.0, delta=1e-5, kind="rdp")
    paper = describe_guarantee(mode="paper", epsilon=3.0, delta=1e-5, kind="rdp")
    assert "paper bound, not a certified record-level guarantee" in paper and "RDP" not in paper
    assert ")-DP" not in paper  # the formula certifies no (epsilon, delta)-DP for the run


def test_the_short_label_names_relation_accountant_and_delta() -> None:
    assert short_guarantee(mode="client", accountant="pld", delta=1e-5) == "client-level, pld, δ=1e-05"
