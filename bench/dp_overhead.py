"""Time of one DP-SGD step over one non-private step, same batch, same process (issue 3 benchmark).

    python bench/dp_overhead.py [--repeats 5] [--batch 8]

LoRA (rank 8) on q_proj,v_proj and on all linear layers of SmolLM2-135M-Instruct. A DP step is
per-example gradients (LoRA hooks + one batched matmul per layer), joint clipping, noise; the
non-private step is one ordinary backward. For comparison, the same step with Opacus' hook-based
per-sample gradients (GradSampleModule) on an identical model, then the same clipping and noise.
Ratios are medians over interleaved repeats, so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Literal

import torch
from interleaved import interleaved_medians  # bench/, beside this script

from dplora_core.batching import collate, encode
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, Example
from dplora_core.model import attach_lora, load_base_model
from dplora_core.privacy import mechanisms as M
from dplora_core.privacy.grad_sample import PerExampleGrads, trainable_linears
from dplora_core.train import DpSgdParams, answer_nll, dp_gradients, plain_gradients

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SENTENCE = "The company reported that operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the same period ."


def measure(
    targets: tuple[str, ...], *, batch: int, repeats: int, dtype: Literal["float32", "bfloat16"]
) -> tuple[float, float, float]:
    """Median seconds of (non-private step, dplora DP step, Opacus-hooks DP step)."""
    from opacus import GradSampleModule

    def lora_model() -> torch.nn.Module:
        base, _ = load_base_model(ModelConfig(dtype=dtype))
        return attach_lora(base, LoraConfig(rank=8, alpha=16, target_modules=targets))

    _, tok = load_base_model(ModelConfig(dtype=dtype))
    model, twin = lora_model(), lora_model()
    GradSampleModule(twin, loss_reduction="sum")  # registers Opacus' per-sample hooks on `twin`
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    task = TASKS["financial_phrasebank"]
    items = [encode(Example(str(i), SENTENCE, "positive"), task, tok, max_len=128) for i in range(batch)]
    mbs = [collate(items, pad_id=int(tok.pad_token_id))]
    dp = DpSgdParams(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01)
    gen = torch.Generator().manual_seed(0)
    buffer = PerExampleGrads(trainable_linears(model))  # reused across steps, as train_local does

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        plain_gradients(model, mbs, batch_size=batch)

    def private() -> None:
        model.zero_grad(set_to_none=True)
        dp_gradients(model, mbs, dp=dp, expected_batch_size=batch, generator=gen, grads=buffer)

    def opacus() -> None:
        for p in twin_params:
            p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        answer_nll(twin, mbs[0]).sum().backward()
        flat = torch.cat([p.grad_sample.reshape(batch, -1) for p in twin_params], dim=1)  # type: ignore[attr-defined]
        factors = M.clip_factors(M.per_example_norms(flat), dp.max_grad_norm)
        M.add_gaussian_noise(M.clipped_sum(flat, factors), std=dp.noise_multiplier * dp.max_grad_norm, generator=gen)

    plain_s, dp_s, opacus_s = interleaved_medians([plain, private, opacus], repeats)
    return plain_s, dp_s, opacus_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{time.strftime('%Y-%m-%d')} {machine}, batch {args.batch}, {args.dtype}")
    print("| LoRA targets | non-private step | dplora DP step | ratio | Opacus-hooks DP step | ratio |")
    print("|---|---|---|---|---|---|")
    for name, targets in (("q_proj, v_proj", ("q_proj", "v_proj")), ("all linear", ALL_LINEAR)):
        plain_s, dp_s, op_s = measure(targets, batch=args.batch, repeats=args.repeats, dtype=args.dtype)
        print(
            f"| {name} | {plain_s * 1000:.0f} ms | {dp_s * 1000:.0f} ms | {dp_s / plain_s:.2f}x "
            f"| {op_s * 1000:.0f} ms | {op_s / plain_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
