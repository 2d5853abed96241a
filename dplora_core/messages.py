"""What travels between the server and the clients: typed, and adapters only as safetensors bytes."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from dplora_core.config import ExperimentConfig
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
    base_dtype: str  # the client's frozen weights, e.g. "bfloat16" (model.dtype: auto resolves per machine)


class TrainRequest(BaseModel):
    """Coordinator -> silo (cross-silo mode): the parameters of one run of the silo's client-train deployment.
    The global adapter itself waits in `folder`, the round's exchange folder; the silo's data path is the
    silo's own parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: ExperimentConfig
    round: int
    client_id: int
    noise_multiplier: float | None
    folder: str
