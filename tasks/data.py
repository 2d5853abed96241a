"""Data tasks: raw copies, prepared splits, client partitions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task

from dplora_core.config import ExperimentConfig
from dplora_core.data import (
    DataError,
    label_histogram,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    prepare_splits,
    task_spec,
    write_jsonl,
)
from dplora_core.io import atomic_write
from tasks.runtime import forget_splits, partition_path, read_partition, split_examples, split_path

SOURCES = Path(__file__).resolve().parent.parent / "data" / "sources.json"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def ingest_raw(source_dir: Path, raw_dir: Path) -> list[Path]:
    """Copy the reference datasets into `raw_dir`, checking each against data/sources.json."""
    expected: dict[str, str] = json.loads(SOURCES.read_text())["md5"]
    copied = []
    for rel, digest in expected.items():
        src, dst = source_dir / rel, raw_dir / rel
        if not src.is_file():
            raise DataError(f"{src}: source dataset file not found (set --source to the shared data folder)")
        if md5(src) != digest:
            raise DataError(f"{src}: md5 {md5(src)} differs from {digest} recorded in {SOURCES}")
        atomic_write(dst, src.read_bytes())  # a crash mid-copy leaves no half file that later stages would trust
        copied.append(dst)
    return copied


@task(name="prepare-data", retries=0)
def prepare_data(cfg: ExperimentConfig) -> dict[str, dict[str, int]]:
    """Write the train/validation/test JSONL splits; return each split's label histogram."""
    d = cfg.data
    splits = prepare_splits(
        d.dataset, Path(d.raw_dir), test_fraction=d.test_fraction, validation_fraction=d.validation_fraction,
        seed=d.split_seed, custom=d.custom,
    )
    labels = task_spec(d).labels
    rewritten = [write_jsonl(split_path(d, name), examples) for name, examples in splits.items()]
    if any(rewritten):  # unchanged splits keep their cached views (tokens, frozen-prefix states, zero-shot scores)
        forget_splits()
    return {name: label_histogram(ex, labels) for name, ex in splits.items()}


def client_shards(cfg: ExperimentConfig) -> list[list[int]]:
    """Each client's training-record indices: a pure function of the training split and the federation config."""
    f = cfg.federation
    train = split_examples(cfg.data, "train")
    if len(train) < f.num_clients:
        raise DataError(f"{split_path(cfg.data, 'train')}: {len(train)} examples for {f.num_clients} clients")
    if f.partition == "iid":
        return partition_iid(len(train), f.num_clients, seed=f.seed)
    if f.partition == "quantity":
        return partition_quantity(len(train), f.num_clients, alpha=f.dirichlet_alpha, seed=f.seed)
    return partition_dirichlet([e.label for e in train], f.num_clients, alpha=f.dirichlet_alpha, seed=f.seed)


def shard_histograms(cfg: ExperimentConfig, shards: list[list[int]]) -> list[dict[str, int]]:
    """Each client's label histogram."""
    train = split_examples(cfg.data, "train")
    return [label_histogram([train[i] for i in s], task_spec(cfg.data).labels) for s in shards]


@task(name="partition-clients", retries=0)
def partition_clients(cfg: ExperimentConfig) -> list[dict[str, int]]:
    """Split the training records over the clients; write the partition; return label histograms."""
    shards = client_shards(cfg)
    hist = shard_histograms(cfg, shards)
    atomic_write(partition_path(cfg), json.dumps({"clients": shards, "label_histograms": hist}).encode())
    return hist


def write_silo_data(cfg: ExperimentConfig, out_dir: Path) -> list[Path]:
    """Simulation aid for cross-silo mode: each client's shard of the partition as a silo's own file,
    out_dir/<client k>/train.jsonl. Real silos bring their own data in this JSONL format instead."""
    train = split_examples(cfg.data, "train")
    shards = read_partition(cfg)
    paths = []
    for k, shard in enumerate(shards):
        path = out_dir / f"client-{k}" / "train.jsonl"
        write_jsonl(path, [train[i] for i in shard])
        paths.append(path)
    return paths
