"""Epsilons pinned against an independent implementation (Opacus) and calibration properties."""

from __future__ import annotations

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
)

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
