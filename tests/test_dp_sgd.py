from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from dplora_core.adapters import adapter_state, load_adapter_state
from dplora_core.batching import by_length, collate, encode, label_token_ids
from dplora_core.config import LoraConfig, ModelConfig
from dplora_core.data import TASKS, Example
from dplora_core.model import attach_lora, init_lora_state, load_base_model
from dplora_core.privacy import mechanisms as M
from dplora_core.privacy.accountant import DpSgdRun
from dplora_core.privacy.grad_sample import per_example_grads, trainable_linears
from dplora_core.strategy import FedAvg
from dplora_core.train import (
    DeadlinePassed,
    DpSgdParams,
    PaperDpParams,
    answer_nll,
    dp_gradients,
    microbatch,
    plain_gradients,
    round_learning_rate,
    train_local,
    warmup_factor,
)

TEXTS = [
    ("company profit rose .", "positive"), ("sales fell eur million .", "negative"),
    ("the company operating year .", "neutral"), ("net loss increased quarter .", "negative"),
    ("sales increased .", "positive"), ("the quarter .", "neutral"),
]


LOSSES = ["lm", "label_words"]


def setup(model_dir: Path, dropout: float = 0.0, freeze_a: bool = False):
    base, tok = load_base_model(ModelConfig(path=str(model_dir), gguf_file=None, device="cpu"))
    model = attach_lora(base, LoraConfig(rank=2, alpha=4, dropout=dropout, freeze_a=freeze_a))
    state = init_lora_state(model, seed=1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in state.items()}
    load_adapter_state(model, state, source="test")  # B != 0 so A gets gradients too
    task = TASKS["financial_phrasebank"]
    data = [encode(Example(str(i), t, y), task, tok, max_len=64) for i, (t, y) in enumerate(TEXTS)]
    return model, tok, data


def params_of(model) -> list[torch.Tensor]:
    return [m.weight for m in trainable_linears(model)]


def label_ids_for(tok, loss: str) -> list[int] | None:
    return label_token_ids(TASKS["financial_phrasebank"], tok) if loss == "label_words" else None


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("freeze_a", [False, True])
def test_per_example_grads_equal_a_loop_of_single_examples(tiny_model_dir: Path, loss: str, freeze_a: bool) -> None:
    model, tok, data = setup(tiny_model_dir, freeze_a=freeze_a)
    ids = label_ids_for(tok, loss)
    modules = trainable_linears(model)
    with per_example_grads(modules) as grads:
        answer_nll(model, collate(data, pad_id=tok.pad_token_id), ids).sum().backward()
    batched = [grads[m] for m in modules]  # each (b, out, in)
    for i, item in enumerate(data):
        model.zero_grad(set_to_none=True)
        answer_nll(model, collate([item], pad_id=tok.pad_token_id), ids).sum().backward()
        for g, m in zip(batched, modules, strict=True):
            torch.testing.assert_close(g[i], m.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_noise_and_no_clipping_equals_plain_step(tiny_model_dir: Path, loss: str) -> None:
    model, tok, data = setup(tiny_model_dir)
    ids = label_ids_for(tok, loss)
    mbs = [collate(data[:4], pad_id=tok.pad_token_id), collate(data[4:], pad_id=tok.pad_token_id)]
    plain_gradients(model, mbs, batch_size=len(data), label_ids=ids)
    plain = [p.grad.clone() for p in params_of(model)]
    model.zero_grad(set_to_none=True)
    dp = DpSgdParams(noise_multiplier=0.0, max_grad_norm=float("inf"), sample_rate=1.0)
    dp_gradients(model, mbs, dp=dp, expected_batch_size=len(data), generator=torch.Generator().manual_seed(0),
                 label_ids=ids)
    for p, g in zip(params_of(model), plain, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_zero_noise_training_equals_plain_training(tiny_model_dir: Path) -> None:
    """Same batches, sigma = 0, C = inf: DP-SGD and plain AdamW end at the same adapter."""
    results = []
    for dp in (None, DpSgdParams(0.0, float("inf"), 1.0)):
        model, tok, data = setup(tiny_model_dir)
        train_local(model, data, steps=3, batch_size=len(data), microbatch_size=4, learning_rate=1e-2,
                    pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), dp=dp)
        results.append([p.detach().clone() for p in params_of(model)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_clipped_per_example_gradients_never_exceed_c(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    modules = trainable_linears(model)
    with per_example_grads(modules) as grads:
        answer_nll(model, collate(data, pad_id=tok.pad_token_id)).sum().backward()
    # Reference norm, computed independently: each example's gradient over all parameters, flattened.
    flat = torch.cat([grads[m].reshape(len(data), -1) for m in modules], dim=1)  # (b, d)
    torch.testing.assert_close(M.per_example_norms(grads.flat), flat.norm(dim=1))
    c = 0.5 * float(flat.norm(dim=1).min())  # every example needs clipping
    factors = M.clip_factors(M.per_example_norms(grads.flat), c)
    for i in range(flat.shape[0]):
        one = M.clipped_sum(flat[i : i + 1], factors[i : i + 1])  # example i alone
        assert float(one.norm()) <= c * (1 + 1e-5)


def test_a_non_finite_example_gradient_adds_nothing_to_the_clipped_sum() -> None:
    g = torch.tensor([[1.0, 2.0], [float("inf"), 0.0], [3.0, 4.0], [float("nan"), 1.0]])  # (b, d)
    factors = M.clip_factors(M.per_example_norms(g), 1.0)
    finite_rows = g[[0, 2]]
    expected = M.clipped_sum(finite_rows, M.clip_factors(M.per_example_norms(finite_rows), 1.0))
    torch.testing.assert_close(M.clipped_sum(g, factors), expected)


def test_gaussian_noise_has_the_calibrated_std() -> None:
    std = 0.7 * 1.3  # sigma * C
    noised = M.add_gaussian_noise(torch.zeros(200_000), std=std, generator=torch.Generator().manual_seed(0))
    # sample std of n=2e5 normals has relative s.e. ~ 1/sqrt(2n) = 0.0016; allow 5 s.e.
    assert abs(float(noised.std()) / std - 1) < 0.008
    assert abs(float(noised.mean())) < 5 * std / 200_000**0.5


def test_noise_uses_the_explicit_generator_not_the_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = M.add_gaussian_noise(torch.zeros(10), std=1.0, generator=torch.Generator().manual_seed(5))
    b = M.add_gaussian_noise(torch.zeros(10), std=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.random.get_rng_state())
    torch.testing.assert_close(a, b)


def test_noise_generator_is_reproducible_only_with_a_seed() -> None:
    cpu = torch.device("cpu")
    fixed = [torch.rand(4, generator=M.noise_generator(7, 1, 2, device=cpu)) for _ in range(2)]
    torch.testing.assert_close(fixed[0], fixed[1])
    other_client = torch.rand(4, generator=M.noise_generator(7, 1, 3, device=cpu))
    assert not torch.equal(fixed[0], other_client)
    fresh = [torch.rand(4, generator=M.noise_generator(None, 1, 2, device=cpu)) for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])


def test_poisson_sample_rate() -> None:
    idx = M.poisson_sample(100_000, 0.1, generator=torch.Generator().manual_seed(0))
    assert abs(len(idx) - 10_000) < 5 * (100_000 * 0.1 * 0.9) ** 0.5


def test_dp_training_changes_only_lora_weights(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_local(model, data, steps=2, batch_size=4, microbatch_size=2, learning_rate=1e-2,
                         pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                         dp=DpSgdParams(1.0, 1.0, 4 / len(data)))
    assert result.dp_run is not None and result.dp_run.steps == 2
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def test_a_step_due_after_the_deadline_is_not_taken(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    before = [p.detach().clone() for p in params_of(model)]
    with pytest.raises(DeadlinePassed, match="after 0 of 2 local steps"):
        train_local(model, data, steps=2, batch_size=4, microbatch_size=2, learning_rate=1e-2,
                    pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                    dp=DpSgdParams(1.0, 1.0, 4 / len(data)), deadline=time.monotonic() - 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model), strict=True))


def test_dp_sgd_batches_are_poisson_draws_at_the_rate_it_reports_to_the_accountant(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok, data = setup(tiny_model_dir)
    records, q, steps = data * 34, 0.1, 40  # 204 records
    calls: list[tuple[int, float]] = []
    real = M.poisson_sample

    def spy(n: int, rate: float, *, generator: torch.Generator) -> torch.Tensor:
        calls.append((n, rate))
        return real(n, rate, generator=generator)

    monkeypatch.setattr(M, "poisson_sample", spy)
    result = train_local(model, records, steps=steps, batch_size=20, microbatch_size=8, learning_rate=1e-3,
                         pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                         dp=DpSgdParams(1.0, 1.0, q))
    assert result.dp_run == DpSgdRun(q, 1.0, steps)
    assert calls == [(len(records), q)] * steps  # every batch a Poisson draw (tested in test_poisson_sample_rate)
    n = len(records)  # examples seen ~ Binomial(n * steps, q)
    assert abs(result.examples_seen - q * n * steps) < 5 * (n * steps * q * (1 - q)) ** 0.5


def test_dp_sgd_divides_the_noised_sum_by_the_expected_batch_not_the_drawn_one(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A draw of 5 records where q n = 20: the step's noise has std sigma C / (q n), not sigma C / 5. With sigma
    100 the clipped signal (norm at most 5 C / (q n)) is lost in it."""
    model, tok, data = setup(tiny_model_dir)
    records = data * 34  # 204 records
    monkeypatch.setattr(M, "poisson_sample", lambda n, q, generator: torch.arange(5))
    before = [p.detach().clone() for p in params_of(model)]
    train_local(model, records, steps=1, batch_size=20, microbatch_size=8, learning_rate=1.0, optimizer="sgd",
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                dp=DpSgdParams(100.0, 1.0, 20 / len(records)))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params_of(model), before, strict=True)]).double()
    assert step.std().item() == pytest.approx(100.0 / 20, rel=5 / (2 * step.numel()) ** 0.5)


def test_warmup_ramps_linearly_then_holds() -> None:
    assert [warmup_factor(t, 3) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_round_learning_rate_decays_geometrically_from_the_full_rate_in_round_one() -> None:
    assert [round_learning_rate(0.1, r, 0.5) for r in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.025])
    assert round_learning_rate(0.1, 3, 1.0) == 0.1


def test_warmup_scales_the_first_adamw_step(tiny_model_dir: Path) -> None:
    """AdamW's first step moves each weight by about lr (m/sqrt(v) = sign(g)); warm-up 1 halves it."""
    moves = []
    for warmup in (0, 1):
        model, tok, data = setup(tiny_model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_local(model, data, steps=1, batch_size=4, microbatch_size=2, learning_rate=1e-2,
                    pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), dp=None,
                    warmup_steps=warmup)
        moves.append(max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                         if n in before))
    assert moves[0] == pytest.approx(1e-2, rel=1e-3)
    assert moves[1] == pytest.approx(0.5e-2, rel=1e-3)


def test_sgd_takes_heavy_ball_steps_on_the_batch_gradient(tiny_model_dir: Path) -> None:
    """optimizer sgd: v <- mu v + g, w <- w - lr v, on the whole-batch gradient (sampled once per step)."""
    model, tok, data = setup(tiny_model_dir)
    mbs = microbatch(data, 4, pad_id=tok.pad_token_id, device=torch.device("cpu"))
    lr, mu = 0.5, 0.9

    def gradient() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        plain_gradients(model, mbs, batch_size=len(data))
        return [p.grad.clone() for p in params_of(model)]

    w0 = [p.detach().clone() for p in params_of(model)]
    g1 = gradient()
    w1 = [w - lr * g for w, g in zip(w0, g1, strict=True)]
    with torch.no_grad():
        for p, w in zip(params_of(model), w1, strict=True):
            p.copy_(w)
    g2 = gradient()  # at the weights after step 1
    with torch.no_grad():
        for p, w in zip(params_of(model), w0, strict=True):
            p.copy_(w)
    model.zero_grad(set_to_none=True)
    train_local(model, data, steps=2, batch_size=len(data), microbatch_size=4, learning_rate=lr,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), dp=None, optimizer="sgd",
                momentum=mu)
    for p, w, a, b in zip(params_of(model), w1, g1, g2, strict=True):  # step 2 moves by lr (mu g1 + g2)
        torch.testing.assert_close(p.detach(), w - lr * (mu * a + b), atol=1e-6, rtol=1e-5)


def test_length_order_changes_no_dp_gradient(tiny_model_dir: Path) -> None:
    """Micro-batches of a logical batch sorted by length (less padding) sum to the same clipped gradient."""
    model, tok, data = setup(tiny_model_dir)
    dp = DpSgdParams(noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0)
    grads = []
    for items in (list(data), [data[i] for i in by_length(data)]):
        model.zero_grad(set_to_none=True)
        dp_gradients(model, microbatch(items, 2, pad_id=tok.pad_token_id, device=torch.device("cpu")), dp=dp,
                     expected_batch_size=len(data), generator=torch.Generator().manual_seed(0))
        grads.append([p.grad.clone() for p in params_of(model)])
    assert [len(data[i].input_ids) for i in by_length(data)] == sorted(len(e.input_ids) for e in data)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_trainable_linears_are_exactly_the_lora_weights(tiny_model_dir: Path, dropout: float) -> None:
    model, _, _ = setup(tiny_model_dir, dropout)
    names = {id(m.weight) for m in trainable_linears(model)}
    assert names == {id(p) for p in model.parameters() if p.requires_grad}


def test_label_word_loss_is_cross_entropy_among_the_label_words(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    ids = label_ids_for(tok, "label_words")
    batch = collate(data, pad_id=tok.pad_token_id)
    loss = answer_nll(model, batch, ids)  # (b,)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for i, (_, label) in enumerate(TEXTS):
        last = int(batch.attention_mask[i].sum()) - 2  # the position before the single answer token
        scores = logits[i, last, ids].float()
        expected = -torch.log_softmax(scores, 0)[TASKS["financial_phrasebank"].labels.index(label)]
        torch.testing.assert_close(loss[i], expected, atol=1e-5, rtol=1e-4)


def test_freeze_a_trains_only_b(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir, freeze_a=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    train_local(model, data, steps=2, batch_size=4, microbatch_size=2, learning_rate=1e-2,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                dp=DpSgdParams(1.0, 1.0, 4 / len(data)))
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_dp_noise_on_the_averaged_gradient_has_std_sigma_c_over_b(tiny_model_dir: Path) -> None:
    """An empty Poisson batch leaves pure noise: its std must be sigma * C / B (B the expected batch)."""
    model, _, _ = setup(tiny_model_dir)
    dp = DpSgdParams(noise_multiplier=1.3, max_grad_norm=0.7, sample_rate=0.5)
    grads = []
    for seed in range(40):
        dp_gradients(model, [], dp=dp, expected_batch_size=10.0, generator=torch.Generator().manual_seed(seed))
        grads.append(torch.cat([p.grad.flatten() for p in params_of(model)]))
    sample = torch.cat(grads)  # n = 40 * d normals
    expected = 1.3 * 0.7 / 10.0
    assert abs(float(sample.std()) / expected - 1) < 6 / (2 * sample.numel()) ** 0.5


def test_dp_training_leaves_the_global_rng_untouched(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    train_local(model, data, steps=2, batch_size=4, microbatch_size=2, learning_rate=1e-2,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                dp=DpSgdParams(1.0, 1.0, 4 / len(data)))
    assert torch.equal(before, torch.random.get_rng_state())


def test_per_example_grads_sum_to_the_batch_gradient_with_dropout(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir, dropout=0.3)
    model.train()
    modules = trainable_linears(model)
    batch = collate(data, pad_id=tok.pad_token_id)
    torch.manual_seed(1)  # dropout masks come from the global RNG; both passes draw the same ones
    with per_example_grads(modules) as grads:
        answer_nll(model, batch).sum().backward()
    torch.manual_seed(1)
    answer_nll(model, batch).sum().backward()
    for m in modules:
        torch.testing.assert_close(grads[m].sum(dim=0), m.weight.grad, atol=1e-6, rtol=1e-5)


def test_per_example_capture_leaves_weights_trainable_and_without_grad(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    modules = trainable_linears(model)
    with per_example_grads(modules):
        answer_nll(model, collate(data, pad_id=tok.pad_token_id)).sum().backward()
    assert all(m.weight.requires_grad and m.weight.grad is None for m in modules)


def test_paper_mode_reproduces_dp_lora_algorithm_1_step_by_step(tiny_model_dir: Path) -> None:
    """arXiv 2312.17493, Alg. 1, re-implemented here from the pseudo-code: sample B records, batch-mean
    gradient, g_A <- g_A / max(1, ||g_A|| / C) and the same for g_B, each + N(0, sigma^2 C^2 I), SGD."""
    sigma, c, lr, batch, steps = 0.5, 0.05, 0.1, 4, 2
    model, tok, data = setup(tiny_model_dir)
    train_local(model, data, steps=steps, batch_size=batch, microbatch_size=2, learning_rate=lr,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(11), dp=PaperDpParams(sigma, c))

    ref, _, _ = setup(tiny_model_dir)
    ref.train()
    gen = torch.Generator().manual_seed(11)
    blocks = [[p for n, p in ref.named_parameters() if p.requires_grad and f".lora_{x}." in n] for x in "AB"]
    norms_before_clip = []
    for _ in range(steps):
        idx = torch.randperm(len(data), generator=gen)[:batch].tolist()
        ref.zero_grad(set_to_none=True)
        answer_nll(ref, collate([data[i] for i in idx], pad_id=tok.pad_token_id)).mean().backward()
        for block in blocks:
            g = torch.cat([p.grad.flatten() for p in block])
            norms_before_clip.append(float(g.norm()))
            g = g / max(1.0, float(g.norm()) / c)
            g = g + sigma * c * torch.randn(g.shape, generator=gen)
            with torch.no_grad():
                for p, gp in zip(block, g.split([p.numel() for p in block]), strict=True):
                    p -= lr * gp.view_as(p)
    assert max(norms_before_clip) > c  # the clipping was exercised
    for (name, p), q in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        [q for q in ref.parameters() if q.requires_grad],
        strict=True,
    ):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_paper_mode_reports_its_run_for_the_paper_formula(tiny_model_dir: Path) -> None:
    model, tok, data = setup(tiny_model_dir)
    result = train_local(model, data, steps=3, batch_size=4, microbatch_size=2, learning_rate=0.1,
                         pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                         dp=PaperDpParams(1.0, 1.0))
    assert result.dp_run == DpSgdRun(4 / len(data), 1.0, 3)


def test_noise_generator_keys_of_different_length_never_collide() -> None:
    cpu = torch.device("cpu")
    short = torch.rand(4, generator=M.noise_generator(7, 1, 2, device=cpu))
    padded = torch.rand(4, generator=M.noise_generator(7, 1, 2, 0, device=cpu))
    assert not torch.equal(short, padded)


def test_distributed_uploads_without_noise_or_clipping_average_to_one_plain_step_on_the_union(
    tiny_model_dir: Path,
) -> None:
    """Mode distributed: each client's one SGD step (q = 1, sigma = 0, C = inf), averaged with equal weights,
    is one plain SGD step on the union of the clients' records: the sum the noise shares protect."""
    model, tok, data = setup(tiny_model_dir)
    start = adapter_state(model)
    shards = [data[:3], data[3:]]
    uploads = []
    for shard in shards:
        load_adapter_state(model, start, source="test")
        train_local(model, shard, steps=1, batch_size=len(shard), microbatch_size=2, learning_rate=1.0,
                    pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                    dp=DpSgdParams(0.0, float("inf"), 1.0), optimizer="sgd")
        uploads.append(adapter_state(model))
    merged = FedAvg().aggregate(start, uploads, [1.0, 1.0])
    load_adapter_state(model, start, source="test")
    train_local(model, data, steps=1, batch_size=len(data), microbatch_size=2, learning_rate=1.0,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), dp=None, optimizer="sgd")
    union = adapter_state(model)
    assert any(not torch.equal(union[k], start[k]) for k in union)  # the step moved the adapter
    for k in union:
        torch.testing.assert_close(merged[k], union[k], atol=1e-6, rtol=1e-5)
