"""MLflow at the flow edge: one run per experiment, config as params, per-round metrics, adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dplora_core.config import ExperimentConfig


class ExperimentRun:
    """An MLflow run addressed by id (no global active-run state, safe from task threads)."""

    def __init__(self, cfg: ExperimentConfig, run_id: str | None = None) -> None:
        mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
        self.client = MlflowClient(cfg.tracking.mlflow_uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            if exp is None:
                artifacts = (Path(cfg.tracking.artifact_dir) / cfg.tracking.experiment).resolve().as_uri()
                exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=cfg.name, tags={"dplora.privacy_mode": cfg.privacy.mode})
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in cfg.flat().items()])
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def has_metric(self, key: str, *, step: int) -> bool:
        """Whether the run holds a value of metric `key` at `step`."""
        return any(m.step == step for m in self.client.get_metric_history(self.run_id, key))

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, payload, artifact_file)

    def reopen(self) -> None:
        """Mark a resumed run as running again."""
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
