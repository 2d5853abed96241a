from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parent.parent


def test_prefect_yaml_entrypoints_are_flows_with_a_config_path_parameter() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        module_path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow)
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        assert (ROOT / deployment["parameters"]["config_path"]).is_file()
