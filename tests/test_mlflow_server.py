"""`make ui`'s server, for real: an MLflow server on 127.0.0.1 over a run's store, read through its REST API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.pipeline import dplora_pipeline
from tests.helpers import tiny_config
from tests.prefect_server import free_port, stop

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None):
    """A finished tiny run, then `mlflow server` on its store (what `make ui` serves)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1)
    metrics = dplora_pipeline(cfg)
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--backend-store-uri", cfg.tracking.mlflow_uri, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "mlflow-server.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield base, cfg, metrics
    finally:
        stop(proc, grace=30)
        log.close()


def test_the_run_reads_back_through_the_mlflow_rest_api(mlflow_server) -> None:
    base, cfg, metrics = mlflow_server
    run = get(f"{base}/api/2.0/mlflow/runs/get?run_id={metrics['mlflow_run_id']}")["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FINISHED" and params["privacy.delta"] == str(cfg.privacy.delta)
    assert latest["epsilon_final"] == pytest.approx(metrics["privacy"]["epsilon"])
    assert latest["test_accuracy"] == pytest.approx(metrics["test"]["final"]["accuracy"])
    assert tags["dplora.guarantee"] == metrics["privacy"]["guarantee"]
    model = get(f"{base}/api/2.0/mlflow/registered-models/get?name=dplora-tiny")["registered_model"]
    assert model["latest_versions"][0]["run_id"] == metrics["mlflow_run_id"]
