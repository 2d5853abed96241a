"""The real embedded model (SmolLM2-135M-Instruct from its GGUF) on real Financial PhraseBank, via the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, shared_data_dir

pytestmark = pytest.mark.e2e


def test_dplora_run_on_the_real_model_and_data(tmp_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-test.yaml").read_text())
    cfg["model"]["converted_dir"] = str(ROOT / cfg["model"]["converted_dir"])  # convert once, reuse
    cfg["data"].update(raw_dir=str(tmp_path / "raw"), prepared_dir=str(tmp_path / "prepared"))
    cfg["tracking"].update(
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_dir=str(tmp_path / "mlartifacts"),
        output_dir=str(tmp_path / "outputs"),
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path), "--source", str(shared_data_dir())],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env=os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / ".prefect")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("zero-shot accuracy / macro-F1", "final accuracy / macro-F1", "epsilon spent", "RDP accountant"):
        assert line in proc.stdout
    metrics = json.loads((tmp_path / "outputs" / "tiny-test" / "metrics.json").read_text())
    assert 0 < metrics["privacy"]["epsilon"] <= 8.0
    assert metrics["test"]["final"]["n"] == 16
    assert metrics["bytes"]["full_model_up"] > 1000 * metrics["bytes"]["up"]
    assert (tmp_path / "raw" / "financial_phrasebank" / "all-data.csv").is_file()
