"""DVC as users run it: `dvc repro`, `dvc push` to the default remote, `dvc pull` into a fresh clone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cwd: Path, *args: str, prefect_api: str | None = None) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    if prefect_api is not None:  # one server for every stage, rather than a temporary one each
        env["PREFECT_API_URL"] = prefect_api
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# One client step on capped data: the real model and pipeline, about a minute per experiment. The training
# cap keeps the frozen-prefix states to 64 records (the whole split's take ten minutes on a 2-core AVX2 CPU).
QUICK = ("federation.rounds=1", "federation.local_steps=1", "federation.batch_size=16",
         "data.max_train_examples=64", "data.max_validation_examples=16", "data.max_test_examples=32")
EXPERIMENTS = (("eps4", 4), ("eps2", 2))


@pytest.fixture(scope="module")
def clone(raw_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Path:
    """A fresh clone, its `ingest` stage finding the shared data where dvc.yaml looks (../shared/data),
    after two `dvc exp run`s of the whole pipeline; the workspace holds the last one (eps2)."""
    tmp = tmp_path_factory.mktemp("dvc")
    (tmp / "shared").mkdir()
    (tmp / "shared" / "data").symlink_to(raw_dir)
    first = tmp / "first"
    run(tmp, "git", "clone", "-q", str(ROOT), str(first))
    run(first, "dvc", "remote", "modify", "--local", "local", "url", str(tmp / "remote"))  # stand-in for the default
    for name, epsilon in EXPERIMENTS:
        sets = [arg for value in (f"privacy.target_epsilon={epsilon}", *QUICK) for arg in ("-S", value)]
        run(first, "dvc", "exp", "run", "-q", "-n", name, *sets, prefect_api=prefect_server)
    return first


def test_dvc_experiments_compare_epsilon_and_results(clone: Path) -> None:
    shown = json.loads(run(clone, "dvc", "exp", "show", "--json"))
    results = {
        exp["name"]: exp["data"]
        for commit in shown
        for branch in commit.get("experiments") or []
        for exp in branch["revs"]
    }
    for name, epsilon in EXPERIMENTS:
        data = results[name]
        assert data["params"]["params.yaml"]["data"]["privacy"]["target_epsilon"] == epsilon
        summary = data["metrics"]["outputs/fpb-demo/summary.json"]["data"]
        assert 0.9 * epsilon < summary["epsilon"] <= epsilon and summary["delta"] == 1e-5
        assert 0 <= summary["test_accuracy"] <= 1 and summary["privacy_mode"] == "sample"
    diff = json.loads(run(clone, "dvc", "params", "diff", "eps4", "eps2", "--json"))
    assert diff["params.yaml"]["privacy.target_epsilon"] | {"diff": None} == {"old": 4, "new": 2, "diff": None}
    metrics = json.loads(run(clone, "dvc", "metrics", "show", "--json"))  # the workspace holds the last one
    assert metrics[""]["data"]["outputs/fpb-demo/summary.json"]["data"]["epsilon"] <= 2


def test_push_then_pull_into_a_fresh_clone_restores_data_and_outputs(clone: Path, tmp_path: Path) -> None:
    run(clone, "dvc", "push")
    second = tmp_path / "second"
    run(tmp_path, "git", "clone", "-q", str(ROOT), str(second))
    for committed in ("dvc.lock", "params.yaml", "outputs/fpb-demo/summary.json"):  # what `git commit` carries
        (second / committed).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clone / committed, second / committed)
    shutil.copy(clone / ".dvc" / "config.local", second / ".dvc" / "config.local")
    run(second, "dvc", "pull")
    for folder in ("data/raw", "data/prepared", "reports"):
        assert digests(second / folder) == digests(clone / folder) != {}, folder
    outputs = ("partition.json", "adapter.safetensors", "training.json", "metrics.json")  # the stages' outs
    for name in outputs:
        assert digests(second / "outputs/fpb-demo")[name] == digests(clone / "outputs/fpb-demo")[name], name
    assert "up to date" in run(second, "dvc", "status").lower()
