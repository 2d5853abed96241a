"""prefect-ray's task runner with no re-run of a task whose worker died (imported only for runner.kind ray)."""

from __future__ import annotations

from typing import Any

from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options


class NoRerunRayTaskRunner(RayTaskRunner):
    """Every task with `max_retries=0` (Ray's default is 3): a task whose worker died fails, not re-runs."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        with remote_options(max_retries=0):
            return super().submit(*args, **kwargs)
