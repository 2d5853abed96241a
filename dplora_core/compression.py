"""Upload codecs: how a client's adapter travels, applied after the DP noise.

`float32` sends the client's adapter as it is. The compressed codecs send its difference to the
global adapter the client started from, which both sides hold and whose range is much smaller:
`float16` halves the bytes; `int8` quantises each rank slice (a row of A, a column of B) to 8 bits with
its own scale, rounding stochastically so the decoded update is unbiased (E[decode(encode(x))] = x;
Alistarh et al., QSGD, NeurIPS 2017, Lemma 3.1).

Privacy: in modes `sample` and `paper`, encoding runs on the already-noised adapter, with no further
access to the client's data, so it is post-processing (Dwork & Roth 2014, Proposition 2.1). In mode
`client` the server decodes, then clips and noises the update, so the clip still bounds each client's
contribution. The rounding draws from the client's explicit `torch.Generator`, never the global RNG.
"""

from __future__ import annotations

from typing import Literal

import torch

from dplora_core.adapters import AdapterError, AdapterState

Codec = Literal["float32", "float16", "int8"]
SCALE = ".scale"  # suffix of an int8 tensor's per-slice scales
INT8_MAX = 127


def _matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(a, b): a tensor of `shape` seen as a matrix (a 1-D tensor as one row)."""
    rows = shape[0] if len(shape) > 1 else 1
    return rows, shape.numel() // rows if rows else 0


def _slices(x: torch.Tensor) -> torch.Tensor:
    """x as (n, m) with one row per scale: along the shorter side (LoRA's rank r), so the scales cost
    r floats, not one per input or output feature."""
    a, b = _matrix_shape(x.shape)
    return x.reshape(a, b) if a <= b else x.reshape(a, b).T  # (min(a, b), max(a, b))


def _unslice(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_slices`: (min(a, b), max(a, b)) back to `shape`."""
    a, b = _matrix_shape(shape)
    return (rows if a <= b else rows.T).reshape(shape)


def scale_count(shape: torch.Size) -> int:
    """How many scales int8 sends for a tensor of `shape`."""
    return min(_matrix_shape(shape))


def quantize_int8(x: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): x ≈ q * scale per slice, q in [-127, 127], stochastic rounding (unbiased)."""
    rows = _slices(x)  # (n, m)
    scale = rows.abs().amax(dim=1, keepdim=True) / INT8_MAX  # (n, 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # a NaN/inf stays, for the server to reject
    scaled = rows / scale  # (n, m), in [-127, 127]
    floor = scaled.floor()
    u = torch.rand(scaled.shape, generator=generator, device=generator.device).to(scaled.device)  # (n, m)
    up = u < (scaled - floor)
    q = (floor + up.to(scaled.dtype)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return _unslice(q, x.shape).contiguous(), scale.reshape(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x̂ = q * scale per slice, float32."""
    rows = _slices(q).float() * scale.float().reshape(-1, 1)  # (n, m)
    return _unslice(rows, q.shape)


def encode_update(
    state: AdapterState, reference: AdapterState, *, codec: Codec, generator: torch.Generator
) -> AdapterState:
    """The tensors a client uploads: `state` itself (float32), or (state - reference) in the codec's form."""
    if codec == "float32":
        return state
    delta = {k: state[k] - reference[k] for k in state}  # same keys as the uploaded reference
    if codec == "float16":
        return {k: v.half() for k, v in delta.items()}
    payload: AdapterState = {}
    for k, v in delta.items():
        payload[k], payload[k + SCALE] = quantize_int8(v, generator=generator)
    return payload


def decode_update(payload: AdapterState, reference: AdapterState, *, codec: Codec, source: str) -> AdapterState:
    """The client's adapter (float32: the payload; else reference + decoded difference); AdapterError naming
    `source` if the tensors are not what `codec` sends (keys, dtypes, scale shapes)."""
    expected = set(reference) | ({k + SCALE for k in reference} if codec == "int8" else set())
    missing, unexpected = sorted(expected - payload.keys()), sorted(payload.keys() - expected)
    if missing or unexpected:
        raise AdapterError(
            f"{source}: tensors do not match codec {codec}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    dtype = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}[codec]
    decoded: AdapterState = {}
    for k, ref in reference.items():
        if payload[k].dtype != dtype or payload[k].shape != ref.shape:
            raise AdapterError(
                f"{source}: {k} is {payload[k].dtype} {tuple(payload[k].shape)}, "
                f"codec {codec} sends {dtype} {tuple(ref.shape)}"
            )
        if codec == "float32":
            decoded[k] = payload[k]
            continue
        if codec == "int8":
            scale = payload[k + SCALE]
            rows = scale_count(ref.shape)
            if scale.shape != (rows,) or not torch.isfinite(scale).all():
                raise AdapterError(f"{source}: {k}{SCALE} must be {rows} finite scales, got {tuple(scale.shape)}")
            delta = dequantize_int8(payload[k], scale)
        else:
            delta = payload[k].float()
        decoded[k] = ref + delta
    return decoded
