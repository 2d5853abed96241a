"""Upload codecs: exact, half or 8-bit; unbiased; smaller on the wire; strict on what they accept."""

from __future__ import annotations

import pytest
import torch

from dplora_core.adapters import AdapterError, to_bytes
from dplora_core.compression import decode_update, dequantize_int8, encode_update, quantize_int8


def adapter(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # the shapes of a rank-4 LoRA on SmolLM2's q_proj (576 -> 576), one layer
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": scale * torch.randn(4, 576, generator=g),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": scale * torch.randn(576, 4, generator=g),
    }


def roundtrip(codec: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bytes]:
    reference, state = adapter(1), adapter(1)
    state = {k: v + 0.01 * adapter(seed + 2)[k] for k, v in state.items()}
    payload = encode_update(state, reference, codec=codec, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return state, decode_update(payload, reference, codec=codec, source="client 3"), to_bytes(payload)  # type: ignore[arg-type]


def test_float32_sends_the_adapter_exactly() -> None:
    state, decoded, _ = roundtrip("float32")
    for k in state:
        assert torch.equal(decoded[k], state[k])


def test_float16_error_is_within_half_precision_of_the_difference() -> None:
    state, decoded, _ = roundtrip("float16")
    for k in state:
        delta = (state[k] - adapter(1)[k]).abs()
        assert ((decoded[k] - state[k]).abs() <= delta * 2**-10 + 1e-7).all()


def test_int8_error_is_at_most_one_step_per_rank_slice() -> None:
    state, decoded, _ = roundtrip("int8")
    for k in state:
        delta = state[k] - adapter(1)[k]
        step = delta.abs().amax(dim=1 if delta.shape[0] < delta.shape[1] else 0, keepdim=True) / 127
        assert ((decoded[k] - state[k]).abs() <= step * (1 + 1e-5)).all()


def test_int8_stochastic_rounding_is_unbiased() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([dequantize_int8(*quantize_int8(x, generator=g)) for _ in range(2000)])  # (2000, 8, 64)
    step = x.abs().amax(dim=1, keepdim=True) / 127
    # each draw errs by at most one step, with variance <= step^2 / 4: the mean of 2000 is within 5 sd
    assert ((draws.mean(0) - x).abs() <= 5 * step / 2 / 2000**0.5).all()


def test_compressed_uploads_are_smaller_on_the_wire() -> None:
    full, half, eight = (len(roundtrip(codec)[2]) for codec in ("float32", "float16", "int8"))
    assert half < 0.55 * full
    assert eight < 0.30 * full


def test_int8_rounding_draws_from_the_given_generator_only() -> None:
    torch.manual_seed(0)
    first = roundtrip("int8", seed=5)[1]
    torch.manual_seed(1)  # the global RNG changes, the client's generator does not
    second = roundtrip("int8", seed=5)[1]
    for k in first:
        assert torch.equal(first[k], second[k])


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda p: {k: v for k, v in p.items() if not k.endswith(".scale")}, "missing"),
        (lambda p: p | {"extra": torch.zeros(1)}, "unexpected"),
        (lambda p: {k: v.float() if not k.endswith(".scale") else v for k, v in p.items()}, "torch.float32"),
        (lambda p: {k: v[:2] if k.endswith(".scale") else v for k, v in p.items()}, "finite scales"),
    ],
)
def test_a_payload_not_in_the_codecs_form_is_refused_naming_the_client(tamper, message: str) -> None:
    reference = adapter(1)
    payload = encode_update(adapter(2), reference, codec="int8", generator=torch.Generator().manual_seed(0))
    with pytest.raises(AdapterError, match=f"client 3.*{message}"):
        decode_update(tamper(payload), reference, codec="int8", source="client 3")


def test_int8_sends_one_scale_per_rank_slice_of_a_and_of_b() -> None:
    reference = adapter(1)
    payload = encode_update(adapter(2), reference, codec="int8", generator=torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in payload.items() if k.endswith(".scale")} == {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight.scale": (4,),  # A is (4, 576): per row
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight.scale": (4,),  # B is (576, 4): per column
    }


def test_a_non_finite_update_is_refused_after_int8_too() -> None:
    reference = adapter(1)
    state = {k: v.clone() for k, v in adapter(2).items()}
    state["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"][3, 1] = float("nan")
    payload = encode_update(state, reference, codec="int8", generator=torch.Generator().manual_seed(0))
    with pytest.raises(AdapterError, match=r"client 3.*finite scales"):
        decode_update(payload, reference, codec="int8", source="client 3")
