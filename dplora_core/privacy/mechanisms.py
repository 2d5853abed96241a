"""The Gaussian mechanism on summed, per-example-clipped gradients (Abadi et al. 2016, Alg. 1).

Small pure functions over the per-example gradients of all trainable weights, flattened
into one (b, d) matrix (one row per example).
They never compute epsilon: that is the accountant's job.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def per_example_norms(grad_samples: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example's full gradient: (b, d) -> (b,)."""
    return torch.linalg.vector_norm(grad_samples, dim=1)


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) for each example, 0 where ||g_i|| is inf or NaN: (b,). max_norm=inf means no clipping."""
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (b,)
    return torch.where(norms.isfinite(), factors, 0.0)


def clipped_sum(grad_samples: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """sum_i factor_i * g_i: (b, d), (b,) -> (d,).

    A row with an inf or NaN entry adds zero (0 * inf would be NaN): whatever one record computes, its
    contribution stays within C, so it cannot turn the noised sum non-finite and show itself to the server.
    """
    finite = grad_samples.isfinite().all(dim=1, keepdim=True)  # (b, 1)
    return factors.to(grad_samples.dtype) @ torch.where(finite, grad_samples, 0.0)


def add_gaussian_noise(summed: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    """summed + N(0, std^2 I), the noise drawn from `generator` (never the global RNG)."""
    if std == 0:
        return summed.clone()
    # drawn where the generator lives (the model's device), then moved to the tensor (an upload is a CPU copy)
    noise = torch.randn(summed.shape, generator=generator, device=generator.device, dtype=summed.dtype)
    return summed + std * noise.to(summed.device)


def poisson_sample(n: int, rate: float, *, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson subsample: each of n records kept independently with prob `rate`."""
    keep = torch.rand(n, generator=generator, device=generator.device) < rate  # (n,)
    return keep.nonzero().flatten().cpu()


def noise_generator(seed: int | None, *keys: int, device: torch.device) -> torch.Generator:
    """A generator for sampling and noise: from OS entropy, or derived from (seed, *keys) if seed is set."""
    if seed is None:
        derived = secrets.randbits(63)
    else:
        # The key count goes first: SeedSequence would treat (a, b) and (a, b, 0) as the same entropy.
        entropy = [seed, len(keys), *keys]
        derived = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(derived)
