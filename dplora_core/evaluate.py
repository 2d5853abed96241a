"""Classification by label-word scoring: the label whose first answer token is most likely."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dplora_core.batching import Encoded, collate
from dplora_core.model import backbone_and_head


@torch.inference_mode()
def predict(
    model: nn.Module, prompts: Sequence[Encoded], label_ids: Sequence[int], *, pad_id: int, batch_size: int
) -> list[int]:
    """Index of the predicted label for each prompt (prompts carry no answer tokens)."""
    backbone, head = backbone_and_head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))  # less padding
    preds = [0] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([prompts[i] for i in chunk], pad_id=pad_id).to(device)
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        last = batch.attention_mask.sum(dim=1) - 1  # (b,) index of each prompt's final token
        h = hidden[torch.arange(len(chunk), device=device), last]  # (b, h)
        scores = head(h)[:, list(label_ids)]  # (b, L) label logits (the softmax normaliser is shared)
        for i, p in zip(chunk, scores.argmax(dim=1).tolist(), strict=True):
            preds[i] = p
    return preds


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / max(len(y_true), 1)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    """Unweighted mean over labels of F1 = 2 TP / (2 TP + FP + FN); a label never seen nor predicted scores 0."""
    scores = []
    for c in range(num_labels):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / num_labels
