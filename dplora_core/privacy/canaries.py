"""Canary records for a membership-inference audit, and the loss-threshold attack's scores.

A canary is a unique text of random words with a label drawn uniformly at random, so that
most canaries are mislabelled for whatever their words suggest: a model can only fit such a
record by memorising it, which is what the attack (score = -loss) looks for.
Words rather than token ids keep canaries encodable by any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dplora_core.batching import Encoded, collate
from dplora_core.data import Example
from dplora_core.train import answer_nll

MAX_DRAWS_PER_CANARY = 100


def make_canaries(
    count: int, *, labels: Sequence[str], words: Sequence[str], seed: int, length: int = 8
) -> list[Example]:
    """`count` distinct texts of `length` words drawn uniformly from `words`, each with a uniform random label."""
    vocab = sorted(set(words))
    if not labels:
        raise ValueError("make_canaries: needs at least one label")
    if len(vocab) ** length < 2 * count:
        raise ValueError(
            f"make_canaries: {len(vocab)} distinct words of {length} per canary cannot make {count} distinct canaries"
        )
    g = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    seen: set[str] = set()
    for _ in range(MAX_DRAWS_PER_CANARY * count):
        if len(texts) == count:
            break
        text = " ".join(vocab[i] for i in torch.randint(len(vocab), (length,), generator=g).tolist())
        if text not in seen:
            seen.add(text)
            texts.append(text)
    if len(texts) < count:
        raise ValueError(f"make_canaries: found only {len(texts)} distinct canaries of {count}")
    ys = torch.randint(len(labels), (count,), generator=g).tolist()  # (count,) label indices
    return [Example(id=f"canary-{i}", text=t, label=labels[y]) for i, (t, y) in enumerate(zip(texts, ys, strict=True))]


@torch.no_grad()
def canary_scores(
    model: nn.Module, items: Sequence[Encoded], label_ids: Sequence[int], *, pad_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Attack score of each canary, minus its label-word loss (larger: more likely a member): (m,) on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    scores = [
        -answer_nll(model, collate(items[i : i + batch_size], pad_id=pad_id).to(device), label_ids).float().cpu()
        for i in range(0, len(items), batch_size)
    ]  # [(b,)]
    return torch.cat(scores) if scores else torch.zeros(0)
