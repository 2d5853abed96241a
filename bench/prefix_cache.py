"""Time of a DP-SGD step with the frozen-prefix cache over one without it, same batch, same process.

    python bench/prefix_cache.py [--repeats 5] [--batch 16] [--last-n-layers 10] [--dtype auto]

The demo's model and adapter: SmolLM2-135M-Instruct (frozen weights in --dtype; auto: bfloat16 where
the CPU has it natively, else float32), FFA-LoRA rank 4 on q_proj,v_proj of the last `--last-n-layers`
of its 30 layers. Without the cache a step runs all 30 layers forward; with it only the layers holding
LoRA, fed the states entering them (`dplora_core.prefix`). Also reported: the one-off cost of computing
those states, per record, and the largest difference in the per-example losses (the states are computed
in batches padded unlike the training batch).
Ratios are medians over interleaved repeats, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from interleaved import interleaved_medians  # bench/, beside this script

from dplora_core.batching import Batch, collate, encode, label_token_ids
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, Example, read_jsonl
from dplora_core.model import attach_lora, dtype_name, load_base_model, resolve_dtype
from dplora_core.prefix import frozen_layers, prefix_states
from dplora_core.privacy.grad_sample import PerExampleGrads, trainable_linears
from dplora_core.train import DpSgdParams, answer_nll, dp_gradients

TRAIN = Path("data/prepared/financial_phrasebank/train.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--last-n-layers", type=int, default=10)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    task = TASKS["financial_phrasebank"]
    base, tok = load_base_model(ModelConfig(dtype=args.dtype))
    model = attach_lora(base, LoraConfig(rank=4, alpha=8, freeze_a=True, last_n_layers=args.last_n_layers))
    examples: list[Example] = read_jsonl(TRAIN, labels=task.labels)[: 4 * args.batch]
    records = [encode(e, task, tok, max_len=128) for e in examples]
    pad, ids = int(tok.pad_token_id), label_token_ids(task, tok)

    start = time.perf_counter()
    cache = prefix_states(model, records, layers=frozen_layers(model), pad_id=pad, batch_size=32)
    per_record = (time.perf_counter() - start) / len(records)
    # a training batch pads its records differently from the batches that computed their states
    chosen = list(range(0, len(records), 4))
    items, prefix = [records[i] for i in chosen], cache.take(chosen)
    full = [collate(items, pad_id=pad)]
    fast = [collate(items, pad_id=pad, prefix=prefix.hidden, prefix_layers=prefix.layers)]
    with torch.no_grad():
        diff = float((answer_nll(model, full[0], ids) - answer_nll(model, fast[0], ids)).abs().max())

    dp = DpSgdParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2)
    gen = torch.Generator().manual_seed(0)
    buffer = PerExampleGrads(trainable_linears(model))
    model.train()

    def step(mbs: list[Batch]) -> None:
        model.zero_grad(set_to_none=True)
        dp_gradients(model, mbs, dp=dp, expected_batch_size=len(items), generator=gen, label_ids=ids, grads=buffer)

    full_s, fast_s = interleaved_medians([lambda: step(full), lambda: step(fast)], args.repeats)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    dtype = dtype_name(resolve_dtype(args.dtype, torch.device("cpu")))
    print(f"{time.strftime('%Y-%m-%d')} {machine}, batch {args.batch}, {dtype}, last {args.last_n_layers} layers")
    print("| frozen layers | DP step, no cache | DP step, cached | speed-up | states per record, once | "
          "max loss difference |")
    print("|---|---|---|---|---|---|")
    print(f"| {prefix.layers} of 30 | {full_s * 1000:.0f} ms | {fast_s * 1000:.0f} ms | {full_s / fast_s:.2f}x "
          f"| {per_record * 1000:.0f} ms | {diff:.1e} |")


if __name__ == "__main__":
    main()
