"""The real embedded model (SmolLM2-135M-Instruct from its GGUF) on real Financial PhraseBank, via the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, shared_data_dir

pytestmark = pytest.mark.e2e


def dplora(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=900,
        env=os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp / ".prefect")},
    )


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-test.yaml").read_text())
    cfg["model"]["converted_dir"] = str(ROOT / cfg["model"]["converted_dir"])  # convert once, reuse
    cfg["data"].update(raw_dir=str(tmp / "raw"), prepared_dir=str(tmp / "prepared"))
    cfg["tracking"].update(
        mlflow_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        artifact_dir=str(tmp / "mlartifacts"),
        output_dir=str(tmp / "outputs"),
    )
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tmp, path, dplora(tmp, "run", str(path), "--source", str(shared_data_dir()))


def test_dplora_run_on_the_real_model_and_data(real_run) -> None:
    tmp, _, proc = real_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("zero-shot accuracy / macro-F1", "final accuracy / macro-F1", "epsilon spent", "RDP accountant"):
        assert line in proc.stdout
    metrics = json.loads((tmp / "outputs" / "tiny-test" / "metrics.json").read_text())
    assert 0.9 * 8.0 < metrics["privacy"]["epsilon"] <= 8.0  # calibrated to the target from below
    adapter = load_file(tmp / "outputs" / "tiny-test" / "adapter.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert metrics["test"]["final"]["n"] == 16
    assert metrics["bytes"]["full_model_up"] > 1000 * metrics["bytes"]["up"]
    assert (tmp / "raw" / "financial_phrasebank" / "all-data.csv").is_file()


def test_dplora_audit_on_the_real_model_and_data(real_run) -> None:
    """Wiring and output only (8 canaries, 1 step): the statistics are checked in test_audit.py, and a
    measured real-model audit is in docs/privacy.md."""
    tmp, path, _ = real_run
    proc = dplora(tmp, "audit", str(path), "--canaries", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attack AUC" in proc.stdout and "empirical epsilon lower bound" in proc.stdout
    audit = json.loads((tmp / "outputs" / "tiny-test" / "audit.json").read_text())
    assert audit["members"] == audit["held_out"] == 8
    assert audit["dp"]["epsilon_lower_bound"] <= audit["dp"]["accountant_epsilon"] <= 8.0
