"""Cross-silo mode, a silo's side: the `client-train` flow each organisation deploys next to its own data.

The coordinator runs it once per round through `run_deployment("client-train/<silo>", ...)`. It reads the
global adapter from the exchange folder, trains on the silo's own records (`data_path`, a parameter of the
silo's own deployment that the coordinator never sends or sees) and writes back only the adapter update,
noised by the configured mechanism before it leaves the silo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from dplora_core import exchange
from dplora_core.messages import TrainRequest
from tasks.training import train_silo


@flow(name="client-train")
def client_train(request: TrainRequest, data_path: str) -> dict[str, Any]:
    """One round of one silo: global adapter in, (noised) adapter update out, both through the exchange folder."""
    cfg, r, k, directory = request.config, request.round, request.client_id, Path(request.folder)
    global_model = exchange.read_global(directory, r)
    if exchange.round_dir(cfg, global_model) != directory:
        raise ValueError(f"{directory}: holds a global adapter of another config or round than round {r} of {cfg.name}")
    update = exchange.existing_update(directory, k, r, max_bytes=exchange.max_update_bytes(global_model))
    if update is None:
        update = train_silo(cfg, r, k, global_model, request.noise_multiplier, data_path)
    else:  # the same round from the same adapter: send the same release again, never a second one
        get_run_logger().info("client %d, round %d: re-sending the update already released for this input", k, r)
    path = exchange.write_update(directory, update, sender=str(flow_run.id))
    return {"client_id": update.client_id, "round": update.round, "update": str(path), "bytes": len(update.adapter)}
