"""One DP-SGD logical batch on the demo's model, ready to time: shared by the benches that time whole steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dplora_core.batching import encode, label_token_ids
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, read_jsonl
from dplora_core.model import attach_lora, load_base_model
from dplora_core.prefix import frozen_layers, prefix_states
from dplora_core.privacy.grad_sample import PerExampleGrads, trainable_linears
from dplora_core.train import DpSgdParams, dp_gradients, microbatch

TRAIN = Path("data/prepared/financial_phrasebank/train.jsonl")


def dp_batch_step(*, dtype: str, last_n_layers: int, batch: int, microbatch_size: int) -> Callable[[], None]:
    """A function computing the noised DP-SGD gradient of one fixed logical batch of `batch` Financial PhraseBank
    training records (random order, seed 0): SmolLM2-135M-Instruct with frozen weights in `dtype` (model.dtype,
    auto allowed), FFA-LoRA rank 4 on q_proj,v_proj of the top `last_n_layers` layers, frozen-prefix cache on."""
    task = TASKS["financial_phrasebank"]
    base, tok = load_base_model(ModelConfig(dtype=dtype))  # type: ignore[arg-type]  # checked by pydantic
    model = attach_lora(base, LoraConfig(rank=4, alpha=8, freeze_a=True, last_n_layers=last_n_layers))
    examples = read_jsonl(TRAIN, labels=task.labels)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:batch].tolist()
    records = [encode(examples[i], task, tok, max_len=128) for i in order]
    pad, ids = int(tok.pad_token_id), label_token_ids(task, tok)
    cache = prefix_states(model, records, layers=frozen_layers(model), pad_id=pad, batch_size=32)
    mbs = microbatch(records, microbatch_size, pad_id=pad, device=torch.device("cpu"), prefix=cache)
    dp = DpSgdParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2)
    gen = torch.Generator().manual_seed(0)
    buffer = PerExampleGrads(trainable_linears(model))
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        dp_gradients(model, mbs, dp=dp, expected_batch_size=batch, generator=gen, label_ids=ids, grads=buffer)

    return step
