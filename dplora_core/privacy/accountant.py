"""Privacy accounting over immutable dp-accounting events.

The mechanism (a client's DP-SGD) reports what it did as a DpEvent; a thin stateful
accountant composes events and answers epsilon for a delta. The maths is Google's
dp-accounting library: RDP (Mironov 2017; Mironov, Talwar, Zhang 2019 for the Poisson
subsampled Gaussian) or privacy loss distributions (Koskela et al. 2020; Doroshenko et
al. 2022). The same Poisson-subsampled Gaussian event serves both certified modes: a DP-SGD
step over records (mode `sample`) and a DP-FedAvg round over clients (mode `client`).
Mode `paper` is answered with the DP-LoRA paper's own per-iteration formula (`paper_epsilon`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

AccountantKind = Literal["rdp", "pld"]
LedgerKind = Literal["rdp", "pld", "paper"]


class _DropUnconvergedOrders(logging.Filter):
    """dp-accounting warns when it drops an RDP order it cannot evaluate; the bound stays valid."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUnconvergedOrders())

ACCOUNTANT_NAMES = {
    "rdp": "RDP accountant (dp-accounting)",
    "pld": "PLD accountant (dp-accounting)",
    "paper": "the DP-LoRA paper's per-iteration formula sigma >= sqrt(2 ln(1.25/delta)) / epsilon",
}


@dataclass(frozen=True)
class DpSgdRun:
    """`steps` Poisson-sampled Gaussian releases: one client's DP-SGD steps in a round (sample_rate over
    its records), or one DP-FedAvg round of the server (sample_rate over clients, steps = 1)."""

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


def paper_epsilon(*, noise_multiplier: float, delta: float) -> float:
    """Per-iteration epsilon of DP-LoRA (Liu et al. 2023, arXiv 2312.17493), as the paper states it.

    The paper requires sigma >= sqrt(2 ln(1.25/delta)) / epsilon for each iteration, the classical
    Gaussian mechanism bound (Dwork & Roth 2014, Thm A.1, proven only for epsilon < 1, sensitivity C),
    and composes nothing over iterations. Solved for epsilon. Not a certified record-level guarantee.
    """
    return math.sqrt(2 * math.log(1.25 / delta)) / noise_multiplier


def paper_noise_multiplier(*, target_epsilon: float, delta: float) -> float:
    """The sigma DP-LoRA prescribes for a per-iteration epsilon: sqrt(2 ln(1.25/delta)) / epsilon."""
    return math.sqrt(2 * math.log(1.25 / delta)) / target_epsilon


class PrivacyLedger:
    """Events spent on one dataset (one client's records, or the population of clients), and their epsilon."""

    def __init__(self, *, kind: LedgerKind) -> None:
        self.kind = kind
        self.runs: list[DpSgdRun] = []

    def record(self, run: DpSgdRun) -> None:
        self.runs.append(run)

    def epsilon(self, *, delta: float, extra: tuple[DpSgdRun, ...] = ()) -> float:
        """Epsilon of everything recorded (plus `extra`, to ask what a planned round would cost)."""
        runs = [*self.runs, *extra]
        if not runs:
            return 0.0
        if self.kind == "paper":
            return max(paper_epsilon(noise_multiplier=r.noise_multiplier, delta=delta) for r in runs)
        accountant = make_accountant(self.kind)
        if self.kind == "rdp":  # RDP adds up: each distinct run once, times its count (one evaluation, not R)
            for run, count in Counter(runs).items():
                accountant.compose(run.event(), count)
        else:
            accountant.compose(dp_accounting.ComposedDpEvent([r.event() for r in runs]))
        return float(accountant.get_epsilon(delta))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "runs": [asdict(r) for r in self.runs]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        ledger = cls(kind=state["kind"])
        ledger.runs = [DpSgdRun(**r) for r in state["runs"]]
        return ledger


@functools.cache  # pure in its scalars; a study's partition table asks for the same sigmas after every run
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, rounds: int = 1, kind: AccountantKind
) -> float:
    """Smallest sigma whose `rounds` x `steps` Poisson-subsampled Gaussian steps spend at most target_epsilon.

    RDP adds up over composition (Mironov 2017, Prop. 1), so its search composes one step
    `rounds * steps` times: the ledger's round-by-round sum, a rounding error apart, in one evaluation.
    PLD is composed exactly as a PrivacyLedger composes it round by round, so the ledger's epsilon
    after the last planned round is the calibrated one, bit for bit. PLD is searched below the RDP
    answer (PLD is the tighter bound, so its sigma is smaller), which keeps it away from tiny sigmas
    whose privacy loss distributions would not fit in memory.
    """

    def every_step(sigma: float) -> dp_accounting.DpEvent:
        return DpSgdRun(sample_rate, sigma, steps * rounds).event()

    def round_by_round(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([DpSgdRun(sample_rate, sigma, steps).event()] * rounds)

    sigma_rdp = float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp"),
            every_step,
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0),
            tol=1e-4,
        )
    )
    if kind == "rdp":
        return sigma_rdp
    bracket = dp_accounting.ExplicitBracketInterval(sigma_rdp / 4, sigma_rdp)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("pld"), round_by_round, target_epsilon, delta, bracket, tol=1e-4
        )
    )


RELATIONS = {
    "sample": (
        "record-level, zero-out: one record of one client's dataset replaced by a null record (client dataset "
        "sizes are public; for this mechanism the same epsilon as adding or removing the record)"
    ),
    "client": (
        "client-level: adding or removing one client with all its records "
        "(Poisson client sampling; the server is trusted to clip and noise the updates)"
    ),
    "distributed": (
        "record-level, zero-out: one record of one client's dataset replaced by a null record, for everyone who "
        "sees only the sum of the clients' uploads (the released adapters), any one client included (client "
        "dataset sizes are public; for this mechanism the same epsilon as adding or removing the record)"
    ),
    "paper": "paper bound, not a certified record-level guarantee",
    "none": "none: no differential privacy",
}

SHORT_RELATIONS = {
    "sample": "record-level", "client": "client-level", "distributed": "record-level, sum of uploads",
    "paper": "paper bound",
    "none": "no DP",
}


def short_guarantee(*, mode: str, accountant: str, delta: float) -> str:
    """What an epsilon is for, in a few words (tables, progress bars): 'record-level, rdp, δ=1e-05'."""
    return f"{SHORT_RELATIONS[mode]}, {accountant}, δ={delta:g}"


MECHANISMS = {
    "sample": "Poisson-subsampled Gaussian DP-SGD; worst client",
    "client": "DP-FedAvg with Poisson-subsampled clients",
    "distributed": (
        "Poisson-subsampled Gaussian DP-SGD, one step a round, its noise split among the clients; worst client"
    ),
    "paper": "per iteration, no composition over iterations, as published in arXiv 2312.17493",
}


def describe_guarantee(
    *, mode: str, epsilon: float, delta: float, kind: LedgerKind, fixed_seed: bool = False,
    server_epsilon: float | None = None,
) -> str:
    """One line an auditor can check: epsilon, delta, neighbouring relation, accountant.

    server_epsilon (mode distributed): what the server, which sees each client's upload with only its share of
    the noise, gets for the same relation and delta.
    """
    if mode == "none":
        return "no differential privacy (privacy.mode = none): epsilon = infinity"
    if mode == "paper":
        kind = "paper"
    claim = "" if mode == "paper" else "-DP"  # the paper's formula certifies no (epsilon, delta)-DP for the run
    text = (
        f"(epsilon = {epsilon:.3f}, delta = {delta:g}){claim}, {RELATIONS[mode]}; "
        f"{ACCOUNTANT_NAMES[kind]}, {MECHANISMS[mode]}"
    )
    if server_epsilon is not None:
        text += (
            f"; against the server, which sees each client's upload with its share of the noise only: epsilon = "
            f"{server_epsilon:.3f} (same relation and delta; no secure aggregation)"
        )
    if fixed_seed:
        text += "; VOID against anyone who knows privacy.noise_seed (fixed seed: reproducible experiments only)"
    return text
