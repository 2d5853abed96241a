"""Privacy accounting over immutable dp-accounting events.

The mechanism (a client's DP-SGD) reports what it did as a DpEvent; a thin stateful
accountant composes events and answers epsilon for a delta. The maths is Google's
dp-accounting library: RDP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the Poisson
subsampled Gaussian) or privacy loss distributions (Koskela et al. 2020; Doroshenko et
al. 2022). Neighbouring relation: add or remove one record.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

AccountantKind = Literal["rdp", "pld"]



class _DropUnconvergedOrders(logging.Filter):
    """dp-accounting warns when it drops an RDP order it cannot evaluate; the bound stays valid."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUnconvergedOrders())

ACCOUNTANT_NAMES = {
    "rdp": "RDP accountant (dp-accounting)",
    "pld": "PLD accountant (dp-accounting)",
}


@dataclass(frozen=True)
class DpSgdRun:
    """What one client's DP-SGD did in one round: `steps` Poisson-sampled Gaussian steps."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


def make_accountant(kind: AccountantKind) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=1e-3)
    raise ValueError(f"privacy.accountant: unknown accountant {kind!r}")


class PrivacyLedger:
    """Events spent on one dataset (one client's records), and the epsilon they add up to."""

    def __init__(self, *, kind: AccountantKind) -> None:
        self.kind = kind
        self.runs: list[DpSgdRun] = []

    def record(self, run: DpSgdRun) -> None:
        self.runs.append(run)

    def epsilon(self, *, delta: float) -> float:
        if not self.runs:
            return 0.0
        accountant = make_accountant(self.kind)
        accountant.compose(dp_accounting.ComposedDpEvent([r.event() for r in self.runs]))
        return float(accountant.get_epsilon(delta))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "runs": [asdict(r) for r in self.runs]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        ledger = cls(kind=state["kind"])
        ledger.runs = [DpSgdRun(**r) for r in state["runs"]]
        return ledger


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: AccountantKind
) -> float:
    """Smallest sigma whose `steps` Poisson-subsampled Gaussian steps spend at most target_epsilon.

    RDP is searched from a wide bracket. PLD is searched below the RDP answer (PLD is the
    tighter bound, so its sigma is smaller), which keeps it away from tiny sigmas whose
    privacy loss distributions would not fit in memory.
    """

    def event(sigma: float) -> dp_accounting.DpEvent:
        return DpSgdRun(sample_rate, sigma, steps).event()

    sigma_rdp = float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp"), event, target_epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4,
        )
    )
    if kind == "rdp":
        return sigma_rdp
    bracket = dp_accounting.ExplicitBracketInterval(sigma_rdp / 4, sigma_rdp)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("pld"), event, target_epsilon, delta, bracket, tol=1e-4
        )
    )


RELATIONS = {
    "sample": (
        "record-level: adding or removing one record of one client's dataset "
        "(client dataset sizes treated as public)"
    ),
    "none": "none: no differential privacy",
}


def describe_guarantee(
    *, mode: str, epsilon: float, delta: float, kind: AccountantKind, fixed_seed: bool = False
) -> str:
    """One line an auditor can check: epsilon, delta, neighbouring relation, accountant."""
    if mode == "none":
        return "no differential privacy (privacy.mode = none): epsilon = infinity"
    text = (
        f"(epsilon = {epsilon:.3f}, delta = {delta:g})-DP, {RELATIONS[mode]}; "
        f"{ACCOUNTANT_NAMES[kind]}, Poisson-subsampled Gaussian DP-SGD; worst client"
    )
    if fixed_seed:
        text += (
            "; VOID against anyone who knows privacy.noise_seed (fixed seed: reproducible experiments only)"
        )
    return text
