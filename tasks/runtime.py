"""Per-process resources shared by tasks: one base model per worker process, clients swap adapters."""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from dplora_core.batching import Encoded, encode, label_token_ids
from dplora_core.config import DataConfig, ExperimentConfig, LoraConfig, ModelConfig
from dplora_core.data import DataError, Example, TaskSpec, read_jsonl, stratified_sample, task_spec
from dplora_core.model import attach_lora, check_trainable, dtype_name, load_base_model
from dplora_core.prefix import FrozenPrefix, frozen_layers, prefix_states


@dataclass(frozen=True)
class Workspace:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    lock: threading.Lock  # one client at a time trains on the shared model

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def base_dtype(self) -> str:
        """The frozen weights' dtype in this process (model.dtype: auto resolves per machine), e.g. "float32"."""
        return dtype_name(self.model.get_input_embeddings().weight.dtype)


@functools.cache
def workspace(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> Workspace:
    base, tokenizer = load_base_model(model_cfg)
    return Workspace(attach_lora(base, lora_cfg), tokenizer, threading.Lock())


def split_path(data: DataConfig, split: str) -> Path:
    name = f"custom-{Path(data.custom.path).stem}" if data.custom is not None else data.dataset
    return Path(data.prepared_dir) / name / f"{split}.jsonl"


def partition_path(cfg: ExperimentConfig) -> Path:
    return cfg.run_dir / "partition.json"


@functools.cache
def split_examples(data: DataConfig, split: str) -> tuple[Example, ...]:
    examples = read_jsonl(split_path(data, split), labels=task_spec(data).labels)
    limit = {"train": data.max_train_examples, "validation": data.max_validation_examples,
             "test": data.max_test_examples}[split]
    if limit is None or data.cap_sampling == "first":
        return tuple(examples[:limit])
    return tuple(stratified_sample(examples, limit, seed=data.split_seed))


# The base model's label scores of an evaluation split, keyed by (model, lora, data, evaluation, split): the
# same for every run of a setting (seeds, privacy, federation), so a study scores zero-shot once per process.
ZERO_SHOT_SCORES: dict[tuple[object, ...], torch.Tensor] = {}


def forget_splits() -> None:
    """Drop every cached view of the prepared splits (after they are rewritten)."""
    for cached in (split_examples, split_encoded, eval_prompts):
        cached.cache_clear()
    PREFIX_STATES.clear()
    ZERO_SHOT_SCORES.clear()


def read_partition(cfg: ExperimentConfig) -> list[list[int]]:
    path = partition_path(cfg)
    if not path.is_file():
        raise DataError(f"{path}: client partition not found (run `dplora partition` first)")
    shards: list[list[int]] = json.loads(path.read_text())["clients"]
    if len(shards) != cfg.federation.num_clients:
        raise DataError(f"{path}: has {len(shards)} clients, config says {cfg.federation.num_clients}")
    n = len(split_examples(cfg.data, "train"))
    for k, shard in enumerate(shards):
        if not shard:
            raise DataError(f"{path}: client {k} has no training examples after partitioning")
        if any(not 0 <= i < n for i in shard):
            raise DataError(f"{path}: client {k} indexes records outside the {n} training examples (stale partition?)")
    return shards


def client_sizes(cfg: ExperimentConfig) -> list[int]:
    """Each client's record count: as the silos declare it (cross-silo), or of this machine's partition."""
    if cfg.federation.silos is not None:
        return [silo.num_examples for silo in cfg.federation.silos]
    return [len(shard) for shard in read_partition(cfg)]


@functools.cache
def silo_data(cfg: ExperimentConfig, client_id: int, data_path: str) -> tuple[Encoded, ...]:
    """Cross-silo, inside silo `client_id`: its own training records (JSONL of text and label), tokenised."""
    assert cfg.federation.silos is not None
    silo = cfg.federation.silos[client_id]
    examples = read_jsonl(Path(data_path), labels=task_of(cfg).labels)
    if len(examples) != silo.num_examples:
        raise DataError(
            f"{data_path}: silo {silo.name} (client {client_id}) holds {len(examples)} records, but "
            f"federation.silos declares num_examples {silo.num_examples}: the accountant's sampling rate would be wrong"
        )
    ws = workspace(cfg.model, cfg.lora)
    return tuple(encode(e, task_of(cfg), ws.tokenizer, max_len=cfg.model.max_seq_len) for e in examples)


@functools.cache
def split_encoded(model_cfg: ModelConfig, lora_cfg: LoraConfig, data: DataConfig, split: str) -> tuple[Encoded, ...]:
    """A split tokenised once for training, evaluation and the frozen-prefix cache alike: the training
    split with its answers (what clients learn), the others as prompts only (what evaluation scores)."""
    tokenizer, task = workspace(model_cfg, lora_cfg).tokenizer, task_spec(data)
    return tuple(
        encode(e, task, tokenizer, max_len=model_cfg.max_seq_len, with_answer=split == "train")
        for e in split_examples(data, split)
    )


def check_shared_model(cfg: ExperimentConfig) -> None:
    """ValueError unless this process's shared model trains exactly the weights `cfg.lora` says (see
    `check_trainable`; each client checks its own process's model again before it trains)."""
    ws = workspace(cfg.model, cfg.lora)
    with ws.lock:
        check_trainable(ws.model, cfg.lora)


def client_data(cfg: ExperimentConfig, client_id: int) -> tuple[Encoded, ...]:
    """Client `client_id`'s training records, tokenised (prompt + answer)."""
    train = split_encoded(cfg.model, cfg.lora, cfg.data, "train")
    return tuple(train[i] for i in read_partition(cfg)[client_id])


# One thread computes a split's frozen-prefix states while the others wait for them.
_PREFIX_LOCK = threading.Lock()


def client_prefix(cfg: ExperimentConfig, client_id: int) -> FrozenPrefix | None:
    """Client `client_id`'s frozen-prefix states, aligned with `client_data` (None if model.cache_frozen_prefix
    is off or LoRA starts at layer 0)."""
    with _PREFIX_LOCK:
        prefix = split_prefix(cfg.model, cfg.lora, cfg.data, "train")
    return prefix.take(read_partition(cfg)[client_id]) if prefix is not None else None


def eval_prefix(cfg: ExperimentConfig, split: str) -> FrozenPrefix | None:
    """The frozen-prefix states of a split's prompts, aligned with `eval_prompts`."""
    with _PREFIX_LOCK:
        return split_prefix(cfg.model, cfg.lora, cfg.data, split)


# Frozen-prefix states by (model, data, split, frozen layers): train, validation and test at two depths.
PREFIX_STATES: OrderedDict[tuple[object, ...], FrozenPrefix | None] = OrderedDict()
PREFIX_SETTINGS_KEPT = 6


def split_prefix(model_cfg: ModelConfig, lora_cfg: LoraConfig, data: DataConfig, split: str) -> FrozenPrefix | None:
    """States entering the first LoRA layer for every record of a split (with answers for train, prompts only
    otherwise). They depend on neither adapter nor client, nor on the LoRA rank or modules: only on how many
    leading layers hold no adapter. So one pass serves all rounds, clients and study cells of that depth."""
    if not model_cfg.cache_frozen_prefix:
        return None
    key = (model_cfg, data, split, frozen_layers(workspace(model_cfg, lora_cfg).model))
    if key not in PREFIX_STATES:
        PREFIX_STATES[key] = frozen_prefix(model_cfg, lora_cfg, split_encoded(model_cfg, lora_cfg, data, split))
        if len(PREFIX_STATES) > PREFIX_SETTINGS_KEPT:
            PREFIX_STATES.popitem(last=False)  # the oldest
    PREFIX_STATES.move_to_end(key)
    return PREFIX_STATES[key]


@functools.cache
def silo_prefix(cfg: ExperimentConfig, client_id: int, data_path: str) -> FrozenPrefix | None:
    """Cross-silo, inside silo `client_id`: the frozen-prefix states of its records, aligned with `silo_data`."""
    if not cfg.model.cache_frozen_prefix:
        return None
    return frozen_prefix(cfg.model, cfg.lora, silo_data(cfg, client_id, data_path))


PREFIX_BATCH_SIZE = 32


def frozen_prefix(model_cfg: ModelConfig, lora_cfg: LoraConfig, items: Sequence[Encoded]) -> FrozenPrefix | None:
    """`items`' states entering the first LoRA layer, or None if LoRA starts at layer 0."""
    ws = workspace(model_cfg, lora_cfg)
    layers = frozen_layers(ws.model)
    if layers == 0:
        return None
    with ws.lock:
        return prefix_states(ws.model, items, layers=layers, pad_id=ws.pad_id, batch_size=PREFIX_BATCH_SIZE)


def task_of(cfg: ExperimentConfig) -> TaskSpec:
    """The configured dataset's labels and prompt."""
    return task_spec(cfg.data)


@functools.cache
def label_ids_of(cfg: ExperimentConfig) -> tuple[int, ...]:
    """Token id of each label word's first token, in TaskSpec.labels order."""
    return tuple(label_token_ids(task_of(cfg), workspace(cfg.model, cfg.lora).tokenizer))


@functools.cache
def eval_prompts(cfg: ExperimentConfig, split: str) -> tuple[tuple[Encoded, ...], tuple[int, ...], tuple[int, ...]]:
    """(prompts without answers, gold label indices, label token ids) for an evaluation split."""
    if split == "train":
        raise ValueError("eval_prompts: the training split is encoded with its answers; evaluate validation or test")
    task = task_of(cfg)
    gold = tuple(task.labels.index(e.label) for e in split_examples(cfg.data, split))
    return split_encoded(cfg.model, cfg.lora, cfg.data, split), gold, label_ids_of(cfg)
