"""Federated round tasks: plan the noise, train one client, aggregate, evaluate."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.states import State

from dplora_core.adapters import (
    AdapterError,
    AdapterState,
    adapter_state,
    check_adapter,
    from_bytes,
    load_adapter_state,
    to_bytes,
    upload_state,
)
from dplora_core.batching import Encoded, encode
from dplora_core.compression import decode_update, encode_update
from dplora_core.config import ExperimentConfig, check_delta
from dplora_core.data import Example
from dplora_core.evaluate import accuracy, confusion_matrix, label_scores, label_word_loss, macro_f1
from dplora_core.messages import ClientUpdate, GlobalModel
from dplora_core.model import adapter_disabled, check_trainable, init_lora_state
from dplora_core.prefix import FrozenPrefix
from dplora_core.privacy.accountant import DpSgdRun, calibrate_noise_multiplier, paper_noise_multiplier
from dplora_core.privacy.client_level import update_noise_multiplier
from dplora_core.privacy.mechanisms import add_gaussian_noise, noise_generator, poisson_sample
from dplora_core.strategy import (
    AdamState,
    AdaptiveClipping,
    DpFedAvgServerSide,
    FedAvg,
    ServerAdam,
    ServerStep,
    Strategy,
    moving_average,
)
from dplora_core.train import (
    DeadlinePassed,
    DpSgdParams,
    LocalResult,
    PaperDpParams,
    round_learning_rate,
    sample_rate,
    train_local,
    warmup_factor,
)
from tasks.runtime import (
    ZERO_SHOT_SCORES,
    Workspace,
    client_data,
    client_prefix,
    client_sizes,
    eval_prefix,
    eval_prompts,
    label_ids_of,
    silo_data,
    silo_prefix,
    task_of,
    workspace,
)

# Generator keys of the server's randomness (client sampling, DP-FedAvg noise), apart from any client id.
SERVER_KEY = 2**32 - 1


@dataclass(frozen=True)
class NoisePlan:
    """The noise multipliers of a run, fixed before round 1 and kept in every checkpoint."""

    # the multiplier of each client's own noise: sigma (modes sample, paper); its share (mode distributed)
    clients: dict[int, float] = field(default_factory=dict)
    server: float | None = None  # z of one DP-FedAvg round, adaptive count included (mode client)
    aggregate: float | None = None  # mode distributed: sigma of the sum of a quorum's uploads but one


def client_sample_rate(cfg: ExperimentConfig) -> float:
    """Poisson rate at which the server samples clients in mode `client`."""
    return cfg.federation.clients_per_round / cfg.federation.num_clients


@task(name="plan-privacy", cache_policy=NO_CACHE)
def plan_noise(cfg: ExperimentConfig) -> NoisePlan:
    """Noise multipliers calibrated so that the planned rounds spend at most the target epsilon."""
    p, f = cfg.privacy, cfg.federation
    if p.mode == "none":
        return NoisePlan()
    if p.mode == "client":
        check_delta(p.delta, f.num_clients, "the client population")
        if p.noise_multiplier is not None:
            z = p.noise_multiplier
        else:
            assert p.target_epsilon is not None
            z = calibrate_noise_multiplier(
                target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=client_sample_rate(cfg), steps=1,
                rounds=f.rounds, kind=p.accountant,
            )
        if p.adaptive_clipping:
            update_noise_multiplier(z, count_stddev(cfg))  # refuses a count noise the budget cannot pay for
        return NoisePlan(server=z)
    sizes = client_sizes(cfg)
    check_delta(p.delta, sum(sizes), f"the {len(sizes)} clients' records together")  # the adapter reads them all
    if p.mode == "distributed":
        return distributed_noise_plan(cfg, sizes)
    if p.noise_multiplier is not None:
        return NoisePlan(clients={k: p.noise_multiplier for k in range(len(sizes))})
    assert p.target_epsilon is not None
    if p.mode == "paper":
        sigma = paper_noise_multiplier(target_epsilon=p.target_epsilon, delta=p.delta)
        return NoisePlan(clients={k: sigma for k in range(len(sizes))})
    return NoisePlan(clients={k: record_noise_multiplier(cfg, n) for k, n in enumerate(sizes)})


def quorum(cfg: ExperimentConfig) -> int:
    """The fewest clients whose updates make a round: federation.min_clients, else every sampled client."""
    return cfg.federation.min_clients or cfg.federation.clients_per_round


def distributed_noise_plan(cfg: ExperimentConfig, sizes: Sequence[int]) -> NoisePlan:
    """Mode distributed: sigma (privacy.noise_multiplier, or calibrated for the client that needs the most: one
    step a round), and each client's share sigma / sqrt(quorum - 1). Any quorum's shares but one add up to at
    least sigma: the sum carries sigma even for a client that knows its own share and takes it out."""
    f = cfg.federation
    for k, n in enumerate(sizes):
        if n < f.batch_size:  # q = 1 would shrink this client's expected batch and weigh its records more
            raise ValueError(
                f"client {k} has {n} training records, fewer than federation.batch_size ({f.batch_size}): "
                "privacy.mode distributed needs every client's expected batch to be batch_size"
            )
    sigma = max(record_noise_multiplier(cfg, n) for n in sizes)
    share = sigma / math.sqrt(quorum(cfg) - 1)
    return NoisePlan(clients={k: share for k in range(len(sizes))}, aggregate=sigma)


def record_noise_multiplier(cfg: ExperimentConfig, n: int) -> float:
    """Mode sample: sigma of DP-SGD for a client with n records, privacy.noise_multiplier or calibrated so that
    the planned rounds spend at most privacy.target_epsilon."""
    p, f = cfg.privacy, cfg.federation
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    assert p.target_epsilon is not None
    return calibrate_noise_multiplier(
        target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=sample_rate(f.batch_size, n),
        steps=f.local_steps, rounds=f.rounds, kind=p.accountant,
    )


@task(name="init-adapter", cache_policy=NO_CACHE)
def init_adapter(cfg: ExperimentConfig) -> GlobalModel:
    """The round-0 global adapter: A seeded (or from the frozen weights, lora.init_a), zero B."""
    ws = workspace(cfg.model, cfg.lora)
    label_ids_of(cfg)  # label words that share a first token fail here, before any client trains
    initial = init_lora_state(ws.model, seed=cfg.federation.seed, init_a=cfg.lora.init_a)
    return GlobalModel(round=0, adapter=to_bytes(initial))


def retry_unless_timed_out(task: object, task_run: object, state: State[object]) -> bool:
    """A straggler that ran out of federation.client_timeout_seconds is not retried: it would straggle again."""
    return not isinstance(state.result(raise_on_failure=False), DeadlinePassed)


@task(
    name="train-client",
    task_run_name="train-client-{client_id}-round-{round_num}",
    retries=2,  # flows.federated.client_trainer turns them off where a retry would be a second release
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless_timed_out,
    cache_policy=NO_CACHE,
)
def train_client(
    cfg: ExperimentConfig, round_num: int, client_id: int, global_model: GlobalModel, noise_multiplier: float | None
) -> ClientUpdate:
    """Local training of the global adapter on one simulated client's records (its shard of the partition)."""
    return local_update(
        cfg, round_num, client_id, global_model, noise_multiplier, client_data(cfg, client_id),
        client_prefix(cfg, client_id),
    )


@task(name="train-silo", task_run_name="train-silo-{client_id}-round-{round_num}", cache_policy=NO_CACHE)
def train_silo(
    cfg: ExperimentConfig, round_num: int, client_id: int, global_model: GlobalModel, noise_multiplier: float | None,
    data_path: str,
) -> ClientUpdate:
    """Cross-silo: local training of the global adapter on this silo's own records, inside the silo."""
    return local_update(
        cfg, round_num, client_id, global_model, noise_multiplier, silo_data(cfg, client_id, data_path),
        silo_prefix(cfg, client_id, data_path),
    )


def local_update(
    cfg: ExperimentConfig, round_num: int, client_id: int, global_model: GlobalModel, noise_multiplier: float | None,
    data: Sequence[Encoded], prefix: FrozenPrefix | None = None,
) -> ClientUpdate:
    """Train the global adapter on `data` (prefix: their cached frozen-prefix states) with the mode's client-side
    mechanism; the update to send back."""
    ws = workspace(cfg.model, cfg.lora)
    f, p = cfg.federation, cfg.privacy
    device = next(ws.model.parameters()).device
    dp: DpSgdParams | PaperDpParams | None = None
    if p.mode in ("sample", "distributed"):  # distributed: noise_multiplier is this client's share
        assert noise_multiplier is not None
        dp = DpSgdParams(noise_multiplier, p.max_grad_norm, sample_rate(f.batch_size, len(data)))
    elif p.mode == "paper":
        assert noise_multiplier is not None
        dp = PaperDpParams(noise_multiplier, p.max_grad_norm)
    seed = f.seed if p.mode == "none" else p.noise_seed
    generator = noise_generator(seed, round_num, client_id, device=device)
    start = from_bytes(global_model.adapter, source="global adapter")
    limit = f.client_timeout_seconds
    with ws.lock:  # the time limit counts from here, so no client's time is spent waiting for another's training
        deadline = time.monotonic() + limit if limit is not None else None
        check_trainable(ws.model, cfg.lora)
        load_adapter_state(ws.model, start, source="global adapter")
        try:
            result = train_round(cfg, ws, data, round_num, generator=generator, dp=dp, prefix=prefix,
                                 deadline=deadline)
        except DeadlinePassed as err:  # nothing of this round leaves the client
            raise DeadlinePassed(f"client {client_id}, round {round_num}: federation.client_timeout_seconds "
                                 f"({limit:g} s) ran out: {err}") from err
        state = upload_state(adapter_state(ws.model), freeze_a=cfg.lora.freeze_a)
    if p.mode == "paper" and p.upload_noise_std > 0:  # Alg. 1 step 3: noise on the uploaded A and B
        state = {k: add_gaussian_noise(v, std=p.upload_noise_std, generator=generator) for k, v in state.items()}
    run_logger().info("client %d trained round %d in process %d on %s", client_id, round_num, os.getpid(), device)
    return ClientUpdate(
        client_id=client_id, round=round_num, num_examples=len(data),
        adapter=to_bytes(  # after any client-side noise: post-processing (mode client: the server clips it)
            encode_update(state, upload_state(start, freeze_a=cfg.lora.freeze_a), codec=f.upload_codec,
                          generator=generator)
        ),
        # With any DP the raw training loss would be an unaccounted release of the client's records: not sent.
        train_loss=result.mean_loss if p.mode == "none" else None, dp_run=result.dp_run, base_dtype=ws.base_dtype,
    )


def train_round(
    cfg: ExperimentConfig, ws: Workspace, data: Sequence[Encoded], round_num: int, *, generator: torch.Generator,
    dp: DpSgdParams | PaperDpParams | None, prefix: FrozenPrefix | None = None, deadline: float | None = None,
) -> LocalResult:
    """One round of a client's schedule on the adapter loaded in ws.model: local_steps steps with a fresh
    optimizer at the round's learning rate (warm-up and round_decay included), none begun after `deadline`
    (`time.monotonic()`). The caller holds ws.lock."""
    f = cfg.federation
    return train_local(
        ws.model, data, steps=f.local_steps, batch_size=f.batch_size, microbatch_size=f.microbatch_size,
        learning_rate=round_learning_rate(f.learning_rate, round_num, f.round_decay), pad_id=ws.pad_id,
        generator=generator, dp=dp, label_ids=label_ids_of(cfg) if f.loss == "label_words" else None,
        warmup_steps=f.warmup_steps, optimizer=f.optimizer, momentum=f.momentum, prefix=prefix, deadline=deadline,
    )


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The task run's logger (its lines reach the Prefect API), or a plain one outside a run (`.fn` calls)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dplora")


def _checked_states(
    cfg: ExperimentConfig, global_model: GlobalModel, updates: Sequence[ClientUpdate]
) -> tuple[AdapterState, AdapterState, list[AdapterState]]:
    """(current global adapter, its uploaded part, each client's adapter checked against it)."""
    current = from_bytes(global_model.adapter, source="global adapter")
    reference = upload_state(current, freeze_a=cfg.lora.freeze_a)
    return current, reference, [_checked_update(cfg, u, reference) for u in updates]


def _checked_update(cfg: ExperimentConfig, update: ClientUpdate, reference: AdapterState) -> AdapterState:
    """The client's adapter, or AdapterError naming the client: unreadable, not in the upload codec's form,
    wrong keys or shapes, non-finite."""
    source = f"client {update.client_id} update, round {update.round}"
    payload = from_bytes(update.adapter, source=source)
    state = decode_update(payload, reference, codec=cfg.federation.upload_codec, source=source)
    check_adapter(state, reference, source=source)
    return state


def screen_updates(
    cfg: ExperimentConfig, global_model: GlobalModel, updates: Sequence[ClientUpdate], planned: dict[int, DpSgdRun]
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """(updates that may be aggregated, {client: why rejected}): wrong keys or shapes, non-finite values,
    unreadable bytes, a record count other than the client's known size (it weighs the average and set q),
    or a DP run other than the planned one (modes sample, paper). Rejected updates never reach the global
    adapter."""
    reference = upload_state(from_bytes(global_model.adapter, source="global adapter"), freeze_a=cfg.lora.freeze_a)
    sizes = client_sizes(cfg)
    kept: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    for u in updates:
        try:
            _checked_update(cfg, u, reference)
            if u.num_examples != sizes[u.client_id]:
                raise AdapterError(
                    f"client {u.client_id} update, round {u.round}: reports {u.num_examples} training records, "
                    f"its known size is {sizes[u.client_id]}"
                )
            if cfg.privacy.mode in ("sample", "distributed", "paper") and u.dp_run != planned.get(u.client_id):
                raise AdapterError(
                    f"client {u.client_id} update, round {u.round}: reported DP run {u.dp_run}, "
                    f"planned {planned.get(u.client_id)}"
                )
        except AdapterError as err:
            rejected[u.client_id] = f"rejected: {err}"
        else:
            kept.append(u)
    return kept, rejected


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate(
    cfg: ExperimentConfig, global_model: GlobalModel, updates: Sequence[ClientUpdate], server_state: bytes | None = None
) -> tuple[GlobalModel, bytes | None]:
    """Check each client's adapter, combine them by FedAvg and take the server's step; (model, server state).

    The weights are `ExperimentConfig.fedavg_weights`. server_state: the server optimizer's state from the
    previous round (adam; None: fresh or none).
    """
    current, reference, states = _checked_states(cfg, global_model, updates)
    if cfg.privacy.mode == "distributed" and len(updates) < quorum(cfg):  # the noise shares assume a quorum
        raise ValueError(f"mode distributed: {len(updates)} uploads, fewer than the quorum of {quorum(cfg)}")
    equal = cfg.fedavg_weights() == "equal"
    weights = [1.0] * len(updates) if equal else [float(u.num_examples) for u in updates]
    strategy = with_server_step(cfg, FedAvg(), server_state, round_num=global_model.round + 1)
    merged = strategy.aggregate(reference, states, weights)
    return GlobalModel(round=global_model.round + 1, adapter=to_bytes(current | merged)), server_state_of(strategy)


def with_server_step(
    cfg: ExperimentConfig, inner: Strategy, server_state: bytes | None = None, *, round_num: int = 1
) -> Strategy:
    """`inner` behind the server's optimizer at round `round_num`'s rate (federation.server_learning_rate after
    the warm-up): sgd (left out at rate 1, so plain FedAvg stays exact), or adam resuming from `server_state`."""
    f = cfg.federation
    eta = f.server_learning_rate * warmup_factor(round_num - 1, f.server_warmup_rounds)
    if f.server_optimizer == "adam":
        state = AdamState(m={}, v={}) if server_state is None else AdamState.from_bytes(
            server_state, source="the checkpoint's server optimizer state"
        )
        return ServerAdam(inner, eta, state)
    return inner if eta == 1 else ServerStep(inner, eta)


def server_state_of(strategy: Strategy) -> bytes | None:
    """What the server optimizer carries to the next round (adam's moments), or None."""
    return strategy.state.to_bytes() if isinstance(strategy, ServerAdam) else None


@task(name="aggregate-dp", cache_policy=NO_CACHE)
def aggregate_private(
    cfg: ExperimentConfig, global_model: GlobalModel, updates: Sequence[ClientUpdate], noise_multiplier: float,
    clip_norm: float, server_state: bytes | None = None,
) -> tuple[GlobalModel, float, bytes | None]:
    """Client-level DP-FedAvg on the server: clip each update, add noise; (model, next clip norm, server state)."""
    p = cfg.privacy
    current, reference, states = _checked_states(cfg, global_model, updates)
    expected = float(cfg.federation.clients_per_round)
    adaptive = None
    if p.adaptive_clipping:
        adaptive = AdaptiveClipping(p.target_quantile, p.clip_learning_rate, count_stddev(cfg))
    dp_fedavg = DpFedAvgServerSide(
        FedAvg(),
        noise_multiplier=update_noise_multiplier(noise_multiplier, adaptive.count_stddev if adaptive else None),
        clip_norm=clip_norm,
        expected_clients=expected,
        generator=noise_generator(p.noise_seed, global_model.round + 1, SERVER_KEY, 1, device=torch.device("cpu")),
        adaptive=adaptive,
    )
    strategy = with_server_step(cfg, dp_fedavg, server_state, round_num=global_model.round + 1)
    merged = strategy.aggregate(reference, states, [1.0] * len(states))
    model = GlobalModel(round=global_model.round + 1, adapter=to_bytes(current | merged))
    return model, dp_fedavg.clip_norm, server_state_of(strategy)


@task(name="average-releases", cache_policy=NO_CACHE)
def average_releases(cfg: ExperimentConfig, average: bytes | None, global_model: GlobalModel) -> bytes | None:
    """The moving average of the global adapters after this round (federation.ema_decay > 0), else None."""
    decay = cfg.federation.ema_decay
    if decay == 0:
        return None
    freeze_a = cfg.lora.freeze_a  # a frozen A stays bit-exact: only the tensors that train are averaged
    previous = None if average is None else upload_state(
        from_bytes(average, source="the checkpoint's moving average"), freeze_a=freeze_a
    )
    current = from_bytes(global_model.adapter, source=f"round {global_model.round}'s global adapter")
    return to_bytes(current | moving_average(previous, upload_state(current, freeze_a=freeze_a), decay=decay))


def count_stddev(cfg: ExperimentConfig) -> float:
    """Noise std of the unclipped-client count in adaptive clipping (default: expected clients / 20)."""
    p = cfg.privacy
    return p.clipped_count_stddev if p.clipped_count_stddev is not None else cfg.federation.clients_per_round / 20


def sample_round_clients(cfg: ExperimentConfig, round_num: int) -> list[int]:
    """The clients of a round: Poisson-sampled at rate clients_per_round / num_clients in mode `client`
    (the sampling the client-level accountant assumes), otherwise a uniform subset of clients_per_round."""
    f, p = cfg.federation, cfg.privacy
    if p.mode == "client":
        gen = noise_generator(p.noise_seed, round_num, SERVER_KEY, 0, device=torch.device("cpu"))
        return poisson_sample(f.num_clients, client_sample_rate(cfg), generator=gen).tolist()
    rng = np.random.default_rng([f.seed, 1, round_num])
    return sorted(rng.choice(f.num_clients, size=f.clients_per_round, replace=False).tolist())


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: ExperimentConfig, adapter: bytes | None, split: str) -> dict[str, Any]:
    """Accuracy, macro-F1, label-word loss and the confusion matrix (rows: true label, columns: predicted, in
    the task's label order) on a split, with the given adapter (None: the base model, zero-shot)."""
    prompts, gold, label_ids = eval_prompts(cfg, split)
    if adapter is None:
        key = (cfg.model, cfg.lora, cfg.data, cfg.evaluation, split)
        if key not in ZERO_SHOT_SCORES:
            ZERO_SHOT_SCORES[key] = score_prompts(cfg, None, prompts, eval_prefix(cfg, split))
        scores = ZERO_SHOT_SCORES[key]
    else:
        scores = score_prompts(cfg, adapter, prompts, eval_prefix(cfg, split))
    confusion = confusion_matrix(gold, scores.argmax(dim=1).tolist(), len(label_ids))
    return {
        "accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion),
        "loss": label_word_loss(scores, gold), "n": len(gold), "confusion": confusion,
    }


def predict_labels(
    cfg: ExperimentConfig, adapter: bytes, texts: Sequence[str], questions: Sequence[str] = ()
) -> list[str]:
    """The label word the adapted model ranks first for each text (inference, as evaluation scores it)."""
    ws = workspace(cfg.model, cfg.lora)
    task = task_of(cfg)
    examples = [Example(id=str(i), text=t, label=task.labels[0], question=q)
                for i, (t, q) in enumerate(zip(texts, questions or [""] * len(texts), strict=True))]
    prompts = [encode(e, task, ws.tokenizer, max_len=cfg.model.max_seq_len, with_answer=False) for e in examples]
    return [task.labels[i] for i in score_prompts(cfg, adapter, prompts).argmax(dim=1).tolist()]


def score_prompts(
    cfg: ExperimentConfig, adapter: bytes | None, prompts: Sequence[Encoded], prefix: FrozenPrefix | None = None
) -> torch.Tensor:
    """Each label word's logit after each prompt, (n, L), with `adapter` (None: the base model, zero-shot);
    prefix: the prompts' cached frozen-prefix states."""
    ws = workspace(cfg.model, cfg.lora)
    label_ids, batch_size = label_ids_of(cfg), cfg.evaluation.batch_size
    with ws.lock:
        if adapter is None:
            with adapter_disabled(ws.model):
                return label_scores(
                    ws.model, prompts, label_ids, pad_id=ws.pad_id, batch_size=batch_size, prefix=prefix
                )
        load_adapter_state(ws.model, from_bytes(adapter, source="adapter"), source="adapter")
        return label_scores(ws.model, prompts, label_ids, pad_id=ws.pad_id, batch_size=batch_size, prefix=prefix)


def full_model_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the whole base model in float32: what one full-model exchange would cost."""
    from dplora_core.model import count_parameters

    ws = workspace(cfg.model, cfg.lora)
    _, total = count_parameters(ws.model)
    trainable = sum(t.numel() for t in adapter_state(ws.model).values())
    return (total - trainable) * 4
