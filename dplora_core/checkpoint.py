"""Round checkpoints: the global adapter (safetensors) and the run state (standard JSON: a non-finite number
is null), both written atomically.

`state.json` is written last and names its adapter file, so a crash at any point leaves the
previous checkpoint whole. The state holds the accountant ledgers, the noise plan and the
config, so a resumed run continues the same privacy accounting (Opacus keeps the accountant's
`state_dict` in checkpoints for the same reason).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dplora_core.io import atomic_write, json_bytes

STATE = "state.json"
# Fields a resumed run may change: more rounds (the budget guard still applies), where it is tracked and
# where its tasks run.
RESUMABLE_CHANGES = ("federation.rounds",)
RESUMABLE_SECTIONS = ("tracking.", "runner.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the file or the config fields."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    adapter: bytes  # safetensors
    state: dict[str, Any]
    server_optimizer: bytes | None = None  # safetensors: the server optimizer's state (adam), if it has one
    average: bytes | None = None  # safetensors: the moving average of the global adapters (ema_decay > 0), if kept


# The optional safetensors a checkpoint may hold next to its adapter: the state.json key and the file's stem.
EXTRA_FILES = {"server_optimizer": "server-optimizer", "average": "average"}


def round_file(directory: Path, stem: str, round_num: int) -> Path:
    """Where round `round_num`'s checkpoint keeps one of its safetensors files, e.g. stem "adapter"."""
    return directory / f"{stem}-round-{round_num:04d}.safetensors"


def adapter_file(directory: Path, round_num: int) -> Path:
    """Where round `round_num`'s checkpoint keeps its global adapter."""
    return round_file(directory, "adapter", round_num)


def average_file(directory: Path, round_num: int) -> Path:
    """Where round `round_num`'s checkpoint keeps the moving average of the global adapters (ema_decay > 0)."""
    return round_file(directory, EXTRA_FILES["average"], round_num)


def save_checkpoint(
    directory: Path, *, round_num: int, adapter: bytes, state: dict[str, Any], server_optimizer: bytes | None = None,
    average: bytes | None = None,
) -> None:
    """Write round `round_num`'s checkpoint (and the server optimizer's state and the moving average, if any),
    then drop the previous round's files."""
    directory.mkdir(parents=True, exist_ok=True)
    name = adapter_file(directory, round_num).name
    atomic_write(directory / name, adapter)
    files = {"adapter": name}
    for key, payload in (("server_optimizer", server_optimizer), ("average", average)):
        if payload is not None:
            files[key] = round_file(directory, EXTRA_FILES[key], round_num).name
            atomic_write(directory / files[key], payload)
    atomic_write(directory / STATE, json_bytes({"round": round_num, **files, **state}))
    for stem in ("adapter", *EXTRA_FILES.values()):
        for old in directory.glob(f"{stem}-round-*.safetensors"):
            if old.name not in files.values():
                old.unlink()


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The latest checkpoint in `directory`, or None if there is none."""
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        adapter = (directory / state["adapter"]).read_bytes()
        extras = {key: (directory / state.pop(key)).read_bytes() for key in EXTRA_FILES if key in state}
        round_num = int(state.pop("round"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    return Checkpoint(round=round_num, adapter=adapter, state=state, **extras)


def unfinished(directory: Path) -> str | None:
    """What a fresh run writing over `directory`'s checkpoint would throw away ("round 2 of 3 done", an
    interrupted round, an unreadable checkpoint), or None if there is none or its run finished."""
    try:
        checkpoint = load_checkpoint(directory)
    except CheckpointError as err:
        return str(err)
    if checkpoint is None:
        return None
    planned = (checkpoint.state.get("config") or {}).get("federation.rounds")
    if checkpoint.state.get("pending"):
        return f"round {checkpoint.round + 1} interrupted"
    if not isinstance(planned, int) or checkpoint.round < planned:
        return f"round {checkpoint.round} of {planned} done"
    return None


def set_aside(path: Path) -> Path:
    """Rename `path` to `<path>.superseded-<UTC time>`, so that nothing written is lost; the new path."""
    target = path.with_name(f"{path.name}.superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    path.rename(target)
    return target


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], added_defaults: dict[str, Any] | None = None
) -> list[str]:
    """Dotted config fields that differ between a checkpoint and the run resuming it, except resumable ones.

    added_defaults: the default of each field the checkpoint predates; such a field left at its
    default (the behaviour before it existed) is no change.
    """
    before = {**(added_defaults or {}), **saved}
    keys = sorted(set(before) | set(current))
    return [
        k for k in keys
        if before.get(k) != current.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_SECTIONS)
    ]
