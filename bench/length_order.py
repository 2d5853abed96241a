"""Time of one DP-SGD logical batch in micro-batches of similar lengths over the same batch in sampled order.

    python bench/length_order.py [--repeats 5] [--batch 128] [--microbatch 16] [--last-n-layers 4] [--dtype auto]

`train_local` sorts each logical batch by length before cutting it into micro-batches
(`dplora_core.batching.by_length`), so a micro-batch pads to a length close to its records' own.
The sum of clipped per-example gradients is the same in any order. The demo's model and adapter
(SmolLM2-135M-Instruct with its frozen weights in --dtype, where auto is bfloat16 on a CPU with it natively
and float32 otherwise; FFA-LoRA rank 4 on q_proj,v_proj), the frozen-prefix cache on,
Financial PhraseBank training records in a random order. Ratios are medians over interleaved
repeats, so machine noise hits both alike; the padded-token share of each order is exact.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from interleaved import interleaved_medians  # bench/, beside this script

from dplora_core.batching import Encoded, by_length, encode, label_token_ids
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, Example, read_jsonl
from dplora_core.model import attach_lora, dtype_name, load_base_model, resolve_dtype
from dplora_core.prefix import FrozenPrefix, frozen_layers, prefix_states
from dplora_core.privacy.grad_sample import PerExampleGrads, trainable_linears
from dplora_core.train import DpSgdParams, dp_gradients, microbatch

TRAIN = Path("data/prepared/financial_phrasebank/train.jsonl")


def padded_share(items: list[Encoded], size: int) -> float:
    """Fraction of the micro-batches' token slots that are padding."""
    slots = real = 0
    for i in range(0, len(items), size):
        lengths = [len(e.input_ids) for e in items[i : i + size]]
        slots, real = slots + max(lengths) * len(lengths), real + sum(lengths)
    return 1 - real / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--microbatch", type=int, default=16)
    parser.add_argument("--last-n-layers", type=int, default=4)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    task = TASKS["financial_phrasebank"]
    base, tok = load_base_model(ModelConfig(dtype=args.dtype))
    model = attach_lora(base, LoraConfig(rank=4, alpha=8, freeze_a=True, last_n_layers=args.last_n_layers))
    examples: list[Example] = read_jsonl(TRAIN, labels=task.labels)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[: args.batch].tolist()
    records = [encode(examples[i], task, tok, max_len=128) for i in order]  # a sampled batch, in sampled order
    pad, ids = int(tok.pad_token_id), label_token_ids(task, tok)
    cache = prefix_states(model, records, layers=frozen_layers(model), pad_id=pad, batch_size=32)
    device = torch.device("cpu")

    def batches(idx: list[int]) -> tuple[list[Encoded], FrozenPrefix]:
        return [records[i] for i in idx], cache.take(idx)

    sampled, ordered = batches(list(range(len(records)))), batches(by_length(records))
    dp = DpSgdParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.2)
    gen = torch.Generator().manual_seed(0)
    buffer = PerExampleGrads(trainable_linears(model))
    model.train()

    def step(batch: tuple[list[Encoded], FrozenPrefix]) -> None:
        mbs = microbatch(batch[0], args.microbatch, pad_id=pad, device=device, prefix=batch[1])
        model.zero_grad(set_to_none=True)
        dp_gradients(model, mbs, dp=dp, expected_batch_size=len(records), generator=gen, label_ids=ids, grads=buffer)

    sampled_s, ordered_s = interleaved_medians([lambda: step(sampled), lambda: step(ordered)], args.repeats)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    dtype = dtype_name(resolve_dtype(args.dtype, torch.device("cpu")))
    print(f"{time.strftime('%Y-%m-%d')} {machine}, {dtype}, last {args.last_n_layers} layers, "
          f"batch {args.batch} in micro-batches of {args.microbatch}")
    print("| order | padding | DP batch | speed-up |")
    print("|---|---|---|---|")
    print(f"| sampled | {padded_share(sampled[0], args.microbatch):.0%} | {sampled_s * 1000:.0f} ms | 1.00x |")
    print(f"| by length | {padded_share(ordered[0], args.microbatch):.0%} | {ordered_s * 1000:.0f} ms "
          f"| {sampled_s / ordered_s:.2f}x |")


if __name__ == "__main__":
    main()
