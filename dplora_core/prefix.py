"""The frozen prefix: decoder layers below the first LoRA layer compute the same states every step.

With LoRA on the last 10 of SmolLM2's 30 layers, layers 0-19 hold no adapter weight, so the hidden
states entering layer 20 depend on the record alone, not on the adapter, the round or the client's
noise. They are computed once per record (`prefix_states`), and training and evaluation run only the
layers above them (`backbone_states`): a third of the forward pass instead of all of it, with the same
numbers up to floating-point summation order. Nothing of this leaves the client: it is a cache of its
own records' activations under the public base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dplora_core.batching import Batch, Encoded, by_length, collate
from dplora_core.model import backbone_and_head


@dataclass(frozen=True)
class FrozenPrefix:
    """Each record's hidden states entering decoder layer `layers`, one (t_i, h) tensor per record."""

    layers: int
    hidden: Sequence[torch.Tensor]

    def take(self, indices: Sequence[int]) -> FrozenPrefix:
        """The prefix of the records at `indices` (a client's shard of a split)."""
        return FrozenPrefix(self.layers, tuple(self.hidden[i] for i in indices))


def frozen_layers(model: nn.Module) -> int:
    """How many leading decoder layers hold no LoRA module (trainable or not): their output ignores the adapter."""
    backbone, _ = backbone_and_head(model)
    layers: nn.ModuleList = backbone.layers  # type: ignore[assignment]
    for i, layer in enumerate(layers):
        if any(isinstance(m, LoraLayer) for m in layer.modules()):
            return i
    return len(layers)


@contextmanager
def _layers(backbone: Any, keep: slice, *, final_norm: bool) -> Iterator[None]:
    """Run `backbone` with only decoder layers[keep] (and without its final norm if not final_norm)."""
    layers, norm = backbone.layers, backbone.norm
    backbone.layers = nn.ModuleList(list(layers)[keep])
    if not final_norm:
        backbone.norm = nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = layers, norm


@torch.inference_mode()
def prefix_states(
    model: nn.Module, items: Sequence[Encoded], *, layers: int, pad_id: int, batch_size: int
) -> FrozenPrefix:
    """Run embeddings and decoder layers [0, layers) over `items` once; keep each record's states on the CPU."""
    backbone, _ = backbone_and_head(model)
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = [torch.empty(0)] * len(items)
    order = by_length(items)
    with _layers(backbone, slice(0, layers), final_norm=False):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([items[i] for i in chunk], pad_id=pad_id).to(device)
            out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            states = out.last_hidden_state  # (b, t, h)
            for row, i in enumerate(chunk):
                hidden[i] = states[row, : len(items[i].input_ids)].cpu().clone()  # (t_i, h), padding dropped
    prefix = FrozenPrefix(layers, tuple(hidden))
    if items:
        check_reproduces(model, [items[i] for i in order[:4]], prefix.take(order[:4]), pad_id=pad_id)
    return prefix


def reproduce_tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between the full forward pass and the one from cached states: 8 machine
    epsilons of the model's dtype (float32 1e-4 floor). The two passes sum in different orders, so rounding
    differs: seen 1e-6 in float32, up to 2.1e-2 in bfloat16 over SmolLM2's last 10 layers (transformers 5.24).
    An architecture that transforms `inputs_embeds` (Gemma scales them by sqrt(h)) is off by order 1."""
    return max(1e-4, 8 * torch.finfo(dtype).eps)


@torch.inference_mode()
def check_reproduces(model: nn.Module, items: Sequence[Encoded], prefix: FrozenPrefix, *, pad_id: int) -> None:
    """ValueError unless the layers above the prefix, fed its cached states, give the full forward's final states."""
    device = next(model.parameters()).device
    batch = collate(items, pad_id=pad_id).to(device)
    full = backbone_states(model, batch)  # (b, t, h)
    cached = backbone_states(
        model, collate(items, pad_id=pad_id, prefix=prefix.hidden, prefix_layers=prefix.layers).to(device)
    )
    real = batch.attention_mask.bool()  # (b, t)
    error = float((full - cached)[real].float().norm() / full[real].float().norm().clamp(min=1e-12))
    if error > reproduce_tolerance(full.dtype):
        raise ValueError(
            f"model.cache_frozen_prefix: {type(backbone_and_head(model)[0]).__name__} does not reproduce its "
            f"forward pass from cached layer-{prefix.layers} states (relative error {error:.3g}); "
            "set model.cache_frozen_prefix: false"
        )


def backbone_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Final hidden states (b, t, h): from the token ids, or from the batch's frozen-prefix states if it has them."""
    backbone, _ = backbone_and_head(model)
    if batch.prefix is None:
        out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return out.last_hidden_state
    with _layers(backbone, slice(batch.prefix_layers, None), final_norm=True):
        out = backbone(inputs_embeds=batch.prefix, attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state
