"""Round checkpoints: atomic, state last, and strict about what a resume may change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dplora_core.checkpoint import (
    CheckpointError,
    config_changes,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    unfinished,
)
from dplora_core.config import field_defaults


def test_latest_checkpoint_round_trips_and_older_adapters_are_dropped(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, round_num=1, adapter=b"one", state={"ledgers": {"0": 1}})
    save_checkpoint(tmp_path, round_num=2, adapter=b"two", state={"ledgers": {"0": 2}})
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    assert (checkpoint.round, checkpoint.adapter, checkpoint.state["ledgers"]) == (2, b"two", {"0": 2})
    assert sorted(p.name for p in tmp_path.glob("adapter-round-*")) == ["adapter-round-0002.safetensors"]


def test_a_non_finite_number_is_saved_as_null_in_standard_json(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, round_num=1, adapter=b"one", state={"history": [{"epsilon": float("inf")}]})
    json.loads((tmp_path / "state.json").read_text(), parse_constant=lambda name: pytest.fail(f"holds {name}"))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.state["history"] == [{"epsilon": None}]


def test_the_server_optimizer_and_the_moving_average_travel_with_their_round(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, round_num=1, adapter=b"one", state={}, server_optimizer=b"adam1", average=b"avg1")
    save_checkpoint(tmp_path, round_num=2, adapter=b"two", state={}, server_optimizer=b"adam2", average=b"avg2")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint.server_optimizer, checkpoint.average) == (b"adam2", b"avg2")
    assert "average" not in checkpoint.state and "server_optimizer" not in checkpoint.state
    assert sorted(p.name for p in tmp_path.glob("*-round-*")) == [
        "adapter-round-0002.safetensors", "average-round-0002.safetensors", "server-optimizer-round-0002.safetensors"
    ]


def test_a_kill_during_the_next_write_leaves_the_previous_checkpoint_usable(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, round_num=1, adapter=b"one", state={"ledgers": {}})
    # What a SIGKILL mid-write leaves: the next adapter half written, the next state torn, neither renamed.
    (tmp_path / "adapter-round-0002.safetensors.tmp").write_bytes(b"tw")
    (tmp_path / "state.json.tmp").write_text('{"round": 2, "adap')
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint.round, checkpoint.adapter) == (1, b"one")


def test_no_checkpoint_is_none_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("round_num", "extra", "expected"),
    [
        (1, {}, "round 1 of 3 done"),
        (3, {}, None),
        (1, {"pending": {"round": 2, "events": {}}}, "round 2 interrupted"),
    ],
)
def test_unfinished_names_what_a_fresh_run_would_throw_away(
    tmp_path: Path, round_num: int, extra: dict[str, object], expected: str | None
) -> None:
    assert unfinished(tmp_path) is None  # no checkpoint
    save_checkpoint(tmp_path, round_num=round_num, adapter=b"a", state={"config": {"federation.rounds": 3}} | extra)
    assert unfinished(tmp_path) == expected


def test_an_unreadable_checkpoint_counts_as_unfinished(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    assert "unreadable checkpoint" in str(unfinished(tmp_path))


def test_set_aside_renames_and_keeps_every_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "checkpoint", round_num=1, adapter=b"a", state={})
    moved = set_aside(tmp_path / "checkpoint")
    assert moved.name.startswith("checkpoint.superseded-") and not (tmp_path / "checkpoint").exists()
    assert load_checkpoint(moved) is not None


@pytest.mark.parametrize(
    "state", ["[1, 2]", '{"adapter": "a.safetensors"}', '{"round": "x", "adapter": "a.safetensors"}']
)
def test_a_checkpoint_state_of_the_wrong_shape_is_named(tmp_path: Path, state: str) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "state.json").write_text(state)
    with pytest.raises(CheckpointError, match=r"state\.json: unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_may_change_rounds_and_tracking_only() -> None:
    saved = {"federation.rounds": 2, "lora.rank": 4, "tracking.output_dir": "a", "privacy.delta": 1e-5}
    assert config_changes(saved, saved | {"federation.rounds": 5, "tracking.output_dir": "b"}) == []
    assert config_changes(saved, saved | {"lora.rank": 8, "privacy.delta": 1e-6}) == ["lora.rank", "privacy.delta"]


def test_a_field_added_after_the_checkpoint_is_no_change_at_its_default() -> None:
    saved = {"lora.rank": 4}
    added = field_defaults(["federation.warmup_steps"])
    assert added == {"federation.warmup_steps": 0}
    assert config_changes(saved, saved | {"federation.warmup_steps": 0}, added) == []
    assert config_changes(saved, saved | {"federation.warmup_steps": 2}, added) == ["federation.warmup_steps"]


def test_a_checkpoint_from_before_cap_sampling_resumes_only_with_the_first_n_records() -> None:
    added = field_defaults(["data.cap_sampling"])
    assert added == {"data.cap_sampling": "first"}  # not today's default: what the checkpoint's run did
    assert config_changes({}, {"data.cap_sampling": "stratified"}, added) == ["data.cap_sampling"]
