"""Examples -> token ids with answer labels, and padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dplora_core.data import Example, TaskSpec

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # prompt + answer tokens
    labels: list[int]  # IGNORE on prompt tokens, the token id on answer tokens
    label: str


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    labels: torch.Tensor  # (b, t)
    prefix: torch.Tensor | None = None  # (b, t, h) hidden states entering decoder layer prefix_layers, if cached
    prefix_layers: int = 0

    def to(self, device: torch.device) -> Batch:
        prefix = self.prefix.to(device) if self.prefix is not None else None
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), prefix,
            self.prefix_layers,
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode(
    example: Example, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, max_len: int, with_answer: bool = True
) -> Encoded:
    """Prompt (text truncated to fit `max_len`) followed by the answer tokens."""
    answer = tokenizer(task.answer(example.label), add_special_tokens=False).input_ids if with_answer else []
    text = example.text
    prompt = tokenizer(task.prompt(example, text)).input_ids
    while len(prompt) + len(answer) > max_len:
        text_ids = tokenizer(text, add_special_tokens=False).input_ids
        overflow = len(prompt) + len(answer) - max_len
        if overflow >= len(text_ids):
            raise ValueError(
                f"example {example.id}: prompt without its text needs more than model.max_seq_len={max_len} tokens"
            )
        text = str(tokenizer.decode(text_ids[: max(len(text_ids) - overflow - 2, 0)]))
        prompt = tokenizer(task.prompt(example, text)).input_ids
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, example.label)


def by_length(items: Sequence[Encoded]) -> list[int]:
    """Indices of `items`, shortest first: batches of similar lengths pad less."""
    return sorted(range(len(items)), key=lambda i: len(items[i].input_ids))


def collate(
    items: Sequence[Encoded], *, pad_id: int, prefix: Sequence[torch.Tensor] | None = None, prefix_layers: int = 0
) -> Batch:
    """Right-pad to the longest item; prefix: each item's cached (t_i, h) states entering layer prefix_layers."""
    t = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    labels = torch.full((len(items), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    if prefix is None:
        return Batch(ids, mask, labels)
    states = torch.zeros((len(items), t, prefix[0].shape[-1]), dtype=prefix[0].dtype)  # (b, t, h)
    for i, h in enumerate(prefix):
        states[i, : h.shape[0]] = h
    return Batch(ids, mask, labels, states, prefix_layers)


def label_token_ids(task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The first token of each label's answer; they must be distinct to score labels by it."""
    ids = [tokenizer(task.answer(label), add_special_tokens=False).input_ids[0] for label in task.labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {task.labels} do not start with distinct tokens for this tokenizer")
    return ids
