from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dplora_core.data import DataError, partition_dirichlet, partition_iid, partition_quantity


def assert_disjoint_and_complete(shards: list[list[int]], n: int) -> None:
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))


@given(n=st.integers(1, 500), k=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_iid_is_disjoint_complete_and_balanced(n: int, k: int, seed: int) -> None:
    shards = partition_iid(n, k, seed=seed)
    assert len(shards) == k
    assert_disjoint_and_complete(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=30)
@given(k=st.integers(2, 8), alpha=st.floats(0.3, 100), seed=st.integers(0, 2**31))
def test_dirichlet_is_disjoint_complete_and_nonempty(k: int, alpha: float, seed: int) -> None:
    labels = ["a"] * 300 + ["b"] * 150 + ["c"] * 50
    shards = partition_dirichlet(labels, k, alpha=alpha, seed=seed)
    assert len(shards) == k
    assert_disjoint_and_complete(shards, len(labels))
    assert all(shards)


def mean_label_skew(labels: list[str], shards: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    classes = sorted(set(labels))
    glob = np.array([labels.count(c) for c in classes]) / len(labels)
    tv = []
    for s in shards:
        local = np.array([sum(labels[i] == c for i in s) for c in classes]) / len(s)
        tv.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tv))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 100
    skew = {
        alpha: np.mean([mean_label_skew(labels, partition_dirichlet(labels, 5, alpha=alpha, seed=s))
                        for s in range(10)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1


def test_dirichlet_empty_client_is_named_error() -> None:
    with pytest.raises(DataError, match="left a client empty"):
        partition_dirichlet(["a", "b"], 5, alpha=0.01, seed=0, max_tries=3)


@settings(max_examples=50)
@given(n=st.integers(1, 500), k=st.integers(1, 20), alpha=st.floats(0.05, 100), seed=st.integers(0, 2**31))
def test_quantity_is_disjoint_complete_and_nonempty(n: int, k: int, alpha: float, seed: int) -> None:
    if n < k:
        with pytest.raises(DataError, match=f"{n} examples cannot give each of {k} clients one"):
            partition_quantity(n, k, alpha=alpha, seed=seed)
        return
    shards = partition_quantity(n, k, alpha=alpha, seed=seed)
    assert len(shards) == k
    assert_disjoint_and_complete(shards, n)
    assert all(shards)


def test_quantity_skew_grows_as_alpha_shrinks() -> None:
    def size_spread(alpha: float) -> float:  # mean coefficient of variation of the client sizes
        return float(np.mean([np.std(s) / np.mean(s) for s in (
            [len(x) for x in partition_quantity(1000, 5, alpha=alpha, seed=seed)] for seed in range(20)
        )]))

    assert size_spread(0.3) > size_spread(3.0) > size_spread(300.0)
    assert size_spread(300.0) < 0.1
