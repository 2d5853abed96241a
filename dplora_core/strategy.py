"""Server-side aggregation strategies (Flower style): pluggable, pure, over adapter states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from dplora_core.adapters import AdapterState


class Strategy(Protocol):
    def aggregate(self, states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState: ...


class FedAvg:
    """McMahan et al. 2017: the example-weighted mean of the clients' adapters."""

    def aggregate(self, states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
        if not states:
            raise ValueError("FedAvg: no client updates to aggregate")
        w = torch.tensor(weights, dtype=torch.float64)
        w = w / w.sum()  # (k,)
        return {
            key: torch.einsum("k,k...->...", w, torch.stack([s[key].double() for s in states])).float()
            for key in states[0]
        }
