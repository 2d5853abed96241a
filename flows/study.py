"""`dplora study`: run a grid of experiments (dplora_core.study), skip the finished ones, tabulate the results.

Each cell is one `dplora-pipeline` subflow with its own run directory, MLflow run and guarantee. A
killed study resumes where it stopped: finished cells are read back, the interrupted one continues
from its last checkpoint. The results go to `outputs/<study>/results.json` and, if `results_doc` is
set, into that markdown file between the study's markers, so a document's numbers always come
from the command that produced them. Runs that recorded a test confusion matrix add each label's recall;
a study with non-IID partitions also tabulates them per seed (each client's records and label skew, its
noise multiplier) beside each cell's test accuracy.

A study with a `results_doc` also keeps one small JSON record per finished run beside it
(`<doc dir>/results/runs/<study>/<run>.json`: the run's full config, its table row, its per-round
history and the git commit it ran at). The records are committed with the document, so a study too
long for one sitting resumes from a fresh clone, where `outputs/` is empty, and every number in the
document can be traced to the config that produced it. `--ignore-records` re-runs recorded cells.
A cell that trains exactly what another study's recorded run trained (only the run names differ) is
not trained twice: that record is copied into the study's folder, naming the run it was (`trained_as`).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import ValidationError

from dplora_core.checkpoint import RESUMABLE_SECTIONS, load_checkpoint, set_aside
from dplora_core.config import ExperimentConfig, load_config, predating_fields
from dplora_core.evaluate import answer_counts, recall_per_label, true_counts
from dplora_core.io import atomic_write, json_bytes, read_json
from dplora_core.privacy.accountant import short_guarantee
from dplora_core.study import Cell, StudyConfig, expand, mean_sd, selected, summarise
from flows.federated import checkpoint_config_changes
from flows.pipeline import dplora_pipeline
from flows.plots import study_bars, study_frontier

NUMBERS = ("val_accuracy", "val_loss", "test_accuracy", "test_macro_f1", "zero_shot_accuracy",
           "majority_class_accuracy", "epsilon", "server_view_epsilon", "upload_bytes_per_client_round",
           "train_seconds")


# Sections that do not change what a run trains (where it is tracked, which executor ran the clients).
UNTRAINED_SECTIONS = {section.removesuffix(".") for section in RESUMABLE_SECTIONS}


def finished_run(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(metrics.json, training.json) of a run that finished with exactly this config (training.json's config)
    and whose metrics were computed from that very training.json (its sha256 in metrics.json), else None."""
    metrics, training = cfg.run_dir / "metrics.json", cfg.run_dir / "training.json"
    if not (metrics.is_file() and training.is_file()):
        return None
    training_bytes = training.read_bytes()
    record: dict[str, Any] = read_json(training, training_bytes)
    if not _same_config(record["config"], cfg):
        return None
    result: dict[str, Any] = read_json(metrics)
    if "training_sha256" not in result:  # written before metrics.json recorded it: at least evaluated after
        return (result, record) if metrics.stat().st_mtime >= training.stat().st_mtime else None
    if result["training_sha256"] != hashlib.sha256(training_bytes).hexdigest():
        return None  # evaluated before the last training (e.g. a resume with more rounds stopped before evaluation)
    return result, record


def _same_config(stored: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """Whether a stored config trained what `cfg` would, once fields added since it was written take what they
    did before (predating_fields, else their defaults). Unlike a resume (RESUMABLE_CHANGES), rounds count."""
    try:
        then = ExperimentConfig.model_validate(predating_fields(stored)).model_dump(
            mode="json", exclude=UNTRAINED_SECTIONS
        )
    except ValidationError:
        return False
    return then == cfg.model_dump(mode="json", exclude=UNTRAINED_SECTIONS)


def set_aside_superseded(cfg: ExperimentConfig) -> Path | None:
    """Rename a run dir whose checkpoint has a config this cell cannot resume (the study was edited) to
    `<run_dir>.superseded-<UTC time>`, so the cell starts afresh and nothing written is lost."""
    checkpoint = load_checkpoint(cfg.run_dir / "checkpoint")
    if checkpoint is None or not checkpoint_config_changes(cfg, checkpoint):
        return None
    return set_aside(cfg.run_dir)


def result_row(cell: Cell, metrics: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """One cell's numbers and guarantee, flat, from its metrics.json and training.json."""
    test, priv, b = metrics["test"], metrics["privacy"], metrics["bytes"]
    # the last round on the validation split (the selection split); none if the budget guard stopped round 1
    last = training["history"][-1] if training["history"] else {}
    f = cell.config.federation
    uploads = metrics["rounds"] * f.clients_per_round
    return {
        "name": cell.config.name,
        "levels": cell.levels,
        "seed": cell.seed,
        "val_accuracy": last.get("val_accuracy"),
        "val_loss": last.get("val_loss"),
        "test_accuracy": test["final"]["accuracy"],
        "test_macro_f1": test["final"]["macro_f1"],
        # counts[t][p]: test examples of label t predicted p (absent from records written before 2026-12-07)
        **({"test_confusion": {"labels": test["labels"], "counts": test["final"]["confusion"]}}
           if "labels" in test else {}),
        "zero_shot_accuracy": test["zero_shot"]["accuracy"],
        "majority_class_accuracy": test["majority_class_accuracy"],
        "epsilon": priv["epsilon"],
        "delta": priv["delta"] if priv["mode"] != "none" else None,
        "privacy_mode": priv["mode"],
        "accountant": priv["accountant"] if priv["mode"] != "none" else None,
        "guarantee": priv["guarantee"],
        # mode distributed: what the server, which sees each upload with its noise share only, gets (else absent)
        **({"server_view_epsilon": priv["server_view_epsilon"]} if "server_view_epsilon" in priv else {}),
        # mode client keeps participation on the server, so per-upload bytes are not in its outputs
        "upload_bytes_per_client_round": b["up"] / uploads if b.get("up") is not None and uploads else None,
        "train_seconds": metrics["train_seconds"],
        "rounds": metrics["rounds"],
        "planned_rounds": f.rounds,
    }


def record_path(study: StudyConfig, cell: Cell) -> Path | None:
    """Where the committed record of a cell's finished run lives (None: the study writes no document)."""
    if study.results_doc is None:
        return None
    return Path(study.results_doc).parent / "results" / "runs" / study.name / f"{cell.config.name}.json"


def recorded_row(study: StudyConfig, cell: Cell) -> dict[str, Any] | None:
    """The table row of a recorded run that trained exactly this cell's config, else None. A run recorded by
    another study that trained the same config under another name (its twin) counts too: it is copied into
    this study's records, naming the run it was (`trained_as`), so that each study's folder stays whole."""
    path = record_path(study, cell)
    if path is None:
        return None
    record: dict[str, Any] | None = read_json(path) if path.is_file() else None
    copied = record is None or not _same_config(record["config"], cell.config)
    if copied:  # missing, or the study was edited since: a twin's record, else the cell runs (its record replaces this)
        record = twin_record(path.parent.parent, cell.config)
    if record is None:
        return None
    row = {**record["row"], "name": cell.config.name, "levels": cell.levels, "seed": cell.seed}
    if copied:
        save_record(path, {**record, "row": row})
    return row


def twin_record(runs_dir: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """A record in another study's folder (`runs_dir/<study>/<run>.json`) of a run that trained what `cfg`
    trains under another name (the name only names the run directory), as `cfg`'s own record, else None."""
    for path in sorted(runs_dir.glob("*/*.json")):
        other: dict[str, Any] = read_json(path)
        name = other["config"]["name"]
        if name != cfg.name and _same_config({**other["config"], "name": cfg.name}, cfg):
            trained_as = other.get("trained_as", f"{path.parent.name}/{name}")
            return {**other, "config": cfg.model_dump(mode="json"), "trained_as": trained_as}
    return None


def write_record(
    study: StudyConfig, cell: Cell, row: dict[str, Any], training: dict[str, Any], commit: str | None
) -> None:
    """Record a finished run (config, row, per-round history, the commit of the code that trained it, None if
    unknown) unless the same row is recorded."""
    path = record_path(study, cell)
    if path is None:
        return
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old["row"] == row and _same_config(old["config"], cell.config):
            return
    save_record(path, {"config": cell.config.model_dump(mode="json"), "row": row, "history": training["history"],
                       "commit": commit, "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def save_record(path: Path, record: dict[str, Any]) -> None:
    """Write a run record as the committed records are written (indented JSON, atomically)."""
    atomic_write(path, json_bytes(record, indent=1) + b"\n")


def code_version(study: StudyConfig | None = None) -> str | None:
    """`git rev-parse HEAD`, with "+dirty" if tracked files were changed (except what the study itself writes:
    its results document and records); None outside a git checkout."""
    own = [f":(exclude){p}" for p in study_outputs(study)] if study is not None else []
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *own],
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.strip() + ("+dirty" if dirty.strip() else "")


def study_outputs(study: StudyConfig) -> list[str]:
    """The tracked paths a study rewrites as it runs: its results document and the folder beside it."""
    if study.results_doc is None:
        return []
    doc = Path(study.results_doc)
    return [doc.as_posix(), (doc.parent / "results").as_posix()]


@flow(name="dplora-study")
def run_study(
    study: StudyConfig, run_missing: bool = True, use_records: bool = True, only: Sequence[str] = ()
) -> dict[str, Any]:
    """Every cell x seed of the study, finished ones read back (from the run directory, else from the
    committed record), then the missing ones trained; results.json and the document section, rewritten
    after each run with every row known so far, so that an interrupted study still shows all it has.
    `run_missing=False` only tabulates the finished runs; `use_records=False` runs the cells that have only
    a record again; `only` (globs of run names, e.g. "*-s0"): train only the cells it names, tabulating
    the others' finished runs."""
    log = get_run_logger()
    base = load_config(study.base)
    cells = expand(study, base.model_dump(mode="json"))
    output_dir = Path(base.tracking.output_dir)
    commit = code_version(study)  # the code this process loaded: later edits to the checkout do not run here
    rows: dict[int, dict[str, Any]] = {}  # by the cell's position in the grid, which orders the table
    failed: dict[str, str] = {}
    published: dict[str, Any] | None = None  # the last publish, while nothing has changed since
    for training in (False, True):  # first every finished run, then training the missing ones
        for i, cell in enumerate(cells, 1):
            if i in rows or cell.config.name in failed:
                continue
            if training and not (run_missing and (not only or selected(cell, only))):
                continue
            # one failed cell (its training, or a file of it that does not read) must not lose the others:
            # it is listed and re-run next time
            try:
                row, ran = study_cell(
                    study, cell, f"{i}/{len(cells)}", commit, use_records=use_records, run_missing=training
                )
            except Exception as err:
                failed[cell.config.name] = f"{type(err).__name__}: {err}"
                log.error("study %s: %s failed: %s", study.name, cell.config.name, failed[cell.config.name])
                published = None
                continue
            if row is not None:
                rows[i] = row
                published = None
            if ran:
                published = publish(study, output_dir, [rows[k] for k in sorted(rows)], failed, len(cells), cells)
    if published is None:
        published = publish(study, output_dir, [rows[k] for k in sorted(rows)], failed, len(cells), cells)
    return published


def study_cell(
    study: StudyConfig, cell: Cell, position: str, commit: str | None, *, run_missing: bool, use_records: bool
) -> tuple[dict[str, Any] | None, bool]:
    """One cell's table row (None if it has not finished and is not to run) and whether it trained now: read
    back from its run directory, else from its committed record, else trained (resuming any checkpoint)."""
    finished = finished_run(cell.config)
    ran = finished is None
    if finished is None:
        if use_records and (row := recorded_row(study, cell)) is not None:
            return row, False
        if not run_missing:
            return None, False
        finished = train_cell(study, cell, position)
    row = result_row(cell, *finished)
    write_record(study, cell, row, finished[1], commit if ran else None)  # read back: trained by unknown code
    return row, ran


def train_cell(study: StudyConfig, cell: Cell, position: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one cell's pipeline (resuming its checkpoint; a superseded run directory is moved aside first)
    and return its (metrics.json, training.json)."""
    log = get_run_logger()
    log.info("study %s: cell %s, %s", study.name, position, cell.config.name)
    if superseded := set_aside_superseded(cell.config):
        log.warning("study %s: %s was run with another config; moved to %s, starting afresh",
                    study.name, cell.config.name, superseded)
    start = time.monotonic()
    metrics = dplora_pipeline(cell.config, resume=True)
    log.info("study %s: %s done in %.0f s", study.name, cell.config.name, time.monotonic() - start)
    return metrics, read_json(cell.config.run_dir / "training.json")


def publish(
    study: StudyConfig, output_dir: Path, rows: list[dict[str, Any]], failed: dict[str, str], planned: int,
    cells: Sequence[Cell] = (),
) -> dict[str, Any]:
    """Write `output_dir/<study>/results.json` and, if set, the study's section of `results_doc` (table, PNG and,
    given the grid's cells, the per-seed table of its non-IID partitions); a plot of the study's that the
    section no longer links is deleted."""
    results: dict[str, Any] = {"study": study.model_dump(mode="json"), "planned": planned, "rows": rows,
                               "failed": failed, "summary": summarise(rows, NUMBERS)}
    out = output_dir / study.name
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json_bytes(results))
    if study.results_doc is None:
        return results
    doc = Path(study.results_doc)
    bars_png = doc.parent / "results" / f"{study.name}.png"
    frontier_png = doc.parent / "results" / f"{study.name}-frontier.png"
    images: list[Path] = []
    if not rows:  # e.g. the study was edited: its old table no longer applies
        write_section(doc, study.name,
                      f"No run of this study's current grid has finished yet (0 of {planned}): run the command above.")
    else:
        images.append(study_bars(results["summary"], bars_png,
                                 title=f"study {study.name}: mean over seeds, bars one sample sd"))
        modes = {tuple(r["levels"].values()): r["privacy_mode"] for r in rows}
        if study.frontier is not None and "sample" in modes.values():
            images.append(study_frontier(
                results["summary"], modes, study.frontier, frontier_png,
                title=f"study {study.name}: test accuracy against record-level epsilon, mean over seeds, bars one sd",
            ))
        links = "".join(f"![{p.stem}]({p.relative_to(doc.parent).as_posix()})\n" for p in images)
        tables = [results_table(results), recall_table(rows), partition_table(cells, rows)]
        body = links + "\n" + "\n\n".join(t for t in tables if t)
        write_section(doc, study.name, body)
    for stale in {bars_png, frontier_png} - set(images):  # a plot the section no longer links
        stale.unlink(missing_ok=True)
    return results


def fmt(value: tuple[float, float] | None, digits: int = 3) -> str:
    """mean ± sd, or mean alone for one seed, or '-'."""
    if value is None:
        return "-"
    mean, sd = value
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: one row per grid cell, mean ± sd over seeds, each epsilon's relation, accountant and delta named.
    Validation (the last round's, on the capped validation split) is what to choose settings by; test is reported."""
    rows = results["rows"]
    axes = list(results["study"]["axes"])
    header = [*axes, "seeds", "val acc.", "val loss", "test accuracy", "macro-F1", "zero-shot acc.", "majority acc.",
              "epsilon (relation, accountant, delta)", "upload B / client / round", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    privacy = {tuple(r["levels"].values()): r for r in rows}
    for s in results["summary"]:
        r = privacy[tuple(s["levels"].values())]
        eps = "∞ (no DP)" if r["privacy_mode"] == "none" else (
            f"{fmt(s['epsilon'], 2)} "
            f"({short_guarantee(mode=r['privacy_mode'], accountant=r['accountant'], delta=r['delta'])})"
        )
        if s["server_view_epsilon"] is not None:  # mode distributed
            eps += f"; each upload, as the server sees it: {fmt(s['server_view_epsilon'], 2)}"
        up = "-" if s["upload_bytes_per_client_round"] is None else f"{s['upload_bytes_per_client_round'][0]:,.0f}"
        lines.append("| " + " | ".join([
            *s["levels"].values(), str(s["n"]), fmt(s["val_accuracy"]), fmt(s["val_loss"]),
            fmt(s["test_accuracy"]), fmt(s["test_macro_f1"]),
            fmt(s["zero_shot_accuracy"]), fmt(s["majority_class_accuracy"]), eps, up, fmt(s["train_seconds"], 0),
        ]) + " |")
    done = len(rows)
    if done < results["planned"]:
        lines += ["", f"{done} of {results['planned']} runs finished so far (the command resumes the rest)."]
    short = [f"{r['name']} ({r['rounds']} of {r['planned_rounds']})" for r in rows
             if r.get("rounds", 0) < r.get("planned_rounds", 0)]
    if short:
        lines += ["", "Stopped by the budget guard before their planned rounds "
                  "(as after an interrupted round, charged again): " + ", ".join(short)]
    if results["failed"]:
        lines += ["", "Failed cells (re-run the command to retry): " + ", ".join(sorted(results["failed"]))]
    return "\n".join(lines)


def same_test_split(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' `test_confusion`s count the same test split: the same labels, as many of each."""
    return bool(a["labels"] == b["labels"] and true_counts(a["counts"]) == true_counts(b["counts"]))


def recall_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown, for the cells whose runs recorded a test confusion matrix: each true label's test recall and
    how many test records were answered with each label, mean (± sd) over those runs; '' if none recorded one.
    A study's cells share one test split; a run whose test split differs from the first one's is left out."""
    recorded = [r for r in rows if "test_confusion" in r]
    if not recorded:
        return ""
    first = recorded[0]["test_confusion"]
    labels, support = first["labels"], true_counts(first["counts"])
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    other_split = []
    for r in recorded:
        if same_test_split(r["test_confusion"], first):
            groups.setdefault(tuple(r["levels"].values()), []).append(r)
        else:
            other_split.append(r.get("name", "?"))
    header = [*recorded[0]["levels"], "runs", *[f"recall {label}" for label in labels],
              "answers " + " / ".join(labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for levels, members in groups.items():
        counts = [m["test_confusion"]["counts"] for m in members]  # each (L, L), rows the true label
        recalls = [recall_per_label(c) for c in counts]
        answered = [answer_counts(c) for c in counts]
        lines.append("| " + " | ".join([
            *levels, str(len(members)),
            *[fmt(mean_sd([x for r in recalls if (x := r[i]) is not None]) if support[i] else None)
              for i in range(len(labels))],
            " / ".join(f"{statistics.fmean(a[p] for a in answered):.0f}" for p in range(len(labels))),
        ]) + " |")
    return "\n".join([
        f"Test recall by true label (the test split holds {' / '.join(map(str, support))} records of "
        f"{' / '.join(labels)}), from each run's confusion matrix, mean ± sd over the runs that recorded one "
        "(from 2026-12-07); 'answers': how many test records were answered with each label, mean over them:",
        "", *lines,
        *(["", "Left out, tested on another split: " + ", ".join(other_split)] if other_split else []),
    ])


def partition_table(cells: Sequence[Cell], rows: Sequence[dict[str, Any]]) -> str:
    """Markdown, for the cells with a non-IID partition: one row per seed (and partition) with each client's
    records and share of the training split's commonest label, the record-level noise multipliers, and each
    finished cell's test accuracy on that partition, which the main table's mean over seeds hides. The
    partitions are recomputed from the configs (a pure function of the seed and the training split)."""
    from dplora_core.data import label_histogram, task_spec
    from tasks.data import client_shards, prepare_data, shard_histograms
    from tasks.runtime import split_examples, split_path
    from tasks.training import record_noise_multiplier

    skewed = [c for c in cells if c.config.federation.partition != "iid"]
    if not skewed:
        return ""
    finished = {r["name"]: r for r in rows}
    varying = [axis for axis in skewed[0].levels if len({c.levels[axis] for c in skewed}) > 1]

    def column(cell: Cell) -> str:
        return " ".join(cell.levels[axis] for axis in varying)

    columns = list(dict.fromkeys(column(c) for c in skewed))
    data = skewed[0].config.data  # a study's cells share one dataset
    if not split_path(data, "train").is_file():  # a fresh clone tabulating committed records
        prepare_data.fn(skewed[0].config)
    totals = label_histogram(split_examples(data, "train"), task_spec(data).labels)
    common = max(totals, key=lambda label: totals[label])
    header = ["seed", "partition", f"clients: records ({common} share)",
              f"largest client: share of records, {common} share", "record-level noise multipliers",
              *[col or "test acc. (macro-F1)" for col in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for c in skewed:
        f = c.config.federation
        groups.setdefault((c.seed, f.partition, f.dirichlet_alpha, f.num_clients), []).append(c)
    for (seed, partition, alpha, _), group in groups.items():
        cfg = group[0].config
        hist = shard_histograms(cfg, client_shards(cfg))
        sizes = [sum(h.values()) for h in hist]
        b = sizes.index(max(sizes))
        sampled = [c for c in group if c.config.privacy.mode == "sample"]
        if sampled:  # the least noise the partition gets: the sample-mode cell with the largest target epsilon
            dp = max(sampled, key=lambda c: c.config.privacy.target_epsilon or 0.0).config
            zs = ", ".join(f"{record_noise_multiplier(dp, n):.2f}" for n in sizes)
            p = dp.privacy
            label = short_guarantee(mode=p.mode, accountant=p.accountant, delta=p.delta)
            noise = f"ε={p.target_epsilon:g} ({label}): {zs}" if p.target_epsilon else zs
        else:
            noise = "-"
        names = {column(c): c.config.name for c in group}
        lines.append("| " + " | ".join([
            str(seed), partition if partition != "dirichlet" else f"dirichlet α={alpha:g}",
            ", ".join(f"{n:,} ({h[common] / n:.0%})" for n, h in zip(sizes, hist, strict=True)),
            f"{sizes[b] / sum(sizes):.0%}, {hist[b][common] / sizes[b]:.0%}", noise,
            *["excluded" if col not in names else accuracy_cell(finished.get(names[col])) for col in columns],
        ]) + " |")
    return "\n".join(["Per seed, the non-IID partitions (recomputed from the configs; simulation statistics, outside "
                      "DP: a deployment would not publish its clients' label counts) and each cell's test accuracy "
                      "(macro-F1) on them, '-' if it has not run yet:", "", *lines])


def accuracy_cell(row: dict[str, Any] | None) -> str:
    """'test accuracy (macro-F1)' of a finished run, '-' for one not run yet."""
    return "-" if row is None else f"{row['test_accuracy']:.3f} ({row['test_macro_f1']:.3f})"


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- study:NAME -->` and `<!-- /study:NAME -->` in `doc` (appended if absent)."""
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(doc, text.encode())
