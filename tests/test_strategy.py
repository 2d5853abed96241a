"""Aggregation strategies: FedAvg, and the server's optimizer (SGD with a learning rate, or Adam) around it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dplora_core.adapters import from_bytes, to_bytes
from dplora_core.messages import GlobalModel
from dplora_core.strategy import AdamState, DpFedAvgServerSide, FedAvg, ServerAdam, ServerStep, moving_average
from tasks.training import average_releases, server_state_of, with_server_step
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


def test_server_adam_takes_the_steps_torch_adam_takes_on_the_pseudo_gradient() -> None:
    """FedAdam checked against an independent implementation: torch.optim.Adam with grad = -(mean - x)."""
    rounds = [[state(0.5), state(-1.0)], [state(2.0), state(0.0)], [state(-3.0), state(0.25)]]
    x = {k: v.clone() for k, v in state(0.0).items()}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in x.items()}
    reference = torch.optim.Adam(params.values(), lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    adam_state = AdamState(m={}, v={})
    for clients in rounds:
        server = ServerAdam(FedAvg(), 0.1, adam_state)
        mean = FedAvg().aggregate(x, clients, [1.0, 1.0])
        x = server.aggregate(x, clients, [1.0, 1.0])
        adam_state = AdamState.from_bytes(server.state.to_bytes(), source="test")  # as a checkpoint carries it
        for k, p in params.items():
            p.grad = -(mean[k] - p.detach())
        reference.step()
        for k in x:
            torch.testing.assert_close(x[k], params[k].detach())
    assert adam_state.t == 3


def test_server_adam_state_refuses_a_payload_that_is_not_one() -> None:
    with pytest.raises(ValueError, match="not a server Adam state"):
        AdamState.from_bytes(to_bytes(state(1.0)), source="checkpoint x")


def test_server_optimizer_adam_wraps_the_strategy_and_resumes_its_state(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path, federation__server_optimizer="adam",
                      federation__server_learning_rate=0.05)
    first = with_server_step(cfg, FedAvg())
    assert isinstance(first, ServerAdam) and first.learning_rate == 0.05 and first.state.t == 0
    first.aggregate(state(0.0), [state(1.0)], [1.0])
    saved = server_state_of(first)
    assert saved is not None
    resumed = with_server_step(cfg, FedAvg(), saved)
    assert isinstance(resumed, ServerAdam) and resumed.state.t == 1
    assert server_state_of(with_server_step(tiny_config(tmp_path, tmp_path, tmp_path), FedAvg())) is None


@pytest.mark.parametrize(("moments", "error"), [
    ({"a": torch.zeros(2, 3)}, "its moments are for 1 tensors, the update has 2"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(1)}, "b has shape (1,), the update (3,)"),
])
def test_server_adam_refuses_moments_that_do_not_fit_the_adapter(moments: dict[str, torch.Tensor], error: str) -> None:
    """A state for other tensors would broadcast or restart silently; it is refused by name instead."""
    server = ServerAdam(FedAvg(), 0.1, AdamState(m=moments, v=moments, t=1))
    with pytest.raises(ValueError, match=re.escape(error)):
        server.aggregate(state(0.0), [state(1.0)], [1.0])


def test_server_warmup_ramps_the_servers_rate_over_the_first_rounds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path, federation__server_optimizer="adam",
                      federation__server_learning_rate=0.3, federation__server_warmup_rounds=2)
    rates = [with_server_step(cfg, FedAvg(), round_num=r).learning_rate for r in (1, 2, 3, 4)]  # type: ignore[attr-defined]
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.3])
    sgd = tiny_config(tmp_path, tmp_path, tmp_path, federation__server_warmup_rounds=1)
    first = with_server_step(sgd, FedAvg(), round_num=1)
    assert isinstance(first, ServerStep) and first.learning_rate == pytest.approx(0.5)
    assert isinstance(with_server_step(sgd, FedAvg(), round_num=2), FedAvg)  # rate 1 after it: plain FedAvg


def test_moving_average_starts_at_the_first_adapter_then_decays_towards_each_new_one() -> None:
    first = moving_average(None, state(2.0), decay=0.75)
    for k in first:
        torch.testing.assert_close(first[k], torch.full_like(first[k], 2.0))
    second = moving_average(first, state(6.0), decay=0.75)  # 0.75 x 2 + 0.25 x 6
    for k in second:
        torch.testing.assert_close(second[k], torch.full_like(second[k], 3.0))


@pytest.mark.parametrize(("average", "error"), [
    ({"a": torch.zeros(2, 3)}, "it holds 1 tensors, the adapter 2; e.g. ['b']"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(1)}, "b has shape (1,), the adapter (3,)"),
])
def test_moving_average_refuses_an_average_of_another_adapter(average: dict[str, torch.Tensor], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        moving_average(average, state(1.0), decay=0.5)


def test_the_released_average_copies_a_frozen_a_from_the_global_adapter(tmp_path: Path) -> None:
    """Under freeze_a only B is averaged: A is the global adapter's, bit for bit, whatever the stored average holds."""
    cfg = tiny_config(tmp_path, tmp_path, tmp_path, lora__freeze_a=True, federation__ema_decay=0.5)
    current = {"m.lora_A.weight": torch.full((2, 3), 1.0), "m.lora_B.weight": torch.full((3, 2), 4.0)}
    stored = {"m.lora_A.weight": torch.full((2, 3), 9.0), "m.lora_B.weight": torch.full((3, 2), 2.0)}
    released = average_releases.fn(cfg, to_bytes(stored), GlobalModel(round=2, adapter=to_bytes(current)))
    assert released is not None
    average = from_bytes(released, source="test")
    assert torch.equal(average["m.lora_A.weight"], current["m.lora_A.weight"])
    torch.testing.assert_close(average["m.lora_B.weight"], torch.full((3, 2), 3.0))
