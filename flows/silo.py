"""Cross-silo mode, a silo's side: the `client-train` flow each organisation deploys next to its own data.

The coordinator runs it once per round through `run_deployment("client-train/<silo>", ...)`. It reads the
global adapter from the exchange folder, trains on the silo's own records (`data_path`, a parameter of the
silo's own deployment that the coordinator never sends or sees) and writes back only the adapter update,
noised by the configured mechanism before it leaves the silo.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from dplora_core import exchange
from dplora_core.messages import TrainRequest
from tasks.training import train_silo


@flow(name="client-train")
def client_train(request: TrainRequest, data_path: str) -> dict[str, Any]:
    """One round of one silo: global adapter in, (noised) adapter update out, both through the exchange folder."""
    cfg = request.config
    directory = exchange.round_dir(cfg, request.round)
    global_model = exchange.read_global(directory, request.round)
    update = train_silo(cfg, request.round, request.client_id, global_model, request.noise_multiplier, data_path)
    path = exchange.write_update(directory, update, sender=str(flow_run.id))
    return {"client_id": update.client_id, "round": update.round, "update": str(path), "bytes": len(update.adapter)}
