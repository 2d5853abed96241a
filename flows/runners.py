"""The task runner of the federated flow, chosen by `runner.kind` in the config.

threads (default): clients train in the flow's own process, on its one base model.
dask / ray: clients train in worker processes of a local cluster (`runner.workers` of them, one base
model each, loaded once per process by `tasks.runtime.workspace`) or of an existing one (`runner.address`).
Worker processes report task states to the Prefect API, so they need a real server (PREFECT_API_URL):
with Prefect's temporary in-process server, every worker would start an API of its own.
Both schedulers re-run a task whose worker process died (Dask: `distributed.scheduler.allowed-failures`,
Ray: a task's `max_retries`, 3 by default). Where a re-run would be a second, fresh DP release
(`PrivacyConfig.rerun_replays` false), the runner built here re-runs none: a local Dask cluster allows no
failure, Ray tasks get `max_retries=0`, and an existing Dask scheduler must be configured so (checked).
"""

from __future__ import annotations

import importlib.util
from typing import Any, cast

from prefect.futures import PrefectFuture
from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from dplora_core.config import RunnerConfig

EXTRAS = {"dask": ("prefect_dask", "dplora[dask]"), "ray": ("prefect_ray", "dplora[ray]")}


class RunnerError(RuntimeError):
    """The configured task runner cannot run here: a missing package or no Prefect server."""


def check_runner(runner: RunnerConfig, *, rerun_lost: bool) -> None:
    """Raise RunnerError naming runner.kind if its package or a Prefect server is missing, or (rerun_lost
    False) if the existing Dask scheduler at runner.address would re-run a lost task; before any work."""
    if runner.kind == "threads":
        return
    module, extra = EXTRAS[runner.kind]
    if importlib.util.find_spec(module) is None:
        raise RunnerError(f"runner.kind {runner.kind!r} needs {module}: pip install '{extra}'")
    if not get_current_settings().api.url:
        raise RunnerError(
            f"runner.kind {runner.kind!r} runs tasks in other processes, which need a Prefect server: "
            "start one (`prefect server start`) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api"
        )
    if runner.kind == "dask" and runner.address and not rerun_lost:
        allowed = dask_allowed_failures(runner.address)
        if allowed != 0:
            raise RunnerError(
                f"runner.address {runner.address}: this Dask scheduler re-runs a task whose worker died "
                f"(distributed.scheduler.allowed-failures = {allowed}); under DP with noise from OS entropy that "
                "re-run is a fresh release the accountant does not compose. Start the scheduler with "
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0"
            )


def dask_allowed_failures(address: str, *, timeout: float = 30) -> int:
    """How many worker deaths the Dask scheduler at `address` lets a task survive (re-running it each time)."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            return int(client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures))
    except (OSError, TimeoutError) as err:
        raise RunnerError(f"runner.address {address}: cannot reach the Dask scheduler ({err})") from err


def task_runner(runner: RunnerConfig, *, rerun_lost: bool) -> TaskRunner[PrefectFuture[Any]]:
    """A fresh task runner for one flow run, as configured; rerun_lost False: no task runs twice when its
    worker dies (see the module's docstring)."""
    check_runner(runner, rerun_lost=rerun_lost)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return cast("TaskRunner[PrefectFuture[Any]]", DaskTaskRunner(address=runner.address))
        local = {"n_workers": runner.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
                 **({} if rerun_lost else {"scheduler_kwargs": {"allowed_failures": 0}})}
        return cast("TaskRunner[PrefectFuture[Any]]", DaskTaskRunner(cluster_kwargs=local))
    if runner.kind == "ray":
        from prefect_ray import RayTaskRunner

        from flows.ray_runner import NoRerunRayTaskRunner

        init = {} if runner.address else {"num_cpus": runner.workers, "include_dashboard": False}
        ray_runner = RayTaskRunner if rerun_lost else NoRerunRayTaskRunner
        return cast("TaskRunner[PrefectFuture[Any]]", ray_runner(address=runner.address, init_kwargs=init))
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=runner.workers))
