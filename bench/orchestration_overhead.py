"""Wall time of the Prefect flow against a plain Python loop over the same functions (issue 4 benchmark).

    python bench/orchestration_overhead.py [--config configs/fpb-demo.yaml] [--rounds 1]

Both run the demo config's rounds in one process, one after the other: the flow is
`federated_finetune` (Prefect tasks, a temporary Prefect server, MLflow tracking, checkpoints); the
loop calls the very same task bodies (`.fn`) in order, with no Prefect, MLflow or checkpoints. The
difference over the number of task runs is the per-task overhead (it includes the flow's fixed costs:
starting the temporary Prefect server and creating the MLflow run). Goal: at most 1.10x.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import flows.cli  # noqa: F401  (first: keeps Prefect, MLflow and HF state in the project, offline)
from dplora_core.config import ExperimentConfig, load_config
from tasks.data import partition_clients, prepare_data
from tasks.runtime import workspace
from tasks.training import aggregate, evaluate, init_adapter, plan_noise, sample_round_clients, train_client


def plain_loop(cfg: ExperimentConfig) -> int:
    """The rounds without Prefect: the same task bodies called in order; returns the number of task calls."""
    plan = plan_noise.fn(cfg)
    model = init_adapter.fn(cfg)
    calls = 2
    for r in range(1, cfg.federation.rounds + 1):
        clients = sample_round_clients(cfg, r)
        updates = [train_client.fn(cfg, r, k, model, plan.clients.get(k)) for k in clients]
        model = aggregate.fn(cfg, model, updates)
        evaluate.fn(cfg, model.adapter, "validation")
        calls += len(clients) + 2
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fpb-demo.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds (default: the config's)")
    args = parser.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        updates = {
            "output_dir": str(Path(tmp) / "outputs"),
            "mlflow_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}",
            "artifact_dir": str(Path(tmp) / "mlartifacts"),
        }
        federation = cfg.federation.model_copy(update={"rounds": args.rounds or cfg.federation.rounds})
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update=updates), "federation": federation})
        prepare_data.fn(cfg)
        partition_clients.fn(cfg)
        workspace(cfg.model, cfg.lora)  # load the model once, outside both timings
        warm = init_adapter.fn(cfg)  # and warm the kernels, so the first timed run pays no warm-up
        train_client.fn(cfg, 0, 0, warm, plan_noise.fn(cfg).clients.get(0))
        evaluate.fn(cfg, warm.adapter, "validation")

        from flows.federated import federated_finetune

        start = time.perf_counter()
        federated_finetune(cfg)
        flow_s = time.perf_counter() - start
        start = time.perf_counter()
        calls = plain_loop(cfg)
        loop_s = time.perf_counter() - start
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{time.strftime('%Y-%m-%d')} {machine}, {args.config}, {cfg.federation.rounds} round(s)")
    print("| run | wall time |")
    print("|---|---|")
    print(f"| Prefect flow | {flow_s:.1f} s |")
    print(f"| plain loop | {loop_s:.1f} s |")
    per_task_ms = (flow_s - loop_s) / calls * 1000
    print(f"ratio {flow_s / loop_s:.3f}x (goal <= 1.10x); overhead {per_task_ms:.0f} ms per task run ({calls} runs)")


if __name__ == "__main__":
    main()
