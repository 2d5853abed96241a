from __future__ import annotations

from pathlib import Path

import pytest

from dplora_core.config import CustomDataConfig
from dplora_core.data import (
    DataError,
    prepare_splits,
    read_custom,
    read_financial_phrasebank,
    read_jsonl,
    read_pubmedqa,
    stratified_sample,
    stratified_split,
)
from tests.helpers import tiny_config


def test_financial_phrasebank_parses_latin1(raw_dir: Path) -> None:
    examples = read_financial_phrasebank(raw_dir / "financial_phrasebank" / "all-data.csv")
    assert 4700 < len(examples) <= 4846
    assert {e.label for e in examples} == {"negative", "neutral", "positive"}
    assert any(not e.text.isascii() for e in examples)  # Latin-1 characters decoded, not dropped
    assert len({e.text for e in examples}) == len(examples)  # duplicates removed


def test_fpb_drops_duplicates_and_conflicting_labels(tmp_path: Path) -> None:
    path = tmp_path / "fpb.csv"
    rows = 'label,news\npositive,"Caf\xe9 sales rose ."\npositive,"Caf\xe9 sales rose ."\n'
    rows += 'negative,"Profit fell ."\npositive,"Profit fell ."\nneutral,"It is a company ."\n'
    path.write_bytes(rows.encode("latin-1"))
    examples = read_financial_phrasebank(path)
    expected = [("Café sales rose .", "positive"), ("It is a company .", "neutral")]
    assert [(e.text, e.label) for e in examples] == expected


def test_fpb_unknown_label_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "fpb.csv"
    path.write_bytes(b'label,news\nneutral,"ok"\nbullish,"up"\n')
    with pytest.raises(DataError, match=r"fpb\.csv, row 3: unknown label 'bullish'"):
        read_financial_phrasebank(path)


def test_fpb_wrong_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fpb.csv"
    path.write_bytes(b"sentiment,text\nneutral,ok\n")
    with pytest.raises(DataError, match="expected header"):
        read_financial_phrasebank(path)


def test_pubmedqa_uses_the_official_test_split(raw_dir: Path) -> None:
    train, test = read_pubmedqa(raw_dir / "pubmedqa" / "ori_pqal.json", raw_dir / "pubmedqa" / "test_ground_truth.json")
    assert len(train) == 500 and len(test) == 500
    assert {e.label for e in test} == {"yes", "no", "maybe"}
    assert all(e.question and e.text for e in train + test)
    assert not {e.id for e in train} & {e.id for e in test}


def test_pubmedqa_missing_field_names_pmid(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"123": {"QUESTION": "q?", "CONTEXTS": ["c"]}}')
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="PMID 123: missing field 'final_decision'"):
        read_pubmedqa(tmp_path / "p.json", tmp_path / "t.json")


def test_splits_are_deterministic_disjoint_and_stratified(raw_dir: Path) -> None:
    a = prepare_splits("financial_phrasebank", raw_dir, test_fraction=0.2, validation_fraction=0.1, seed=0)
    b = prepare_splits("financial_phrasebank", raw_dir, test_fraction=0.2, validation_fraction=0.1, seed=0)
    assert a == b
    ids = [{e.id for e in a[s]} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    share = {s: sum(e.label == "neutral" for e in a[s]) / len(a[s]) for s in a}
    assert max(share.values()) - min(share.values()) < 0.01


def test_stratified_split_fraction() -> None:
    from dplora_core.data import Example

    examples = [Example(id=str(i), text=str(i), label="ab"[i % 2]) for i in range(100)]
    rest, held = stratified_split(examples, 0.2, seed=1)
    assert len(held) == 20 and len(rest) == 80
    assert sum(e.label == "a" for e in held) == 10


def test_a_capped_split_keeps_each_label_s_share_in_file_order(raw_dir: Path) -> None:
    """FPB's file is grouped by label: its first 64 records are mostly positive, a sample of 64 is not."""
    examples = read_financial_phrasebank(raw_dir / "financial_phrasebank" / "all-data.csv")
    sample = stratified_sample(examples, 64, seed=0)
    share = {label: sum(e.label == label for e in examples) * 64 / len(examples) for label in ("negative", "neutral")}
    assert len(sample) == 64 and all(abs(sum(e.label == k for e in sample) - v) < 1 for k, v in share.items())
    positions = [examples.index(e) for e in sample]
    assert positions == sorted(positions) and sample == stratified_sample(examples, 64, seed=0)
    assert sample != stratified_sample(examples, 64, seed=1)
    assert stratified_sample(examples[:5], 9, seed=0) == examples[:5]  # a cap above the size keeps all


def test_the_caps_sample_the_split_unless_told_to_keep_the_first_records(tmp_path: Path, raw_dir: Path) -> None:
    from tasks.data import prepare_data
    from tasks.runtime import split_examples

    cfg = tiny_config(tmp_path / "no-model", tmp_path, raw_dir, data__max_train_examples=40)
    prepare_data.fn(cfg)
    whole = read_jsonl(tmp_path / "prepared" / "financial_phrasebank" / "train.jsonl")
    assert list(split_examples(cfg.data, "train")) == stratified_sample(whole, 40, seed=cfg.data.split_seed)
    first = cfg.data.model_copy(update={"cap_sampling": "first"})
    assert list(split_examples(first, "train")) == whole[:40]


def test_missing_raw_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"all-data\.csv: raw data file not found"):
        prepare_splits("financial_phrasebank", tmp_path, test_fraction=0.2, validation_fraction=0.1, seed=0)


# --- custom datasets ---------------------------------------------------------------------


def custom(path: Path, **overrides: object) -> CustomDataConfig:
    spec: dict[str, object] = {
        "path": str(path), "text_column": "sentence", "label_column": "y", "labels": ["0", "1"],
        "label_words": ["bad", "good"],
    }
    return CustomDataConfig.model_validate(spec | overrides)


def test_a_custom_csv_becomes_examples_labelled_with_the_label_words(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text('sentence,y,extra\nSales fell,0,x\n"Profit rose, again",1,y\n', encoding="utf-8")
    examples = read_custom(custom(path))
    assert [(e.text, e.label) for e in examples] == [("Sales fell", "bad"), ("Profit rose, again", "good")]


def test_a_custom_jsonl_with_a_question_column(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"sentence": "ctx", "q": "why?", "y": 1}\n\n{"sentence": "c2", "q": "how?", "y": 0}\n')
    examples = read_custom(custom(path, question_column="q"))
    assert [(e.text, e.question, e.label) for e in examples] == [("ctx", "why?", "good"), ("c2", "how?", "bad")]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("sentence,label\nSales fell,0\n", ".csv", r"corpus\.csv, row 2: no column 'y'"),
        ("sentence,y\nSales fell,0\nProfit rose,2\n", ".csv", r"corpus\.csv, row 3: unknown label '2'"),
        ("sentence,y\n ,1\n", ".csv", r"corpus\.csv, row 2: empty text in column 'sentence'"),
        ('{"sentence": "a", "y": "0"}\nnot json\n', ".jsonl", r"corpus\.jsonl, line 2: not JSON"),
        ("sentence,y\n", ".csv", r"corpus\.csv: no records"),
        ("a\tb\n", ".tsv", r"corpus\.tsv: data\.custom\.path must end in \.csv or \.jsonl"),
        ('{"sentence": null, "y": 1}\n', ".jsonl", r"corpus\.jsonl, line 1: column 'sentence' holds NoneType None"),
        ('{"sentence": ["a", "b"], "y": 1}\n', ".jsonl", r"line 1: column 'sentence' holds list \['a', 'b'\]"),
        ("y,sentence\n1\n", ".csv", r"corpus\.csv, row 2: column 'sentence' holds NoneType None, not text"),
    ],
)
def test_custom_data_errors_name_the_file_and_row(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_custom(custom(path))


def test_a_custom_file_not_in_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_bytes("sentence,y\nUmsatz gestärkt,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"corpus\.csv: not UTF-8 text .* save the file as UTF-8"):
        read_custom(custom(path))


def test_a_split_left_empty_by_the_fractions_is_refused_before_training(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("sentence,y\n" + "".join(f"text {i},{i % 2}\n" for i in range(12)))
    with pytest.raises(DataError, match=r"corpus\.csv: empty validation and test split \(train 12, validation 0, "
                       r"test 0 records with data\.test_fraction = 0\.05, data\.validation_fraction = 0\.05\)"):
        prepare_splits("custom", tmp_path, test_fraction=0.05, validation_fraction=0.05, seed=0, custom=custom(path))


def test_a_missing_custom_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: data\.custom\.path not found"):
        read_custom(custom(tmp_path / "nope.csv"))


def test_custom_splits_are_stratified(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("sentence,y\n" + "".join(f"text {i},{i % 2}\n" for i in range(100)))
    splits = prepare_splits(
        "custom", tmp_path, test_fraction=0.2, validation_fraction=0.1, seed=0, custom=custom(path)
    )
    assert {k: len(v) for k, v in splits.items()} == {"train": 72, "validation": 8, "test": 20}
    assert sum(e.label == "good" for e in splits["test"]) == 10


def test_preparing_unchanged_splits_keeps_files_and_cached_views(tmp_path: Path, raw_dir: Path) -> None:
    from tasks.data import prepare_data
    from tasks.runtime import split_examples, split_path

    cfg = tiny_config(tmp_path / "no-model", tmp_path, raw_dir)
    prepare_data.fn(cfg)
    written = split_path(cfg.data, "train").stat().st_mtime_ns
    split_examples(cfg.data, "train")
    prepare_data.fn(cfg)
    hits = split_examples.cache_info().hits
    split_examples(cfg.data, "train")
    assert split_examples.cache_info().hits == hits + 1
    assert split_path(cfg.data, "train").stat().st_mtime_ns == written


def test_preparing_changed_splits_drops_the_cached_views(tmp_path: Path, raw_dir: Path) -> None:
    from tasks.data import prepare_data
    from tasks.runtime import split_examples

    cfg = tiny_config(tmp_path / "no-model", tmp_path, raw_dir)
    prepare_data.fn(cfg)
    before = split_examples(cfg.data, "train")
    reshuffled = cfg.model_copy(update={"data": cfg.data.model_copy(update={"split_seed": 1})})
    prepare_data.fn(reshuffled)  # the same files, other records
    assert split_examples(cfg.data, "train") != before
