"""The frozen-prefix cache changes the speed of training and evaluation, not their numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dplora_core.adapters import adapter_state, load_adapter_state
from dplora_core.batching import collate, encode, label_token_ids
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, Example
from dplora_core.evaluate import label_scores
from dplora_core.model import attach_lora, init_lora_state, load_base_model
from dplora_core.prefix import FrozenPrefix, check_reproduces, frozen_layers, prefix_states
from dplora_core.train import DpSgdParams, answer_nll, train_local

TEXTS = [
    ("company profit rose .", "positive"), ("sales fell eur million .", "negative"),
    ("the company operating year .", "neutral"), ("net loss increased quarter .", "negative"),
    ("sales increased sharply this quarter .", "positive"), ("the quarter .", "neutral"),
]
TASK = TASKS["financial_phrasebank"]


def setup(model_dir: Path, last_n_layers: int | None = 1):
    base, tok = load_base_model(ModelConfig(path=str(model_dir), gguf_file=None, device="cpu"))
    model = attach_lora(base, LoraConfig(rank=2, alpha=4, last_n_layers=last_n_layers))
    state = init_lora_state(model, seed=1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in state.items()}
    load_adapter_state(model, state, source="test")
    data = [encode(Example(str(i), t, y), TASK, tok, max_len=64) for i, (t, y) in enumerate(TEXTS)]
    return model, tok, data


def cached(model, tok, items) -> FrozenPrefix:
    return prefix_states(model, items, layers=frozen_layers(model), pad_id=tok.pad_token_id, batch_size=4)


@pytest.mark.parametrize(("last_n_layers", "frozen"), [(1, 1), (2, 0), (None, 0)])
def test_frozen_layers_are_those_below_the_first_lora_layer(
    tiny_model_dir: Path, last_n_layers: int | None, frozen: int
) -> None:
    model, _, _ = setup(tiny_model_dir, last_n_layers)
    assert frozen_layers(model) == frozen


def test_loss_and_gradients_from_cached_states_equal_the_full_forward(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    prefix = cached(model, tok, data)
    ids = label_token_ids(TASK, tok)
    losses, grads = [], []
    for kwargs in ({}, {"prefix": prefix.hidden, "prefix_layers": prefix.layers}):
        model.zero_grad(set_to_none=True)
        loss = answer_nll(model, collate(data, pad_id=tok.pad_token_id, **kwargs), ids)  # type: ignore[arg-type]
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for full, fast in zip(*grads, strict=True):
        torch.testing.assert_close(full, fast, rtol=1e-4, atol=1e-6)


def test_dp_training_from_cached_states_gives_the_same_adapter(tiny_model_dir: Path) -> None:
    results = []
    for use_cache in (False, True):
        model, tok, data = setup(tiny_model_dir)
        prefix = cached(model, tok, data) if use_cache else None
        train_local(
            model, data, steps=3, batch_size=4, microbatch_size=2, learning_rate=0.05, pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(3), dp=DpSgdParams(0.5, 1.0, 0.6),
            label_ids=label_token_ids(TASK, tok), prefix=prefix,
        )
        results.append(adapter_state(model))
    assert results[0].keys() == results[1].keys()
    initial = adapter_state(setup(tiny_model_dir)[0])
    assert any(not torch.equal(initial[k], results[1][k]) for k in initial)  # training moved it: not vacuous
    for key, full in results[0].items():
        torch.testing.assert_close(full, results[1][key], rtol=1e-4, atol=1e-6)


def test_label_scores_from_cached_prompt_states_equal_the_full_forward(tiny_model_dir: Path) -> None:
    model, tok, _ = setup(tiny_model_dir)
    prompts = [encode(Example(str(i), t, y), TASK, tok, max_len=64, with_answer=False)
               for i, (t, y) in enumerate(TEXTS)]
    ids = label_token_ids(TASK, tok)
    full = label_scores(model, prompts, ids, pad_id=tok.pad_token_id, batch_size=4)
    fast = label_scores(model, prompts, ids, pad_id=tok.pad_token_id, batch_size=4, prefix=cached(model, tok, prompts))
    torch.testing.assert_close(full, fast, rtol=1e-5, atol=1e-6)


def test_cached_states_keep_no_padding(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    prefix = cached(model, tok, data)
    assert [h.shape[0] for h in prefix.hidden] == [len(e.input_ids) for e in data]


def test_states_that_do_not_reproduce_the_forward_pass_are_refused(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    prefix = cached(model, tok, data)
    wrong = FrozenPrefix(prefix.layers, tuple(3.0 * h for h in prefix.hidden))  # as if inputs_embeds were rescaled
    with pytest.raises(ValueError, match=r"model\.cache_frozen_prefix"):
        check_reproduces(model, data, wrong, pad_id=tok.pad_token_id)


def test_in_bfloat16_rounding_passes_the_check_and_a_rescaled_prefix_does_not(tiny_model_dir: Path) -> None:
    """The cached and the full pass sum in different orders; bfloat16 rounds them apart (2.1e-2 relative on
    SmolLM2's last 10 layers), which is not a mismatch, while transformed inputs are off by order 1."""
    model, tok, data = setup(tiny_model_dir)
    model.to(torch.bfloat16)
    prefix = cached(model, tok, data)  # checks itself
    assert prefix.hidden[0].dtype == torch.bfloat16
    wrong = FrozenPrefix(prefix.layers, tuple(3.0 * h for h in prefix.hidden))
    with pytest.raises(ValueError, match=r"model\.cache_frozen_prefix"):
        check_reproduces(model, data, wrong, pad_id=tok.pad_token_id)


def test_a_federated_run_with_the_cache_trains_the_same_adapter_as_one_without(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    """The cache is wired in the right order: each client's cached states belong to its own records."""
    from dplora_core.adapters import from_bytes
    from flows.pipeline import dplora_pipeline
    from tests.helpers import tiny_config

    adapters = []
    for cached_prefix in (False, True):
        cfg = tiny_config(
            tiny_model_dir, tmp_path / str(cached_prefix), raw_dir, lora__last_n_layers=1,
            model__cache_frozen_prefix=cached_prefix, federation__rounds=1,
        )
        dplora_pipeline(cfg)
        adapters.append(from_bytes((cfg.run_dir / "adapter.safetensors").read_bytes(), source="test"))
    assert any(v.abs().sum() > 0 for k, v in adapters[1].items() if "lora_B" in k)  # it trained
    for key, without in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], without, rtol=1e-4, atol=1e-6)


def test_runs_of_one_depth_share_frozen_states_whatever_the_rank(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path
) -> None:
    from tasks.data import prepare_data
    from tasks.runtime import split_prefix
    from tests.helpers import tiny_config

    def prefix(**lora: object) -> FrozenPrefix | None:
        overrides = {f"lora__{k}": v for k, v in lora.items()}
        cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, model__cache_frozen_prefix=True, **overrides)
        prepare_data.fn(cfg)
        return split_prefix(cfg.model, cfg.lora, cfg.data, "validation")

    top = prefix(last_n_layers=1, rank=2)
    assert top is not None
    assert prefix(last_n_layers=1, rank=1, alpha=2) is top
    assert prefix(last_n_layers=2, rank=2) is not top
