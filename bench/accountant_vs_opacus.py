"""dplora's RDP epsilon (dp-accounting) against Opacus' independent RDP implementation, over a grid of
Poisson-subsampled Gaussian DP-SGD runs, both on dp-accounting's orders.

    python bench/accountant_vs_opacus.py [--delta 1e-5]

Prints each grid point where the two differ by more than 0.1%, then the range of dp-accounting / Opacus - 1
over the whole grid. Accounting only: no model, no data, a few seconds.
"""

from __future__ import annotations

import argparse
import itertools

from opacus.accountants.analysis import rdp as opacus_rdp

from dplora_core.privacy.accountant import DpSgdRun, make_accountant

RATES = (0.01, 0.05, 0.18, 0.33, 0.5, 1.0)
SIGMAS = (0.5, 0.87, 1.0, 1.3, 2.0)
STEPS = (1, 15, 100, 1000)


def epsilons(q: float, sigma: float, steps: int, delta: float) -> tuple[float, float, float]:
    """(dplora's epsilon, Opacus' epsilon, the order Opacus' bound is taken at)."""
    accountant = make_accountant("rdp")
    accountant.compose(DpSgdRun(q, sigma, steps).event())
    orders = list(accountant._orders)  # type: ignore[attr-defined]  # the same orders for both
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    theirs, order = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(accountant.get_epsilon(delta)), float(theirs), float(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    print(f"Record-level epsilon of Poisson-subsampled Gaussian DP-SGD, RDP, delta {args.delta:g}\n")
    print("| q | sigma | steps | dplora (dp-accounting) | Opacus | Opacus' order | ratio - 1 |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for q, sigma, steps in itertools.product(RATES, SIGMAS, STEPS):
        ours, theirs, order = epsilons(q, sigma, steps, args.delta)
        ratios.append(ours / theirs - 1)
        if abs(ratios[-1]) > 1e-3:
            print(f"| {q} | {sigma} | {steps} | {ours:.3f} | {theirs:.3f} | {order:g} | {ratios[-1]:+.2%} |")
    print(f"\n{len(ratios)} runs; dp-accounting / Opacus - 1 from {min(ratios):+.2e} to {max(ratios):+.2%}")


if __name__ == "__main__":
    main()
