"""runner.kind: clients train on a local Dask cluster of worker processes, reporting to a real Prefect server."""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.runners as runners
from dplora_core.config import RunnerConfig
from flows.cli import main
from flows.pipeline import dplora_pipeline
from tests.helpers import tiny_config


def train_client_pids(since: dt.datetime, expected: int) -> list[int]:
    """The process ids that train-client task runs logged on the server since `since` (logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp

    query = LogFilter(timestamp=LogFilterTimestamp(after_=since))
    pids: list[int] = []
    for _ in range(30):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(query, limit=200, offset=0)
        pids = [int(m.group(1)) for log in logs if (m := re.search(r"trained round \d+ in process (\d+)", log.message))]
        if len(pids) >= expected:
            break
        time.sleep(1)
    return pids


def test_a_round_on_a_local_dask_cluster_of_two_processes_matches_the_threads_run(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, use_prefect_server: str
) -> None:
    common = {"federation__rounds": 1, "privacy__noise_seed": 11}
    threads = tiny_config(tiny_model_dir, tmp_path / "threads", raw_dir, **common)
    dask = tiny_config(
        tiny_model_dir, tmp_path / "dask", raw_dir, runner__kind="dask", runner__workers=2, **common
    )
    dplora_pipeline(threads)
    since = dt.datetime.now(dt.UTC)
    dplora_pipeline(dask)
    pids = train_client_pids(since, expected=2)
    assert len(pids) == 2 and os.getpid() not in pids  # both clients trained outside the flow's process
    assert (dask.run_dir / "adapter.safetensors").read_bytes() == (threads.run_dir / "adapter.safetensors").read_bytes()


def test_a_round_on_a_local_ray_cluster_of_two_processes_matches_the_threads_run(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, use_prefect_server: str, capfd: pytest.CaptureFixture[str]
) -> None:
    common = {"federation__rounds": 1, "privacy__noise_seed": 11}
    threads = tiny_config(tiny_model_dir, tmp_path / "threads", raw_dir, **common)
    ray = tiny_config(tiny_model_dir, tmp_path / "ray", raw_dir, runner__kind="ray", runner__workers=2, **common)
    dplora_pipeline(threads)
    capfd.readouterr()
    dplora_pipeline(ray)
    # Ray forwards its workers' output to the driver, prefixed "(train-client pid=N)".
    out = "".join(capfd.readouterr())
    pids = {int(pid) for pid in re.findall(r"\(train-client pid=(\d+)\).*trained round 1 in process \1", out)}
    assert len(pids) == 2 and os.getpid() not in pids
    assert (ray.run_dir / "adapter.safetensors").read_bytes() == (threads.run_dir / "adapter.safetensors").read_bytes()


def test_dask_without_a_prefect_server_is_refused_before_any_work(tiny_model_dir, raw_dir, tmp_path, capsys) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, runner__kind="dask")
    path = tmp_path / "dask.yaml"
    path.write_text(cfg.model_dump_json())  # JSON is YAML
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "runner.kind 'dask'" in err and "PREFECT_API_URL" in err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "prepared").exists()


def test_a_runner_whose_package_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runners.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(runners.RunnerError, match=r"runner.kind 'ray' needs prefect_ray: pip install 'dplora\[ray\]'"):
        runners.check_runner(RunnerConfig(kind="ray"), rerun_lost=True)


def test_an_address_needs_a_cluster_runner() -> None:
    with pytest.raises(ValueError, match=r"runner\.address is for runner\.kind dask or ray"):
        RunnerConfig(address="tcp://127.0.0.1:8786")


def local_scheduler(**scheduler_kwargs: int) -> Any:
    """A Dask scheduler in this process with no workers, reachable over TCP like an existing cluster's."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=0, processes=False, protocol="tcp", dashboard_address=None,
                        scheduler_kwargs=scheduler_kwargs)


def test_a_local_dask_cluster_reruns_no_task_whose_worker_died_when_a_rerun_is_a_fresh_release() -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):  # checked for, not contacted
        runner = runners.task_runner(RunnerConfig(kind="dask"), rerun_lost=False)
    kwargs = {**runner.cluster_kwargs, "n_workers": 0, "processes": False}  # type: ignore[attr-defined]
    from distributed import LocalCluster

    with LocalCluster(**kwargs) as cluster:
        assert cluster.scheduler.allowed_failures == 0  # Dask's default, 3, would run it up to 4 times


def test_an_existing_dask_scheduler_that_reruns_lost_tasks_is_refused_under_os_entropy_noise() -> None:
    with local_scheduler(allowed_failures=2) as cluster, temporary_settings({PREFECT_API_URL: "http://x/api"}):
        config = RunnerConfig(kind="dask", address=cluster.scheduler_address)
        runners.check_runner(config, rerun_lost=True)  # seeded noise or no DP: a retry replays, allowed
        with pytest.raises(runners.RunnerError, match=r"allowed-failures = 2\).*ALLOWED_FAILURES=0") as err:
            runners.check_runner(config, rerun_lost=False)
        assert "noise_seed" not in str(err.value)  # a fixed seed voids the guarantee: never the advice
    with local_scheduler(allowed_failures=0) as cluster, temporary_settings({PREFECT_API_URL: "http://x/api"}):
        runners.check_runner(RunnerConfig(kind="dask", address=cluster.scheduler_address), rerun_lost=False)


def test_ray_tasks_get_no_retries_when_a_rerun_is_a_fresh_release(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import RemoteOptionsContext

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(RayTaskRunner, "submit", lambda self, *a, **k: seen.append(
        RemoteOptionsContext.get().current_remote_options))  # what ray.remote(**options) would get
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        runner = runners.task_runner(RunnerConfig(kind="ray"), rerun_lost=False)
    runner.duplicate().submit(None, {})  # Prefect runs a flow on a duplicate of its runner
    assert seen == [{"max_retries": 0}]  # Ray's default, 3, would re-run a task whose worker died


def test_an_unreachable_dask_scheduler_is_named_not_a_traceback() -> None:
    with temporary_settings({PREFECT_API_URL: "http://x/api"}), pytest.raises(
        runners.RunnerError, match=r"runner.address tcp://127.0.0.1:9: cannot reach the Dask scheduler"
    ):
        runners.dask_allowed_failures("tcp://127.0.0.1:9", timeout=2)


@pytest.mark.parametrize(("mode", "noise_seed", "rerun_lost"), [("sample", None, False), ("sample", 7, True),
                                                                 ("none", None, True)])
def test_the_flow_asks_for_no_rerun_exactly_when_a_retry_would_be_a_fresh_release(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    mode: str, noise_seed: int | None, rerun_lost: bool,
) -> None:
    import flows.federated as federated

    asked: list[bool] = []

    def fake_task_runner(runner: RunnerConfig, *, rerun_lost: bool) -> Any:
        asked.append(rerun_lost)
        raise RuntimeError("stop before any work")

    monkeypatch.setattr(federated, "task_runner", fake_task_runner)
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode=mode, privacy__noise_seed=noise_seed)
    with pytest.raises(RuntimeError, match="stop before any work"):
        federated.federate(cfg)
    assert asked == [rerun_lost]


def test_the_pipeline_stops_on_a_runner_error_before_it_prepares_data(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, runner__kind="dask")  # no Prefect server: refused
    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(runners.RunnerError, match="need a Prefect server"):
        dplora_pipeline(cfg)
    assert not Path(cfg.data.prepared_dir).exists()


def test_the_pipeline_trains_on_the_runner_it_checked_at_its_start(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One check per run: a Dask scheduler at runner.address is asked once, not again when training starts."""
    import flows.federated as federated
    import flows.pipeline as pipeline

    built: list[RunnerConfig] = []

    def counted(runner: RunnerConfig, *, rerun_lost: bool) -> Any:
        built.append(runner)
        return runners.task_runner(runner, rerun_lost=rerun_lost)

    monkeypatch.setattr(pipeline, "task_runner", counted)
    monkeypatch.setattr(federated, "task_runner", counted)
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1)
    dplora_pipeline(cfg)
    assert len(built) == 1 and (cfg.run_dir / "adapter.safetensors").exists()
