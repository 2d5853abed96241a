"""Aggregation strategies: FedAvg and the server learning rate wrapped around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dplora_core.strategy import DpFedAvgServerSide, FedAvg, ServerStep
from tasks.training import with_server_step
from tests.helpers import tiny_config


def state(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.full((3,), value)}


def test_fedavg_weighs_clients_by_their_weights() -> None:
    merged = FedAvg().aggregate(state(0.0), [state(1.0), state(4.0)], [2.0, 1.0])
    for k in merged:
        torch.testing.assert_close(merged[k], torch.full_like(merged[k], 2.0))


@pytest.mark.parametrize("eta", [0.5, 1.0, 3.0])
def test_server_step_moves_eta_times_the_mean_update(eta: float) -> None:
    current, clients = state(1.0), [state(2.0), state(4.0)]  # mean update: +2
    merged = ServerStep(FedAvg(), eta).aggregate(current, clients, [1.0, 1.0])
    for k in merged:
        torch.testing.assert_close(merged[k], torch.full_like(merged[k], 1.0 + 2.0 * eta))


def test_server_step_scales_a_dp_wrappers_released_update_and_its_noise_alike() -> None:
    def dp() -> DpFedAvgServerSide:
        return DpFedAvgServerSide(FedAvg(), noise_multiplier=1.0, clip_norm=1.0, expected_clients=2.0,
                                  generator=torch.Generator().manual_seed(7))

    current, clients = state(0.0), [state(0.1), state(0.3)]
    released = dp().aggregate(current, clients, [1.0, 1.0])  # the same noise draw in both
    stepped = ServerStep(dp(), 3.0).aggregate(current, clients, [1.0, 1.0])
    for k in released:
        torch.testing.assert_close(stepped[k], 3.0 * released[k])


def test_server_learning_rate_one_is_plain_fedavg_and_other_values_wrap_it(tmp_path: Path) -> None:
    inner = FedAvg()
    assert with_server_step(tiny_config(tmp_path, tmp_path, tmp_path), inner) is inner
    cfg = tiny_config(tmp_path, tmp_path, tmp_path, federation__server_learning_rate=2.0)
    wrapped = with_server_step(cfg, inner)
    assert isinstance(wrapped, ServerStep) and wrapped.learning_rate == 2.0 and wrapped.inner is inner
