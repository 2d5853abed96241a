"""`dplora study`: the grid, resumability, and the document section written from the results."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import flows.study
from dplora_core.checkpoint import load_checkpoint, save_checkpoint
from dplora_core.config import ConfigError, ExperimentConfig
from dplora_core.io import json_bytes
from dplora_core.study import StudyConfig, expand, summarise
from flows.cli import main
from flows.plots import no_dp_label
from flows.study import finished_run, publish, run_study, set_aside_superseded, write_section
from tests.helpers import tiny_config

BASE = {"name": "base", "privacy": {"mode": "sample", "target_epsilon": 8.0, "delta": 1e-5}}
AXES = {
    "partition": {"iid": {}, "dir": {"federation.partition": "dirichlet", "federation.dirichlet_alpha": 0.5}},
    "privacy": {"eps4": {"privacy.target_epsilon": 4}, "nodp": {"privacy.mode": "none"}},
}


def test_the_grid_is_the_product_of_the_axes_times_the_seeds_minus_exclusions() -> None:
    study = StudyConfig(name="s", base="b.yaml", seeds=(0, 1), axes=AXES, common={"federation.num_clients": 5,
                        "federation.clients_per_round": 5}, exclude=({"partition": "dir", "privacy": "nodp"},))
    cells = expand(study, BASE)
    assert {c.config.federation.num_clients for c in cells} == {5}
    assert [c.config.name for c in cells] == [
        "s-iid-eps4-s0", "s-iid-nodp-s0", "s-dir-eps4-s0", "s-iid-eps4-s1", "s-iid-nodp-s1", "s-dir-eps4-s1",
    ]
    dir_eps4 = cells[2].config
    assert dir_eps4.federation.partition == "dirichlet" and dir_eps4.privacy.target_epsilon == 4
    assert [c.config.federation.seed for c in cells] == [0, 0, 0, 1, 1, 1]
    assert cells[1].config.privacy.mode == "none"


def test_a_bad_override_names_the_cell_and_the_field() -> None:
    study = StudyConfig(name="s", base="b.yaml", axes={"privacy": {"bad": {"privacy.target_epsilon": -1}}})
    message = r"cell s-bad-s0: invalid config\n  privacy.target_epsilon: Input should be greater than 0"
    with pytest.raises(ConfigError, match=message):
        expand(study, BASE)


def test_an_exclusion_with_seeds_drops_the_cell_on_those_seeds_only() -> None:
    study = StudyConfig(name="s", base="b.yaml", seeds=(0, 1, 2), axes={"privacy": AXES["privacy"]},
                        exclude=({"privacy": "nodp", "seeds": [1, 2]},))
    assert [c.config.name for c in expand(study, BASE)] == ["s-eps4-s0", "s-nodp-s0", "s-eps4-s1", "s-eps4-s2"]


def test_an_exclusion_naming_a_seed_the_study_does_not_run_is_refused() -> None:
    with pytest.raises(ValueError, match=r"exclude: seeds=\[3\] must be a list of the study's seeds"):
        StudyConfig(name="s", base="b.yaml", seeds=(0, 1), axes=AXES, exclude=({"privacy": "nodp", "seeds": [3]},))


def test_a_repeated_seed_is_refused() -> None:
    with pytest.raises(ValueError, match=r"seeds: \[0, 0\] repeats a seed"):
        StudyConfig(name="s", base="b.yaml", seeds=(0, 0), axes=AXES)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"common": {"federation.seed": 7}}, r"common: sets federation\.seed, which the study sets for each cell"),
        ({"axes": {"p": {"x": {"name": "mine"}}}}, r"axes\.p\.x: sets name, which the study sets"),
        ({"exclude": ({},)}, r"exclude: an empty rule would drop every cell"),
    ],
)
def test_a_study_overriding_its_own_fields_or_dropping_every_cell_is_refused(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        StudyConfig.model_validate({"name": "s", "base": "b.yaml", "axes": AXES} | fields)


def test_two_cells_with_the_same_name_are_refused() -> None:
    study = StudyConfig(name="s", base="b.yaml", axes={"a": {"x-y": {}, "x": {}}, "b": {"z": {}, "y-z": {}}})
    with pytest.raises(ConfigError, match=r"cells \{'a': 'x-y', 'b': 'z'\} and \{'a': 'x', 'b': 'y-z'\} are both "
                       "named s-x-y-z-s0"):
        expand(study, BASE)


def test_an_exclusion_naming_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="exclude: privacy=eps9"):
        StudyConfig(name="s", base="b.yaml", axes=AXES, exclude=({"privacy": "eps9"},))


def test_summary_gives_mean_and_sample_sd_per_cell() -> None:
    rows = [{"levels": {"a": "x"}, "acc": v} for v in (0.5, 0.7)] + [{"levels": {"a": "y"}, "acc": 0.9}]
    (x, y) = summarise(rows, ("acc",))
    assert x["n"] == 2 and x["acc"][0] == pytest.approx(0.6) and x["acc"][1] == pytest.approx(0.1414, abs=1e-4)
    assert y["n"] == 1 and y["acc"][0] == 0.9


def test_a_study_config_error_exits_2_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE | {"tracking": {"output_dir": str(tmp_path / "outputs")}}))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": str(base), "axes": {"p": {"x": {"lora.rank": 0}}}}))
    assert main(["study", str(study)]) == 2
    assert "s-x-s0" in capsys.readouterr().err and not (tmp_path / "outputs").exists()


def test_write_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nprose\n\n<!-- study:a -->\nold\n<!-- /study:a -->\n\nmore prose\n")
    write_section(doc, "a", "new table")
    write_section(doc, "b", "other")
    text = doc.read_text()
    assert "old" not in text and "<!-- study:a -->\nnew table\n<!-- /study:a -->\n\nmore prose" in text
    assert text.endswith("<!-- study:b -->\nother\n<!-- /study:b -->\n")


def test_a_study_runs_its_cells_then_skips_them_when_run_again(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1)
                                   .model_dump(mode="json")))
    doc = tmp_path / "results.md"
    study = StudyConfig(name="t", base=str(base), seeds=(0, 1), results_doc=str(doc),
                        axes={"privacy": {"eps8": {}, "nodp": {"privacy.mode": "none"}}})
    results = run_study(study)
    assert [r["name"] for r in results["rows"]] == ["t-eps8-s0", "t-nodp-s0", "t-eps8-s1", "t-nodp-s1"]
    eps8, nodp = results["summary"]
    assert eps8["n"] == 2 and 0.9 * 8 < eps8["epsilon"][0] <= 8 and nodp["epsilon"] is None
    assert json.loads((tmp_path / "outputs" / "t" / "results.json").read_text())["rows"] == results["rows"]
    table = doc.read_text()
    assert "![t](results/t.png)" in table and (tmp_path / "results" / "t.png").stat().st_size > 0
    assert "| eps8 | 2 |" in table and "(record-level, rdp, δ=0.001)" in table and "∞ (no DP)" in table

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(flows.study, "dplora_pipeline", no_training)
    assert run_study(study)["rows"] == results["rows"]
    training = tmp_path / "outputs" / "t-nodp-s1" / "training.json"
    training.write_bytes(training.read_bytes() + b"\n")  # trained again since metrics.json was evaluated
    rows = run_study(study, run_missing=False, use_records=False)["rows"]  # run directories only
    assert [r["name"] for r in rows] == ["t-eps8-s0", "t-nodp-s0", "t-eps8-s1"]
    assert "3 of 4 runs finished so far" in doc.read_text()


def test_a_run_from_before_a_new_config_field_still_counts(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    """A field added later with a default that keeps the old behaviour does not make finished runs stale."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    stored = cfg.model_dump(mode="json")
    del stored["federation"]["warmup_steps"]
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "training.json").write_text(json.dumps({"config": stored}))
    (cfg.run_dir / "metrics.json").write_text(json.dumps({"test": {}}))
    assert finished_run(cfg) == ({"test": {}}, {"config": stored})
    assert finished_run(cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"warmup_steps": 2})})) is None
    ray = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"kind": "ray"})})
    assert finished_run(ray) is not None  # the same training, run by another executor
    more_rounds = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 9})})
    assert finished_run(more_rounds) is None  # resumable, but not the same finished run


def test_a_run_from_before_cap_sampling_counts_as_the_first_n_records(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    """A field whose default changed behaviour reads, in a config that predates it, as the old behaviour."""
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    stored = cfg.model_dump(mode="json")
    del stored["data"]["cap_sampling"]  # written before 2026-12-04: its caps kept the first N records
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "training.json").write_text(json.dumps({"config": stored}))
    (cfg.run_dir / "metrics.json").write_text(json.dumps({"test": {}}))
    assert finished_run(cfg) is None  # today's default, stratified, would validate on other records
    first = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cap_sampling": "first"})})
    assert finished_run(first) is not None


def test_a_run_of_an_edited_study_is_set_aside_not_resumed(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir)
    save_checkpoint(cfg.run_dir / "checkpoint", round_num=1, adapter=b"a", state={"config": cfg.flat()})
    assert set_aside_superseded(cfg) is None  # same config: resumed, left in place
    edited = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"warmup_steps": 2})})
    moved = set_aside_superseded(edited)
    assert moved is not None and moved.name.startswith(f"{cfg.run_dir.name}.superseded-")
    assert not cfg.run_dir.exists() and load_checkpoint(moved / "checkpoint") is not None


def test_a_partial_study_says_how_many_runs_it_has(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    study = StudyConfig(name="p", base="b.yaml", seeds=(0, 1), results_doc=str(doc), axes={"privacy": {"eps8": {}}})
    row = {"name": "p-eps8-s0", "levels": {"privacy": "eps8"}, "seed": 0, "val_accuracy": 0.65, "val_loss": 0.8,
           "test_accuracy": 0.7, "test_macro_f1": 0.5,
           "zero_shot_accuracy": 0.36, "majority_class_accuracy": 0.59, "epsilon": 7.99, "delta": 1e-5,
           "privacy_mode": "sample", "accountant": "rdp", "guarantee": "...", "upload_bytes_per_client_round": 125432.0,
           "train_seconds": 700.0}
    results = publish(study, tmp_path / "outputs", [row], {"p-eps8-s1": "RoundFailed: below quorum"}, planned=2)
    text = doc.read_text()
    cells = ["eps8", "1", "0.650", "0.800", "0.700", "0.500", "0.360", "0.590", "7.99 (record-level, rdp, δ=1e-05)",
             "125,432", "700"]
    assert "| " + " | ".join(cells) + " |" in text
    assert "1 of 2 runs finished so far" in text and "Failed cells (re-run the command to retry): p-eps8-s1" in text
    assert "Stopped by the budget guard" not in text
    # as returned, one seed's sd (NaN) as null: standard JSON
    assert json.loads((tmp_path / "outputs" / "p" / "results.json").read_text()) == json.loads(json_bytes(results))


def test_a_run_stopped_before_its_planned_rounds_is_named(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    study = StudyConfig(name="p", base="b.yaml", results_doc=str(doc), axes={"privacy": {"eps8": {}}})
    row = {"name": "p-eps8-s0", "levels": {"privacy": "eps8"}, "seed": 0, "val_accuracy": 0.65, "val_loss": 0.8,
           "test_accuracy": 0.7, "test_macro_f1": 0.5, "zero_shot_accuracy": 0.36, "majority_class_accuracy": 0.59,
           "epsilon": 8.0, "delta": 1e-5, "privacy_mode": "sample", "accountant": "rdp", "guarantee": "...",
           "upload_bytes_per_client_round": 1.0, "train_seconds": 1.0, "rounds": 2, "planned_rounds": 3}
    publish(study, tmp_path / "outputs", [row], {}, planned=1)
    assert "Stopped by the budget guard before their planned rounds (as after an interrupted round, charged again): " \
        "p-eps8-s0 (2 of 3)" in doc.read_text()


def test_mode_distributed_s_server_view_is_tabulated_as_mean_and_sd_over_seeds(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    study = StudyConfig(name="d", base="b.yaml", seeds=(0, 1), results_doc=str(doc), axes={"privacy": {"dist": {}}})

    def row(seed: int, server_view: float) -> dict[str, object]:
        return {"name": f"d-dist-s{seed}", "levels": {"privacy": "dist"}, "seed": seed, "test_accuracy": 0.7,
                "test_macro_f1": 0.5, "zero_shot_accuracy": 0.36, "majority_class_accuracy": 0.59, "epsilon": 8.0,
                "server_view_epsilon": server_view, "delta": 1e-5, "privacy_mode": "distributed", "accountant": "rdp",
                "guarantee": "...", "upload_bytes_per_client_round": 1.0, "train_seconds": 1.0}

    publish(study, tmp_path / "outputs", [row(0, 10.0), row(1, 12.0)], {}, planned=2)
    assert "; each upload, as the server sees it: 11.00 ± 1.41 |" in doc.read_text()


def test_a_frontier_study_plots_accuracy_against_epsilon(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    study = StudyConfig(name="f", base="b.yaml", results_doc=str(doc), frontier="privacy",
                        axes={"partition": {"iid": {}},
                              "privacy": {"eps2": {}, "eps8": {}, "no-dp": {}, "centralised": {}}})

    def row(level: str, epsilon: float | None, accuracy: float) -> dict[str, object]:
        return {"name": f"f-iid-{level}-s0", "levels": {"partition": "iid", "privacy": level}, "seed": 0,
                "test_accuracy": accuracy, "test_macro_f1": accuracy - 0.2, "zero_shot_accuracy": 0.36,
                "majority_class_accuracy": 0.59, "epsilon": epsilon, "delta": 1e-5 if epsilon else None,
                "privacy_mode": "sample" if epsilon else "none", "accountant": "rdp" if epsilon else None,
                "guarantee": "...", "upload_bytes_per_client_round": 1.0, "train_seconds": 1.0}

    rows = [row("eps2", 1.99, 0.6), row("eps8", 7.99, 0.7), row("no-dp", None, 0.75), row("centralised", None, 0.8)]
    publish(study, tmp_path / "outputs", rows, {}, planned=4)
    assert "![f-frontier](results/f-frontier.png)" in doc.read_text()
    assert (tmp_path / "results" / "f-frontier.png").stat().st_size > 0


@pytest.mark.parametrize(("group", "level", "label"), [
    ((), "no-dp", "no-dp"),  # a study with one axis: no group to name, and never "record-level DP: no-dp"
    (("iid",), "centralised", "iid: centralised (no DP)"),
    (("dirichlet0.5",), "federated-nodp", "dirichlet0.5: federated-nodp"),
    (("iid",), "dp-clip-off", "iid: dp-clip-off (no DP)"),  # "dp" in a name does not make it say no DP
])
def test_a_frontier_plot_labels_each_run_without_dp_by_its_level(
    group: tuple[str, ...], level: str, label: str
) -> None:
    assert no_dp_label(group, level) == label


def test_a_frontier_must_be_one_of_the_axes() -> None:
    with pytest.raises(ValueError, match="frontier: eps is not an axis"):
        StudyConfig(name="f", base="b.yaml", frontier="eps", axes={"privacy": {"eps8": {}}})


def test_a_study_without_finished_runs_replaces_an_old_table(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("intro\n\n<!-- study:e -->\n| old | table |\n<!-- /study:e -->\n")
    study = StudyConfig(name="e", base="b.yaml", seeds=(1, 2), results_doc=str(doc), axes={"privacy": {"eps8": {}}})
    publish(study, tmp_path / "outputs", [], {}, planned=2)
    assert "old" not in doc.read_text() and "0 of 2" in doc.read_text() and doc.read_text().startswith("intro")


def test_a_study_without_finished_runs_removes_its_old_plots(tmp_path: Path) -> None:
    study = StudyConfig(name="e", base="b.yaml", results_doc=str(tmp_path / "results.md"), frontier="privacy",
                        axes={"privacy": {"eps8": {}}})
    plots = [tmp_path / "results" / "e.png", tmp_path / "results" / "e-frontier.png"]
    for png in plots:
        png.parent.mkdir(exist_ok=True)
        png.write_bytes(b"an old plot")
    publish(study, tmp_path / "outputs", [], {}, planned=1)
    assert not any(png.exists() for png in plots)


def table_cells(text: str) -> list[list[str]]:
    """The body rows of the one markdown table in text, each as its cells."""
    return [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]


def test_a_non_iid_study_tabulates_each_seed_s_partition_and_its_cells_accuracy(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    from dplora_core.data import label_histogram, partition_dirichlet, task_spec
    from dplora_core.privacy.accountant import calibrate_noise_multiplier
    from tasks.runtime import split_examples

    base = tiny_config(tiny_model_dir, tmp_path, raw_dir).model_dump(mode="json")
    study = StudyConfig(name="s", base="b.yaml", seeds=(0, 1), axes=AXES,
                        exclude=({"partition": "dir", "privacy": "nodp", "seeds": [0]},))
    cells = expand(study, base)
    row = {"name": "s-dir-eps4-s1", "test_accuracy": 0.7, "test_macro_f1": 0.5}
    text = flows.study.partition_table(cells, [row])
    rows = table_cells(text)
    assert "outside DP" in text.splitlines()[0]  # the clients' exact label counts are not covered by any epsilon
    assert [r[:2] for r in rows] == [["0", "dirichlet α=0.5"], ["1", "dirichlet α=0.5"]]  # the IID cells have none
    assert "| eps4 | nodp |" in text
    assert rows[1][5:] == ["0.700 (0.500)", "-"] and rows[0][5:] == ["-", "excluded"]
    cfg = cells[-1].config  # dir, nodp, seed 1: the partition the row describes
    train = split_examples(cfg.data, "train")
    shards = partition_dirichlet([e.label for e in train], 2, alpha=0.5, seed=1)
    hists = [label_histogram([train[i] for i in s], task_spec(cfg.data).labels) for s in shards]
    shares = [f"{len(s)} ({h['neutral'] / len(s):.0%})" for s, h in zip(shards, hists, strict=True)]
    assert rows[1][2] == ", ".join(shares)
    rates = [min(1.0, cfg.federation.batch_size / len(s)) for s in shards]
    sigmas = [calibrate_noise_multiplier(target_epsilon=4, delta=cfg.privacy.delta, sample_rate=q,
                                         steps=cfg.federation.local_steps, rounds=cfg.federation.rounds,
                                         kind=cfg.privacy.accountant)
              for q in rates]
    assert rows[1][4] == f"ε=4 (record-level, {cfg.privacy.accountant}, δ={cfg.privacy.delta:g}): " + ", ".join(
        f"{z:.2f}" for z in sigmas)


def test_an_iid_study_has_no_partition_table() -> None:
    study = StudyConfig(name="s", base="b.yaml", axes={"privacy": AXES["privacy"]})
    assert flows.study.partition_table(expand(study, BASE), []) == ""


ONE_ROUND = [{"round": 1, "val_accuracy": 0.7, "val_loss": 0.8}]


def fake_pipeline(
    calls: list[str], history: list[dict[str, float]] = ONE_ROUND, test: dict[str, object] | None = None
) -> Callable[[ExperimentConfig, bool], dict[str, object]]:
    """Stands in for `dplora_pipeline`: writes a finished run's training.json and metrics.json (`test`: extra
    entries of its metrics' test section)."""

    def run(cfg: ExperimentConfig, resume: bool) -> dict[str, object]:
        calls.append(cfg.name)
        training = json.dumps({"config": cfg.model_dump(mode="json"), "history": history}).encode()
        metrics = {"test": {"final": {"accuracy": 0.75, "macro_f1": 0.6}, "zero_shot": {"accuracy": 0.36},
                            "majority_class_accuracy": 0.59, **(test or {})},
                   "privacy": {"epsilon": None, "delta": None, "mode": "none", "accountant": None, "guarantee": "none"},
                   "bytes": {"up": 100}, "train_seconds": 1.0, "rounds": 1,
                   "training_sha256": hashlib.sha256(training).hexdigest()}
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "training.json").write_bytes(training)
        (cfg.run_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return run


def record_study(tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, lr: float = 0.01) -> StudyConfig:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=1,
                                               privacy__mode="none").model_dump(mode="json")))
    return StudyConfig(name="r", base=str(base), seeds=(0, 1), results_doc=str(tmp_path / "results.md"),
                       axes={"lr": {"low": {"federation.learning_rate": lr}}})


Recorded = tuple[StudyConfig, list[str]]  # the study, and the runs its fake training trained


@pytest.fixture
def recorded(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> Recorded:
    """`record_study` with `fake_pipeline` for training, and the names of the runs it trains, in order."""
    calls: list[str] = []
    monkeypatch.setattr(flows.study, "dplora_pipeline", fake_pipeline(calls))
    return record_study(tiny_model_dir, raw_dir, tmp_path), calls


def test_a_fresh_clone_reads_finished_runs_back_from_their_committed_records(
    recorded: Recorded, tmp_path: Path
) -> None:
    study, calls = recorded
    first = run_study(study)
    record = json.loads((tmp_path / "results" / "runs" / "r" / "r-low-s1.json").read_text())
    assert record["config"]["federation"]["seed"] == 1 and record["history"][0]["val_accuracy"] == 0.7
    shutil.rmtree(tmp_path / "outputs")  # a fresh clone: no run directories
    assert run_study(study)["rows"] == first["rows"] and calls == ["r-low-s0", "r-low-s1"]


def test_a_record_of_another_config_does_not_count(
    recorded: Recorded, tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    study, calls = recorded
    run_study(study)
    shutil.rmtree(tmp_path / "outputs")
    run_study(record_study(tiny_model_dir, raw_dir, tmp_path, lr=0.02))  # the same cell names, edited
    assert calls == ["r-low-s0", "r-low-s1"] * 2
    record = json.loads((tmp_path / "results" / "runs" / "r" / "r-low-s0.json").read_text())
    assert record["config"]["federation"]["learning_rate"] == 0.02  # the new run replaced the stale record


def test_ignoring_records_runs_the_recorded_cells_again(recorded: Recorded, tmp_path: Path) -> None:
    study, calls = recorded
    run_study(study)
    shutil.rmtree(tmp_path / "outputs")
    assert run_study(study, run_missing=False, use_records=False)["rows"] == []
    run_study(study, use_records=False)
    assert calls == ["r-low-s0", "r-low-s1"] * 2


def test_a_run_another_study_recorded_with_the_same_config_is_reused_not_trained_again(
    recorded: Recorded, tmp_path: Path
) -> None:
    study, calls = recorded
    run_study(study, only=["*-s0"])
    twin = study.model_copy(update={"name": "t", "axes": {"rate": {"same": {"federation.learning_rate": 0.01},
                                                                    "other": {"federation.learning_rate": 0.02}}}})
    rows = run_study(twin, only=["t-same-s0", "t-other-s0"])["rows"]
    assert calls == ["r-low-s0", "t-other-s0"]  # t-same-s0 trains what r-low-s0 trained
    assert [r["name"] for r in rows] == ["t-same-s0", "t-other-s0"]
    copied = json.loads((tmp_path / "results" / "runs" / "t" / "t-same-s0.json").read_text())
    assert copied["trained_as"] == "r/r-low-s0" and copied["config"]["name"] == "t-same-s0"
    assert copied["row"]["name"] == "t-same-s0" and copied["row"]["levels"] == {"rate": "same"}


def test_only_trains_the_runs_it_names_and_tabulates_the_others_finished_runs(recorded: Recorded) -> None:
    study, calls = recorded
    assert [r["name"] for r in run_study(study, only=["*-s1"])["rows"]] == ["r-low-s1"] and calls == ["r-low-s1"]
    assert [r["name"] for r in run_study(study, only=["r-low-s0"])["rows"]] == ["r-low-s0", "r-low-s1"]
    assert calls == ["r-low-s1", "r-low-s0"]


def spy_on_publish(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The run names of each table `run_study` publishes from now on, in order (publishing still happens)."""
    tables: list[list[str]] = []

    def spy(study: StudyConfig, output_dir: Path, rows: list[dict[str, object]], *args: object) -> object:
        tables.append([str(r["name"]) for r in rows])
        return publish(study, output_dir, rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(flows.study, "publish", spy)
    return tables


def test_the_table_written_after_a_run_keeps_the_finished_runs_of_later_cells(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted study's document keeps every row it had, not only those of the cells before the cut."""
    study, calls = recorded
    run_study(study, only=["*-s1"])
    tables = spy_on_publish(monkeypatch)
    run_study(study)  # trains s0, the first cell; s1 is finished
    assert calls == ["r-low-s1", "r-low-s0"]
    assert tables[0] == ["r-low-s0", "r-low-s1"]  # written just after s0 trained


def test_a_study_whose_last_cell_trained_writes_its_table_once_after_it(
    recorded: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    study, calls = recorded
    written = spy_on_publish(monkeypatch)
    assert [r["name"] for r in run_study(study)["rows"]] == ["r-low-s0", "r-low-s1"]
    assert calls == ["r-low-s0", "r-low-s1"]
    assert written == [["r-low-s0"], ["r-low-s0", "r-low-s1"]]  # after each run, and not again at the end


def test_only_naming_no_run_exits_2_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE | {"tracking": {"output_dir": str(tmp_path / "outputs")}}))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "base": str(base), "axes": {"p": {"x": {}}}}))
    assert main(["study", str(study), "--only", "*-s0", "--only", "*-s9"]) == 2
    assert "--only *-s9 names none of the study's 1 runs (e.g. s-x-s0)" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_the_recorded_commit_is_dirty_for_code_changes_not_for_the_study_s_own_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "docs" / "results" / "runs").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "results.md").write_text("table\n")
    (tmp_path / "docs" / "results" / "runs" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    study = StudyConfig(name="r", base="params.yaml", results_doc="docs/results.md", axes={"a": {"b": {}}})
    (tmp_path / "docs" / "results.md").write_text("new table\n")
    (tmp_path / "docs" / "results" / "runs" / "r.json").write_text('{"row": 1}\n')
    version = flows.study.code_version(study)
    assert version is not None and not version.endswith("+dirty")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert str(flows.study.code_version(study)).endswith("+dirty")


def test_a_record_names_the_commit_the_study_started_on_not_later_edits_or_none_if_unknown(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study runs for hours with the code it loaded; an edit to the checkout meanwhile is not what ran."""
    (tmp_path / "code.py").write_text("x = 1\n")
    identity = ("-c", "user.name=t", "-c", "user.email=t@t")
    for args in (("init", "-q"), ("add", "code.py"), (*identity, "commit", "-qm", "init")):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    train = fake_pipeline(calls)

    def train_then_edit(cfg: ExperimentConfig, resume: bool) -> dict[str, object]:
        (tmp_path / "code.py").write_text("x = 2\n")  # someone edits the code while the study runs
        return train(cfg, resume)

    monkeypatch.setattr(flows.study, "dplora_pipeline", train_then_edit)
    run_study(record_study(tiny_model_dir, raw_dir, tmp_path))
    records = tmp_path / "results" / "runs" / "r"
    commits = {json.loads(f.read_text())["commit"] for f in records.glob("*.json")}
    assert len(commits) == 1 and not commits.pop().endswith("+dirty")
    shutil.rmtree(records)  # run directories without records: which code trained them is not known here
    run_study(record_study(tiny_model_dir, raw_dir, tmp_path))
    assert {json.loads(f.read_text())["commit"] for f in records.glob("*.json")} == {None}


def test_a_cell_whose_files_do_not_read_is_listed_failed_and_the_others_still_count(
    recorded: Recorded, tmp_path: Path
) -> None:
    study, calls = recorded
    run_study(study)
    broken = tmp_path / "outputs" / "r-low-s0" / "training.json"
    broken.write_text('{"config": ')  # e.g. a disk that filled up outside atomic_write
    results = run_study(study)
    assert [r["name"] for r in results["rows"]] == ["r-low-s1"] and calls == ["r-low-s0", "r-low-s1"]
    assert results["failed"]["r-low-s0"].startswith(f"ValueError: {broken}: not valid JSON")


def test_a_run_the_budget_guard_stopped_before_its_first_round_still_has_a_row(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flows.study, "dplora_pipeline", fake_pipeline([], history=[]))
    results = run_study(record_study(tiny_model_dir, raw_dir, tmp_path))
    assert [(r["name"], r["val_accuracy"], r["test_accuracy"]) for r in results["rows"]] == [
        ("r-low-s0", None, 0.75), ("r-low-s1", None, 0.75)]


def test_a_run_s_record_keeps_its_test_confusion_matrix_with_its_labels(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = [[3, 1], [0, 4]]
    test = {"labels": ["no", "yes"], "final": {"accuracy": 0.875, "macro_f1": 0.87, "confusion": counts}}
    monkeypatch.setattr(flows.study, "dplora_pipeline", fake_pipeline([], test=test))
    results = run_study(record_study(tiny_model_dir, raw_dir, tmp_path))
    assert results["rows"][0]["test_confusion"] == {"labels": ["no", "yes"], "counts": counts}


def test_the_recall_table_averages_each_labels_recall_and_answers_over_seeds() -> None:
    def row(cell: str, counts: list[list[int]]) -> dict[str, object]:
        return {"levels": {"training": cell}, "test_confusion": {"labels": ["no", "yes"], "counts": counts}}

    rows = [row("dp", [[3, 1], [2, 4]]), row("dp", [[1, 3], [0, 6]]), row("nodp", [[4, 0], [1, 5]]),
            {"levels": {"training": "old"}}]  # a record from before the confusion matrix: no row
    assert flows.study.recall_table(rows).splitlines()[2:] == [
        "| training | runs | recall no | recall yes | answers no / yes |",
        "|---|---|---|---|---|",
        "| dp | 2 | 0.500 ± 0.354 | 0.833 ± 0.236 | 3 / 7 |",
        "| nodp | 1 | 1.000 | 0.833 | 5 / 5 |",
    ]


def test_runs_without_a_confusion_matrix_give_no_recall_table() -> None:
    assert flows.study.recall_table([{"levels": {"training": "old"}}]) == ""


def test_the_recall_table_leaves_out_a_run_tested_on_another_split_and_dashes_a_label_without_records() -> None:
    def row(name: str, counts: list[list[int]]) -> dict[str, object]:
        return {"name": name, "levels": {"training": name},
                "test_confusion": {"labels": ["no", "maybe", "yes"], "counts": counts}}

    table = flows.study.recall_table([row("a", [[2, 0, 0], [0, 0, 0], [1, 0, 1]]),
                                      row("b", [[1, 0, 0], [0, 1, 0], [0, 0, 1]])])
    assert "| a | 1 | 1.000 | - | 0.500 | 3 / 0 / 1 |" in table.splitlines()
    assert table.splitlines()[-1] == "Left out, tested on another split: b"
