"""What releasing the moving average of the global adapters (`federation.ema_decay`) would have scored on
finished runs, from the per-round global adapters each run logged to MLflow.

    python bench/release_average.py outputs/recipe-fp32-dp-eps8-ffa10-svd-dist-s5 [...] [--decays 0 0.5 0.7 0.9]

For each run and decay it prints the validation accuracy and loss of ema_R (R the run's last round),
ema_r = decay ema_(r-1) + (1 - decay) x_r from ema_1 = x_1, over the global adapters x_r; decay 0 is the
last global adapter, which for a run without ema_decay is what it released (a check that the numbers
reproduce the run's). Post-processing of released adapters: no privacy cost. Validation
data only, on tuning seeds: the decay is a choice, and the test split must not make it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from dplora_core.checkpoint import adapter_file
from dplora_core.config import ExperimentConfig, predating_fields
from dplora_core.messages import GlobalModel
from tasks.training import average_releases, evaluate


def round_adapters(cfg: ExperimentConfig, run_id: str, rounds: int) -> list[bytes]:
    """The global adapter after each round, as the run logged it (MLflow artifacts adapters/adapter-round-*)."""
    client = MlflowClient(cfg.tracking.mlflow_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return [
            Path(client.download_artifacts(run_id, f"adapters/{adapter_file(Path(tmp), r).name}", tmp)).read_bytes()
            for r in range(1, rounds + 1)
        ]


def averaged(cfg: ExperimentConfig, adapters: list[bytes], decay: float) -> bytes:
    """ema_R over the rounds' adapters, computed by the flow's own task (decay 0: the last adapter)."""
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"ema_decay": decay})})
    average: bytes | None = None
    for r, adapter in enumerate(adapters, 1):
        average = average_releases.fn(cfg, average, GlobalModel(round=r, adapter=adapter))
    return average if average is not None else adapters[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding training.json")
    parser.add_argument("--decays", nargs="+", type=float, default=[0.0, 0.5, 0.7, 0.8, 0.9])
    args = parser.parse_args()
    print("| run | rounds | " + " | ".join(f"decay {d:g}" for d in args.decays) + " |")
    print("|---|---|" + "---|" * len(args.decays))
    for run in args.runs:
        training = json.loads((run / "training.json").read_text())
        cfg = ExperimentConfig.model_validate(predating_fields(training["config"]))  # as it ran
        adapters = round_adapters(cfg, training["mlflow_run_id"], training["rounds"])
        cells = []
        for decay in args.decays:
            val = evaluate.fn(cfg, averaged(cfg, adapters, decay), "validation")
            cells.append(f"{val['accuracy']:.3f} ({val['loss']:.3f})")
        print(f"| {run.name} | {training['rounds']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
