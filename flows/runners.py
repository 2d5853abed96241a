"""The task runner of the federated flow, chosen by `runner.kind` in the config.

threads (default): clients train in the flow's own process, on its one base model.
dask / ray: clients train in worker processes of a local cluster (`runner.workers` of them, one base
model each, loaded once per process by `tasks.runtime.workspace`) or of an existing one (`runner.address`).
Worker processes report task states to the Prefect API, so they need a real server (PREFECT_API_URL):
with Prefect's temporary in-process server, every worker would start an API of its own.
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


def check_runner(runner: RunnerConfig) -> None:
    """Raise RunnerError naming runner.kind if its package or a Prefect server is missing; before any work."""
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


def task_runner(runner: RunnerConfig) -> TaskRunner[PrefectFuture[Any]]:
    """A fresh task runner for one flow run, as configured."""
    check_runner(runner)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return cast("TaskRunner[PrefectFuture[Any]]", DaskTaskRunner(address=runner.address))
        local = {"n_workers": runner.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        return cast("TaskRunner[PrefectFuture[Any]]", DaskTaskRunner(cluster_kwargs=local))
    if runner.kind == "ray":
        from prefect_ray import RayTaskRunner

        init = {} if runner.address else {"num_cpus": runner.workers, "include_dashboard": False}
        return cast("TaskRunner[PrefectFuture[Any]]", RayTaskRunner(address=runner.address, init_kwargs=init))
    return cast("TaskRunner[PrefectFuture[Any]]", ThreadPoolTaskRunner(max_workers=runner.workers))
