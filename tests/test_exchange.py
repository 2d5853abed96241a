"""Cross-silo exchange folder and silo data: what the coordinator accepts back, what a silo refuses to train on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import tasks.data  # noqa: F401  (imports Prefect, whose log handlers bind sys.stderr, before capsys replaces it)
from dplora_core import exchange
from dplora_core.adapters import AdapterError, to_bytes
from dplora_core.data import DataError, Example, write_jsonl
from dplora_core.messages import ClientUpdate, GlobalModel
from dplora_core.privacy.accountant import DpSgdRun
from flows.cli import main
from tasks.runtime import silo_data
from tests.helpers import tiny_config

LIMIT = 1 << 20
SILOS = [{"name": "bank-a", "num_examples": 3}, {"name": "bank-b", "num_examples": 4}]


def an_update(client_id: int = 1, round_num: int = 2) -> ClientUpdate:
    adapter = to_bytes({"layer.lora_B.weight": torch.ones(2, 3)})
    return ClientUpdate(client_id, round_num, 4, adapter, None, DpSgdRun(0.25, 1.3, 5), "bfloat16")


def test_an_update_round_trips_through_the_exchange_folder(tmp_path: Path) -> None:
    update = an_update()
    exchange.write_update(tmp_path, update, sender="run-1")
    assert exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT) == update


def test_a_diverged_loss_travels_as_null_in_a_standard_json_record(tmp_path: Path) -> None:
    update = dataclasses.replace(an_update(), train_loss=float("nan"), dp_run=None)  # a silo without DP that diverged
    exchange.write_update(tmp_path, update, sender="run-1")
    record = exchange.update_paths(tmp_path, 1)[1].read_text()
    assert json.loads(record, parse_constant=lambda name: pytest.fail(f"the record holds {name}"))["train_loss"] is None
    assert exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT).train_loss is None


def test_an_update_record_without_the_clients_dtype_is_refused_by_name(tmp_path: Path) -> None:
    exchange.write_update(tmp_path, an_update(), sender="run-1")
    record_path = tmp_path / "client-1.json"
    record = json.loads(record_path.read_text())
    del record["base_dtype"]
    record_path.write_text(json.dumps(record))
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*lacks base_dtype"):
        exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT)


def test_the_global_adapter_round_trips(tmp_path: Path) -> None:
    exchange.write_global(tmp_path, GlobalModel(round=2, adapter=b"adapter"))
    assert exchange.read_global(tmp_path, 3) == GlobalModel(round=2, adapter=b"adapter")


def test_an_update_from_another_silo_run_is_refused_as_stale(tmp_path: Path) -> None:
    exchange.write_update(tmp_path, an_update(), sender="earlier-run")
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*earlier-run, not by run-2"):
        exchange.read_update(tmp_path, 1, 2, sender="run-2", max_bytes=LIMIT)


def test_an_adapter_changed_after_its_record_is_refused(tmp_path: Path) -> None:
    path = exchange.write_update(tmp_path, an_update(), sender="run-1")
    path.write_bytes(to_bytes({"layer.lora_B.weight": torch.zeros(2, 3)}))
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*sha256"):
        exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT)


def test_an_update_recorded_for_another_round_is_refused(tmp_path: Path) -> None:
    exchange.write_update(tmp_path, an_update(round_num=1), sender="run-1")
    with pytest.raises(AdapterError, match="says client 1, round 1"):
        exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT)


def test_an_oversized_update_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = exchange.write_update(tmp_path, an_update(), sender="run-1")
    limit = path.stat().st_size - 1
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*unreadable: .* bytes, more than the"):
        exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=limit)


def test_the_update_limit_leaves_room_for_a_full_precision_update() -> None:
    adapter = to_bytes({"layer.lora_B.weight": torch.ones(64, 4)})
    assert exchange.max_update_bytes(GlobalModel(round=0, adapter=adapter)) > len(adapter)


def test_a_missing_update_names_the_client(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"client 0 update, round 1 .*unreadable"):
        exchange.read_update(tmp_path, 0, 1, sender="run-1", max_bytes=LIMIT)


def test_a_silo_refuses_data_that_differs_from_its_declared_size(tiny_model_dir, raw_dir, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__silos=SILOS, federation__exchange_dir=str(tmp_path / "x")
    )
    path = tmp_path / "bank-b.jsonl"
    write_jsonl(path, [Example(id=f"r{i}", text="profit rose", label="positive") for i in range(5)])
    with pytest.raises(DataError, match=r"bank-b.jsonl: silo bank-b \(client 1\) holds 5 records, .* declares .* 4"):
        silo_data(cfg, 1, str(path))


def test_a_silo_names_the_line_of_an_unknown_label(tiny_model_dir, raw_dir, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__silos=SILOS, federation__exchange_dir=str(tmp_path / "x")
    )
    path = tmp_path / "bank-a.jsonl"
    labels = ("positive", "bullish", "neutral")
    path.write_text("".join(json.dumps({"id": str(i), "text": "t", "label": b}) + "\n" for i, b in enumerate(labels)))
    with pytest.raises(DataError, match=r"bank-a.jsonl, line 2: unknown label 'bullish'"):
        silo_data(cfg, 0, str(path))


def test_a_completed_update_is_found_again_for_the_same_round(tmp_path: Path) -> None:
    assert exchange.existing_update(tmp_path, 1, 2, max_bytes=LIMIT) is None
    exchange.write_update(tmp_path, an_update(), sender="run-1")
    assert exchange.existing_update(tmp_path, 1, 2, max_bytes=LIMIT) == an_update()


def test_a_corrupt_earlier_release_is_refused_by_name_not_resent(tmp_path: Path) -> None:
    exchange.write_update(tmp_path, an_update(), sender="run-1")
    (tmp_path / "client-1.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*unreadable"):
        exchange.existing_update(tmp_path, 1, 2, max_bytes=LIMIT)


def test_a_record_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    exchange.write_update(tmp_path, an_update(), sender="run-1")
    (tmp_path / "client-1.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match=r"client 1 update, round 2 .*not a JSON object"):
        exchange.read_update(tmp_path, 1, 2, sender="run-1", max_bytes=LIMIT)


def test_the_round_folder_changes_with_the_global_adapter_and_the_config(tiny_model_dir, raw_dir, tmp_path) -> None:
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__silos=SILOS, federation__exchange_dir=str(tmp_path / "x")
    )
    other_cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__silos=SILOS, federation__exchange_dir=str(tmp_path / "x"),
        federation__learning_rate=0.5,
    )
    model = GlobalModel(round=2, adapter=b"a")
    folders = {
        exchange.round_dir(cfg, model), exchange.round_dir(cfg, GlobalModel(round=2, adapter=b"b")),
        exchange.round_dir(other_cfg, model),
    }
    assert len(folders) == 3 and all(f.name.startswith("round-0003-") for f in folders)
    assert exchange.round_dir(cfg, model) == exchange.round_dir(cfg, GlobalModel(round=2, adapter=b"a"))


def test_split_silos_writes_each_clients_records_as_its_own_file(tiny_model_dir, raw_dir, tmp_path, capsys) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    path = tmp_path / "sim.yaml"
    path.write_text(cfg.model_dump_json())
    assert main(["split-silos", str(path), "--out", str(tmp_path / "silos")]) == 0
    files = [tmp_path / "silos" / f"client-{k}" / "train.jsonl" for k in range(2)]
    ids = [[json.loads(line)["id"] for line in f.read_text().splitlines()] for f in files]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 48  # max_train_examples
    silos = yaml.safe_load(capsys.readouterr().out)["federation"]["silos"]
    assert silos == [{"name": f"client-{k}", "num_examples": len(ids[k])} for k in range(2)]
