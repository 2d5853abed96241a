"""Cross-silo mode, the coordinator's side: one silo's round runs as a run of that silo's deployment."""

from __future__ import annotations

from typing import cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from dplora_core import exchange
from dplora_core.config import ExperimentConfig
from dplora_core.messages import ClientUpdate, GlobalModel, TrainRequest

SILO_FLOW = "client-train"  # flows/silo.py; each silo deploys it under its own name


# No retries: a silo whose run fails may already have written its update (a release of its records), and a
# retry would train again, a second release. So every started silo is charged once and a failed one counts
# against the quorum; a resumed round finds a completed update and sends it again (flows/silo.py).
@task(name="train-remote", task_run_name="train-client-{client_id}-round-{round_num}", cache_policy=NO_CACHE)
def train_remote(
    cfg: ExperimentConfig, round_num: int, client_id: int, global_model: GlobalModel, noise_multiplier: float | None
) -> ClientUpdate:
    """Run silo `client_id`'s client-train deployment on the round's global adapter; read back its update."""
    assert cfg.federation.silos is not None
    silo = cfg.federation.silos[client_id]
    folder = exchange.round_dir(cfg, global_model)
    request = TrainRequest(
        config=cfg, round=round_num, client_id=client_id, noise_multiplier=noise_multiplier, folder=str(folder)
    )
    run = cast(
        FlowRun,
        run_deployment(
            f"{SILO_FLOW}/{silo.name}", parameters={"request": request.model_dump(mode="json")}, timeout=None,
            poll_interval=2,
        ),
    )
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"silo {silo.name} (client {client_id}), round {round_num}: flow run {run.id} ended {state}")
    return exchange.read_update(
        folder, client_id, round_num, sender=str(run.id), max_bytes=exchange.max_update_bytes(global_model)
    )


def publish_global(cfg: ExperimentConfig, global_model: GlobalModel) -> None:
    """Put the round's starting adapter where the silos read it."""
    exchange.write_global(exchange.round_dir(cfg, global_model), global_model)
