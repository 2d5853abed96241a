"""Local client training: plain mini-batch SGD or record-level DP-SGD on the LoRA weights.

DP-SGD (Abadi et al. 2016) with Poisson sampling, so that each step is exactly the
`PoissonSampledDpEvent(GaussianDpEvent(sigma))` the accountant composes:
  1. sample each record with probability q (a logical batch of expected size B = q n),
  2. per-example gradients g_i of the example's mean answer-token loss,
  3. clip: g_i * min(1, C / ||g_i||),
  4. noise: (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / B,
  5. optimizer step.
The logical batch is processed in micro-batches (gradient accumulation), so B can be large.

`paper_gradients` is DP-LoRA's Algorithm 1 as published (arXiv 2312.17493), kept to reproduce
the paper: a uniformly sampled batch of B records, the *batch-mean* gradient of all A matrices
and of all B matrices each clipped to C, N(0, sigma^2 C^2 I) added to each, plain SGD. Clipping
a batch gradient does not bound one record's influence the way per-example clipping does, so
this is not a certified record-level guarantee (see `privacy.accountant.paper_epsilon`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dplora_core.batching import IGNORE, Batch, Encoded, by_length, collate
from dplora_core.model import backbone_and_head
from dplora_core.prefix import FrozenPrefix, backbone_states
from dplora_core.privacy import mechanisms as M
from dplora_core.privacy.accountant import DpSgdRun
from dplora_core.privacy.grad_sample import PerExampleGrads, per_example_grads, trainable_linears


@dataclass(frozen=True)
class DpSgdParams:
    noise_multiplier: float  # sigma
    max_grad_norm: float  # C
    sample_rate: float  # q


@dataclass(frozen=True)
class PaperDpParams:
    """DP-LoRA Algorithm 1: batch gradients of A and B clipped separately to C, each + N(0, sigma^2 C^2)."""

    noise_multiplier: float  # sigma
    max_grad_norm: float  # C


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sampling rate q = B / n of a client with n records (capped at 1): one definition for the
    mechanism and the accountant."""
    return min(1.0, batch_size / n)


class DeadlinePassed(TimeoutError):
    """Local training reached its deadline between two steps; the partial adapter must not be released."""


@dataclass(frozen=True)
class LocalResult:
    mean_loss: float  # mean per-example loss over the examples seen
    steps: int
    examples_seen: int
    dp_run: DpSgdRun | None  # what the accountant must compose; None without DP


def answer_nll(model: nn.Module, batch: Batch, label_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Per-example loss of the answer: (b,).

    label_ids=None: mean negative log-likelihood of the answer tokens over the whole vocabulary.
    label_ids given: cross-entropy of the answer's first token among the label words only
    (prompt-based classification, Gao et al. 2021), the same scores `evaluate.predict` ranks.
    The LM head runs only at the positions that predict an answer token.
    """
    _, head = backbone_and_head(model)
    hidden = backbone_states(model, batch)  # (b, t, h)
    target = batch.labels[:, 1:]  # (b, t-1): token t+1 is predicted at position t
    is_answer = target != IGNORE  # (b, t-1)
    if label_ids is not None:
        return _label_word_nll(hidden, target, is_answer, head, label_ids)
    logits = head(hidden[:, :-1][is_answer]).float()  # (n_answer, V)
    nll = F.cross_entropy(logits, target[is_answer], reduction="none")  # (n_answer,)
    rows = is_answer.nonzero()[:, 0]  # (n_answer,)
    per_example = torch.zeros(batch.input_ids.shape[0], device=nll.device).index_add(0, rows, nll)  # (b,)
    return per_example / is_answer.sum(dim=1).clamp(min=1)


def _label_word_nll(
    hidden: torch.Tensor, target: torch.Tensor, is_answer: torch.Tensor, head: nn.Module, label_ids: Sequence[int]
) -> torch.Tensor:
    """Cross-entropy over the label words at each example's first answer position: (b,)."""
    first = is_answer.int().argmax(dim=1)  # (b,) first position predicting an answer token
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h = hidden[rows, first]  # (b, h)
    ids = torch.tensor(list(label_ids), device=hidden.device)
    logits = head(h)[:, ids].float()  # (b, L)
    classes = (target[rows, first].unsqueeze(1) == ids).int().argmax(dim=1)  # (b,) label index
    return F.cross_entropy(logits, classes, reduction="none")


def plain_gradients(
    model: nn.Module, microbatches: Sequence[Batch], *, batch_size: int, label_ids: Sequence[int] | None = None
) -> float:
    """Fill .grad with d/dtheta of (sum of per-example losses) / batch_size; return the loss sum."""
    total = 0.0
    for mb in microbatches:
        loss = answer_nll(model, mb, label_ids)  # (b,)
        (loss.sum() / batch_size).backward()
        total += float(loss.detach().sum())
    return total


def dp_gradients(
    model: nn.Module,
    microbatches: Sequence[Batch],
    *,
    dp: DpSgdParams,
    expected_batch_size: float,
    generator: torch.Generator,
    label_ids: Sequence[int] | None = None,
    grads: PerExampleGrads | None = None,
) -> float:
    """Fill .grad with (sum of clipped per-example grads + N(0, sigma^2 C^2)) / B; return the loss sum.

    grads: the per-example gradient buffer to reuse across steps (made here if None).
    """
    grads = grads if grads is not None else PerExampleGrads(trainable_linears(model))
    modules = grads.modules
    summed = torch.zeros(grads.dim, device=modules[0].weight.device)  # (d,)
    total = 0.0
    for mb in microbatches:
        with per_example_grads(modules, reuse=grads):
            loss = answer_nll(model, mb, label_ids)  # (b,)
            loss.sum().backward()
        if grads.flat is not None:
            factors = M.clip_factors(M.per_example_norms(grads.flat), dp.max_grad_norm)  # (b,)
            summed += M.clipped_sum(grads.flat, factors)  # (d,)
        total += float(loss.detach().sum())
    std = dp.noise_multiplier * dp.max_grad_norm if dp.noise_multiplier > 0 else 0.0  # sigma=0 allows C=inf
    noised = M.add_gaussian_noise(summed, std=std, generator=generator) / expected_batch_size  # (d,)
    for m, g in zip(modules, noised.split([m.weight.numel() for m in modules]), strict=True):
        m.weight.grad = g.view_as(m.weight).to(m.weight.dtype)
    return total


def lora_groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The trainable LoRA weights split into the paper's two blocks: {'A': [...], 'B': [...]} (A may be empty)."""
    groups: dict[str, list[torch.Tensor]] = {"A": [], "B": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["A" if ".lora_A." in name else "B"].append(p)
    return groups


def paper_gradients(
    model: nn.Module,
    microbatches: Sequence[Batch],
    *,
    paper: PaperDpParams,
    batch_size: int,
    generator: torch.Generator,
    label_ids: Sequence[int] | None = None,
) -> float:
    """Fill .grad as DP-LoRA Alg. 1 does: per block g <- g / max(1, ||g|| / C) + N(0, sigma^2 C^2 I)."""
    total = plain_gradients(model, microbatches, batch_size=batch_size, label_ids=label_ids)  # batch mean
    for params in lora_groups(model).values():
        if not params:
            continue
        flat = torch.cat([_grad_or_zeros(p).flatten().float() for p in params]).unsqueeze(0)  # (1, d_block)
        clipped = M.clipped_sum(flat, M.clip_factors(M.per_example_norms(flat), paper.max_grad_norm))  # (d_block,)
        noised = M.add_gaussian_noise(clipped, std=paper.noise_multiplier * paper.max_grad_norm, generator=generator)
        for p, g in zip(params, noised.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).to(p.dtype)
    return total


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def microbatch(
    items: Sequence[Encoded], size: int, *, pad_id: int, device: torch.device, prefix: FrozenPrefix | None = None
) -> list[Batch]:
    """Padded batches of `size` items (with their frozen-prefix states, aligned with items, if given)."""
    return [
        collate(
            items[i : i + size], pad_id=pad_id, prefix=prefix.hidden[i : i + size] if prefix is not None else None,
            prefix_layers=prefix.layers if prefix is not None else 0,
        ).to(device)
        for i in range(0, len(items), size)
    ]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """(step + 1) / (warmup_steps + 1), capped at 1: a linear ramp of the local learning rate.

    Clients are stateless, so AdamW restarts every round, and its first bias-corrected steps move every
    coordinate by about the full learning rate, signal or not (m/sqrt(v) = sign(g) at step 1). With few
    local steps a round, those restarts undo progress; the ramp lets the moments settle first.
    """
    return min(1.0, (step + 1) / (warmup_steps + 1))


def round_learning_rate(learning_rate: float, round_num: int, decay: float) -> float:
    """learning_rate x decay^(round_num - 1): rounds count from 1, so round 1 takes the full rate."""
    return learning_rate * decay ** (round_num - 1)


def train_local(
    model: nn.Module,
    data: Sequence[Encoded],
    *,
    steps: int,
    batch_size: int,
    microbatch_size: int,
    learning_rate: float,
    pad_id: int,
    generator: torch.Generator,
    dp: DpSgdParams | PaperDpParams | None,
    label_ids: Sequence[int] | None = None,
    warmup_steps: int = 0,
    prefix: FrozenPrefix | None = None,
    optimizer: Literal["adamw", "sgd"] = "adamw",
    momentum: float = 0.0,
    deadline: float | None = None,
) -> LocalResult:
    """`steps` optimizer steps on the trainable (LoRA) weights of `model`.

    dp: DpSgdParams -> DP-SGD with Poisson batches; PaperDpParams -> DP-LoRA Alg. 1 (uniform batches of
    `batch_size`, plain SGD whatever `optimizer` says); None -> uniform batches without noise.
    optimizer: "adamw" (no weight decay) or "sgd" (heavy-ball `momentum`) on the (noised) gradients; its state
    lives for this call only, so clients stay stateless.
    label_ids: train with the label-word loss (see `answer_nll`); None: the full-vocabulary LM loss.
    warmup_steps: the learning rate ramps up linearly over the first steps (see `warmup_factor`).
    prefix: each record's cached frozen-prefix states, aligned with `data` (see `dplora_core.prefix`).
    deadline: a `time.monotonic()` instant; a step that would start after it raises `DeadlinePassed` instead
    (a step under way finishes).
    """
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if isinstance(dp, PaperDpParams):
        opt = torch.optim.SGD(params, lr=learning_rate)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=learning_rate, momentum=momentum)
    else:
        opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    n = len(data)
    loss_sum, seen = 0.0, 0
    grads = PerExampleGrads(trainable_linears(model)) if isinstance(dp, DpSgdParams) else None
    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlinePassed(f"deadline passed after {step} of {steps} local steps")
        for group in opt.param_groups:
            group["lr"] = learning_rate * warmup_factor(step, warmup_steps)
        if isinstance(dp, DpSgdParams):
            idx = M.poisson_sample(n, dp.sample_rate, generator=generator)
        else:
            idx = torch.randperm(n, generator=generator, device=generator.device)[: min(batch_size, n)].cpu()
        picked: list[int] = idx.tolist()
        chosen = [picked[j] for j in by_length([data[i] for i in picked])]  # a sum over examples: order is free
        mbs = microbatch(
            [data[i] for i in chosen], microbatch_size, pad_id=pad_id, device=device,
            prefix=prefix.take(chosen) if prefix is not None else None,
        )
        opt.zero_grad(set_to_none=True)
        if isinstance(dp, DpSgdParams):
            loss_sum += dp_gradients(
                model, mbs, dp=dp, expected_batch_size=dp.sample_rate * n, generator=generator, label_ids=label_ids,
                grads=grads,
            )
        elif isinstance(dp, PaperDpParams):
            loss_sum += paper_gradients(
                model, mbs, paper=dp, batch_size=max(len(idx), 1), generator=generator, label_ids=label_ids
            )
        else:
            loss_sum += plain_gradients(model, mbs, batch_size=max(len(idx), 1), label_ids=label_ids)
        seen += len(idx)
        opt.step()
    model.eval()
    run = None
    if isinstance(dp, DpSgdParams):
        run = DpSgdRun(dp.sample_rate, dp.noise_multiplier, steps)
    elif isinstance(dp, PaperDpParams):  # for the paper's per-iteration formula, which ignores the sampling rate
        run = DpSgdRun(min(1.0, batch_size / n), dp.noise_multiplier, steps)
    return LocalResult(mean_loss=loss_sum / max(seen, 1), steps=steps, examples_seen=seen, dp_run=run)
