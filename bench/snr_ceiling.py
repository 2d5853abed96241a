"""How much DP noise a schedule leaves on the signal it sums, at a fixed epsilon: the ceiling of mode `sample`.

    python bench/snr_ceiling.py [--epsilon 8] [--delta 1e-5] [--records 696] [--clients 5] [--accountant rdp]

Not a speed benchmark: accountant arithmetic only (no model, no data). For each schedule (expected batch B
of a client's n records, T steps) it calibrates sigma as a run does (`calibrate_noise_multiplier`) and
prints B sqrt(T) / sigma: the norm of T summed clipped-gradient means against the noise summed with them
(sigma C sqrt(d) / B per step, d drops out of the ratio), so larger is better. `x recipe` divides by the
recipe's (B 128, T 15, mode sample). In mode `sample` every client adds its own noise, and averaging K clients
gains sqrt(K) on every schedule alike. In mode `distributed` each client adds sigma / sqrt(K - 1) (any K - 1 shares
carry sigma, so a client that takes out its own still faces sigma), and the sum of the K batches carries
sigma sqrt(K / (K - 1)): sqrt(K - 1) times mode `sample`'s ratio on the same schedule.

At q = 1 (every record in every step) the T steps are one Gaussian mechanism on the whole shard however they
are split, so the ratio is the same for every T: n epsilon / c, the most any schedule of mode `sample` can
reach with n records; subsampled schedules approach it from below.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from dplora_core.privacy.accountant import calibrate_noise_multiplier
from dplora_core.train import sample_rate

RECIPE = (128, 15)
SCHEDULES = [(128, 15), (128, 30), (128, 60), (256, 15), (256, 30), (348, 15), (696, 1), (696, 6), (696, 15)]


def snr(batch: int, steps: int, *, n: int, epsilon: float, delta: float, accountant: str) -> tuple[float, float]:
    """(sigma, B sqrt(T) / sigma) of T Poisson-sampled steps at rate B / n spending epsilon."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate(batch, n), steps=steps, kind=accountant  # type: ignore[arg-type]
    )
    return sigma, min(batch, n) * math.sqrt(steps) / sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--records", type=int, default=696, help="n, one client's training records")
    parser.add_argument("--clients", type=int, default=5, help="K, clients averaged per round")
    parser.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    args = parser.parse_args()
    kw: dict[str, Any] = {
        "n": args.records, "epsilon": args.epsilon, "delta": args.delta, "accountant": args.accountant,
    }
    _, recipe = snr(*RECIPE, **kw)
    gain = math.sqrt(args.clients - 1)  # mode distributed over mode sample, same schedule
    print(f"epsilon {args.epsilon:g}, delta {args.delta:g}, {args.accountant}, n = {args.records} records a client, "
          f"K = {args.clients} clients; B sqrt(T) / sigma, larger is better\n")
    print("| B | q | T | sigma | B sqrt(T) / sigma | x recipe, mode sample | x recipe, mode distributed |")
    print("|---|---|---|---|---|---|---|")
    for batch, steps in SCHEDULES:
        sigma, ratio = snr(batch, steps, **kw)
        q = sample_rate(batch, args.records)
        print(f"| {batch} | {q:.3f} | {steps} | {sigma:.3f} | {ratio:,.0f} | {ratio / recipe:.2f} | "
              f"{ratio * gain / recipe:.2f} |")


if __name__ == "__main__":
    main()
