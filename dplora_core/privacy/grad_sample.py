"""Per-example gradients of LoRA weights from layer inputs and output gradients.

For a linear map y = x W^T (x: (b, t, in), y: (b, t, out)) the gradient of example i's
loss is  dL_i/dW = sum_t g[i, t, :]^T x[i, t, :],  i.e. einsum("bto,bti->boi").
LoRA's A and B are bias-free nn.Linear modules, so two hooks per module give exact
per-example gradients at the cost of one small einsum, with no per-example backward pass.
This requires the loss to be a *sum* of per-example losses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def trainable_linears(model: nn.Module) -> list[nn.Linear]:
    """The bias-free nn.Linear modules whose weight trains (LoRA A and B)."""
    mods = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.requires_grad:
            if m.bias is not None and m.bias.requires_grad:
                raise ValueError(f"{name}: trainable bias is not supported by the per-example hooks")
            mods.append(m)
    for name, p in model.named_parameters():
        if p.requires_grad and not any(p is m.weight for m in mods):
            raise ValueError(f"{name}: trainable parameter outside a bias-free nn.Linear")
    return mods


@contextmanager
def per_example_grads(modules: list[nn.Linear]) -> Iterator[dict[nn.Linear, torch.Tensor]]:
    """Within the block, each backward fills {module: grad_sample (b, out, in)}."""
    grads: dict[nn.Linear, torch.Tensor] = {}

    def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach()

        def backward_hook(g: torch.Tensor) -> None:
            gs = _linear_grad_sample(x, g.detach())
            assert isinstance(module, nn.Linear)
            grads[module] = grads[module] + gs if module in grads else gs

        if output.requires_grad:
            output.register_hook(backward_hook)

    handles = [m.register_forward_hook(forward_hook) for m in modules]
    try:
        yield grads
    finally:
        for h in handles:
            h.remove()


def _linear_grad_sample(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x: (b, ..., in), g: (b, ..., out) -> per-example weight gradient (b, out, in)."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # (b, t, in)
    g3 = g.reshape(g.shape[0], -1, g.shape[-1]).float()  # (b, t, out)
    return torch.einsum("bto,bti->boi", g3, x3)
