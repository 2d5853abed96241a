"""Cross-silo mode: the exchange folder where adapters cross between the coordinator and the silos.

Per round, the coordinator writes the global adapter once; each silo reads it and writes back its update:
the adapter (safetensors, never pickle) and a small JSON record of what it is (client, round, record
count, DP run, the dtype its frozen weights ran in, the silo's flow run id, the adapter's sha256). These
files are all that crosses besides the deployment parameters (the experiment config, the round, the noise
multiplier); no record ever does.

A round's folder is named by the round and a hash of the config and the global adapter, so a retried or
resumed round finds the update its silo already released for exactly that input, and the silo sends that
one again instead of a second, fresh release (`existing_update`).

    <exchange_dir>/<experiment>/round-0003-<16 hex>/global.safetensors
    <exchange_dir>/<experiment>/round-0003-<16 hex>/client-1.safetensors, client-1.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from dplora_core.adapters import AdapterError
from dplora_core.config import ExperimentConfig
from dplora_core.io import atomic_write, json_bytes
from dplora_core.messages import ClientUpdate, GlobalModel
from dplora_core.privacy.accountant import DpSgdRun


def round_dir(cfg: ExperimentConfig, global_model: GlobalModel) -> Path:
    """The folder of the round that starts from `global_model` under this config."""
    assert cfg.federation.exchange_dir is not None
    key = hashlib.sha256(cfg.model_dump_json().encode() + global_model.adapter).hexdigest()[:16]
    return Path(cfg.federation.exchange_dir) / cfg.name / f"round-{global_model.round + 1:04d}-{key}"


def write_global(directory: Path, model: GlobalModel) -> Path:
    """The adapter every silo of the round starts from (the model after round `model.round`)."""
    path = directory / "global.safetensors"
    atomic_write(path, model.adapter)
    return path


def read_global(directory: Path, round_num: int) -> GlobalModel:
    path = directory / "global.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the coordinator's global adapter for round {round_num} is not there")
    return GlobalModel(round=round_num - 1, adapter=path.read_bytes())


def write_update(directory: Path, update: ClientUpdate, *, sender: str) -> Path:
    """The silo's update: adapter first, then the record that names it (a reader never sees a half)."""
    adapter, record_path = update_paths(directory, update.client_id)
    atomic_write(adapter, update.adapter)
    record = {
        "client_id": update.client_id, "round": update.round, "num_examples": update.num_examples,
        "train_loss": update.train_loss, "dp_run": asdict(update.dp_run) if update.dp_run else None,
        "base_dtype": update.base_dtype, "sender": sender, "sha256": hashlib.sha256(update.adapter).hexdigest(),
    }
    atomic_write(record_path, json_bytes(record, indent=None))  # a non-finite loss travels as null: no loss
    return adapter


MAX_RECORD_BYTES = 1 << 16  # a client's JSON record is a few hundred bytes


def max_update_bytes(global_model: GlobalModel) -> int:
    """The largest adapter file accepted back for a round that starts from `global_model`.

    An update holds the global adapter's tensors in at most float32 (plus, for int8, one scale per row), so
    twice the global adapter plus room for a longer header is generous; a silo cannot make the coordinator
    read and parse gigabytes.
    """
    return 2 * len(global_model.adapter) + (1 << 16)


def existing_update(directory: Path, client_id: int, round_num: int, *, max_bytes: int) -> ClientUpdate | None:
    """The update a silo already released in this folder (a retry or a resumed round), or None.

    Whichever silo run wrote it: the silo re-sends its own earlier release. A record that does not read, or
    does not match its adapter, is an AdapterError naming it, as in `read_update`.
    """
    if not update_paths(directory, client_id)[1].is_file():
        return None
    return _load_update(directory, client_id, round_num, max_bytes=max_bytes)[1]


def read_update(directory: Path, client_id: int, round_num: int, *, sender: str, max_bytes: int) -> ClientUpdate:
    """Client `client_id`'s update of `round_num`, written by the silo run `sender`, or AdapterError naming it.

    Files larger than `max_bytes` (the adapter; see `max_update_bytes`) or MAX_RECORD_BYTES (its record)
    are refused before they are read.
    """
    written_by, update = _load_update(directory, client_id, round_num, max_bytes=max_bytes)
    if written_by != sender:
        raise AdapterError(f"{_who(directory, client_id, round_num)}: written by silo run {written_by}, "
                           f"not by {sender} (stale?)")
    return update


def update_paths(directory: Path, client_id: int) -> tuple[Path, Path]:
    """(adapter, record) files of client `client_id`'s update in a round folder."""
    return directory / f"client-{client_id}.safetensors", directory / f"client-{client_id}.json"


def _who(directory: Path, client_id: int, round_num: int) -> str:
    return f"client {client_id} update, round {round_num} ({update_paths(directory, client_id)[1]})"


def _load_update(directory: Path, client_id: int, round_num: int, *, max_bytes: int) -> tuple[object, ClientUpdate]:
    """(the silo run its record names, the update), each file read once and checked against the other."""
    adapter_path, record_path = update_paths(directory, client_id)
    who = _who(directory, client_id, round_num)
    try:
        record = json.loads(_read_capped(record_path, MAX_RECORD_BYTES))
        adapter = _read_capped(adapter_path, max_bytes)
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{who}: unreadable: {err}") from err
    if not isinstance(record, dict):
        raise AdapterError(f"{who}: the record is not a JSON object")
    if (record.get("client_id"), record.get("round")) != (client_id, round_num):
        raise AdapterError(f"{who}: says client {record.get('client_id')}, round {record.get('round')}")
    if hashlib.sha256(adapter).hexdigest() != record.get("sha256"):
        raise AdapterError(f"{who}: the adapter's sha256 differs from the one its record names")
    missing = sorted({"num_examples", "train_loss", "dp_run", "base_dtype"} - record.keys())
    if missing:
        raise AdapterError(f"{who}: the record lacks {', '.join(missing)}")
    dp_run = record["dp_run"]
    return record.get("sender"), ClientUpdate(
        client_id=client_id, round=round_num, num_examples=int(record["num_examples"]), adapter=adapter,
        train_loss=record["train_loss"], dp_run=DpSgdRun(**dp_run) if dp_run else None,
        base_dtype=str(record["base_dtype"]),
    )


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, or OSError if it is larger than max_bytes (checked before reading)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise OSError(f"{size:,} bytes, more than the {max_bytes:,} accepted")
    return path.read_bytes()
