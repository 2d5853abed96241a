"""What one client uploads per round, counted from a model's shapes.

LoRA replaces the update of a weight W (d_out x d_in) by B A with A (r x d_in) and B (d_out x r)
(Hu et al., ICLR 2022, Sec. 4.1): r (d_in + d_out) numbers instead of d_in d_out; for a square
n x n matrix that is 2nr, the form DP-LoRA's communication argument uses. Under FFA-LoRA
(`freeze_a`) only B travels: r d_out. Full-model exchange sends every parameter.

Shapes only: a model built on the `meta` device has them without any weights, so a 7B model's
counts come from its published config, with nothing downloaded or allocated.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from dplora_core.model import matches_target

# Llama-2-7B as published (Touvron et al. 2023, Table 1; its Hugging Face config.json), the paper's 7B shape.
LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
)


def shape_model(config: PretrainedConfig) -> torch.nn.Module:
    """The causal LM of `config` with shapes and no storage (meta device)."""
    with torch.device("meta"):
        model: torch.nn.Module = AutoModelForCausalLM.from_config(config)
    return model


def full_parameters(model: torch.nn.Module) -> int:
    """Every parameter, tied weights once: what full-model exchange sends."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def lora_targets(
    model: torch.nn.Module, *, target_modules: tuple[str, ...], last_n_layers: int | None = None
) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of each Linear LoRA adapts: a Linear inside a transformer block (`layers.<i>`; the
    last N blocks only) whose name a target matches by peft's rule (`matches_target`). Linears outside the blocks,
    such as lm_head, are not counted."""
    config: Any = model.config
    n_layers = int(config.num_hidden_layers)
    first = 0 if last_n_layers is None else n_layers - last_n_layers
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not isinstance(module, torch.nn.Linear) or "layers" not in parts:
            continue
        if not any(matches_target(name, target) for target in target_modules):
            continue
        if int(parts[parts.index("layers") + 1]) >= first:
            found.append((name, module.in_features, module.out_features))
    return found


def lora_upload_parameters(
    model: torch.nn.Module, *, rank: int, target_modules: tuple[str, ...], last_n_layers: int | None = None,
    freeze_a: bool = False,
) -> int:
    """Numbers one client uploads per round: sum of r (d_in + d_out), or r d_out under freeze_a."""
    targets = lora_targets(model, target_modules=target_modules, last_n_layers=last_n_layers)
    return sum(rank * (d_out if freeze_a else d_in + d_out) for _, d_in, d_out in targets)


BYTES_PER = {"float32": 4.0, "float16": 2.0, "int8": 1.0}


def payload_bytes(parameters: int, codec: str) -> float:
    """Tensor bytes of `parameters` numbers in `codec` (int8's r scales per matrix and the file header excluded)."""
    return parameters * BYTES_PER[codec]
