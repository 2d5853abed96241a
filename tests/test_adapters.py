from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dplora_core.adapters import AdapterError, adapter_state, from_bytes, load_adapter_state, to_bytes
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.model import adapter_disabled, attach_lora, check_trainable, init_lora_state, load_base_model


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


FROZEN_A = LoraConfig(rank=2, alpha=4, freeze_a=True)


def frozen_a_model(model_dir: Path):
    base, _ = load_base_model(ModelConfig(path=str(model_dir), gguf_file=None, device="cpu"))
    return attach_lora(base, FROZEN_A)


def test_scoring_the_base_model_leaves_a_frozen_a_frozen(tiny_model_dir: Path) -> None:
    model = frozen_a_model(tiny_model_dir)
    with adapter_disabled(model):
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    check_trainable(model, FROZEN_A)  # raises if A trains
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_A" in name)


def test_peft_disable_adapter_alone_unfreezes_a_and_training_refuses_the_model(tiny_model_dir: Path) -> None:
    """Why adapter_disabled exists: on exit peft marks every adapter weight trainable; check_trainable (run before
    each client trains) names it instead of training A against lora.freeze_a."""
    model = frozen_a_model(tiny_model_dir)
    with model.disable_adapter():
        pass
    with pytest.raises(ValueError, match=r"would train against lora.freeze_a=True \(e.g. .*lora_A"):
        check_trainable(model, FROZEN_A)


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


def test_svd_initial_a_reads_the_directions_the_frozen_weight_amplifies_most(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    state = init_lora_state(model, seed=0, init_a="svd")
    key = next(k for k in state if "lora_A" in k)
    weight = model.get_submodule(key.split(".lora_A")[0]).base_layer.weight.detach().float()  # (out, in)
    a = state[key]  # (r, in)
    top = torch.linalg.svdvals(weight)[: a.shape[0]]
    torch.testing.assert_close(torch.linalg.vector_norm(weight @ a.T, dim=0) * math.sqrt(3.0), top)
    torch.testing.assert_close(a.norm(dim=1), torch.full((a.shape[0],), 1 / math.sqrt(3.0)))  # kaiming's row norm
    assert all("lora_A" in k or v.abs().sum() == 0 for k, v in state.items())  # B = 0: still the base model


def test_svd_initial_a_is_the_same_for_every_seed(tiny_model_dir: Path) -> None:
    model, _ = lora_model(tiny_model_dir)
    first, second = init_lora_state(model, seed=0, init_a="svd"), init_lora_state(model, seed=1, init_a="svd")
    for key, value in first.items():
        torch.testing.assert_close(second[key], value)


def test_the_federation_starts_from_the_configured_initial_a(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    from tasks.runtime import workspace
    from tasks.training import init_adapter
    from tests.helpers import tiny_config

    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, lora__init_a="svd")
    expected = init_lora_state(workspace(cfg.model, cfg.lora).model, seed=cfg.federation.seed, init_a="svd")
    initial = from_bytes(init_adapter.fn(cfg).adapter, source="test")
    for key, value in expected.items():
        torch.testing.assert_close(initial[key], value)


def test_a_target_module_that_is_not_linear_is_refused_naming_the_field(tiny_model_dir: Path) -> None:
    base, _ = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None, device="cpu"))
    with pytest.raises(ValueError, match=r"lora.target_modules: 'embed_tokens' matches .*Embedding"):
        attach_lora(base, LoraConfig(rank=2, alpha=4, target_modules=("q_proj", "embed_tokens")))


def test_a_target_module_the_model_lacks_is_refused_naming_the_field(tiny_model_dir: Path) -> None:
    base, _ = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None, device="cpu"))
    with pytest.raises(ValueError, match=r"lora.target_modules: 'c_attn' names no module"):
        attach_lora(base, LoraConfig(rank=2, alpha=4, target_modules=("c_attn",)))
