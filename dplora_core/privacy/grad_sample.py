"""Per-example gradients of LoRA weights from layer inputs and output gradients.

For a linear map y = x W^T (x: (b, t, in), y: (b, t, out)) the gradient of example i's
loss is  dL_i/dW = sum_t g[i, t, :]^T x[i, t, :],  one batched matmul (b, out, t) @ (b, t, in).
LoRA's A and B are bias-free nn.Linear modules with small rank r, so their per-example
gradients are small ((b, r, in) and (b, out, r)) and two hooks per module give them exactly,
with no per-example backward pass. This requires the loss to be a *sum* of per-example losses.

All per-example gradients of a backward land in one flat (b, d) matrix, one row per example,
so that norms, clipping and the clipped sum are a handful of whole-matrix operations instead
of a handful per LoRA module (with LoRA on every linear layer of a 30-layer model, that is 420
modules, and per-operation overhead, not arithmetic, is the cost).
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
    weights = {id(m.weight) for m in mods}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in weights:
            raise ValueError(f"{name}: trainable parameter outside a bias-free nn.Linear")
    return mods


class PerExampleGrads:
    """The per-example gradients of one backward: `flat` (b, d), columns in `modules` order.

    The (b, d) buffer is kept between backwards (`reset` before each): allocating tens of MB
    afresh every micro-batch costs more than computing the gradients.
    """

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        sizes = [m.weight.numel() for m in modules]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.columns = {m: slice(s, s + n) for m, s, n in zip(modules, starts, sizes, strict=True)}
        self.dim = sum(sizes)
        self.flat: torch.Tensor | None = None  # (b, d), set by the first hook after `reset`
        self._storage = torch.empty(0)
        self._written: set[nn.Linear] = set()

    def reset(self) -> None:
        self.flat, self._written = None, set()

    def __getitem__(self, module: nn.Linear) -> torch.Tensor:
        """Per-example gradients of one module's weight: (b, out, in), a view into `flat`."""
        assert self.flat is not None, "no backward has run"
        return self.flat[:, self.columns[module]].view(-1, *module.weight.shape)

    def accumulate(self, module: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add the per-example gradient of `module` given its input x (b, ..., in) and output grad g (b, ..., out)."""
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # (b, t, in)
        g3 = g.reshape(g.shape[0], -1, g.shape[-1]).float()  # (b, t, out)
        if self.flat is None:
            self.flat = self._buffer(x3.shape[0], x3.device)
        # (b, out, in); the larger of in/out as the matmul's last dimension is several times faster on CPU
        gs = torch.bmm(g3.transpose(1, 2), x3) if x3.shape[-1] >= g3.shape[-1] else torch.bmm(x3.transpose(1, 2), g3).mT
        if module in self._written:
            self[module].add_(gs)
        else:
            self[module].copy_(gs)
            self._written.add(module)

    def finish(self) -> torch.Tensor | None:
        """The (b, d) matrix after a backward, with zeros for modules that received no gradient."""
        if self.flat is not None:
            for m in self.modules:
                if m not in self._written:
                    self[m].zero_()
        return self.flat

    def _buffer(self, batch: int, device: torch.device) -> torch.Tensor:
        if self._storage.numel() < batch * self.dim or self._storage.device != device:
            self._storage = torch.empty(batch * self.dim, device=device)
        return self._storage[: batch * self.dim].view(batch, self.dim)


@contextmanager
def per_example_grads(
    modules: list[nn.Linear], reuse: PerExampleGrads | None = None
) -> Iterator[PerExampleGrads]:
    """Within the block, one backward fills the yielded PerExampleGrads (`reuse` keeps its buffer)."""
    grads = reuse if reuse is not None else PerExampleGrads(modules)
    grads.reset()

    def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        assert isinstance(module, nn.Linear)
        x = inputs[0].detach()
        if not output.requires_grad:  # no trainable weight upstream: the output is a leaf of the graph
            output.requires_grad_(True)
        output.register_hook(lambda g: grads.accumulate(module, x, g.detach()))
        return output

    # The weights themselves need no .grad (the caller builds it from the per-example rows), so autograd
    # skips their batch gradients; gradients still flow through each module's output to its input.
    weights = [m.weight for m in modules]
    handles = [m.register_forward_hook(forward_hook) for m in modules]
    for w in weights:
        w.requires_grad_(False)
    try:
        yield grads
    finally:
        for w in weights:
            w.requires_grad_(True)
        for h in handles:
            h.remove()
        grads.finish()
