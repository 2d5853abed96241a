"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dplora_core.config import ExperimentConfig


def tiny_config(model_dir: Path, tmp: Path, raw_dir: Path, **overrides: Any) -> ExperimentConfig:
    """A fast experiment on the tiny random model and a slice of Financial PhraseBank."""
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
            "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_dir": str(tmp / "mlartifacts"),
            "experiment": "tests", "output_dir": str(tmp / "outputs"),
        },
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    return ExperimentConfig.model_validate(cfg)
