"""model.dtype: auto picks bfloat16 only where the device multiplies it natively."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dplora_core import model as model_module
from dplora_core.config import ModelConfig
from dplora_core.model import load_base_model, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_on_a_device_with_native_bfloat16(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(model_module, "native_bfloat16", lambda device: native)
    assert resolve_dtype("auto", CPU) == expected


@pytest.mark.parametrize("native", [True, False])
def test_a_named_dtype_is_taken_as_given(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(model_module, "native_bfloat16", lambda device: native)
    assert [resolve_dtype(n, CPU) for n in ("float32", "bfloat16", "float16")] == [
        torch.float32, torch.bfloat16, torch.float16
    ]


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_loads_the_frozen_weights_in_the_resolved_dtype(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(model_module, "native_bfloat16", lambda device: native)
    model, _ = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None, dtype="auto", device="cpu"))
    assert {p.dtype for p in model.parameters()} == {expected}


def test_bfloat16_without_native_support_loads_but_warns_that_it_is_slow(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module, "native_bfloat16", lambda device: False)
    cfg = ModelConfig(path=str(tiny_model_dir), gguf_file=None, dtype="bfloat16", device="cpu")
    with pytest.warns(UserWarning, match=r"model\.dtype: bfloat16 on a cpu without native bfloat16"):
        model, _ = load_base_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bfloat16_with_native_support_loads_without_a_warning(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_module, "native_bfloat16", lambda device: True)
    cfg = ModelConfig(path=str(tiny_model_dir), gguf_file=None, dtype="bfloat16", device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"model\.dtype")
        load_base_model(cfg)
