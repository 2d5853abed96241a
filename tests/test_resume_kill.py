"""Stopping a run in the middle of a round: SIGKILL then `--resume` gives the same final adapter, each round
charged once; SIGTERM exits in order, leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.helpers import tiny_config

SEED = 7


def write_config(tiny_model_dir: Path, raw_dir: Path, out: Path) -> tuple[Path, Path]:
    """(config path, run directory) of a seeded 2-round run whose rounds last long enough to be killed in."""
    cfg = tiny_config(
        tiny_model_dir, out, raw_dir, privacy__noise_seed=SEED, federation__rounds=2, federation__local_steps=50,
        federation__microbatch_size=8,
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path, cfg.run_dir


def dplora(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(cwd / ".prefect")},
    )


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_until_pending(proc: subprocess.Popen[str], state: Path, *, round_num: int) -> None:
    """Poll the checkpoint's state.json until round `round_num` is in flight (or the run ends, or 5 min pass)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text()).get("pending", {}).get("round") == round_num:
            return
        time.sleep(0.02)


def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    straight, straight_dir = write_config(tiny_model_dir, raw_dir, tmp_path / "straight")
    finish(dplora(tmp_path / "straight", "run", str(straight)))

    killed, killed_dir = write_config(tiny_model_dir, raw_dir, tmp_path / "killed")
    state = killed_dir / "checkpoint" / "state.json"
    proc = dplora(tmp_path / "killed", "run", str(killed))
    wait_until_pending(proc, state, round_num=2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its temporary Prefect server
    proc.wait()
    at_kill = json.loads(state.read_text())
    assert at_kill["round"] == 1 and at_kill["pending"]["round"] == 2, "the kill did not land inside round 2"

    finish(dplora(tmp_path / "killed", "run", str(killed), "--resume"))
    runs = [straight_dir, killed_dir]
    assert (runs[0] / "adapter.safetensors").read_bytes() == (runs[1] / "adapter.safetensors").read_bytes()
    summaries = [json.loads((run / "training.json").read_text()) for run in runs]
    assert summaries[1]["privacy"]["ledgers"] == summaries[0]["privacy"]["ledgers"]  # 2 rounds, each once
    assert summaries[1]["privacy"]["epsilon"] == summaries[0]["privacy"]["epsilon"]
    assert summaries[1]["mlflow_run_id"] == at_kill["mlflow_run_id"]  # the resumed run continues the same MLflow run


def test_sigterm_mid_round_exits_143_and_stops_the_temporary_server(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    path, run_dir = write_config(tiny_model_dir, raw_dir, tmp_path)
    state = run_dir / "checkpoint" / "state.json"
    proc = dplora(tmp_path, "run", str(path))
    try:
        wait_until_pending(proc, state, round_num=1)
        proc.send_signal(signal.SIGTERM)  # the CLI alone, as `kill` or a scheduler sends it
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert json.loads(state.read_text()).get("pending"), "the signal did not land inside a round"
        deadline = time.monotonic() + 30  # the server started in the CLI's process group stops with it
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "a process of the run (the temporary Prefect server?) outlived it"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
