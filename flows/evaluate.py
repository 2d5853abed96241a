"""Held-out test evaluation of the final adapter against the zero-shot base model."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from prefect import flow

from dplora_core.config import ExperimentConfig
from dplora_core.data import DataError
from dplora_core.evaluate import recall_per_label
from dplora_core.io import atomic_write, json_bytes
from dplora_core.privacy.accountant import SHORT_RELATIONS
from flows.registry import register_final_adapter, registered_name
from flows.tracking import ExperimentRun
from tasks.runtime import eval_prompts, task_of
from tasks.training import evaluate


@flow(name="evaluate-experiment")
def evaluate_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Zero-shot and final accuracy / macro-F1 on the test split; writes metrics.json next to the adapter."""
    out = config.run_dir
    training_path, adapter_path = out / "training.json", out / "adapter.safetensors"
    for path in (training_path, adapter_path):
        if not path.is_file():
            raise DataError(f"{path}: not found (run `dplora federate` first)")
    training_bytes = training_path.read_bytes()
    training = json.loads(training_bytes)
    zero_shot = evaluate(config, None, "test")
    final = evaluate(config, adapter_path.read_bytes(), "test")
    _, gold, label_ids = eval_prompts(config, "test")
    if not gold:
        raise DataError(f"{config.data.prepared_dir}: the test split of {config.data.dataset} is empty")
    majority = max(gold.count(c) for c in range(len(label_ids))) / len(gold)
    # the labels as the data names them (custom data: data.custom.labels), and the words the model answers
    words = list(task_of(config).labels)
    labels = list(config.data.custom.labels) if config.data.custom is not None else words
    metrics = {
        # each confusion matrix: rows the true label, columns the predicted one, in the order of "labels"
        "test": {"zero_shot": zero_shot, "final": final, "majority_class_accuracy": majority, "labels": labels,
                 "label_words": words},
        "privacy": {k: v for k, v in training["privacy"].items() if k not in ("ledgers", "server_view_ledgers")},
        "bytes": training["bytes"],
        "rounds": training["rounds"],
        "stopped_by_budget_guard": training["stopped_by_budget_guard"],
        "num_clients": training["num_clients"],
        "train_seconds": training["train_seconds"],
        "mlflow_run_id": training["mlflow_run_id"],
        "training_sha256": hashlib.sha256(training_bytes).hexdigest(),  # which training these numbers evaluate
    }
    version = register_final_adapter(config, training["mlflow_run_id"], adapter_path, metrics["privacy"])
    metrics["registered_model"] = {"name": registered_name(config), "version": version}
    atomic_write(out / "metrics.json", json_bytes(metrics))
    atomic_write(out / "summary.json", json_bytes(dvc_summary(metrics)))
    run = ExperimentRun(config, run_id=training["mlflow_run_id"])
    run.log_metrics(evaluation_metrics(final, labels, prefix="test_"), step=training["rounds"])
    run.log_metrics(evaluation_metrics(zero_shot, labels, prefix="zero_shot_test_"), step=0)
    run.log_artifact(out / "metrics.json")
    return metrics


def evaluation_metrics(scores: dict[str, Any], labels: list[str], *, prefix: str) -> dict[str, float]:
    """MLflow metrics of one test evaluation: accuracy, macro-F1, loss and each label's recall."""
    numbers = {f"{prefix}{k}": float(scores[k]) for k in ("accuracy", "macro_f1", "loss")}
    recalls = recall_per_label(scores["confusion"])
    keys = [metric_key(label) for label in labels]
    if len(set(keys)) < len(keys):  # two labels that differ only in characters metric_key replaces
        keys = [str(c) for c in range(len(labels))]
    return numbers | {f"{prefix}recall_{key}": r for key, r in zip(keys, recalls, strict=True) if r is not None}


def metric_key(label: str) -> str:
    """A label as part of an MLflow metric name: letters, digits, _ - . and spaces kept, anything else (even / and
    :, which MLflow takes but which read as paths and differ by platform) becomes _."""
    return re.sub(r"[^\w\-. ]", "_", label)


def dvc_summary(metrics: dict[str, Any]) -> dict[str, float | int | str | bool | None]:
    """The few numbers `dvc metrics show` and `dvc exp show` compare across experiments (summary.json); each
    epsilon with its relation, accountant and delta, as everywhere (the full sentence: training.json)."""
    test, priv, b = metrics["test"], metrics["privacy"], metrics["bytes"]
    server_view = {"server_view_epsilon": priv["server_view_epsilon"]} if "server_view_epsilon" in priv else {}
    return {
        "test_accuracy": test["final"]["accuracy"],
        "test_macro_f1": test["final"]["macro_f1"],
        "zero_shot_accuracy": test["zero_shot"]["accuracy"],
        "majority_class_accuracy": test["majority_class_accuracy"],
        "epsilon": priv["epsilon"],  # null without DP
        **server_view,  # mode distributed: against the server, which sees each upload with its share of the noise
        "delta": priv["delta"] if priv["mode"] != "none" else None,
        "privacy_mode": priv["mode"],
        "relation": SHORT_RELATIONS[priv["mode"]],  # record-level, client-level, paper bound, ...
        "accountant": priv["accountant"],
        "noise_seed_fixed": priv.get("noise_seed_fixed"),  # true: void against whoever knows privacy.noise_seed
        "rounds": metrics["rounds"],
        "bytes_up": b["up"],  # null in mode client: participation stays on the server
        "bytes_down": b["down"],
    }
