"""Audit tasks: the canary vocabulary, client 0's noise, and one training-and-scoring run."""

from __future__ import annotations

import re

from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import PreTrainedTokenizerBase

from dplora_core.adapters import load_adapter_state
from dplora_core.batching import Encoded
from dplora_core.config import ExperimentConfig
from dplora_core.data import Example
from dplora_core.model import check_trainable, init_lora_state
from dplora_core.privacy.accountant import PrivacyLedger
from dplora_core.privacy.canaries import canary_scores
from dplora_core.privacy.mechanisms import noise_generator
from dplora_core.train import DpSgdParams
from tasks.data import partition_clients, prepare_data
from tasks.runtime import label_ids_of, partition_path, split_path, workspace
from tasks.training import check_delta, record_noise_multiplier, train_round

AUDITED_CLIENT = 0
AUDIT_KEY = 2**32 - 2  # generator key of the audit's randomness, apart from any round, client or server key
CANARY_WORDS = 8  # words per canary text


def canary_words(tokenizer: PreTrainedTokenizerBase, examples: tuple[Example, ...]) -> list[str]:
    """Distinct lower-case words of the training texts that the tokenizer encodes without its unknown token."""
    words = sorted({w for e in examples for w in re.findall(r"[a-z]+", e.text.lower())})
    unk = tokenizer.unk_token_id
    return [w for w in words if unk is None or unk not in tokenizer(f" {w}", add_special_tokens=False).input_ids]


def ensure_partition(cfg: ExperimentConfig) -> None:
    """Prepare the splits and partition the clients if that has not been done yet."""
    if not split_path(cfg.data, "train").is_file():
        prepare_data(cfg)
    if not partition_path(cfg).is_file():
        partition_clients(cfg)


def audit_noise_multiplier(cfg: ExperimentConfig, n: int) -> float:
    """sigma of client 0's DP-SGD with n records (canaries included), as `plan_noise` would set it."""
    check_delta(cfg.privacy.delta, n, f"client {AUDITED_CLIENT} with canaries")
    return record_noise_multiplier(cfg, n)


@task(name="audit-train", task_run_name="audit-train-{label}", cache_policy=NO_CACHE)
def train_and_score(
    cfg: ExperimentConfig, label: str, data: list[Encoded], canaries: list[Encoded], dp: DpSgdParams | None
) -> tuple[list[float], PrivacyLedger | None]:
    """Train client 0's adapter as in the federation, alone; score every canary; the run's ledger.

    Each round is `local_steps` steps with a fresh optimizer at that round's learning rate (warm-up and
    `round_decay` included), continuing from the previous round's adapter (no other client to average with).
    """
    ws = workspace(cfg.model, cfg.lora)
    f, p = cfg.federation, cfg.privacy
    device = next(ws.model.parameters()).device
    generator = noise_generator(p.noise_seed, AUDIT_KEY, 0 if dp is not None else 1, device=device)
    label_ids = label_ids_of(cfg)
    ledger = PrivacyLedger(kind=p.accountant) if dp is not None else None
    with ws.lock:
        check_trainable(ws.model, cfg.lora)
        initial = init_lora_state(ws.model, seed=f.seed, init_a=cfg.lora.init_a)
        load_adapter_state(ws.model, initial, source="initial adapter")
        for round_num in range(1, f.rounds + 1):  # the client's schedule in the federation: rounds of local steps
            result = train_round(cfg, ws, data, round_num, generator=generator, dp=dp)
            if ledger is not None and result.dp_run is not None:
                ledger.record(result.dp_run)
        scores = canary_scores(ws.model, canaries, label_ids, pad_id=ws.pad_id, batch_size=cfg.evaluation.batch_size)
    return scores.tolist(), ledger
