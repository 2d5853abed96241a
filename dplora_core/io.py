"""Atomic file writes (a sibling temporary file, then a rename over the target), and JSON reads that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, payload: bytes) -> None:
    """Replace `path` with `payload` so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def read_json(path: Path, payload: bytes | None = None) -> Any:
    """The JSON document in `path` (or in `payload`, its bytes already read); a file that does not parse
    raises ValueError naming it (and where)."""
    try:
        return json.loads(path.read_bytes() if payload is None else payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
