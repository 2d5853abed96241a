"""Failing and straggling clients: retries, the quorum, per-client timeouts (tiny model, Prefect harness)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from prefect import task

import flows.federated as federated
import tasks.training as training
from dplora_core.adapters import from_bytes, to_bytes
from dplora_core.checkpoint import load_checkpoint
from dplora_core.messages import ClientUpdate
from flows.pipeline import dplora_pipeline
from tests.helpers import tiny_config


def three_clients(tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, **overrides: Any):
    return tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__num_clients=3, federation__clients_per_round=3,
        federation__rounds=1, **overrides,
    )


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production backoff (5 s, 30 s) is right for silos, too slow for tests."""
    monkeypatch.setattr(federated, "train_client", training.train_client.with_options(retry_delay_seconds=0))


def break_client(monkeypatch: pytest.MonkeyPatch, client: int, *, attempts: int | None = None) -> dict[str, int]:
    """Make `client`'s data unreadable: for its first `attempts` tries, or always (None)."""
    real, calls = training.client_data, {"n": 0}

    def flaky(cfg, k):  # type: ignore[no-untyped-def]
        if k == client:
            calls["n"] += 1
            if attempts is None or calls["n"] <= attempts:
                raise OSError(f"silo {client} unreachable")
        return real(cfg, k)

    monkeypatch.setattr(training, "client_data", flaky)
    return calls


def test_a_failing_client_is_retried(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = break_client(monkeypatch, 1, attempts=1)
    dplora_pipeline(three_clients(tiny_model_dir, raw_dir, tmp_path))
    history = json.loads((tmp_path / "outputs" / "tiny" / "training.json").read_text())["history"]
    assert calls["n"] == 2 and history[0]["failed_clients"] == []


def test_client_level_dp_has_no_quorum_a_failed_client_adds_zero(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode client: whether a round completes must not hang on one client (the epsilon does not cover it)."""
    break_client(monkeypatch, 1)
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="client", privacy__target_epsilon=8.0,
                      federation__num_clients=3, federation__clients_per_round=3, federation__rounds=1)
    metrics = dplora_pipeline(cfg)
    assert metrics["rounds"] == 1  # every client is sampled (q = 1) and client 1 fails: the round is applied


def test_round_proceeds_at_the_quorum_naming_the_failed_client(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = break_client(monkeypatch, 1)
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, federation__min_clients=2)
    metrics = dplora_pipeline(cfg)
    training_json = json.loads((cfg.run_dir / "training.json").read_text())
    assert calls["n"] == 3  # the first try and two retries
    assert training_json["history"][0]["failed_clients"] == [1]
    ledgers = training_json["privacy"]["ledgers"]
    assert [len(ledgers[k]["runs"]) for k in ("0", "1", "2")] == [1, 0, 1]  # client 1 released nothing
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["dplora.failed_clients.round_1"] == "[1]"


def test_below_the_quorum_the_round_fails_and_nothing_is_applied(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch
) -> None:
    break_client(monkeypatch, 1)
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path)  # min_clients None: every client must succeed
    with pytest.raises(federated.RoundFailed, match=r"round 1: 2 of 3 clients .* quorum of 3 .* client 1 \(.*silo 1"):
        dplora_pipeline(cfg)
    checkpoint = load_checkpoint(cfg.run_dir / "checkpoint")
    assert checkpoint is not None and checkpoint.round == 0  # the global adapter did not move
    assert checkpoint.state["pending"]["round"] == 1  # and a resume charges what the others released
    assert not (cfg.run_dir / "adapter.safetensors").exists()


class SlowShard(tuple):  # type: ignore[type-arg]
    """A slow client's records: its local training first sleeps (tasks.training.train_local, in the lock)."""

    client = -1


def slow_clients(monkeypatch: pytest.MonkeyPatch, slow: set[int], seconds: float) -> dict[int, int]:
    """Clients in `slow` take `seconds` longer to train once they hold the model; counts their local runs."""
    real_data, real_train, runs = training.client_data, training.train_local, dict.fromkeys(slow, 0)

    def data(cfg, k):  # type: ignore[no-untyped-def]
        records = real_data(cfg, k)
        if k not in slow:
            return records
        shard = SlowShard(records)
        shard.client = k
        return shard

    def train_local(model, records, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(records, SlowShard):
            runs[records.client] += 1
            time.sleep(seconds)
        return real_train(model, records, **kwargs)

    monkeypatch.setattr(training, "client_data", data)
    monkeypatch.setattr(training, "train_local", train_local)
    return runs


def test_a_straggler_is_cut_by_the_per_client_timeout_and_not_retried(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, fast_retries, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = slow_clients(monkeypatch, {2}, seconds=4.0)
    cfg = three_clients(
        tiny_model_dir, raw_dir, tmp_path, federation__min_clients=2, federation__client_timeout_seconds=2.0
    )
    dplora_pipeline(cfg)
    training_json = json.loads((cfg.run_dir / "training.json").read_text())
    assert training_json["history"][0]["failed_clients"] == [2]
    assert runs == {2: 1}  # a retry would straggle again
    assert training_json["privacy"]["ledgers"]["2"]["runs"] == []  # it released nothing


def test_time_spent_waiting_for_another_clients_training_does_not_count(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each client trains for a little over 4 s of a 7 s limit, one at a time on the shared model: the client
    that waits for another's training spends 8 s or more in its task, which a task-level timeout would cut."""
    slow_clients(monkeypatch, {0, 1, 2}, seconds=4.0)
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, federation__client_timeout_seconds=7.0)
    dplora_pipeline(cfg)
    history = json.loads((cfg.run_dir / "training.json").read_text())["history"]
    assert history[0]["failed_clients"] == []


def test_under_dp_with_os_entropy_noise_a_client_gets_one_attempt(tiny_model_dir, raw_dir, tmp_path) -> None:
    def retries(**overrides: Any) -> int:
        trainer = federated.client_trainer(three_clients(tiny_model_dir, raw_dir, tmp_path, **overrides))
        return trainer.retries

    assert retries(privacy__noise_seed=None) == 0  # a retry would draw a new sample and new noise
    assert retries() == 2  # seeded noise: a retry replays the same sample and noise
    assert retries(privacy__mode="none", privacy__target_epsilon=None) == 2


def tamper_update(monkeypatch: pytest.MonkeyPatch, client: int, change: Callable[[ClientUpdate], ClientUpdate]) -> None:
    """Every round, `client`'s update reaches the server as `change` makes it (the others as trained)."""

    @task(name="train-client-tampered")
    def tampered(cfg, round_num, client_id, global_model, noise_multiplier):  # type: ignore[no-untyped-def]
        update = training.train_client.fn(cfg, round_num, client_id, global_model, noise_multiplier)
        return change(update) if client_id == client else update

    monkeypatch.setattr(federated, "train_client", tampered)


def test_a_non_finite_update_is_rejected_by_name_and_never_aggregated(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def poisoned(update: ClientUpdate) -> ClientUpdate:
        state = {k: v * float("nan") for k, v in from_bytes(update.adapter, source="test").items()}
        return dataclasses.replace(update, adapter=to_bytes(state))

    tamper_update(monkeypatch, 1, poisoned)
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, federation__min_clients=2)
    dplora_pipeline(cfg)
    summary = json.loads((cfg.run_dir / "training.json").read_text())
    assert summary["history"][0]["failed_clients"] == [1]
    final = from_bytes((cfg.run_dir / "adapter.safetensors").read_bytes(), source="test")
    assert all(bool(v.isfinite().all()) for v in final.values())
    ledgers = summary["privacy"]["ledgers"]
    assert [len(ledgers[k]["runs"]) for k in ("0", "1", "2")] == [1, 1, 1]  # client 1 did release: charged


def test_distributed_a_rejected_upload_is_charged_to_the_servers_view_only(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode distributed: the server saw client 1's upload (its share's epsilon), but its records are not in the
    released sum, which the other two clients' uploads still make (quorum 2: each share is sigma / sqrt(2 - 1))."""
    def poisoned(update: ClientUpdate) -> ClientUpdate:
        state = {k: v * float("nan") for k, v in from_bytes(update.adapter, source="test").items()}
        return dataclasses.replace(update, adapter=to_bytes(state))

    tamper_update(monkeypatch, 1, poisoned)
    cfg = three_clients(
        tiny_model_dir, raw_dir, tmp_path, federation__min_clients=2, privacy__mode="distributed",
        federation__local_steps=1, federation__optimizer="sgd",
    )
    dplora_pipeline(cfg)
    privacy = json.loads((cfg.run_dir / "training.json").read_text())["privacy"]
    sigmas = privacy["noise_multipliers"]
    assert sigmas["clients"]["1"] == pytest.approx(sigmas["aggregate"])
    views = ("ledgers", "server_view_ledgers")
    runs = {view: [len(privacy[view][k]["runs"]) for k in ("0", "1", "2")] for view in views}
    assert runs == {"ledgers": [1, 0, 1], "server_view_ledgers": [1, 1, 1]}


def run_with_client_2_claiming_10_to_the_12_records(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """A one-round pipeline in which client 2's update overstates its record count; its training.json."""
    tamper_update(monkeypatch, 2, lambda update: dataclasses.replace(update, num_examples=10**12))
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, federation__min_clients=2)
    dplora_pipeline(cfg)
    summary: dict[str, Any] = json.loads((cfg.run_dir / "training.json").read_text())
    return summary


def test_a_rejected_update_is_listed_with_its_epsilon_alone(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its release is charged, so the round's per-client numbers show that epsilon; no bytes, nothing aggregated."""
    summary = run_with_client_2_claiming_10_to_the_12_records(tiny_model_dir, raw_dir, tmp_path, monkeypatch)
    per_client = summary["history"][0]["per_client"]
    assert per_client["2"] == {"epsilon": pytest.approx(summary["privacy"]["per_client_epsilon"]["2"])}
    assert per_client["2"]["epsilon"] > 0 and set(per_client["0"]) == {"bytes_up", "num_examples", "epsilon"}


def test_an_update_reporting_another_record_count_is_rejected_by_name(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg weighs each update by its record count: one client claiming 10^12 records would be the average."""
    summary = run_with_client_2_claiming_10_to_the_12_records(tiny_model_dir, raw_dir, tmp_path, monkeypatch)
    assert summary["history"][0]["failed_clients"] == [2]


def test_a_failed_silo_is_named_and_still_charged(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cross-silo: a silo's failed run may have written its update, so it is charged like a released one."""
    from types import SimpleNamespace

    from prefect.states import Completed, Crashed

    import tasks.silos as silos
    from dplora_core import exchange
    from dplora_core.data import write_jsonl
    from dplora_core.messages import TrainRequest
    from tasks.runtime import silo_data, split_examples

    def fake_run_deployment(name, parameters, **kwargs):  # type: ignore[no-untyped-def]
        request = TrainRequest.model_validate(parameters["request"])
        if name == "client-train/bank-b":
            return SimpleNamespace(id="run-b", state=Crashed(message="silo machine lost power"))
        cfg, folder = request.config, Path(request.folder)
        data_path = tmp_path / "bank-a.jsonl"
        write_jsonl(data_path, split_examples(cfg.data, "train")[:24])
        update = training.local_update(
            cfg, request.round, request.client_id, exchange.read_global(folder, request.round),
            request.noise_multiplier, silo_data(cfg, request.client_id, str(data_path)),
        )
        exchange.write_update(folder, update, sender="run-a")
        return SimpleNamespace(id="run-a", state=Completed())

    monkeypatch.setattr(silos, "run_deployment", fake_run_deployment)
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, federation__rounds=1, federation__min_clients=1,
        federation__silos=[{"name": "bank-a", "num_examples": 24}, {"name": "bank-b", "num_examples": 24}],
        federation__exchange_dir=str(tmp_path / "exchange"),
    )
    dplora_pipeline(cfg)
    summary = json.loads((cfg.run_dir / "training.json").read_text())
    assert summary["history"][0]["failed_clients"] == [1]
    ledgers = summary["privacy"]["ledgers"]
    assert [len(ledgers[k]["runs"]) for k in ("0", "1")] == [1, 1]


def test_an_adapter_the_model_cannot_take_fails_before_an_mlflow_run_exists(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness
) -> None:
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, lora__target_modules=["q_projj"])
    with pytest.raises(Exception, match="q_projj"):
        dplora_pipeline(cfg)
    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # no run left RUNNING


def test_label_words_sharing_a_first_token_fail_before_any_client_trains(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "reviews.csv"
    corpus.write_text("text,y\n" + "".join(f"review {i},{i % 2}\n" for i in range(60)))
    custom = {"path": str(corpus), "text_column": "text", "label_column": "y", "labels": ["0", "1"],
              "label_words": ["very bad", "very good"]}
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path, data__dataset="custom", data__custom=custom,
                        data__prompt_template="review : {text} verdict :")
    trained: list[int] = []
    monkeypatch.setattr(training, "train_client", lambda *a, **k: trained.append(1))
    monkeypatch.setattr(federated, "train_client", lambda *a, **k: trained.append(1))
    with pytest.raises(ValueError, match=r"label words .* do not start with distinct tokens"):
        dplora_pipeline(cfg)
    assert trained == []


def test_a_round_checkpointed_but_not_yet_tracked_reaches_mlflow_on_resume(
    tiny_model_dir, raw_dir, tmp_path, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Killed(Exception):
        pass

    def killed(*args: object) -> None:
        raise Killed  # the process dies after the round's checkpoint, before MLflow hears of the round

    real = federated.track_round
    monkeypatch.setattr(federated, "track_round", killed)
    cfg = three_clients(tiny_model_dir, raw_dir, tmp_path)
    with pytest.raises(Killed):
        dplora_pipeline(cfg)
    monkeypatch.setattr(federated, "track_round", real)
    metrics = dplora_pipeline(cfg, resume=True)
    history = MlflowClient(cfg.tracking.mlflow_uri).get_metric_history(metrics["mlflow_run_id"], "val_accuracy")
    assert [m.step for m in history] == [1]
