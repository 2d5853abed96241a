"""The final adapter in the MLflow Model Registry, tagged with its privacy guarantee and data version."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dplora_core.config import ExperimentConfig
from tasks.runtime import split_path

MODEL_CODE = Path(__file__).with_name("registered_model.py")


def registered_name(cfg: ExperimentConfig) -> str:
    return f"dplora-{cfg.name}"


def dataset_version(cfg: ExperimentConfig) -> str:
    """sha256 (first 12 hex) of the prepared train, validation and test files the run used."""
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        path = split_path(cfg.data, split)
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:12]


def register_final_adapter(cfg: ExperimentConfig, run_id: str, adapter: Path, privacy: dict[str, Any]) -> str:
    """Log the adapter as an MLflow pyfunc model of run `run_id`, register it; return its version. The same
    adapter of the same run (an evaluation re-run after a crash) keeps its version instead of adding one."""
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    client = MlflowClient(cfg.tracking.mlflow_uri)
    sha256 = hashlib.sha256(adapter.read_bytes()).hexdigest()
    for known in client.search_model_versions(f"name = '{registered_name(cfg)}' and run_id = '{run_id}'"):
        if known.tags.get("adapter_sha256") == sha256:
            return str(known.version)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(cfg.model_dump_json(indent=2))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"adapter": str(adapter), "config": str(config)},
                pip_requirements=["dplora"], registered_model_name=registered_name(cfg),
            )
    version = str(info.registered_model_version)
    tags = {
        "epsilon": "inf (no DP)" if privacy["epsilon"] is None else f"{privacy['epsilon']:.4f}",
        "delta": str(privacy["delta"]),
        "privacy_mode": privacy["mode"],
        "accountant": privacy["accountant"],
        "guarantee": privacy["guarantee"],
        "dataset": cfg.data.dataset if cfg.data.custom is None else f"custom:{cfg.data.custom.path}",
        "dataset_version": dataset_version(cfg),
        "adapter_sha256": sha256,  # last: a version without it was not fully tagged, and is registered again
    }
    for key, value in tags.items():
        client.set_model_version_tag(registered_name(cfg), version, key, value)
    return version
