"""The whole experiment in one flow: prepare -> partition -> federate -> evaluate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dplora_core.config import ExperimentConfig
from flows.evaluate import evaluate_experiment
from flows.federated import federate
from flows.runners import task_runner
from tasks.data import partition_clients, prepare_data


@flow(name="dplora-pipeline")
def dplora_pipeline(config: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Prepare the data, partition it over clients, train federatedly with DP, evaluate on test."""
    runner = task_runner(config.runner, rerun_lost=config.privacy.rerun_replays)  # checked here, before any work
    prepare_data(config)
    if config.federation.silos is None:  # cross-silo: the silos hold the training records, not this machine
        partition_clients(config)
    federate(config, resume=resume, runner=runner)
    return evaluate_experiment(config)


@flow(name="dplora-pipeline-from-file")
def dplora_pipeline_from_file(config_path: str, resume: bool = False) -> dict[str, Any]:
    """Deployment entry point: validate the YAML config at `config_path`, then run the pipeline; `resume`
    continues from the run's last checkpoint (a fresh start if there is none)."""
    from dplora_core.config import load_config

    return dplora_pipeline(load_config(config_path), resume=resume)
