"""The Prefect flows end to end on a tiny random model, and what they leave in MLflow."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dplora_core.adapters import AdapterError, from_bytes, to_bytes
from dplora_core.messages import ClientUpdate
from flows.evaluate import metric_key
from flows.federated import _weighted_train_loss, client_base_dtypes
from flows.pipeline import dplora_pipeline
from tasks.training import aggregate, init_adapter, plan_noise
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, raw_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None):
    tmp = tmp_path_factory.mktemp("flow")
    cfg = tiny_config(tiny_model_dir, tmp, raw_dir)
    return cfg, dplora_pipeline(cfg)


def test_pipeline_writes_adapter_training_and_metrics(finished) -> None:
    cfg, metrics = finished
    for name in ("adapter.safetensors", "training.json", "metrics.json", "partition.json"):
        assert (cfg.run_dir / name).is_file(), name
    assert json.loads((cfg.run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["test"]["final"]["n"] == 16
    assert 0 <= metrics["test"]["final"]["accuracy"] <= 1


def test_metrics_hold_the_test_confusion_matrix_and_mlflow_each_labels_recall(finished) -> None:
    cfg, metrics = finished
    test, run_id = metrics["test"], metrics["mlflow_run_id"]
    counts = test["final"]["confusion"]
    assert len(counts) == len(test["labels"]) and sum(map(sum, counts)) == test["final"]["n"]
    assert sum(counts[c][c] for c in range(len(counts))) / test["final"]["n"] == test["final"]["accuracy"]
    logged = MlflowClient(cfg.tracking.mlflow_uri).get_run(run_id).data.metrics
    for c, label in enumerate(test["labels"]):
        if sum(counts[c]):
            assert logged[f"test_recall_{metric_key(label)}"] == pytest.approx(counts[c][c] / sum(counts[c]))


def test_pipeline_writes_the_numbers_dvc_compares(finished) -> None:
    cfg, metrics = finished
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == metrics["test"]["final"]["accuracy"]
    assert summary["epsilon"] == metrics["privacy"]["epsilon"] and summary["delta"] == cfg.privacy.delta
    assert (summary["privacy_mode"], summary["relation"], summary["accountant"]) == ("sample", "record-level", "rdp")
    assert summary["noise_seed_fixed"] is True  # the test config's seed: the guarantee is void for its holders


def test_pipeline_spends_at_most_the_target_epsilon(finished) -> None:
    cfg, metrics = finished
    priv = metrics["privacy"]
    assert 0.9 * cfg.privacy.target_epsilon < priv["epsilon"] <= cfg.privacy.target_epsilon
    assert priv["delta"] == cfg.privacy.delta
    assert "record-level" in priv["guarantee"] and "RDP" in priv["guarantee"]


def test_bytes_are_adapter_payloads(finished) -> None:
    cfg, metrics = finished
    adapter = (cfg.run_dir / "adapter.safetensors").stat().st_size
    rounds, clients = cfg.federation.rounds, cfg.federation.clients_per_round
    assert metrics["bytes"]["up"] == adapter * rounds * clients  # every upload is one adapter payload
    assert metrics["bytes"]["down"] == adapter * rounds * clients
    assert metrics["bytes"]["full_model_up"] > 10 * metrics["bytes"]["up"]


def test_mlflow_run_holds_config_round_metrics_and_adapter(finished) -> None:
    cfg, metrics = finished
    client = MlflowClient(cfg.tracking.mlflow_uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.params["privacy.delta"] == str(cfg.privacy.delta)
    assert run.data.params["federation.num_clients"] == "2"
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "epsilon", "bytes_up", "bytes_down"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    eps = [m.value for m in client.get_metric_history(run.info.run_id, "epsilon")]
    assert eps[0] < eps[1] == pytest.approx(metrics["privacy"]["epsilon"])
    assert "test_accuracy" in run.data.metrics
    assert "train_loss" not in run.data.metrics  # a raw client loss would be outside the DP guarantee
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter.safetensors" in artifacts
    assert run.info.status == "FINISHED"
    assert "record-level" in run.data.tags["dplora.guarantee"]


def test_mlflow_has_per_client_metrics_and_every_rounds_adapter(finished) -> None:
    cfg, metrics = finished
    client = MlflowClient(cfg.tracking.mlflow_uri)
    run_id = metrics["mlflow_run_id"]
    for k in ("0", "1"):
        eps = client.get_metric_history(run_id, f"client_{k}_epsilon")
        assert [m.step for m in eps] == [1, 2]
        assert eps[-1].value == pytest.approx(metrics["privacy"]["per_client_epsilon"][k])
        assert [m.step for m in client.get_metric_history(run_id, f"client_{k}_bytes_up")] == [1, 2]
    adapters = [a.path for a in client.list_artifacts(run_id, "adapters")]
    assert adapters == [f"adapters/adapter-round-{r:04d}.safetensors" for r in (1, 2)]


def test_the_final_adapter_is_registered_with_its_guarantee_and_loads_for_inference(finished) -> None:
    import mlflow

    cfg, metrics = finished
    client = MlflowClient(cfg.tracking.mlflow_uri)
    version = client.get_model_version("dplora-tiny", metrics["registered_model"]["version"])
    assert version.tags["epsilon"] == f"{metrics['privacy']['epsilon']:.4f}"
    assert version.tags["delta"] == str(cfg.privacy.delta) and version.tags["privacy_mode"] == "sample"
    assert "record-level" in version.tags["guarantee"] and len(version.tags["dataset_version"]) == 12
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/dplora-tiny/{version.version}")
    assert set(model.predict(["profit rose", "sales fell"])) <= {"negative", "neutral", "positive"}


def test_registering_the_same_adapter_of_the_same_run_again_keeps_its_version(finished) -> None:
    """An evaluation re-run after a crash between registering and writing metrics.json adds no version."""
    from flows.registry import register_final_adapter

    cfg, metrics = finished
    client = MlflowClient(cfg.tracking.mlflow_uri)
    before = len(client.search_model_versions("name = 'dplora-tiny'"))
    again = register_final_adapter(cfg, metrics["mlflow_run_id"], cfg.run_dir / "adapter.safetensors",
                                   metrics["privacy"])
    assert again == metrics["registered_model"]["version"]
    assert len(client.search_model_versions("name = 'dplora-tiny'")) == before


def test_under_dp_mlflow_gets_no_exact_label_histograms(finished) -> None:
    cfg, metrics = finished
    client = MlflowClient(cfg.tracking.mlflow_uri)
    assert client.list_artifacts(metrics["mlflow_run_id"], "data") == []
    assert "outside the guarantee" in client.get_run(metrics["mlflow_run_id"]).data.tags["dplora.label_histograms"]


def test_report_writes_a_summary_and_png_plots(finished, tmp_path: Path) -> None:
    from flows.report import write_report

    cfg, metrics = finished
    summary = write_report(cfg, tmp_path / "reports").read_text()
    pngs = sorted(p.name for p in (tmp_path / "reports").glob("*.png"))
    assert pngs == sorted(
        ["frontier.png", *(f"tiny-{k}.png" for k in ("accuracy-loss", "epsilon", "bytes", "label-histograms"))]
    )
    assert all((tmp_path / "reports" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for png in pngs:
        assert f"({png})" in summary
    row = f"| tiny | sample | {metrics['privacy']['epsilon']:.3f} | {cfg.privacy.delta} |"
    assert row in summary and "record-level" in summary


def test_the_report_frontier_puts_only_record_level_and_no_dp_runs_on_its_epsilon_axis() -> None:
    from flows.report import frontier_points

    runs = [{"name": m, "mode": m, "accuracy": 0.7} for m in ("sample", "distributed", "none", "client", "paper")]
    runs.append({"name": "unscored", "mode": "sample", "accuracy": None})
    assert [r["name"] for r in frontier_points(runs)] == ["sample", "distributed", "none"]


def test_the_report_tells_runs_with_a_fixed_noise_seed_from_the_others(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    from flows.report import store_runs

    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.create_experiment(cfg.tracking.experiment, artifact_location=(tmp_path / "art").as_uri())
    for name, seed in (("seeded", "7"), ("entropy", "os-entropy")):  # the dplora.noise_seed tag a run starts with
        run = client.create_run(experiment, run_name=name, tags={"dplora.noise_seed": seed})
        client.set_terminated(run.info.run_id)
    assert {r["name"]: r["seeded"] for r in store_runs(cfg)} == {"seeded": True, "entropy": False}


@pytest.mark.parametrize(("mode", "seeded", "label"), [
    ("sample", False, "mode sample"),
    ("sample", True, "mode sample, fixed noise seed: void against its holder"),
    ("distributed", False, "mode distributed (for the sum of uploads)"),
    ("none", True, "mode none"),
])
def test_the_report_frontier_labels_what_each_epsilon_is_for(mode: str, seeded: bool, label: str) -> None:
    from flows.plots import frontier_label

    assert frontier_label(mode, seeded=seeded) == label


def test_a_client_trains_its_round_at_the_decayed_learning_rate(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """federation.round_decay reaches the local optimizer: round 3 at decay 0.5 trains at a quarter of the rate."""
    import tasks.training as training
    from dplora_core.train import LocalResult

    seen: list[float] = []

    def record(model, data, *, learning_rate, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(learning_rate)
        return LocalResult(mean_loss=0.0, steps=0, examples_seen=0, dp_run=None)

    monkeypatch.setattr(training, "train_local", record)
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="none", federation__round_decay=0.5)
    training.local_update(cfg, 3, 0, init_adapter.fn(cfg), None, ())
    assert seen == [pytest.approx(cfg.federation.learning_rate / 4)]


def test_aggregate_rejects_a_bad_client_update_by_name(finished) -> None:
    cfg, _ = finished
    global_model = init_adapter.fn(cfg)
    state = from_bytes(global_model.adapter, source="test")
    key = next(iter(state))
    bad = to_bytes(state | {key: torch.full_like(state[key], float("inf"))})
    good = ClientUpdate(client_id=0, round=1, num_examples=5, adapter=global_model.adapter, train_loss=1.0, dp_run=None,
                        base_dtype="float32")
    evil = ClientUpdate(client_id=1, round=1, num_examples=5, adapter=bad, train_loss=1.0, dp_run=None,
                        base_dtype="float32")
    with pytest.raises(AdapterError, match=r"client 1 update, round 1: .* non-finite"):
        aggregate.fn(cfg, global_model, [good, evil])


def filled_updates(state: dict[str, torch.Tensor], sizes_and_values: list[tuple[int, float]],
                   keys: list[str] | None = None, train_loss: float | None = 0.0) -> list[ClientUpdate]:
    """Round-1 updates of clients 0, 1, ...: client i reports n_i records and sends `keys` of `state` (default:
    all) filled with value_i."""
    return [
        ClientUpdate(client_id=i, round=1, num_examples=n, train_loss=train_loss, dp_run=None, base_dtype="float32",
                     adapter=to_bytes({k: torch.full_like(state[k], value) for k in (keys or list(state))}))
        for i, (n, value) in enumerate(sizes_and_values)
    ]


def test_aggregate_is_example_weighted_and_keeps_frozen_a(finished) -> None:
    cfg, _ = finished
    ffa = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"freeze_a": True})})
    global_model = init_adapter.fn(cfg)
    state = from_bytes(global_model.adapter, source="test")
    b_keys = [k for k in state if ".lora_B." in k]
    updates = filled_updates(state, [(1, 1.0), (3, 5.0)], b_keys)
    merged = from_bytes(aggregate.fn(ffa, global_model, updates)[0].adapter, source="test")
    assert set(merged) == set(state)
    for key, value in merged.items():
        expected = state[key] if ".lora_A." in key else torch.full_like(value, (1 * 1.0 + 3 * 5.0) / 4)
        torch.testing.assert_close(value, expected)


def test_aggregate_with_equal_client_weights_is_the_plain_mean(finished) -> None:
    cfg, _ = finished
    equal = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"client_weights": "equal"})})
    global_model = init_adapter.fn(cfg)
    state = from_bytes(global_model.adapter, source="test")
    updates = filled_updates(state, [(1, 1.0), (3, 5.0)])
    merged = from_bytes(aggregate.fn(equal, global_model, updates)[0].adapter, source="test")
    for value in merged.values():
        torch.testing.assert_close(value, torch.full_like(value, 3.0))  # (1 + 5) / 2, not (1 + 15) / 4


def test_aggregate_in_mode_distributed_is_the_plain_mean_of_the_uploads(finished) -> None:
    """Each upload is a step on its client's noised mean gradient over an expected batch of batch_size records,
    so the mean of the uploads (not a record-weighted one) is the step on the union's; below the quorum the noise
    shares would not add up, and aggregation refuses."""
    cfg, _ = finished
    distributed = cfg.model_copy(update={
        "privacy": cfg.privacy.model_copy(update={"mode": "distributed"}),
        "federation": cfg.federation.model_copy(update={"local_steps": 1, "optimizer": "sgd"}),
    })
    global_model = init_adapter.fn(cfg)
    state = from_bytes(global_model.adapter, source="test")
    updates = filled_updates(state, [(1, 1.0), (3, 5.0)], train_loss=None)
    merged = from_bytes(aggregate.fn(distributed, global_model, updates)[0].adapter, source="test")
    for value in merged.values():
        torch.testing.assert_close(value, torch.full_like(value, 3.0))
    with pytest.raises(ValueError, match="1 uploads, fewer than the quorum of 2"):
        aggregate.fn(distributed, global_model, updates[:1])


def test_non_private_baseline_reports_no_guarantee(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    from flows.report import format_summary

    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode="none", privacy__target_epsilon=None,
                      federation__rounds=1)
    metrics = dplora_pipeline(cfg)
    assert metrics["privacy"]["epsilon"] is None
    assert metrics["privacy"]["per_client_epsilon"] == {}
    training = json.loads((cfg.run_dir / "training.json").read_bytes(), parse_constant=lambda c: c)  # keep Infinity
    assert [row["epsilon"] for row in training["history"]] == [None]  # standard JSON: null, not Infinity
    assert "no differential privacy" in metrics["privacy"]["guarantee"]
    table = format_summary(metrics)
    assert "infinity (no DP)" in table
    run = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"])
    assert "epsilon" not in run.data.metrics
    assert "train_loss" in run.data.metrics  # without DP the clients' loss may travel
    artifacts = MlflowClient(cfg.tracking.mlflow_uri).list_artifacts(metrics["mlflow_run_id"], "data")
    assert [a.path for a in artifacts] == ["data/label_histograms.png"]  # and so may the label counts


def test_delta_too_large_for_the_federations_records_is_refused_before_training(finished) -> None:
    from tasks.runtime import read_partition

    cfg, _ = finished
    total = sum(len(shard) for shard in read_partition(cfg))
    delta = 0.1 / total * 1.5  # below 0.1 / n for every client, above it for all their records together
    assert all(delta * len(shard) <= 0.1 for shard in read_partition(cfg))
    bad = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"delta": delta})})
    with pytest.raises(ValueError, match=rf"too large for the \d clients' records together \({total} records"):
        plan_noise.fn(bad)


def test_stale_partition_is_named_not_an_index_error(finished, tmp_path: Path) -> None:
    import shutil

    from dplora_core.data import DataError
    from tasks.runtime import read_partition

    cfg, _ = finished
    other = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"output_dir": str(tmp_path)})})
    other.run_dir.mkdir(parents=True)
    shutil.copy(cfg.run_dir / "partition.json", other.run_dir / "partition.json")
    stale = json.loads((other.run_dir / "partition.json").read_text())
    stale["clients"][1].append(10_000)
    (other.run_dir / "partition.json").write_text(json.dumps(stale))
    with pytest.raises(DataError, match=r"partition\.json: client 1 indexes records outside"):
        read_partition(other)


def test_fixed_noise_seed_is_flagged_in_the_guarantee_and_recorded_as_a_run_tag(finished) -> None:
    cfg, metrics = finished
    assert "VOID against anyone who knows privacy.noise_seed" in metrics["privacy"]["guarantee"]
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["dplora.noise_seed"] == str(cfg.privacy.noise_seed)


def test_the_frozen_weights_dtype_run_is_recorded_in_training_json_and_as_a_run_tag(finished) -> None:
    cfg, metrics = finished
    training = json.loads((cfg.run_dir / "training.json").read_text())
    assert training["base_dtype"] == "float32" == cfg.model.dtype
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["dplora.base_dtype"] == "float32"


def test_each_rounds_client_dtypes_are_recorded_from_the_updates(finished) -> None:
    cfg, metrics = finished
    training = json.loads((cfg.run_dir / "training.json").read_text())
    assert [row["base_dtypes"] for row in training["history"]] == [["float32"]] * cfg.federation.rounds
    assert training["client_base_dtypes"] == ["float32"]
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["dplora.client_base_dtypes"] == "float32"


def test_client_dtypes_are_the_union_over_rounds_and_withheld_where_participation_is_private(tmp_path: Path) -> None:
    history = [{"base_dtypes": ["float32"]}, {"base_dtypes": ["bfloat16", "float32"]}, {"base_dtypes": None}]
    cfg = tiny_config(tmp_path, tmp_path, tmp_path)
    assert client_base_dtypes(cfg, history) == ["bfloat16", "float32"]
    client_level = tiny_config(tmp_path, tmp_path, tmp_path, privacy__mode="client")
    assert client_base_dtypes(client_level, history) is None


def test_demo_shape_freeze_a_with_os_entropy_noise(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """The demo's path: FFA-LoRA, label-word loss, noise from OS entropy. Only B travels up; A never moves."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, lora__freeze_a=True, privacy__noise_seed=None,
                      federation__rounds=1)
    metrics = dplora_pipeline(cfg)
    assert "VOID" not in metrics["privacy"]["guarantee"]
    tags = MlflowClient(cfg.tracking.mlflow_uri).get_run(metrics["mlflow_run_id"]).data.tags
    assert tags["dplora.noise_seed"] == "os-entropy"
    assert 0.9 * 8.0 < metrics["privacy"]["epsilon"] <= 8.0
    final = from_bytes((cfg.run_dir / "adapter.safetensors").read_bytes(), source="test")
    initial = from_bytes(init_adapter.fn(cfg).adapter, source="test")
    for key, value in final.items():
        if ".lora_A." in key:
            torch.testing.assert_close(value, initial[key])
        else:
            assert not torch.equal(value, initial[key]), key  # B trained (and noised)
    b = metrics["bytes"]
    assert b["up"] < 0.75 * b["down"]  # uploads carry B only; downloads the whole adapter


def test_the_pipeline_runs_on_a_custom_csv_described_only_in_config(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    import csv

    source = csv.reader((raw_dir / "financial_phrasebank" / "all-data.csv").open(encoding="latin-1"))
    next(source)
    ids = {"negative": 0, "neutral": 1, "positive": 2}
    corpus = tmp_path / "headlines.csv"
    with corpus.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["headline", "sentiment_id"])
        writer.writerows([text, ids[label]] for label, text in list(source)[:200])
    custom = {
        "path": str(corpus), "text_column": "headline", "label_column": "sentiment_id", "labels": ["0", "1", "2"],
        "label_words": ["negative", "neutral", "positive"],
    }
    cfg = tiny_config(
        tiny_model_dir, tmp_path, raw_dir, data__dataset="custom", data__custom=custom,
        data__prompt_template="classify the sentiment : {text} sentiment :", federation__rounds=1,
    )
    metrics = dplora_pipeline(cfg)
    assert metrics["test"]["final"]["n"] == 16
    assert metrics["test"]["labels"] == ["0", "1", "2"]  # the confusion matrix's rows, named as in the file
    assert metrics["test"]["label_words"] == ["negative", "neutral", "positive"]  # the words the model answered
    prepared = (tmp_path / "prepared" / "custom-headlines" / "train.jsonl").read_text().splitlines()
    assert {json.loads(line)["label"] for line in prepared} <= {"negative", "neutral", "positive"}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_show_rounds_clients_and_the_named_epsilon_on_a_terminal(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1)
    dplora_pipeline(cfg)
    shown = terminal.getvalue()
    assert "rounds: 100%" in shown and "round 1 clients:" in shown  # the clients bar clears itself when done
    assert "(record-level, rdp, δ=0.001)" in shown


def test_int8_uploads_train_under_the_same_guarantee_and_cost_fewer_bytes(
    finished, tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    cfg, float32 = finished
    int8 = dplora_pipeline(tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__upload_codec="int8"))
    assert int8["bytes"]["down"] == float32["bytes"]["down"]  # the global adapter still travels in float32
    # tiny tensors: the safetensors header (key names) dominates; real LoRA shapes in test_compression
    assert int8["bytes"]["up"] < 0.9 * float32["bytes"]["up"]
    assert 0.9 * 8.0 < int8["privacy"]["epsilon"] <= 8.0  # post-processing: the same guarantee
    final = from_bytes((tmp_path / "outputs" / cfg.name / "adapter.safetensors").read_bytes(), source="test")
    assert all(v.dtype == torch.float32 for v in final.values())


def test_zero_shot_is_scored_once_per_setting_whatever_the_seed(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.training
    from tasks.runtime import forget_splits

    cfg, metrics = finished
    other_seed = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"seed": 7})})

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("zero-shot scored again")

    first = tasks.training.evaluate.fn(cfg, None, "test")  # scored now, or still held from the pipeline run
    assert first == metrics["test"]["zero_shot"]
    monkeypatch.setattr(tasks.training, "score_prompts", no_scoring)
    assert tasks.training.evaluate.fn(other_seed, None, "test") == first
    forget_splits()  # the prepared splits were rewritten: nothing of the old ones may be reused
    with pytest.raises(AssertionError, match="scored again"):
        tasks.training.evaluate.fn(other_seed, None, "test")


def test_under_dp_a_round_without_losses_is_no_loss_and_no_warning() -> None:
    """Clients under DP (mode client included: no record-level run) send no loss; outside a flow a warning would
    raise MissingContextError, so this also pins that nothing is logged."""
    updates = [ClientUpdate(k, 1, 8, b"", None, None, "float32") for k in range(2)]
    assert _weighted_train_loss(updates, private=True) is None
