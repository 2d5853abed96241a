"""Time of one DP-SGD batch with the frozen weights in bfloat16 against float32, on this machine's CPU.

    python bench/dtype_speed.py [--repeats 3] [--batch 8] [--last-n-layers 10]

bfloat16 halves the frozen weights' memory, and on a CPU with native bfloat16 matrix multiply
(AVX512-BF16 or AMX) it is also faster. Without it (AVX2 only), torch falls back to a scalar
kernel. `model.dtype: auto` picks bfloat16 only where `dplora_core.model.native_bfloat16` says the
hardware has it. The demo's adapter (FFA-LoRA rank 4 on q_proj,v_proj of the top layers), frozen-prefix
cache on, one micro-batch of `--batch` Financial PhraseBank training records. Medians over
interleaved repeats.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from dp_batch import dp_batch_step  # bench/, beside this script
from interleaved import interleaved_medians

from dplora_core.model import native_bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--last-n-layers", type=int, default=10)
    args = parser.parse_args()
    steps = [dp_batch_step(dtype=d, last_n_layers=args.last_n_layers, batch=args.batch, microbatch_size=args.batch)
             for d in ("float32", "bfloat16")]
    fp32_s, bf16_s = interleaved_medians(steps, args.repeats)
    print(f"{time.strftime('%Y-%m-%d')} {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bfloat16: {native_bfloat16(torch.device('cpu'))}; last {args.last_n_layers} layers, "
          f"batch {args.batch}, {args.repeats} repeats")
    print("| frozen weights | DP batch | time vs float32 |")
    print("|---|---|---|")
    print(f"| float32 | {fp32_s * 1000:.0f} ms | 1.00x |")
    print(f"| bfloat16 | {bf16_s * 1000:.0f} ms | {bf16_s / fp32_s:.1f}x |")


if __name__ == "__main__":
    main()
