"""SIGKILL in the middle of a round, then `--resume`: same final adapter, each round charged once."""

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

SEED = 7


def write_config(tiny_model_dir: Path, raw_dir: Path, shared: Path, out: Path) -> Path:
    cfg = {
        "name": "kill",
        "model": {"path": str(tiny_model_dir), "gguf_file": None, "dtype": "float32", "max_seq_len": 96},
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "privacy": {"mode": "sample", "target_epsilon": 8.0, "delta": 1e-3, "noise_seed": SEED},
        "federation": {
            "num_clients": 2, "clients_per_round": 2, "rounds": 3, "local_steps": 150,
            "batch_size": 8, "microbatch_size": 8, "learning_rate": 1e-2,
        },
        "data": {
            "raw_dir": str(raw_dir), "prepared_dir": str(shared / "prepared"),
            "max_train_examples": 48, "max_validation_examples": 16, "max_test_examples": 16,
        },
        "tracking": {
            "mlflow_uri": f"sqlite:///{out / 'mlflow.db'}", "artifact_dir": str(out / "mlartifacts"),
            "experiment": "kill", "output_dir": str(out / "outputs"),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    straight = write_config(tiny_model_dir, raw_dir, tmp_path, tmp_path / "straight")
    finish(dplora(tmp_path / "straight", "run", str(straight)))

    killed = write_config(tiny_model_dir, raw_dir, tmp_path, tmp_path / "killed")
    state = tmp_path / "killed" / "outputs" / "kill" / "checkpoint" / "state.json"
    proc = dplora(tmp_path / "killed", "run", str(killed))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text()).get("pending", {}).get("round") == 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its temporary Prefect server
    proc.wait()
    at_kill = json.loads(state.read_text())
    assert at_kill["round"] == 1 and at_kill["pending"]["round"] == 2, "the kill did not land inside round 2"

    finish(dplora(tmp_path / "killed", "run", str(killed), "--resume"))
    runs = [tmp_path / d / "outputs" / "kill" for d in ("straight", "killed")]
    assert (runs[0] / "adapter.safetensors").read_bytes() == (runs[1] / "adapter.safetensors").read_bytes()
    summaries = [json.loads((run / "training.json").read_text()) for run in runs]
    assert summaries[1]["privacy"]["ledgers"] == summaries[0]["privacy"]["ledgers"]  # 3 rounds, each once
    assert summaries[1]["privacy"]["epsilon"] == summaries[0]["privacy"]["epsilon"]
    assert summaries[1]["mlflow_run_id"] == at_kill["mlflow_run_id"]  # the resumed run continues the same MLflow run
