"""The federated DP-LoRA flow: rounds of per-client training, aggregation and validation."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, unmapped

from dplora_core.config import ExperimentConfig
from dplora_core.io import atomic_write
from dplora_core.messages import ClientUpdate
from dplora_core.privacy.accountant import PrivacyLedger, describe_guarantee
from flows.tracking import ExperimentRun
from tasks.training import aggregate, evaluate, full_model_bytes, init_adapter, plan_noise, train_client


def sample_clients(rng: np.random.Generator, num_clients: int, per_round: int) -> list[int]:
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


@flow(name="federated-finetune")
def federated_finetune(config: ExperimentConfig) -> dict[str, Any]:
    """Federated, record-level DP LoRA fine-tuning of the configured model on the configured dataset."""
    cfg, f, p = config, config.federation, config.privacy
    log = get_run_logger()
    start = time.monotonic()
    sigmas = plan_noise(cfg)
    ledgers = {k: PrivacyLedger(kind=p.accountant) for k in range(f.num_clients)}
    global_model = init_adapter(cfg)
    run = ExperimentRun(cfg)
    run.set_tags({"dplora.noise_seed": p.noise_seed if p.noise_seed is not None else "os-entropy"})
    full_bytes = full_model_bytes(cfg)
    rng = np.random.default_rng([f.seed, 1])
    bytes_up = bytes_down = 0
    history: list[dict[str, Any]] = []
    client_rounds = 0  # client participations, for the full-model exchange comparison
    epsilon = 0.0 if p.mode == "sample" else float("inf")
    per_client_epsilon: dict[int, float] = {}  # record-level epsilon each client has spent; empty without DP
    try:
        for r in range(1, f.rounds + 1):
            clients = sample_clients(rng, f.num_clients, f.clients_per_round)
            futures = train_client.map(
                unmapped(cfg), unmapped(r), clients, unmapped(global_model), [sigmas.get(k) for k in clients]
            )
            updates = futures.result()
            round_down = len(global_model.adapter) * len(clients)
            round_up = sum(len(u.adapter) for u in updates)
            bytes_down, bytes_up = bytes_down + round_down, bytes_up + round_up
            client_rounds += len(clients)
            for u in updates:
                if u.dp_run is not None:
                    ledgers[u.client_id].record(u.dp_run)
            global_model = aggregate(cfg, global_model, updates)
            val = evaluate(cfg, global_model.adapter, "validation")
            if p.mode == "sample":
                per_client_epsilon = {k: ledger.epsilon(delta=p.delta) for k, ledger in ledgers.items()}
                epsilon = max(per_client_epsilon.values())
            row: dict[str, Any] = {
                "round": r,
                "clients": clients,
                "train_loss": _weighted_train_loss(updates),
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "epsilon": epsilon,
                "bytes_up": round_up,
                "bytes_down": round_down,
            }
            history.append(row)
            run.log_metrics(
                {k: v for k, v in row.items() if k not in ("round", "clients") and v is not None and np.isfinite(v)},
                step=r,
            )
            log.info(
                "round %d/%d: clients %s, val loss %.4f, acc %.4f, macro-F1 %.4f; %s",
                r, f.rounds, clients, val["loss"], val["accuracy"], val["macro_f1"],
                describe_guarantee(mode=p.mode, epsilon=epsilon, delta=p.delta, kind=p.accountant),
            )
        out = cfg.run_dir
        out.mkdir(parents=True, exist_ok=True)
        adapter_path = out / "adapter.safetensors"
        atomic_write(adapter_path, global_model.adapter)
        guarantee = describe_guarantee(
            mode=p.mode, epsilon=epsilon, delta=p.delta, kind=p.accountant, fixed_seed=p.noise_seed is not None
        )
        summary = {
            "name": cfg.name, "mlflow_run_id": run.run_id, "rounds": f.rounds,
            "num_clients": f.num_clients, "clients_per_round": f.clients_per_round,
            "privacy": {
                "mode": p.mode, "epsilon": epsilon if np.isfinite(epsilon) else None, "delta": p.delta,
                "accountant": p.accountant, "noise_multipliers": sigmas,
                "per_client_epsilon": per_client_epsilon,
                "guarantee": guarantee,
                "ledgers": {k: ledger.state_dict() for k, ledger in ledgers.items()},
            },
            "bytes": {
                "up": bytes_up, "down": bytes_down, "adapter": len(global_model.adapter), "full_model": full_bytes,
                "full_model_up": full_bytes * client_rounds, "full_model_down": full_bytes * client_rounds,
            },
            "history": history,
            "train_seconds": time.monotonic() - start,
            "config": cfg.model_dump(mode="json"),
        }
        atomic_write(out / "training.json", json.dumps(summary, indent=2).encode())
        run.log_artifact(adapter_path, "adapter")
        run.log_artifact(out / "training.json")
        run.set_tags({"dplora.guarantee": guarantee})
        if p.mode == "sample":
            run.log_metrics({"epsilon_final": epsilon}, step=f.rounds)
        run.finish()  # last: a failure above marks the run FAILED, never a finished run
    except BaseException:
        run.finish("FAILED")
        raise
    return summary


def _weighted_train_loss(updates: list[ClientUpdate]) -> float | None:
    """Example-weighted mean of the clients' training losses; None under DP, where clients do not send them."""
    if any(u.train_loss is None for u in updates):
        return None
    return float(np.average([u.train_loss for u in updates], weights=[u.num_examples for u in updates]))
