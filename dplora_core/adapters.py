"""Adapter state: only LoRA tensors travel, as safetensors bytes (never pickle)."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

AdapterState = dict[str, torch.Tensor]


class AdapterError(ValueError):
    """An adapter whose keys, shapes or values do not fit the model; names the source."""


def adapter_state(model: PeftModel) -> AdapterState:
    """The LoRA tensors of `model`, detached float32 CPU copies, peft key names."""
    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def upload_state(state: AdapterState, *, freeze_a: bool) -> AdapterState:
    """What a client sends back: every adapter tensor, or only the B matrices under freeze_a (A never changes)."""
    return {k: v for k, v in state.items() if not (freeze_a and ".lora_A." in k)}


def check_adapter(state: AdapterState, reference: AdapterState, *, source: str) -> None:
    """Raise AdapterError if `state` has missing/unexpected keys, wrong shapes or non-finite values."""
    missing = sorted(reference.keys() - state.keys())
    unexpected = sorted(state.keys() - reference.keys())
    if missing or unexpected:
        raise AdapterError(
            f"{source}: adapter keys do not match the model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, ref in reference.items():
        if state[key].shape != ref.shape:
            raise AdapterError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(state[key]).all():
            raise AdapterError(f"{source}: {key} has non-finite values")


def load_adapter_state(model: PeftModel, state: AdapterState, *, source: str) -> None:
    """Check `state` against the model's adapter, then copy it in."""
    check_adapter(state, adapter_state(model), source=source)
    result: Any = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise AdapterError(f"{source}: peft rejected keys {result.unexpected_keys[:3]}")


def to_bytes(state: AdapterState, *, metadata: dict[str, str] | None = None) -> bytes:
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def from_bytes(payload: bytes, *, source: str) -> AdapterState:
    try:
        return dict(st_load(payload))
    except Exception as err:  # safetensors raises its own error types
        raise AdapterError(f"{source}: not a safetensors adapter payload: {err}") from err
