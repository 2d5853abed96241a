"""What people read: the results table printed at the end of a run, and `dplora report` (markdown and PNGs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from dplora_core.config import ExperimentConfig
from dplora_core.evaluate import recall_per_label
from dplora_core.io import atomic_write
from flows import plots
from tasks.runtime import partition_path


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _byte_rows(b: dict[str, Any]) -> list[tuple[str, str]]:
    if b["up"] is None:  # mode client: participation counts stay on the server
        return [
            ("bytes per adapter payload", _mib(b["adapter"])),
            ("full model (fp32)", _mib(b["full_model"])),
            ("saving per exchange", f"{b['full_model'] / max(b['adapter'], 1):,.0f}x"),
        ]
    return [
        ("bytes up / down (LoRA)", f"{_mib(b['up'])} / {_mib(b['down'])}"),
        ("full-model exchange (fp32)", f"{_mib(b['full_model_up'])} / {_mib(b['full_model_down'])}"),
        ("upload saving vs full model", f"{b['full_model_up'] / max(b['up'], 1):,.0f}x"),
        ("download saving vs full model", f"{b['full_model_down'] / max(b['down'], 1):,.0f}x"),
    ]


def recalls(confusion: list[list[int]], labels: list[str]) -> str:
    """Each true label's recall, e.g. "negative 0.81, neutral 0.93, positive 0.62"."""
    return ", ".join(f"{label} {'-' if r is None else f'{r:.2f}'}"
                     for label, r in zip(labels, recall_per_label(confusion), strict=True))


def format_summary(metrics: dict[str, Any], wall_seconds: float | None = None) -> str:
    test, priv, b = metrics["test"], metrics["privacy"], metrics["bytes"]
    zs, fin = test["zero_shot"], test["final"]
    eps = "infinity (no DP)" if priv["epsilon"] is None else f"{priv['epsilon']:.3f}"
    rows = [
        ("test examples", f"{fin['n']}"),
        ("zero-shot accuracy / macro-F1", f"{zs['accuracy']:.4f} / {zs['macro_f1']:.4f}"),
        ("final accuracy / macro-F1", f"{fin['accuracy']:.4f} / {fin['macro_f1']:.4f}"),
        ("majority-class accuracy", f"{test['majority_class_accuracy']:.4f}"),
        *([("final recall by true label", recalls(fin["confusion"], test["labels"]))] if "labels" in test else []),
        ("paper bound" if priv["mode"] == "paper" else "epsilon spent", eps),
        ("delta", f"{priv['delta']:g}" if priv["mode"] != "none" else "-"),
        ("guarantee", priv["guarantee"]),
        ("rounds x clients", f"{metrics['rounds']} x {metrics['num_clients']}"),
        *_byte_rows(b),
        ("training wall time", f"{metrics['train_seconds']:.0f} s"),
    ]
    if metrics.get("stopped_by_budget_guard"):
        rows.append(("stopped early", metrics["stopped_by_budget_guard"]))
    if wall_seconds is not None:
        rows.append(("total wall time", f"{wall_seconds:.0f} s"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows[:5]))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])


def write_report(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """reports/: a markdown summary and PNG plots of this config's run, and the frontier of every run in
    its MLflow experiment. Returns the path of the markdown file."""
    training_path = cfg.run_dir / "training.json"
    if not training_path.is_file():
        raise FileNotFoundError(f"{training_path}: no run of {cfg.name} yet (run `dplora run` first)")
    training = json.loads(training_path.read_text())
    history, p = training["history"], training["privacy"]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = cfg.name
    figures = [
        plots.round_curves(history, out_dir / f"{name}-accuracy-loss.png", title=f"{name}: validation per round"),
        plots.epsilon_curve(
            history, out_dir / f"{name}-epsilon.png",
            title=f"{name}: epsilon per round, mode {p['mode']}, {p['accountant']} accountant, delta {p['delta']:g}",
            target=cfg.privacy.target_epsilon if p["mode"] != "none" else None,
        ),
    ]
    if history and history[0]["bytes_up"] is not None:  # mode client keeps per-round bytes on the server
        figures.append(plots.bytes_curve(
            history, out_dir / f"{name}-bytes.png", title=f"{name}: bytes per round",
            full_model_bytes=training["bytes"]["full_model"],
        ))
    histograms = label_histogram_plot(cfg, out_dir / f"{name}-label-histograms.png")
    if histograms is not None:
        figures.append(histograms)
    runs = store_runs(cfg)
    figures.append(plots.frontier(frontier_points(runs), out_dir / "frontier.png"))
    lines = [
        f"# dplora report: experiment `{cfg.tracking.experiment}`",
        "",
        f"Written by `dplora report` from the MLflow store `{cfg.tracking.mlflow_uri}` and `{cfg.run_dir}`.",
        "",
        f"## {name}",
        "",
        f"Privacy: {p['guarantee']}",
        "",
    ]
    metrics_path = cfg.run_dir / "metrics.json"
    if metrics_path.is_file():
        lines += ["```", format_summary(json.loads(metrics_path.read_text())), "```", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures if f.name != "frontier.png"]
    lines += [
        "",
        "## All runs in the store",
        "",
        "| run | mode | epsilon | delta | test accuracy | test macro-F1 | rounds | guarantee |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        f1 = "-" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}"
        lines.append(
            f"| {r['name']} | {r['mode']} | {eps} | {r['delta']} | {acc} | {f1} | {r['rounds']} | {r['guarantee']} |"
        )
    lines += ["", "![frontier](frontier.png)", ""]
    summary = out_dir / "summary.md"
    atomic_write(summary, "\n".join(lines).encode())
    return summary


def label_histogram_plot(cfg: ExperimentConfig, path: Path) -> Path | None:
    """Simulation: each client's label histogram from the partition as a PNG (None without a partition)."""
    partition = partition_path(cfg)
    if cfg.federation.silos is not None or not partition.is_file():  # cross-silo: the silos keep theirs
        return None
    return plots.label_histograms(
        json.loads(partition.read_text())["label_histograms"], path,
        title=f"{cfg.name}: training records per client and label\n(simulation statistics, not covered by DP)",
    )


def frontier_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs one epsilon axis can hold: record-level DP (modes sample and distributed, headline epsilon) and
    no DP at its edge. Mode client's epsilon is client-level and mode paper's the paper's per-round formula:
    other quantities, left to the table."""
    return [r for r in runs if r["accuracy"] is not None and r["mode"] in ("sample", "distributed", "none")]


def store_runs(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Every finished run of the config's MLflow experiment: name, mode, epsilon, delta, test metrics."""
    client = MlflowClient(cfg.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time"]
    )
    return [
        {
            "name": run.info.run_name,
            "mode": run.data.tags.get("dplora.privacy_mode", "?"),
            "epsilon": run.data.metrics.get("epsilon_final"),
            "delta": run.data.params.get("privacy.delta", "?"),
            "accuracy": run.data.metrics.get("test_accuracy"),
            "macro_f1": run.data.metrics.get("test_macro_f1"),
            "rounds": run.data.params.get("federation.rounds", "?"),
            "guarantee": run.data.tags.get("dplora.guarantee", "-").replace("|", "/"),
            "seeded": run.data.tags.get("dplora.noise_seed", "os-entropy") != "os-entropy",
        }
        for run in runs
        if "dplora.audit" not in run.data.tags
    ]
