"""The empirical privacy audit: canaries, their attack scores, and the `privacy-audit` flow on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dplora_core.batching import encode, label_token_ids
from dplora_core.config import ModelConfig
from dplora_core.data import TASKS
from dplora_core.evaluate import label_scores
from dplora_core.io import json_bytes
from dplora_core.model import load_base_model
from dplora_core.privacy.canaries import canary_scores, make_canaries
from flows.audit import format_audit, privacy_audit
from tests.conftest import WORDS
from tests.helpers import tiny_config

LABELS = TASKS["financial_phrasebank"].labels
CANARIES = 32  # per side: 32 planted vs 32 held out
# Client 0 holds 8 real records and 32 canaries; 2 x 125 local steps at lr 1e-2 without DP fit most of them.
# Measured over noise seeds 0-12 (canaries fixed, 2026-12-04): AUC 0.82-0.96 without DP, 0.51-0.63 with DP at epsilon 1.
AUDIT = {
    "privacy__target_epsilon": 1.0, "data__max_train_examples": 16, "federation__rounds": 2,
    "federation__local_steps": 125, "federation__learning_rate": 1e-2, "federation__microbatch_size": 8,
    "data__cap_sampling": "first",  # the 16 records the AUCs below were measured with
}


# --- canaries --------------------------------------------------------------------------------


def test_canaries_are_distinct() -> None:
    canaries = make_canaries(200, labels=LABELS, words=["a", "b", "c"], seed=0, length=6)  # 729 possible texts
    assert len({c.text for c in canaries}) == len({c.id for c in canaries}) == 200


def test_canary_labels_come_from_the_label_set_and_cover_it() -> None:
    canaries = make_canaries(300, labels=LABELS, words=WORDS, seed=0)
    assert {c.label for c in canaries} == set(LABELS)  # uniform over 3 labels: all appear in 300 draws


def test_canary_texts_use_only_the_given_words() -> None:
    words = ["profit", "loss", "sales", "eur"]
    canaries = make_canaries(20, labels=LABELS, words=words, seed=1, length=5)
    assert all(len(c.text.split()) == 5 and set(c.text.split()) <= set(words) for c in canaries)


def test_canaries_are_deterministic_in_the_seed() -> None:
    first, again = (make_canaries(16, labels=LABELS, words=WORDS, seed=3) for _ in range(2))
    other = make_canaries(16, labels=LABELS, words=WORDS, seed=4)
    assert first == again
    assert [c.text for c in first] != [c.text for c in other]


def test_too_few_words_for_distinct_canaries_is_refused() -> None:
    with pytest.raises(ValueError, match="2 distinct words of 3 per canary cannot make 8 distinct canaries"):
        make_canaries(8, labels=LABELS, words=["up", "down", "up"], seed=0, length=3)


def test_canary_score_is_minus_the_label_word_loss(tiny_model_dir: Path) -> None:
    """Checked against evaluation's label scores: -loss = log softmax over the label words at the gold label."""
    model, tokenizer = load_base_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None, max_seq_len=96))
    task = TASKS["financial_phrasebank"]
    label_ids = label_token_ids(task, tokenizer)
    canaries = make_canaries(10, labels=LABELS, words=WORDS, seed=0)
    items = [encode(c, task, tokenizer, max_len=96) for c in canaries]
    prompts = [encode(c, task, tokenizer, max_len=96, with_answer=False) for c in canaries]
    scores = canary_scores(model, items, label_ids, pad_id=int(tokenizer.pad_token_id), batch_size=4)  # (m,)
    logits = label_scores(model, prompts, label_ids, pad_id=int(tokenizer.pad_token_id), batch_size=4)  # (m, L)
    gold = torch.tensor([LABELS.index(c.label) for c in canaries])
    expected = logits.log_softmax(dim=1)[torch.arange(len(canaries)), gold]  # (m,)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


# --- the flow ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tiny_model_dir: Path, raw_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None):
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("audit"), raw_dir, **AUDIT)  # noise_seed 7
    return cfg, privacy_audit(cfg, canaries=CANARIES)


def test_without_dp_the_attack_shows_memorisation(audited) -> None:
    _, result = audited
    assert result["nodp"]["auc"] >= 0.8  # 0.948 measured with this seed


def test_with_dp_at_epsilon_1_the_attack_stays_near_chance(audited) -> None:
    """Detects missing noise or clipping only (the no-DP AUC, ~0.9); the noise scale is pinned by the
    statistical tests in test_dp_sgd.py. 0.7 stays below e/(1+e) = 0.73, the largest AUC any epsilon = 1
    mechanism allows; with no leakage the AUC of 32 vs 32 has std ~0.073 (Mann-Whitney), so 0.7 is ~2.7 std
    above chance. The noise seed is fixed, so the test is deterministic."""
    _, result = audited
    assert result["dp"]["auc"] <= 0.7  # 0.554 measured with this seed


def test_with_dp_the_empirical_lower_bound_is_at_most_the_accountant_epsilon(audited) -> None:
    _, result = audited
    dp = result["dp"]
    assert dp["epsilon_lower_bound"] <= dp["accountant_epsilon"]


def test_accountant_epsilon_is_the_calibrated_target(audited) -> None:
    cfg, result = audited
    assert 0.99 * cfg.privacy.target_epsilon <= result["dp"]["accountant_epsilon"] <= cfg.privacy.target_epsilon
    assert "(epsilon = 1.000, delta = 0.001)-DP, record-level" in result["dp"]["guarantee"]


def test_the_audit_partitions_the_clients_when_no_partition_exists(audited) -> None:
    cfg, result = audited
    shards = json.loads((cfg.run_dir / "partition.json").read_text())["clients"]
    assert result["client_records"] == len(shards[0]) == 8


def test_audit_json_is_written_with_the_expected_keys(audited) -> None:
    cfg, result = audited
    written = json.loads((cfg.run_dir / "audit.json").read_text())
    assert written == json.loads(json_bytes(result))
    assert {"members", "held_out", "delta", "confidence", "max_certifiable_epsilon", "dp", "nodp"} <= set(written)
    for run in ("dp", "nodp"):
        assert {"auc", "epsilon_lower_bound", "accountant_epsilon", "member_scores", "held_out_scores"} <= set(
            written[run]
        )
        assert len(written[run]["member_scores"]) == len(written[run]["held_out_scores"]) == CANARIES
    assert written["nodp"]["accountant_epsilon"] is None


def test_the_audit_is_its_own_tagged_mlflow_run_with_metrics_and_json(audited) -> None:
    cfg, result = audited
    client = MlflowClient(cfg.tracking.mlflow_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["dplora.audit"] == "true"
    assert run.info.run_name == f"{cfg.name}-audit"
    assert run.data.metrics == pytest.approx({
        "audit_auc_dp": result["dp"]["auc"], "audit_auc_nodp": result["nodp"]["auc"],
        "audit_epsilon_lb_dp": result["dp"]["epsilon_lower_bound"],
        "audit_epsilon_lb_nodp": result["nodp"]["epsilon_lower_bound"],
        "audit_accountant_epsilon": result["dp"]["accountant_epsilon"],
    })
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["audit.json"]
    assert run.info.status == "FINISHED"


def test_format_audit_prints_both_runs_and_what_the_numbers_mean(audited) -> None:
    _, result = audited
    text = format_audit(result)
    assert "run    | attack AUC | empirical epsilon lower bound | accountant epsilon" in text
    dp, nodp = result["dp"], result["nodp"]
    assert f"DP-SGD | {dp['auc']:.3f}" in text and f"{dp['accountant_epsilon']:.3f}" in text
    assert f"no DP  | {nodp['auc']:.3f}" in text and "infinity" in text
    assert "calls for investigation" in text


def test_the_audit_trains_each_round_as_the_federation_would(
    tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rounds x local_steps as `rounds` runs of local_steps, each at its round's rate (round_decay 0.5)."""
    import tasks.audit as audit
    import tasks.training as training
    from dplora_core.train import LocalResult

    seen: list[tuple[int, float]] = []

    def record(model, data, *, steps, learning_rate, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((steps, learning_rate))
        return LocalResult(mean_loss=0.0, steps=steps, examples_seen=0, dp_run=None)

    monkeypatch.setattr(training, "train_local", record)
    monkeypatch.setattr(audit, "canary_scores", lambda *args, **kwargs: torch.zeros(0))
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, federation__rounds=3, federation__round_decay=0.5)
    audit.train_and_score.fn(cfg, "nodp", [], [], None)
    lr, steps = cfg.federation.learning_rate, cfg.federation.local_steps
    assert seen == [(steps, pytest.approx(lr)), (steps, pytest.approx(lr / 2)), (steps, pytest.approx(lr / 4))]


@pytest.mark.parametrize("mode", ["none", "client", "paper"])
def test_only_record_level_dp_is_audited(
    mode: str, tiny_model_dir: Path, raw_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path, raw_dir, privacy__mode=mode)
    with pytest.raises(ValueError, match=rf"privacy\.mode is '{mode}'.*record-level"):
        privacy_audit(cfg)
    assert not (cfg.run_dir / "audit.json").exists()
