from __future__ import annotations

from pathlib import Path

import pytest

from dplora_core.data import (
    DataError,
    prepare_splits,
    read_financial_phrasebank,
    read_pubmedqa,
    stratified_split,
)


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


def test_missing_raw_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"all-data\.csv: raw data file not found"):
        prepare_splits("financial_phrasebank", tmp_path, test_fraction=0.2, validation_fraction=0.1, seed=0)
