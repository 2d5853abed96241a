"""Classification by label-word scoring: the label whose first answer token is most likely."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dplora_core.batching import Encoded, by_length, collate
from dplora_core.model import backbone_and_head
from dplora_core.prefix import FrozenPrefix, backbone_states


@torch.inference_mode()
def label_scores(
    model: nn.Module, prompts: Sequence[Encoded], label_ids: Sequence[int], *, pad_id: int, batch_size: int,
    prefix: FrozenPrefix | None = None,
) -> torch.Tensor:
    """Logit of each label word's first token after each prompt: (n, L), float32 on the CPU.

    prefix: each prompt's cached frozen-prefix states, aligned with `prompts` (see `dplora_core.prefix`).
    """
    _, head = backbone_and_head(model)
    device = next(model.parameters()).device
    order = by_length(prompts)
    scores = torch.zeros(len(prompts), len(label_ids))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate(
            [prompts[i] for i in chunk], pad_id=pad_id,
            prefix=prefix.take(chunk).hidden if prefix is not None else None,
            prefix_layers=prefix.layers if prefix is not None else 0,
        ).to(device)
        hidden = backbone_states(model, batch)  # (b, t, h)
        last = batch.attention_mask.sum(dim=1) - 1  # (b,) index of each prompt's final token
        h = hidden[torch.arange(len(chunk), device=device), last]  # (b, h)
        scores[chunk] = head(h)[:, list(label_ids)].float().cpu()  # (b, L)
    return scores


def label_word_loss(scores: torch.Tensor, y_true: Sequence[int]) -> float:
    """Mean cross-entropy among the label words (the `label_words` training loss), from label_scores."""
    return float(torch.nn.functional.cross_entropy(scores, torch.tensor(list(y_true))))


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """counts[t][p]: how many examples of true label t were predicted p, (num_labels, num_labels)."""
    counts = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred, strict=True):
        counts[t][p] += 1
    return counts


def true_counts(confusion: Sequence[Sequence[int]]) -> list[int]:
    """How many examples carry each true label: the row sums, (L,)."""
    return [sum(row) for row in confusion]


def answer_counts(confusion: Sequence[Sequence[int]]) -> list[int]:
    """How many examples were predicted each label: the column sums, (L,)."""
    return [sum(row[p] for row in confusion) for p in range(len(confusion))]


def recall_per_label(confusion: Sequence[Sequence[int]]) -> list[float | None]:
    """Each true label's share of its examples predicted right (None for a label with no examples)."""
    return [confusion[c][c] / n if n else None for c, n in enumerate(true_counts(confusion))]


def accuracy(confusion: Sequence[Sequence[int]]) -> float:
    """Share of all examples on the diagonal (0 for no examples)."""
    return sum(row[c] for c, row in enumerate(confusion)) / max(sum(true_counts(confusion)), 1)


def macro_f1(confusion: Sequence[Sequence[int]]) -> float:
    """Unweighted mean over labels of F1 = 2 TP / (2 TP + FP + FN); a label never seen nor predicted scores 0."""
    scores = []
    for c, (true, answered) in enumerate(zip(true_counts(confusion), answer_counts(confusion), strict=True)):
        tp = confusion[c][c]
        fn = true - tp  # true c, predicted otherwise
        fp = answered - tp  # predicted c, true otherwise
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(confusion)
