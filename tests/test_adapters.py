from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dplora_core.adapters import AdapterError, adapter_state, from_bytes, load_adapter_state, to_bytes
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.model import attach_lora, init_lora_state, load_base_model


def lora_model(model_dir: Path):
    base, tok = load_base_model(ModelConfig(path=str(model_dir), gguf_file=None, device="cpu"))
    return attach_lora(base, LoraConfig(rank=2, alpha=4)), tok


def test_only_lora_tensors_travel(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    state = adapter_state(model)
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adapter_round_trip_through_safetensors_bytes(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, from_bytes(to_bytes(state), source="test"), source="test")
    ids = torch.tensor([[3, 4, 5, 6]])
    out_a = model(input_ids=ids).logits
    other, _ = lora_model(tiny_model_dir)
    load_adapter_state(other, from_bytes(to_bytes(adapter_state(model)), source="test"), source="test")
    torch.testing.assert_close(other(input_ids=ids).logits, out_a)
    for k, v in adapter_state(other).items():
        torch.testing.assert_close(v, state[k])


def test_initial_adapter_is_the_base_model(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    load_adapter_state(model, init_lora_state(model, seed=0), source="init")
    ids = torch.tensor([[3, 4, 5, 6]])
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_load_rejects_missing_and_unexpected_keys(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    state = adapter_state(model)
    key = next(iter(state))
    broken = {k: v for k, v in state.items() if k != key} | {"base_model.model.evil.weight": torch.zeros(1)}
    with pytest.raises(AdapterError, match=r"client 3.*missing.*unexpected.*evil"):
        load_adapter_state(model, broken, source="client 3")


def test_load_rejects_wrong_shape_and_non_finite(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    state = adapter_state(model)
    key = next(iter(state))
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter_state(model, state | {key: torch.zeros(1, 1)}, source="client 1")
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter_state(model, state | {key: torch.full_like(state[key], float("nan"))}, source="client 1")


def test_garbage_payload_is_an_adapter_error() -> None:
    with pytest.raises(AdapterError, match="client 2: not a safetensors"):
        from_bytes(b"\x80\x04pickle-ish", source="client 2")


def test_upload_under_freeze_a_holds_only_b(tiny_model_dir: Path) -> None:
    from dplora_core.adapters import upload_state

    model, _ = lora_model(tiny_model_dir)
    state = adapter_state(model)
    up = upload_state(state, freeze_a=True)
    assert up and all(".lora_B." in k for k in up)
    assert set(upload_state(state, freeze_a=False)) == set(state)
