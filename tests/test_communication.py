"""Upload counts from shapes: equal to what peft builds, and the published model sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from dplora_core.adapters import adapter_state, upload_state
from dplora_core.communication import LLAMA2_7B, full_parameters, lora_upload_parameters, shape_model
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.model import attach_lora, load_base_model
from flows.communication import measured_upload_bytes

# SmolLM2-135M's published config.json (HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_135M = LlamaConfig(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True,
)


@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("modules", [
    ("q_proj", "v_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    ("self_attn.q_proj", "mlp.down_proj"),  # peft also matches a name's last dotted parts
])
def test_counted_upload_equals_the_tensors_peft_builds(
    tiny_model_dir: Path, modules: tuple[str, ...], freeze_a: bool
) -> None:
    model, _ = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None))
    lora = LoraConfig(rank=3, target_modules=modules, last_n_layers=1, freeze_a=freeze_a)
    built = upload_state(adapter_state(attach_lora(model, lora)), freeze_a=freeze_a)
    counted = lora_upload_parameters(shape_model(model.config), rank=3, target_modules=modules, last_n_layers=1,
                                     freeze_a=freeze_a)
    assert counted == sum(t.numel() for t in built.values()) > 0


def test_full_model_sizes_match_the_published_parameter_counts() -> None:
    assert full_parameters(shape_model(SMOLLM2_135M)) == 134_515_008  # "135M", tied embeddings counted once
    assert full_parameters(shape_model(LLAMA2_7B)) == 6_738_415_616  # Llama-2-7B's 6.74B


def test_lora_r8_on_q_and_v_of_smollm2_is_the_guide_figure() -> None:
    assert lora_upload_parameters(shape_model(SMOLLM2_135M), rank=8, target_modules=("q_proj", "v_proj")) == 460_800


def test_measuring_one_adapter_leaves_the_model_as_it_was(tiny_model_dir: Path) -> None:
    model, _ = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wide = LoraConfig(rank=3, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), freeze_a=False)
    narrow = LoraConfig(rank=2, target_modules=("q_proj",), last_n_layers=1, freeze_a=True)
    first = measured_upload_bytes(model, narrow)
    measured_upload_bytes(model, wide)
    assert measured_upload_bytes(model, narrow) == first  # no adapter of the wide config left behind
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())
    counted = lora_upload_parameters(shape_model(model.config), rank=2, target_modules=("q_proj",), last_n_layers=1,
                                     freeze_a=True)
    assert 4 * counted < first["float32"] < 4 * counted + 1_000  # float32 numbers + the safetensors header
