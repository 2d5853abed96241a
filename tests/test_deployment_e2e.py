"""prefect.yaml end to end on loopback: a real server, `prefect deploy`, a process worker, triggered runs.

The worker runs each flow run in a subprocess of its own, from this project folder (the pull step of
prefect.yaml), so this is what a scheduled run does on a user's machine.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from tests.helpers import tiny_config
from tests.prefect_server import PREFECT, server_env, stop

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "dplora-pipeline-from-file/federated-finetune"


def prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def trigger_and_wait(api_url: str, parameters: dict[str, object], timeout: float = 600) -> tuple[UUID, str]:
    """Trigger the deployment as a user would, wait for the worker to finish it; (flow run id, final state)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        run = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)
        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(run.id).state
                assert state is not None
                if state.is_final() or time.monotonic() > deadline:
                    return run.id, state.type.value
                time.sleep(2)


@pytest.fixture
def worker(prefect_server: str, tmp_path: Path):
    """`prefect deploy` of prefect.yaml, then `prefect worker start` on its process pool (the README steps)."""
    env = server_env(tmp_path / "client-home", prefect_server) | {"DPLORA_PROJECT_DIR": str(ROOT)}
    pool = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    prefect_cli(env, "work-pool", "create", pool, "--type", "process", "--overwrite")
    prefect_cli(env, "deploy", "--name", "federated-finetune")
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    yield env
    stop(proc, grace=15)
    log.close()


def test_deploy_worker_and_triggered_runs_resume_into_the_same_mlflow_run(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_server: str, worker: dict[str, str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config_path = tmp_path / "experiment.yaml"
    fixed_noise = {"privacy__noise_multiplier": 1.0, "privacy__target_epsilon": None}  # room for a second round
    first = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1, **fixed_noise)
    config_path.write_text(first.model_dump_json())  # JSON is YAML
    run_id, state = trigger_and_wait(prefect_server, {"config_path": str(config_path), "resume": True})
    assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    one_round = json.loads((first.run_dir / "training.json").read_text())
    assert one_round["rounds"] == 1

    more = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=2, **fixed_noise)
    config_path.write_text(more.model_dump_json())
    _, state = trigger_and_wait(prefect_server, {"config_path": str(config_path), "resume": True})
    assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    two_rounds = json.loads((more.run_dir / "training.json").read_text())
    assert two_rounds["rounds"] == 2 and two_rounds["history"][0] == one_round["history"][0]
    assert two_rounds["mlflow_run_id"] == one_round["mlflow_run_id"]

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        flow_run = client.read_flow_run(run_id)
    assert flow_run.deployment_id == deployment.id and deployment.work_pool_name == "dplora-process"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * 1"]  # type: ignore[union-attr]
