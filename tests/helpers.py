"""Small builders shared by tests."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from dplora_core.config import ExperimentConfig


@cache
def empty_mlflow_db() -> Path:
    """An MLflow SQLite store with its tables made, once per test process (the migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    folder = tempfile.mkdtemp(prefix="dplora-mlflow-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def tiny_config(model_dir: Path, tmp: Path, raw_dir: Path, **overrides: Any) -> ExperimentConfig:
    """A fast experiment on the tiny random model and a slice of Financial PhraseBank."""
    db = tmp / "mlflow.db"
    if not db.exists():  # a copy of an empty store: what MLflow would create, without its migrations' time
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_mlflow_db(), db)
    cfg: dict[str, Any] = {
        "name": "tiny",
        "model": {"path": str(model_dir), "gguf_file": None, "dtype": "float32", "max_seq_len": 96},
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "privacy": {"mode": "sample", "target_epsilon": 8.0, "delta": 1e-3, "noise_seed": 7},
        "federation": {
            "num_clients": 2, "clients_per_round": 2, "rounds": 2, "local_steps": 2,
            "batch_size": 8, "microbatch_size": 4, "learning_rate": 1e-2,
        },
        "data": {
            "raw_dir": str(raw_dir), "prepared_dir": str(tmp / "prepared"),
            "max_train_examples": 48, "max_validation_examples": 16, "max_test_examples": 16,
        },
        "tracking": {
            "mlflow_uri": f"sqlite:///{db}", "artifact_dir": str(tmp / "mlartifacts"),
            "experiment": "tests", "output_dir": str(tmp / "outputs"),
        },
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return ExperimentConfig.model_validate(cfg)
