"""Client-level DP-FedAvg as small pure functions (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models", ICLR; adaptive clipping: Andrew et al. 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS).

Each round, clients are Poisson-sampled with rate q; each sampled client's update (its adapter
minus the global one) is clipped to L2 norm S; the server adds N(0, z^2 S^2 I) to the sum and
divides by the expected number of clients qN (the fixed-denominator estimator, so one client
changes the sum by at most S). One round is the accountant's PoissonSampled(q, Gaussian(z)).
"""

from __future__ import annotations

import math

import torch

from dplora_core.adapters import AdapterState


def update_norm(update: AdapterState) -> float:
    """L2 norm of a whole adapter update, over all its tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: AdapterState, clip_norm: float) -> AdapterState:
    """update * min(1, S / ||update||)."""
    factor = min(1.0, clip_norm / (update_norm(update) + 1e-12))
    return {k: t * factor for k, t in update.items()}


def update_noise_multiplier(noise_multiplier: float, count_stddev: float | None) -> float:
    """Noise multiplier left for the update sum when adaptive clipping also releases a noisy count.

    Andrew et al. 2021, Thm 1: releasing the sum with multiplier z_d and the count of unclipped
    clients (sensitivity 1/2 after centring) with std sigma_b costs as one Gaussian of multiplier
    z = (z_d^-2 + (2 sigma_b)^-2)^(-1/2); so z_d = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    """
    if count_stddev is None:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"privacy.clipped_count_stddev ({count_stddev:g}) is too small for noise multiplier "
            f"{noise_multiplier:.3f}: adaptive clipping needs 2 * clipped_count_stddev > noise multiplier"
        )
    return rest**-0.5


def centred_unclipped_count(norms: list[float], clip_norm: float) -> float:
    """sum_i (1[||update_i|| <= S] - 1/2): adding or removing one client moves it by exactly 1/2, the
    sensitivity `update_noise_multiplier` charges for (Andrew et al. 2021, Sec. 3; TF-Privacy centres too)."""
    return sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms)


def next_clip_norm(
    clip_norm: float, centred_count: float, *, expected_clients: float, count_stddev: float,
    target_quantile: float, learning_rate: float, generator: torch.Generator,
) -> float:
    """Geometric update of S towards the target quantile of update norms (Andrew et al. 2021, Alg. 1):
    b = (centred count + N(0, sigma_b^2)) / (qN) + 1/2;  S <- S * exp(-eta (b - gamma))."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * count_stddev
    fraction = (centred_count + noise) / expected_clients + 0.5
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))
