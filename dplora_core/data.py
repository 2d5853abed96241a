"""Datasets as labelled examples, deterministic splits and client partitions.

Each dataset is a classification task that a causal LM answers with a label word:
the prompt ends with a cue ("Sentiment:") and the answer is " <label>".
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dplora_core.config import CustomDataConfig, DataConfig
from dplora_core.io import atomic_write


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: str
    question: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """How a dataset becomes prompts: the label words and the prompt around the text."""

    labels: tuple[str, ...]
    template: str  # with {text} (truncated if too long) and optionally {question}

    def prompt(self, example: Example, text: str | None = None) -> str:
        return self.template.format(text=example.text if text is None else text, question=example.question)

    @staticmethod
    def answer(label: str) -> str:
        return f" {label}"


TASKS: dict[str, TaskSpec] = {
    "financial_phrasebank": TaskSpec(
        labels=("negative", "neutral", "positive"),
        template=(
            "Classify the sentiment of this financial news sentence as negative, neutral or positive.\n"
            "Sentence: {text}\nSentiment:"
        ),
    ),
    "pubmedqa": TaskSpec(
        labels=("yes", "no", "maybe"),
        template=(
            "Answer the biomedical research question with yes, no or maybe.\n"
            "Context: {text}\nQuestion: {question}\nAnswer:"
        ),
    ),
}


def task_spec(data: DataConfig) -> TaskSpec:
    """The configured dataset's label words and prompt (data.prompt_template, else the dataset's default)."""
    if data.custom is not None:
        assert data.prompt_template is not None  # the config requires one for custom data
        return TaskSpec(labels=data.custom.words, template=data.prompt_template)
    spec = TASKS[data.dataset]
    return spec if data.prompt_template is None else TaskSpec(labels=spec.labels, template=data.prompt_template)


RAW_FILES: dict[str, tuple[str, ...]] = {
    "financial_phrasebank": ("financial_phrasebank/all-data.csv",),
    "pubmedqa": ("pubmedqa/ori_pqal.json", "pubmedqa/test_ground_truth.json"),
}


class DataError(ValueError):
    """Unusable data; the message names the file, row or client."""


# --- parsing -----------------------------------------------------------------------------


def read_financial_phrasebank(path: Path) -> list[Example]:
    """Parse the Latin-1 `label,news` CSV; drop exact duplicates and sentences with conflicting labels."""
    labels = set(TASKS["financial_phrasebank"].labels)
    by_text: dict[str, set[str]] = {}
    order: list[str] = []
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["label", "news"]:
            raise DataError(f"{path}: expected header 'label,news', found {header!r}")
        for row_no, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise DataError(f"{path}, row {row_no}: expected 2 columns, found {len(row)}")
            label, text = row[0].strip(), row[1].strip()
            if label not in labels:
                raise DataError(f"{path}, row {row_no}: unknown label {label!r} (expected one of {sorted(labels)})")
            if text not in by_text:
                by_text[text] = set()
                order.append(text)
            by_text[text].add(label)
    return [
        Example(id=f"fpb-{i}", text=text, label=next(iter(by_text[text])))
        for i, text in enumerate(order)
        if len(by_text[text]) == 1
    ]


def read_pubmedqa(pqal_path: Path, test_path: Path) -> tuple[list[Example], list[Example]]:
    """Parse PQA-L; return (train, test) with the official 500 test PMIDs."""
    labels = set(TASKS["pubmedqa"].labels)
    records = _read_json(pqal_path)
    test_ids = set(_read_json(test_path))
    train: list[Example] = []
    test: list[Example] = []
    for pmid, rec in records.items():
        for key in ("QUESTION", "CONTEXTS", "final_decision"):
            if key not in rec:
                raise DataError(f"{pqal_path}, PMID {pmid}: missing field {key!r}")
        if rec["final_decision"] not in labels:
            raise DataError(f"{pqal_path}, PMID {pmid}: unknown label {rec['final_decision']!r}")
        ex = Example(id=f"pmid-{pmid}", text=" ".join(rec["CONTEXTS"]), label=rec["final_decision"],
                     question=rec["QUESTION"])
        (test if pmid in test_ids else train).append(ex)
    missing = test_ids - set(records)
    if missing:
        raise DataError(f"{test_path}: {len(missing)} test PMIDs not in {pqal_path}, e.g. {sorted(missing)[0]}")
    return train, test


def read_custom(custom: CustomDataConfig) -> list[Example]:
    """Your own CSV (header row) or JSONL file -> examples whose labels are the label words.

    Errors name the file and the row (CSV, counting the header as row 1) or line (JSONL)."""
    path = Path(custom.path)
    if not path.is_file():
        raise DataError(f"{path}: data.custom.path not found")
    word_of = dict(zip(custom.labels, custom.words, strict=True))
    columns = [c for c in (custom.text_column, custom.label_column, custom.question_column) if c is not None]
    examples: list[Example] = []
    for where, row in _rows(path):
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{path}, {where}: no column {missing[0]!r} (data.custom; found {sorted(row)})")
        label = _cell(row, custom.label_column, path, where, numbers=True)
        text = _cell(row, custom.text_column, path, where)
        if label not in word_of:
            raise DataError(f"{path}, {where}: unknown label {label!r} (data.custom.labels: {list(custom.labels)})")
        if not text:
            raise DataError(f"{path}, {where}: empty text in column {custom.text_column!r}")
        question = _cell(row, custom.question_column, path, where) if custom.question_column else ""
        examples.append(Example(id=f"{path.stem}-{len(examples)}", text=text, label=word_of[label], question=question))
    if not examples:
        raise DataError(f"{path}: no records")
    return examples


def _cell(row: dict[str, Any], column: str, path: Path, where: str, *, numbers: bool = False) -> str:
    """One record's value in `column` as stripped text: a string (or, for a label, a number); a null, a list
    or a short CSV row is an error naming the file, the record and the column, not the text 'None'."""
    value = row[column]
    if isinstance(value, str) or (numbers and isinstance(value, int | float) and not isinstance(value, bool)):
        return str(value).strip()
    raise DataError(f"{path}, {where}: column {column!r} holds {type(value).__name__} {value!r}, not text")


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a CSV with a header row, or of a JSONL file (UTF-8)."""
    try:
        yield from _parsed_rows(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} of the decoded chunk: {err.reason}); "
                        "save the file as UTF-8") from err


def _parsed_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            for row_no, row in enumerate(csv.DictReader(f), start=2):
                yield f"row {row_no}", {k: v for k, v in row.items() if k is not None}
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {line_no}: not JSON: {err}") from err
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {line_no}: expected a JSON object")
                yield f"line {line_no}", record
    else:
        raise DataError(f"{path}: data.custom.path must end in .csv or .jsonl")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by PMID")
    return data


# --- splits ------------------------------------------------------------------------------


def stratified_split(
    examples: Sequence[Example], fraction: float, *, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split off `fraction` of each label (deterministic in `seed`); return (rest, held_out)."""
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for label in sorted({e.label for e in examples}):
        idx = np.array([i for i, e in enumerate(examples) if e.label == label])
        rng.shuffle(idx)
        held.update(idx[: round(fraction * len(idx))].tolist())
    rest = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    return rest, out


def stratified_sample(examples: Sequence[Example], n: int, *, seed: int) -> list[Example]:
    """`n` of `examples` with each label's share kept (largest remainders), drawn with `seed`, in file order."""
    if n >= len(examples):
        return list(examples)
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    labels = sorted(by_label)
    exact = {label: n * len(by_label[label]) / len(examples) for label in labels}
    quota = {label: int(exact[label]) for label in labels}
    for label in sorted(labels, key=lambda k: quota[k] - exact[k])[: n - sum(quota.values())]:
        quota[label] += 1
    rng = np.random.default_rng(seed)
    chosen = sorted(i for label in labels for i in rng.choice(by_label[label], quota[label], replace=False).tolist())
    return [examples[i] for i in chosen]


def prepare_splits(
    dataset: str, raw_dir: Path, *, test_fraction: float, validation_fraction: float, seed: int,
    custom: CustomDataConfig | None = None,
) -> dict[str, list[Example]]:
    """Raw files (or your own file, dataset custom) -> {'train', 'validation', 'test'} examples."""
    if dataset == "custom":
        assert custom is not None
        source = custom.path
        train, test = stratified_split(read_custom(custom), test_fraction, seed=seed)
    else:
        files = [raw_dir / f for f in RAW_FILES[dataset]]
        for f in files:
            if not f.is_file():
                raise DataError(f"{f}: raw data file not found (run `dvc repro ingest` first)")
        source = str(files[0])
        if dataset == "financial_phrasebank":
            train, test = stratified_split(read_financial_phrasebank(files[0]), test_fraction, seed=seed)
        else:
            train, test = read_pubmedqa(files[0], files[1])
    train, validation = stratified_split(train, validation_fraction, seed=seed + 1)
    splits = {"train": train, "validation": validation, "test": test}
    if empty := [name for name, examples in splits.items() if not examples]:
        sizes = ", ".join(f"{name} {len(examples)}" for name, examples in splits.items())
        raise DataError(f"{source}: empty {' and '.join(empty)} split ({sizes} records with data.test_fraction = "
                        f"{test_fraction:g}, data.validation_fraction = {validation_fraction:g}); more records or "
                        "larger fractions")
    return splits


def write_jsonl(path: Path, examples: Sequence[Example]) -> bool:
    """Write `examples` one JSON object a line, unless `path` already holds exactly these bytes; True if written."""
    payload = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples).encode("utf-8")
    if path.is_file() and path.read_bytes() == payload:
        return False
    atomic_write(path, payload)
    return True


def read_jsonl(path: Path, *, labels: Sequence[str] | None = None) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: prepared split not found (run `dvc repro prepare` first)")
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                ex = Example(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as err:
                raise DataError(f"{path}, line {line_no}: not an example record: {err}") from err
            if labels is not None and ex.label not in labels:
                raise DataError(f"{path}, line {line_no}: unknown label {ex.label!r}")
            out.append(ex)
    return out


# --- client partitions -------------------------------------------------------------------


def partition_iid(n: int, num_clients: int, *, seed: int) -> list[list[int]]:
    """Shuffle 0..n-1 and cut into `num_clients` near-equal shards."""
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(s.tolist()) for s in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: Sequence[str], num_clients: int, *, alpha: float, seed: int, max_tries: int = 100
) -> list[list[int]]:
    """Label skew: each class is spread over clients with proportions ~ Dirichlet(alpha * 1_K).

    Smaller alpha means more skew. Redraws until every client has at least one example.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    by_class = {c: np.array([i for i, y in enumerate(labels) if y == c]) for c in classes}
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(by_class[c])
            p = rng.dirichlet(np.full(num_clients, alpha))  # (K,)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if all(shards):
            return [sorted(s) for s in shards]
    raise DataError(
        f"partition: Dirichlet(alpha={alpha}) left a client empty in {max_tries} draws "
        f"for {len(labels)} examples and {num_clients} clients; raise alpha or use fewer clients"
    )


def partition_quantity(n: int, num_clients: int, *, alpha: float, seed: int) -> list[list[int]]:
    """Quantity skew: client k gets a share p_k of the shuffled records, p ~ Dirichlet(alpha * 1_K), labels IID.

    Smaller alpha means more unequal sizes. Every client keeps at least one record; a share too small for
    that is raised to one, taken from the largest client.
    """
    if n < num_clients:
        raise DataError(f"partition: {n} examples cannot give each of {num_clients} clients one")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    sizes = np.floor(rng.dirichlet(np.full(num_clients, alpha)) * n).astype(int)  # (K,)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    for k in np.flatnonzero(sizes == 0):
        sizes[np.argmax(sizes)] -= 1
        sizes[k] = 1
    return [sorted(s.tolist()) for s in np.split(perm, np.cumsum(sizes)[:-1])]


def label_histogram(examples: Sequence[Example], labels: Sequence[str]) -> dict[str, int]:
    counts = Counter(e.label for e in examples)
    return {label: counts.get(label, 0) for label in labels}
