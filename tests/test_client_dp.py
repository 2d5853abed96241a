"""Client-level DP-FedAvg: the server-side wrapper around FedAvg and its adaptive clipping."""

from __future__ import annotations

import math

import pytest
import torch

from dplora_core.privacy.client_level import centred_unclipped_count, clip_update, next_clip_norm, update_norm
from dplora_core.strategy import AdaptiveClipping, DpFedAvgServerSide, FedAvg


def state(value: float, shape: tuple[int, ...] = (3, 4)) -> dict[str, torch.Tensor]:
    return {"b": torch.full(shape, value), "c": torch.full((5,), value)}


def dp(z: float, clip: float, expected: float, seed: int = 0, adaptive: AdaptiveClipping | None = None):
    return DpFedAvgServerSide(
        FedAvg(), noise_multiplier=z, clip_norm=clip, expected_clients=expected,
        generator=torch.Generator().manual_seed(seed), adaptive=adaptive,
    )


def test_clip_update_bounds_the_norm_and_keeps_small_updates() -> None:
    big, small = state(10.0), state(0.01)
    assert update_norm(clip_update(big, 1.0)) == pytest.approx(1.0, rel=1e-6)
    assert all(torch.equal(clip_update(small, 1.0)[k], small[k]) for k in small)


def test_zero_noise_and_no_clipping_is_the_plain_mean_of_updates() -> None:
    current = state(1.0)
    clients = [state(2.0), state(5.0)]
    merged = dp(0.0, math.inf, expected=2).aggregate(current, clients, [1.0, 1.0])
    for k in current:
        torch.testing.assert_close(merged[k], torch.full_like(current[k], 3.5))


def test_one_client_moves_the_noiseless_aggregate_by_at_most_clip_over_expected() -> None:
    current = state(0.0)
    others = [state(0.1), state(-0.2)]
    with_evil = dp(0.0, 0.5, expected=3).aggregate(current, [*others, state(1e6)], [1.0] * 3)
    without = dp(0.0, 0.5, expected=3).aggregate(current, others, [1.0] * 2)
    diff = update_norm({k: with_evil[k] - without[k] for k in current})
    assert diff <= 0.5 / 3 * (1 + 1e-6)


def test_server_noise_has_std_z_clip_over_expected_clients() -> None:
    current = {"b": torch.zeros(100_000)}
    merged = dp(1.3, 0.4, expected=5).aggregate(current, [], [])
    expected_std = 1.3 * 0.4 / 5
    # relative s.e. of a sample std over n normals is 1/sqrt(2n) ~ 0.0022; allow 5 s.e.
    assert abs(float(merged["b"].std()) / expected_std - 1) < 5 / math.sqrt(2 * 100_000)


def test_noise_comes_from_the_given_generator() -> None:
    current = state(0.0)
    a = dp(1.0, 1.0, expected=2, seed=3).aggregate(current, [state(0.1)], [1.0])
    b = dp(1.0, 1.0, expected=2, seed=3).aggregate(current, [state(0.1)], [1.0])
    c = dp(1.0, 1.0, expected=2, seed=4).aggregate(current, [state(0.1)], [1.0])
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["b"], c["b"])


def test_adaptive_clip_grows_when_every_update_is_clipped_and_shrinks_when_none_is() -> None:
    current = state(0.0)
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1e-9)
    grow = dp(1.0, 0.01, expected=4, adaptive=adaptive)
    grow.aggregate(current, [state(1.0)] * 4, [1.0] * 4)
    shrink = dp(1.0, 100.0, expected=4, adaptive=adaptive)
    shrink.aggregate(current, [state(1.0)] * 4, [1.0] * 4)
    assert grow.clip_norm == pytest.approx(0.01 * math.exp(0.2 * 0.5))
    assert shrink.clip_norm == pytest.approx(100.0 * math.exp(-0.2 * 0.5))


def test_adaptive_clip_converges_to_the_target_quantile_of_update_norms() -> None:
    """Andrew et al. 2021: with many rounds, C settles where the target fraction of updates is unclipped."""
    norms = torch.linspace(0.1, 10.0, 50)  # median ~ 5.05
    clip, gen = 1.0, torch.Generator().manual_seed(0)
    for _ in range(400):
        centred = centred_unclipped_count(norms.tolist(), clip)
        clip = next_clip_norm(
            clip, centred, expected_clients=50, count_stddev=1.0, target_quantile=0.5, learning_rate=0.2, generator=gen
        )
    assert 4.0 < clip < 6.2


@pytest.mark.parametrize("newcomer_norm", [0.1, 10.0])
def test_one_client_moves_the_released_count_by_exactly_one_half(newcomer_norm: float) -> None:
    """The sensitivity the adaptive-clipping budget split charges for (z_d uses 2 sigma_b)."""
    norms = [0.5, 2.0, 3.0, 0.7]
    with_client = centred_unclipped_count([*norms, newcomer_norm], 1.0)
    assert abs(with_client - centred_unclipped_count(norms, 1.0)) == 0.5
