"""Evaluation arithmetic: the confusion matrix, recall by label, and the metric names they travel under."""

from __future__ import annotations

import pytest
from sklearn import metrics as sklearn_metrics

from dplora_core.evaluate import accuracy, answer_counts, confusion_matrix, macro_f1, recall_per_label, true_counts
from flows.evaluate import evaluation_metrics, metric_key


def test_the_confusion_matrix_counts_true_labels_by_row_and_predictions_by_column() -> None:
    assert confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 1, 2], 3) == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]


def test_true_counts_are_row_sums_and_answer_counts_column_sums() -> None:
    counts = [[3, 1, 0], [0, 0, 0], [1, 1, 2]]  # rows: true label; columns: predicted
    assert (true_counts(counts), answer_counts(counts)) == ([4, 0, 4], [4, 2, 2])


def test_recall_is_each_rows_diagonal_share_and_none_for_a_label_without_examples() -> None:
    assert recall_per_label([[3, 1, 0], [0, 0, 0], [1, 1, 2]]) == [0.75, None, 0.5]


def test_accuracy_and_macro_f1_from_the_confusion_matrix_match_scikit_learn() -> None:
    gold, pred = [0, 1, 1, 2, 2, 2, 0, 1, 1], [0, 1, 2, 2, 0, 2, 0, 1, 0]
    counts = confusion_matrix(gold, pred, 3)
    assert accuracy(counts) == pytest.approx(sklearn_metrics.accuracy_score(gold, pred), abs=1e-15)
    assert macro_f1(counts) == pytest.approx(sklearn_metrics.f1_score(gold, pred, average="macro"), abs=1e-15)


def test_a_label_never_seen_nor_predicted_counts_as_zero_f1() -> None:
    counts = confusion_matrix([0, 0, 1], [0, 0, 1], 3)  # label 2: no examples, no predictions
    assert macro_f1(counts) == pytest.approx(2 / 3)
    assert accuracy(counts) == 1.0


def test_evaluation_metrics_name_each_labels_recall_and_skip_labels_without_examples() -> None:
    scores = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "n": 4, "confusion": [[1, 1, 0], [0, 1, 0], [0, 0, 0]]}
    assert evaluation_metrics(scores, ["very bad", "good?", "none"], prefix="test_") == {
        "test_accuracy": 0.5, "test_macro_f1": 0.4, "test_loss": 1.0, "test_recall_very bad": 0.5,
        "test_recall_good_": 1.0,
    }


def test_labels_that_would_share_a_metric_name_are_numbered_instead() -> None:
    scores = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "n": 4, "confusion": [[1, 1], [0, 2]]}
    recalls = {k: v for k, v in evaluation_metrics(scores, ["a/b", "a?b"], prefix="").items() if "recall" in k}
    assert recalls == {"recall_0": 0.5, "recall_1": 1.0}


def test_a_label_outside_mlflows_metric_alphabet_is_made_safe() -> None:
    assert metric_key("a/b:c?") == "a_b_c_"
