"""JSON out: standard JSON, which has no Infinity or NaN."""

from __future__ import annotations

import json
import math

import pytest

from dplora_core.io import json_bytes


def strict_loads(payload: bytes) -> object:
    """json.loads refusing the non-standard constants Python writes by default."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(payload, parse_constant=refuse)


def test_non_finite_floats_become_null_at_any_depth() -> None:
    payload = json_bytes({"epsilon": math.inf, "history": [{"epsilon": -math.inf}, (1.5, math.nan)], "n": 3})
    assert strict_loads(payload) == {"epsilon": None, "history": [{"epsilon": None}, [1.5, None]], "n": 3}


@pytest.mark.parametrize("value", [0.0, 1e-300, 1e300, -2.5])
def test_finite_floats_round_trip_exactly(value: float) -> None:
    assert strict_loads(json_bytes({"x": value})) == {"x": value}
