"""Server-side aggregation strategies (Flower style): pluggable, pure, over adapter states.

A strategy maps (current global adapter, client adapters, weights) to the next global adapter.
Differential privacy wraps a strategy rather than forking it (`DpFedAvgServerSide`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dplora_core.adapters import AdapterState, from_bytes, to_bytes
from dplora_core.privacy import client_level as CL
from dplora_core.privacy.mechanisms import add_gaussian_noise


class Strategy(Protocol):
    def aggregate(
        self, current: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState: ...


class FedAvg:
    """McMahan et al. 2017: the weighted mean of the clients' adapters."""

    def aggregate(
        self, current: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState:
        if not states:
            raise ValueError("FedAvg: no client updates to aggregate")
        w = torch.tensor(weights, dtype=torch.float64)
        w = w / w.sum()  # (k,)
        return {
            key: torch.einsum("k,k...->...", w, torch.stack([s[key].double() for s in states])).float()
            for key in states[0]
        }


@dataclass
class ServerStep:
    """A server learning rate around any strategy: x <- x + eta (inner(x) - x).

    FedOpt with server SGD (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 1); eta = 1 is
    the inner strategy. With IID clients the mean update is one client's update with less noise, so
    eta > 1 buys progress per round without more local steps. It acts only on what the inner strategy
    released, so it is post-processing: any DP guarantee of the clients' updates or of a DP wrapper holds.
    """

    inner: Strategy
    learning_rate: float  # eta

    def aggregate(
        self, current: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState:
        merged = self.inner.aggregate(current, states, weights)
        return {k: current[k].float() + self.learning_rate * (merged[k].float() - current[k].float()) for k in merged}


@dataclass
class ServerAdam:
    """Adam on the server around any strategy: FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization",
    Alg. 2, with Adam's bias correction), on the pseudo-gradient -(inner(x) - x).

    Its moments persist across rounds (`state`, kept in every checkpoint), where a client's local optimizer
    restarts every round. It acts only on what the inner strategy released: post-processing, so any DP
    guarantee of the clients' updates holds.
    """

    inner: Strategy
    learning_rate: float  # eta
    state: AdamState
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def aggregate(
        self, current: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState:
        merged = self.inner.aggregate(current, states, weights)
        delta = {k: merged[k].float() - current[k].float() for k in merged}  # -pseudo-gradient, per tensor
        self.state = adam_moments(self.state, delta, betas=self.betas)
        step = adam_direction(self.state, betas=self.betas, eps=self.eps)
        return {k: current[k].float() + self.learning_rate * step[k] for k in merged}


@dataclass(frozen=True)
class AdamState:
    """Adam's moments of the server's updates: m, v per adapter tensor, and the step count t."""

    m: AdapterState
    v: AdapterState
    t: int = 0

    def to_bytes(self) -> bytes:
        tensors = {f"m.{k}": x for k, x in self.m.items()} | {f"v.{k}": x for k, x in self.v.items()}
        return to_bytes(tensors | {"t": torch.tensor(self.t)})

    @classmethod
    def from_bytes(cls, payload: bytes, *, source: str) -> AdamState:
        tensors = from_bytes(payload, source=source)
        m = {k[2:]: x for k, x in tensors.items() if k.startswith("m.")}
        v = {k[2:]: x for k, x in tensors.items() if k.startswith("v.")}
        if "t" not in tensors or len(m) + len(v) + 1 != len(tensors) or m.keys() != v.keys():
            raise ValueError(f"{source}: not a server Adam state (needs t and an m and a v for each tensor)")
        state = cls(m=m, v=v, t=int(tensors["t"]))
        if (state.t > 0) != bool(m):
            raise ValueError(f"{source}: server Adam state with t = {state.t} and {len(m)} moment tensors")
        return state

    def check_fits(self, delta: AdapterState) -> None:
        """ValueError unless the moments are those of tensors named and shaped as `delta`'s (or there are none yet)."""
        if self.t == 0:
            return
        if self.m.keys() != delta.keys():
            raise ValueError(
                f"server Adam state: its moments are for {len(self.m)} tensors, the update has {len(delta)}; "
                f"e.g. {sorted(self.m.keys() ^ delta.keys())[:2]}"
            )
        for k, d in delta.items():
            if self.m[k].shape != d.shape or self.v[k].shape != d.shape:
                raise ValueError(
                    f"server Adam state: {k} has shape {tuple(self.m[k].shape)}, the update {tuple(d.shape)}"
                )


def adam_moments(state: AdamState, delta: AdapterState, *, betas: tuple[float, float]) -> AdamState:
    """m <- b1 m + (1 - b1) delta, v <- b2 v + (1 - b2) delta^2 (zeros before the first step), t <- t + 1."""
    state.check_fits(delta)
    b1, b2 = betas
    m = {k: b1 * state.m.get(k, torch.zeros_like(d)) + (1 - b1) * d for k, d in delta.items()}
    v = {k: b2 * state.v.get(k, torch.zeros_like(d)) + (1 - b2) * d * d for k, d in delta.items()}
    return AdamState(m=m, v=v, t=state.t + 1)


def adam_direction(state: AdamState, *, betas: tuple[float, float], eps: float) -> AdapterState:
    """The bias-corrected step m_hat / (sqrt(v_hat) + eps) (Kingma and Ba 2015, Alg. 1): sign(delta) at t = 1."""
    b1, b2 = betas
    c1, c2 = 1 - b1**state.t, 1 - b2**state.t
    return {k: (state.m[k] / c1) / ((state.v[k] / c2).sqrt() + eps) for k in state.m}


def moving_average(average: AdapterState | None, current: AdapterState, *, decay: float) -> AdapterState:
    """decay average + (1 - decay) current, per tensor; `current` itself when there is no average yet.

    The exponential moving average of the global adapters (Polyak and Juditsky 1992; under DP-SGD,
    De et al. 2022, "Unlocking High-Accuracy Differentially Private Image Classification through Scale",
    Sec. 3.2). A function of adapters already released: post-processing, no privacy cost.
    """
    if average is None:
        return {k: v.float().clone() for k, v in current.items()}
    if average.keys() != current.keys():
        raise ValueError(
            f"moving average: it holds {len(average)} tensors, the adapter {len(current)}; "
            f"e.g. {sorted(average.keys() ^ current.keys())[:2]}"
        )
    for k, x in current.items():
        if average[k].shape != x.shape:
            raise ValueError(f"moving average: {k} has shape {tuple(average[k].shape)}, the adapter {tuple(x.shape)}")
    return {k: decay * average[k].float() + (1 - decay) * x.float() for k, x in current.items()}


@dataclass
class AdaptiveClipping:
    """Andrew et al. 2021: move the clip norm towards a quantile of the clients' update norms."""

    target_quantile: float
    learning_rate: float
    count_stddev: float


@dataclass
class DpFedAvgServerSide:
    """Client-level DP around an averaging strategy (McMahan et al. 2018; Flower's server-side clipping).

    Updates (client adapter - current) are clipped to `clip_norm`, averaged by `inner` with equal
    weights, rescaled to sum / expected_clients, and N(0, (z S / expected_clients)^2) is added.
    With `adaptive`, `clip_norm` moves after each round (read it back for the next one).
    """

    inner: Strategy
    noise_multiplier: float  # z for the update sum (already net of the adaptive count's share)
    clip_norm: float  # S
    expected_clients: float  # qN
    generator: torch.Generator
    adaptive: AdaptiveClipping | None = None

    def aggregate(
        self, current: AdapterState, states: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState:
        keys = list(current)  # the tensors that travel (B only under freeze_a)
        updates = [{k: s[k].float() - current[k].float() for k in keys} for s in states]
        clipped = [CL.clip_update(u, self.clip_norm) for u in updates]
        if clipped:  # equal weights: each client moves the sum by at most S
            mean = self.inner.aggregate({k: torch.zeros_like(current[k]) for k in keys}, clipped, [1.0] * len(clipped))
            total = {k: mean[k] * len(clipped) for k in keys}
        else:
            total = {k: torch.zeros_like(current[k], dtype=torch.float32) for k in keys}
        std = self.noise_multiplier * self.clip_norm / self.expected_clients if self.noise_multiplier > 0 else 0.0
        noised = {
            k: add_gaussian_noise(total[k] / self.expected_clients, std=std, generator=self.generator) for k in keys
        }
        if self.adaptive is not None:
            centred = CL.centred_unclipped_count([CL.update_norm(u) for u in updates], self.clip_norm)
            self.clip_norm = CL.next_clip_norm(
                self.clip_norm, centred, expected_clients=self.expected_clients,
                count_stddev=self.adaptive.count_stddev, target_quantile=self.adaptive.target_quantile,
                learning_rate=self.adaptive.learning_rate, generator=self.generator,
            )
        return {k: current[k].float() + noised[k] for k in keys}
