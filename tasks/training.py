"""Federated round tasks: plan the noise, train one client, aggregate, evaluate."""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from dplora_core.adapters import (
    adapter_state,
    check_adapter,
    from_bytes,
    load_adapter_state,
    to_bytes,
    upload_state,
)
from dplora_core.config import ExperimentConfig
from dplora_core.evaluate import accuracy, label_scores, label_word_loss, macro_f1
from dplora_core.messages import ClientUpdate, GlobalModel
from dplora_core.model import init_lora_state
from dplora_core.privacy.accountant import calibrate_noise_multiplier
from dplora_core.privacy.mechanisms import noise_generator
from dplora_core.strategy import FedAvg, Strategy
from dplora_core.train import DpSgdParams, sample_rate, train_local
from tasks.runtime import client_data, eval_prompts, label_ids_of, read_partition, workspace

# A mechanism that publishes each record with probability delta passes delta < 1/n; ask for delta << 1/n.
MAX_DELTA_TIMES_N = 0.1


@task(name="plan-privacy", cache_policy=NO_CACHE)
def plan_noise(cfg: ExperimentConfig) -> dict[int, float]:
    """Noise multiplier per client: calibrated so a client in every round spends at most the target epsilon."""
    p, f = cfg.privacy, cfg.federation
    if p.mode == "none":
        return {}
    sizes = [len(s) for s in read_partition(cfg)]
    for k, n in enumerate(sizes):
        if p.delta * n > MAX_DELTA_TIMES_N:
            raise ValueError(
                f"privacy.delta ({p.delta}) is too large for client {k} ({n} records): "
                f"delta * n = {p.delta * n:.3g} must be <= {MAX_DELTA_TIMES_N} (delta << 1/n)"
            )
    if p.noise_multiplier is not None:
        return {k: p.noise_multiplier for k in range(len(sizes))}
    assert p.target_epsilon is not None
    return {
        k: calibrate_noise_multiplier(
            target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=sample_rate(f.batch_size, n),
            steps=f.rounds * f.local_steps, kind=p.accountant,
        )
        for k, n in enumerate(sizes)
    }


@task(name="init-adapter", cache_policy=NO_CACHE)
def init_adapter(cfg: ExperimentConfig) -> GlobalModel:
    """The round-0 global adapter: random A (seeded), zero B."""
    ws = workspace(cfg.model, cfg.lora)
    return GlobalModel(round=0, adapter=to_bytes(init_lora_state(ws.model, seed=cfg.federation.seed)))


@task(
    name="train-client",
    task_run_name="train-client-{client_id}-round-{round_num}",
    retries=2,
    retry_delay_seconds=[5, 30],
    cache_policy=NO_CACHE,
)
def train_client(
    cfg: ExperimentConfig, round_num: int, client_id: int, global_model: GlobalModel, noise_multiplier: float | None
) -> ClientUpdate:
    """Local training of the global adapter on one client's records (DP-SGD unless mode is 'none')."""
    ws = workspace(cfg.model, cfg.lora)
    data = client_data(cfg, client_id)
    f, p = cfg.federation, cfg.privacy
    device = next(ws.model.parameters()).device
    dp = None
    if p.mode == "sample":
        assert noise_multiplier is not None
        dp = DpSgdParams(noise_multiplier, p.max_grad_norm, sample_rate(f.batch_size, len(data)))
    seed = p.noise_seed if dp is not None else f.seed
    generator = noise_generator(seed, round_num, client_id, device=device)
    with ws.lock:
        load_adapter_state(ws.model, from_bytes(global_model.adapter, source="global adapter"), source="global adapter")
        result = train_local(
            ws.model, data, steps=f.local_steps, batch_size=f.batch_size, microbatch_size=f.microbatch_size,
            learning_rate=f.learning_rate, pad_id=ws.pad_id, generator=generator, dp=dp,
            label_ids=label_ids_of(cfg) if f.loss == "label_words" else None,
        )
        state = upload_state(adapter_state(ws.model), freeze_a=cfg.lora.freeze_a)
    return ClientUpdate(
        client_id=client_id, round=round_num, num_examples=len(data), adapter=to_bytes(state),
        # Under DP the raw training loss would be an unaccounted release of the client's records: not sent.
        train_loss=result.mean_loss if dp is None else None, dp_run=result.dp_run,
    )


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(
    cfg: ExperimentConfig, global_model: GlobalModel, updates: Sequence[ClientUpdate], strategy: Strategy | None = None
) -> GlobalModel:
    """Check each client's adapter, then combine them with the strategy (FedAvg by default)."""
    current = from_bytes(global_model.adapter, source="global adapter")
    reference = upload_state(current, freeze_a=cfg.lora.freeze_a)
    states = []
    for u in updates:
        state = from_bytes(u.adapter, source=f"client {u.client_id}")
        check_adapter(state, reference, source=f"client {u.client_id} update, round {u.round}")
        states.append(state)
    merged = (strategy or FedAvg()).aggregate(states, [u.num_examples for u in updates])
    return GlobalModel(round=global_model.round + 1, adapter=to_bytes(current | merged))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: ExperimentConfig, adapter: bytes | None, split: str) -> dict[str, float]:
    """Accuracy and macro-F1 on a split, with the given adapter (None: the base model, zero-shot)."""
    ws = workspace(cfg.model, cfg.lora)
    prompts, gold, label_ids = eval_prompts(cfg, split)
    batch_size = cfg.evaluation.batch_size
    with ws.lock:
        if adapter is None:
            with ws.model.disable_adapter():
                scores = label_scores(ws.model, prompts, label_ids, pad_id=ws.pad_id, batch_size=batch_size)
        else:
            load_adapter_state(ws.model, from_bytes(adapter, source="adapter"), source="adapter")
            scores = label_scores(ws.model, prompts, label_ids, pad_id=ws.pad_id, batch_size=batch_size)
    preds = scores.argmax(dim=1).tolist()
    return {
        "accuracy": accuracy(gold, preds), "macro_f1": macro_f1(gold, preds, len(label_ids)),
        "loss": label_word_loss(scores, gold), "n": len(gold),
    }


def full_model_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the whole base model in float32: what one full-model exchange would cost."""
    from dplora_core.model import count_parameters

    ws = workspace(cfg.model, cfg.lora)
    _, total = count_parameters(ws.model)
    trainable = sum(t.numel() for t in adapter_state(ws.model).values())
    return (total - trainable) * 4
