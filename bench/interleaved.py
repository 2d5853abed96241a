"""Timing shared by the benches: medians over interleaved repeats, so machine noise hits every variant alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved_medians(variants: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall seconds of each variant over `repeats` rounds that run every variant once, after one warm-up
    call of each."""
    for run in variants:
        run()
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for run, t in zip(variants, times, strict=True):
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
