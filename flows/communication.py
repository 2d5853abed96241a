"""`dplora communication`: bytes one client uploads per round, measured on the real model, against
full-model exchange, the count from the shapes, the paper's 2nr, and Llama-2-7B's shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from dplora_core.adapters import adapter_state, to_bytes, upload_state
from dplora_core.communication import (
    LLAMA2_7B,
    full_parameters,
    lora_targets,
    lora_upload_parameters,
    payload_bytes,
    shape_model,
)
from dplora_core.compression import encode_update
from dplora_core.config import ExperimentConfig, LoraConfig
from dplora_core.model import attach_lora, load_base_model
from flows.study import write_section

RANKS = (4, 8, 16)
MODULE_SETS = {
    "q,v": ("q_proj", "v_proj"),
    "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def measured_upload_bytes(model: PreTrainedModel, lora: LoraConfig) -> dict[str, int]:
    """Bytes of the safetensors payload a client sends, per codec, with `lora` on the real `model`
    (attached, measured, then removed again: the model comes back unchanged)."""
    peft_model = attach_lora(model, lora)
    state = upload_state(adapter_state(peft_model), freeze_a=lora.freeze_a)
    peft_model.unload()
    g = torch.Generator().manual_seed(0)
    return {codec: len(to_bytes(encode_update(state, state, codec=codec, generator=g)))
            for codec in ("float32", "float16", "int8")}


def communication_rows(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per (modules, rank, freeze_a): measured bytes per codec, counts, and the 7B counts."""
    model, _ = load_base_model(cfg.model)
    shapes = shape_model(model.config)
    full = full_parameters(shapes)
    shapes_7b = shape_model(LLAMA2_7B)
    full_7b = full_parameters(shapes_7b)
    hidden = int(model.config.hidden_size)
    grid = [(f"{label}, all layers", LoraConfig(rank=rank, alpha=2 * rank, target_modules=modules, freeze_a=freeze_a))
            for label, modules in MODULE_SETS.items() for rank in RANKS for freeze_a in (False, True)]
    rows = []
    for label, lora in [(f"{cfg.name} ({', '.join(cfg.lora.target_modules)}, last {cfg.lora.last_n_layers} layers)",
                         cfg.lora), *grid]:
        kw: dict[str, Any] = {"rank": lora.rank, "target_modules": lora.target_modules,
                              "last_n_layers": lora.last_n_layers}
        rows.append({
            "modules": label, "rank": lora.rank, "freeze_a": lora.freeze_a,
            "parameters": lora_upload_parameters(shapes, freeze_a=lora.freeze_a, **kw),
            "paper_2nr": None if lora.freeze_a else 2 * hidden * lora.rank * len(lora_targets(
                shapes, target_modules=lora.target_modules, last_n_layers=lora.last_n_layers)),
            "bytes": measured_upload_bytes(model, lora), "full_model_bytes": full * 4,
            "parameters_7b": lora_upload_parameters(shapes_7b, freeze_a=lora.freeze_a, **kw),
            "full_model_bytes_7b": full_7b * 4,
        })
    return rows


def communication_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `communication_rows`."""
    header = ["modules", "r", "uploads", "numbers (counted)", "paper 2nr", "float32 B (measured)",
              "float16 B", "int8 B", "full model / float32 LoRA", "7B: LoRA float32 B (shapes)", "7B: full / LoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        b = r["bytes"]
        lines.append("| " + " | ".join([
            r["modules"], str(r["rank"]), "B only (FFA)" if r["freeze_a"] else "A and B", f"{r['parameters']:,}",
            "-" if r["paper_2nr"] is None else f"{r['paper_2nr']:,}", f"{b['float32']:,}", f"{b['float16']:,}",
            f"{b['int8']:,}", f"{r['full_model_bytes'] / b['float32']:,.0f}x",
            f"{payload_bytes(r['parameters_7b'], 'float32'):,.0f}",
            f"{r['full_model_bytes_7b'] / payload_bytes(r['parameters_7b'], 'float32'):,.0f}x",
        ]) + " |")
    first = rows[0]
    lines += [
        "",
        f"Full-model exchange: {first['full_model_bytes']:,} B for SmolLM2-135M "
        f"({first['full_model_bytes'] // 4:,} parameters in float32), "
        f"{first['full_model_bytes_7b']:,} B for Llama-2-7B ({first['full_model_bytes_7b'] // 4:,} parameters), "
        "both per client per round in each direction.",
    ]
    return "\n".join(lines)


def write_communication(cfg: ExperimentConfig, doc: Path) -> list[dict[str, Any]]:
    """Measure and count, then rewrite the `communication` section of `doc`."""
    rows = communication_rows(cfg)
    write_section(doc, "communication", communication_table(rows))
    return rows
