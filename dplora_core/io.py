"""Atomic file writes (a sibling temporary file, then a rename over the target), standard JSON out (no Infinity),
and JSON reads that name the file."""

from __future__ import annotations

import json
import math
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


def json_bytes(obj: Any, *, indent: int | None = 2) -> bytes:
    """`obj` as standard JSON (RFC 8259 has no Infinity or NaN): a non-finite float becomes null (not finite), as
    the epsilon of a run without DP does."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False).encode()


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def read_json(path: Path, payload: bytes | None = None) -> Any:
    """The JSON document in `path` (or in `payload`, its bytes already read); a file that does not parse
    raises ValueError naming it (and where)."""
    try:
        return json.loads(path.read_bytes() if payload is None else payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
