"""What travels between the server and the clients: typed, and adapters only as safetensors bytes."""

from __future__ import annotations

from dataclasses import dataclass

from dplora_core.privacy.accountant import DpSgdRun


@dataclass(frozen=True)
class GlobalModel:
    """Server -> client: the global adapter at the start of a round."""

    round: int
    adapter: bytes  # safetensors


@dataclass(frozen=True)
class ClientUpdate:
    """Client -> server: the client's adapter after local training, and what it spent."""

    client_id: int
    round: int
    num_examples: int  # size of the client's dataset (treated as public, as in DP-SGD)
    adapter: bytes  # safetensors; already noised when DP is on
    train_loss: float | None  # only without DP: a raw loss is not covered by the DP guarantee
    dp_run: DpSgdRun | None  # None in mode 'none'
