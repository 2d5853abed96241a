"""Cross-silo mode on loopback: two silos, each with its own worker, work pool and data folder.

The coordinator (this test process) runs the federated flow; each silo's round is a run of that silo's
`client-train` deployment, executed by the silo's worker in a process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dplora_core.config import ExperimentConfig
from flows.pipeline import dplora_pipeline
from tasks.data import write_silo_data
from tests.helpers import tiny_config
from tests.prefect_server import PREFECT, server_env, stop

ROOT = Path(__file__).resolve().parent.parent
SILOS = ("bank-a", "bank-b")

OPENED: list[str] | None = None  # while a list, every file this process opens is appended to it


def _record_open(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], str | Path):
        OPENED.append(str(Path(args[0]).resolve()))


sys.addaudithook(_record_open)  # audit hooks cannot be removed; it does nothing unless OPENED is a list


@contextmanager
def files_opened() -> Iterator[list[str]]:
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


def deploy_silo(env: dict[str, str], name: str, data_path: Path) -> None:
    """What an organisation runs once, next to its data: its pool, its client-train deployment."""
    for args in (
        ["work-pool", "create", name, "--type", "process", "--overwrite"],
        ["deploy", "--prefect-file", "prefect-silo.yaml", "--name", name, "--pool", name,
         "--param", f"data_path={data_path}"],
    ):
        done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def silo_workers(prefect_server: str, tmp_path: Path, simulated: tuple[ExperimentConfig, dict[str, Any]]):
    """Each silo's data folder (one client's shard of the simulated run), deployment and running worker."""
    sim_cfg, _ = simulated
    env = server_env(tmp_path / "client-home", prefect_server) | {"DPLORA_PROJECT_DIR": str(ROOT)}
    data = write_silo_data(sim_cfg, tmp_path / "silo-data")
    procs, logs = [], []
    for name, path in zip(SILOS, data, strict=True):
        deploy_silo(env, name, path)
        logs.append((tmp_path / f"worker-{name}.log").open("wb"))
        procs.append(subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", name], cwd=path.parent, env=env, stdout=logs[-1],
            stderr=subprocess.STDOUT,
        ))
    yield data
    for proc, log in zip(procs, logs, strict=True):
        stop(proc, grace=15)
        log.close()


@pytest.fixture
def simulated(tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, use_prefect_server: str):
    """The same experiment with both clients simulated on this machine: the reference."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "simulated", raw_dir)
    return cfg, dplora_pipeline(cfg)


def test_two_silos_train_the_same_adapter_without_the_coordinator_opening_their_data(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, simulated, silo_workers: list[Path]
) -> None:
    sim_cfg, _ = simulated
    sizes = [sum(1 for _ in path.open()) for path in silo_workers]
    cfg = tiny_config(
        tiny_model_dir, tmp_path / "coordinator", raw_dir,
        federation__silos=[{"name": n, "num_examples": k} for n, k in zip(SILOS, sizes, strict=True)],
        federation__exchange_dir=str(tmp_path / "exchange"),
    )
    with files_opened() as opened:
        dplora_pipeline(cfg)
    silo_dirs = {str(path.parent.resolve()) for path in silo_workers}
    assert opened and not [p for p in opened if any(p.startswith(d) for d in silo_dirs)]

    summary = json.loads((cfg.run_dir / "training.json").read_text())
    exchange = tmp_path / "exchange" / cfg.name
    up = sum(p.stat().st_size for p in exchange.glob("round-*/client-*.safetensors"))
    down = sum(p.stat().st_size * len(SILOS) for p in exchange.glob("round-*/global.safetensors"))
    assert (summary["bytes"]["up"], summary["bytes"]["down"]) == (up, down) and summary["rounds"] == 2
    assert summary["client_base_dtypes"] == ["float32"]  # from the silos' update records
    # Same records, same seeds: the silos' deployments compute exactly what the simulation computed.
    assert (cfg.run_dir / "adapter.safetensors").read_bytes() == (sim_cfg.run_dir / "adapter.safetensors").read_bytes()
