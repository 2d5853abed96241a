from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dplora_core.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("study-"))
STUDIES = sorted((ROOT / "configs").glob("study-*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    assert isinstance(load_config(path), ExperimentConfig)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_expand_to_valid_configs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dplora_core.study import expand, load_study

    monkeypatch.chdir(ROOT)  # a study's base path is relative to the project
    study = load_study(path)
    cells = expand(study, yaml.safe_load(Path(study.base).read_text()))
    assert len(cells) >= len(study.seeds) and all(c.config.name.startswith(study.name) for c in cells)


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    ("tree", "field", "reason"),
    [
        ({"federation": {"num_clients": 2, "clients_per_round": 3}}, "federation", "clients_per_round (3) must be <="),
        ({"privacy": {"target_epsilon": None}}, "privacy", "needs target_epsilon"),
        ({"federation": {"clients_per_round": 2, "min_clients": 3}}, "federation", "min_clients (3) must be <="),
        ({"federation": {"client_timeout_seconds": 0}}, "federation.client_timeout_seconds", "greater than 0"),
        ({"privacy": {"mode": "dp"}}, "privacy.mode", "Input should be"),
        ({"privacy": {"delta": 1.5}}, "privacy.delta", "less than 1"),
        ({"federation": {"learning_rate": -1}}, "federation.learning_rate", "greater than 0"),
        ({"lora": {"rank": 0}}, "lora.rank", "greater than or equal to 1"),
        ({"lora": {"rnak": 4}}, "lora.rnak", "Extra inputs are not permitted"),
        ({"data": {"dataset": "imdb"}}, "data.dataset", "financial_phrasebank"),
        ({"federation": {"batch_size": 8, "microbatch_size": 16}}, "microbatch_size (16) must be <=", ""),
        ({"data": {"prompt_template": "Sentiment:"}}, "data.prompt_template", "{text}"),
        ({"data": {"dataset": "custom"}}, "data", "data.custom describes the file of data.dataset: custom"),
        (
            {"data": {"dataset": "custom", "custom": {"path": "c.csv", "labels": ["0", "1"]}}},
            "data", "needs data.prompt_template",
        ),
        (
            {"data": {"dataset": "custom", "prompt_template": "{text} A:",
                      "custom": {"path": "c.csv", "labels": ["0", "1"], "label_words": ["bad"]}}},
            "data.custom", "has 1 words for 2 labels",
        ),
        ({"runner": {"kind": "spark"}}, "runner.kind", "Input should be"),
        ({"runner": {"address": "tcp://127.0.0.1:8786"}}, "runner", "runner.address is for runner.kind dask or ray"),
        (
            {"federation": {"num_clients": 2, "clients_per_round": 2, "exchange_dir": "x",
                            "silos": [{"name": "a", "num_examples": 9}]}},
            "federation", "federation.silos has 1 entries, federation.num_clients is 2",
        ),
        (
            {"federation": {"num_clients": 1, "clients_per_round": 1, "silos": [{"name": "a", "num_examples": 9}]}},
            "federation", "needs federation.exchange_dir",
        ),
        (
            {"federation": {"num_clients": 2, "clients_per_round": 2, "exchange_dir": "x",
                            "silos": [{"name": "a", "num_examples": 9}, {"name": "a", "num_examples": 5}]}},
            "federation", "names must be unique",
        ),
        ({"federation": {"exchange_dir": "x"}}, "federation", "exchange_dir is for cross-silo runs"),
        ({"federation": {"momentum": 0.9}}, "federation", "momentum (0.9) is for federation.optimizer sgd, not adamw"),
        ({"federation": {"optimizer": "lion"}}, "federation.optimizer", "Input should be"),
        ({"federation": {"server_optimizer": "lamb"}}, "federation.server_optimizer", "Input should be"),
        (
            {"privacy": {"mode": "distributed"}, "federation": {"optimizer": "sgd"}},
            "federation.local_steps is 4", "privacy.mode distributed needs 1",
        ),
        (
            {"privacy": {"mode": "distributed"}, "federation": {"local_steps": 1}},
            "federation.optimizer is 'adamw'", "needs 'sgd'",
        ),
        (
            {"privacy": {"mode": "distributed"},
             "federation": {"local_steps": 1, "optimizer": "sgd", "warmup_steps": 2}},
            "federation.warmup_steps is 2", "needs 0",
        ),
        (
            {"privacy": {"mode": "distributed"},
             "federation": {"local_steps": 1, "optimizer": "sgd", "upload_codec": "float16"}},
            "federation.upload_codec is 'float16'", "the uploads add up",
        ),
        (
            {"privacy": {"mode": "distributed", "upload_noise_std": 0.1},
             "federation": {"local_steps": 1, "optimizer": "sgd"}},
            "privacy.upload_noise_std is 0.1", "needs 0.0",
        ),
        (
            {"privacy": {"mode": "distributed"},
             "federation": {"local_steps": 1, "optimizer": "sgd", "num_clients": 4, "clients_per_round": 1}},
            "privacy.mode distributed needs a quorum of at least 2 clients", "each client knows its own share",
        ),
        (
            {"privacy": {"mode": "client"}, "federation": {"client_weights": "records"}},
            "federation.client_weights records is not for privacy.mode client", "the unweighted sum",
        ),
        ({"federation": {"client_weights": "size"}}, "federation.client_weights", "Input should be"),
        ({"privacy": {"max_grad_norm": float("inf")}}, "privacy.max_grad_norm", "Input should be a finite number"),
        (
            {"federation": {"server_optimizer": "adam"}},
            "federation.server_optimizer adam needs federation.server_learning_rate set", "its default, 1",
        ),
        (
            {"privacy": {"mode": "client"}, "federation": {"min_clients": 2}},
            "federation.min_clients is not for privacy.mode client", "a failed client adds zero",
        ),
        (
            {"privacy": {"mode": "client", "delta": 0.05}, "federation": {"num_clients": 4}},
            "privacy.delta (0.05) is too large for the client population (federation.num_clients)", "delta * n = 0.2",
        ),
        (
            {"privacy": {"delta": 0.02}, "federation": {"num_clients": 2, "clients_per_round": 2, "exchange_dir": "x",
                                                        "silos": [{"name": "bank", "num_examples": 4},
                                                                  {"name": "clinic", "num_examples": 5}]}},
            "too large for the silos' records together (federation.silos[*].num_examples)", "(9 records or clients)",
        ),
    ],
)
def test_bad_config_names_field_and_reason(tmp_path: Path, tree: dict, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, tree))
    assert field in str(err.value)
    assert reason in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_not_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("privacy: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_flat_view_has_dotted_keys() -> None:
    flat = ExperimentConfig().flat()
    assert flat["privacy.delta"] == 1e-5
    assert flat["federation.num_clients"] == 4


@pytest.mark.parametrize(
    ("mode", "weights"),
    [("none", "records"), ("sample", "records"), ("paper", "equal"), ("client", "equal"), ("distributed", "equal")],
)
def test_fedavg_weights_default_to_the_modes_own(mode: str, weights: str) -> None:
    base = ExperimentConfig()  # model_copy skips the validators: only the resolver is under test
    cfg = base.model_copy(update={"privacy": base.privacy.model_copy(update={"mode": mode})})
    assert cfg.fedavg_weights() == weights


def test_fedavg_weights_follow_the_config_when_set() -> None:
    cfg = ExperimentConfig.model_validate({"privacy": {"mode": "paper"}, "federation": {"client_weights": "records"}})
    assert cfg.fedavg_weights() == "records"


def test_cli_exits_2_on_bad_config_before_any_work(tmp_path: Path) -> None:
    path = write(tmp_path, {"federation": {"num_clients": 2, "clients_per_round": 3},
                            "tracking": {"output_dir": str(tmp_path / "out")}})
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert "federation" in proc.stderr and "clients_per_round" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()
