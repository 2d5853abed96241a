"""PNG plots for people: per-client label histograms, per-round curves, the utility-privacy frontier.

Matplotlib with the Agg backend (no screen); every function writes one PNG and returns its path.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen
import matplotlib.ticker


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_histograms(histograms: Sequence[dict[str, int]], path: Path, *, title: str) -> Path:
    """Stacked bars: each client's number of training records per label."""
    labels = list(histograms[0]) if histograms else []
    clients = [f"client {k}" for k in range(len(histograms))]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(clients) + 2), 3.6))
    bottom = [0] * len(histograms)
    for label in labels:
        counts = [h.get(label, 0) for h in histograms]
        ax.bar(clients, counts, bottom=bottom, label=label)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylabel("training records")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.tick_params(axis="x", labelrotation=45 if len(clients) > 6 else 0)
    return _save(fig, path)


def round_curves(history: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Validation accuracy, macro-F1 and loss after each round."""
    rounds = [row["round"] for row in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(8, 3.4))
    acc.plot(rounds, [row["val_accuracy"] for row in history], marker="o", label="accuracy")
    acc.plot(rounds, [row["val_macro_f1"] for row in history], marker="s", label="macro-F1")
    acc.set_xlabel("round")
    acc.set_ylim(0, 1)
    acc.legend(fontsize=8)
    acc.set_title("validation accuracy", fontsize=10)
    # none: runs before val_loss was logged; null: a non-finite loss (JSON has no NaN)
    losses = [math.nan if row.get("val_loss") is None else row["val_loss"] for row in history]
    loss.plot(rounds, losses, marker="o", color="tab:red")
    if all(math.isnan(x) for x in losses):
        loss.text(0.5, 0.5, "not recorded by this run", ha="center", transform=loss.transAxes)
    loss.set_xlabel("round")
    loss.set_title("validation loss (label words)", fontsize=10)
    for ax in (acc, loss):
        ax.set_xticks(rounds)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def epsilon_curve(history: Sequence[dict[str, Any]], path: Path, *, title: str, target: float | None) -> Path:
    """Epsilon spent after each round (the accountant's, at the run's delta), with the target."""
    rounds = [row["round"] for row in history]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    eps = [row["epsilon"] if row["epsilon"] is not None and math.isfinite(row["epsilon"]) else math.nan
           for row in history]
    ax.plot(rounds, eps, marker="o", label="spent")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon")
    ax.set_xticks(rounds)
    top = max([e for e in eps if not math.isnan(e)] + ([target] if target is not None else []), default=1.0)
    ax.set_ylim(0, 1.15 * top)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def bytes_curve(history: Sequence[dict[str, Any]], path: Path, *, title: str, full_model_bytes: int) -> Path:
    """Bytes sent up and down in each round, against what full-model exchange would have sent."""
    rounds = [row["round"] for row in history]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    width = 0.38
    up = [(row["bytes_up"] or 0) / 2**20 for row in history]
    down = [(row["bytes_down"] or 0) / 2**20 for row in history]
    ax.bar([r - width / 2 for r in rounds], up, width, label="LoRA up")
    ax.bar([r + width / 2 for r in rounds], down, width, label="LoRA down")
    ax.set_xlabel("round")
    ax.set_ylabel("MiB")
    ax.set_xticks(rounds)
    clients = [len(row["clients"] or []) for row in history]
    full = max(clients, default=0) * full_model_bytes / 2**20
    ax.set_title(f"{title}\n(full-model exchange: {full:,.0f} MiB each way per round)", fontsize=9)
    ax.set_ylim(0, 1.3 * max(up + down, default=1.0))
    ax.legend(fontsize=8, ncols=2, loc="upper center")
    return _save(fig, path)


def void_guarantee(mode: str, *, seeded: bool) -> bool:
    """Whether runs of `mode` with (or without) a fixed noise seed promise nothing against the seed's holder."""
    return seeded and mode != "none"


def frontier_label(mode: str, *, seeded: bool) -> str:
    """The report frontier's legend entry for one mode's runs, with or without a fixed noise seed."""
    label = f"mode {mode}" + (" (for the sum of uploads)" if mode == "distributed" else "")
    return label + (", fixed noise seed: void against its holder" if void_guarantee(mode, seeded=seeded) else "")


def frontier(points: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test accuracy against epsilon, one point per run; runs without DP at the right edge, marked; mode distributed
    (the epsilon of the sum of uploads, not the server's view) and runs with a fixed noise seed labelled so."""
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [p["epsilon"] for p in points if p["epsilon"] is not None]
    edge = (max(finite) * 1.5) if finite else 1.0
    colours = {mode: f"C{i}" for i, mode in enumerate(sorted({p["mode"] for p in points}))}
    for mode, seeded in sorted({(p["mode"], p.get("seeded", False)) for p in points}):
        mine = [p for p in points if (p["mode"], p.get("seeded", False)) == (mode, seeded)]
        xs = [p["epsilon"] if p["epsilon"] is not None else edge for p in mine]
        hollow = void_guarantee(mode, seeded=seeded)  # an empty marker in its mode's colour
        ax.scatter(xs, [p["accuracy"] for p in mine], label=frontier_label(mode, seeded=seeded), s=40,
                   facecolors="none" if hollow else colours[mode], edgecolors=colours[mode])
        for j, (p, x) in enumerate(zip(mine, xs, strict=True)):  # staggered, so runs at one point stay legible
            offset = (4, 4 - 9 * (j % 3))
            ax.annotate(p["name"], (x, p["accuracy"]), fontsize=7, xytext=offset, textcoords="offset points")
    if any(p["epsilon"] is None for p in points):
        ax.axvline(edge, color="grey", linestyle=":", linewidth=1)
        ax.text(edge, ax.get_ylim()[0], " no DP", fontsize=7, va="bottom")
    ax.set_xlabel("record-level epsilon (each run's own delta and accountant; see the table)")
    ax.set_ylabel("test accuracy")
    ax.set_xlim(0, edge * 1.15)
    ax.set_ylim(0, 1)
    ax.set_title("utility against privacy, runs in the store with record-level DP or none", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_bars(summary: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Test accuracy and macro-F1 per study cell (mean, error bar one sample sd where there are 2 seeds or more),
    zero-shot and majority marked."""
    names = [" / ".join(s["levels"].values()) for s in summary]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 2.5), 4.2))
    xs = range(len(names))
    for offset, key, label in ((-0.2, "test_accuracy", "test accuracy"), (0.2, "test_macro_f1", "test macro-F1")):
        means = [s[key][0] if s[key] else math.nan for s in summary]
        ax.bar([x + offset for x in xs], means, width=0.4, label=label)
        cells = zip(xs, summary, strict=True)
        spread = [(x + offset, *s[key]) for x, s in cells if s[key] and not math.isnan(s[key][1])]
        if spread:  # one seed has no sample sd: no error bar rather than one of length 0
            ax.errorbar([p[0] for p in spread], [p[1] for p in spread], yerr=[p[2] for p in spread], fmt="none",
                        ecolor="black", capsize=3)
    for key, label, style in (("zero_shot_accuracy", "zero-shot accuracy", "--"),
                              ("majority_class_accuracy", "always the majority class", ":")):
        values = [s[key][0] for s in summary if s[key]]
        if values:
            ax.axhline(sum(values) / len(values), color="grey", linestyle=style, label=label)
    crowded = len(names) > 4 or max((len(n) for n in names), default=0) > 12  # long names overlap unrotated
    ax.set_xticks(list(xs), names, rotation=30 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("on the test split")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def no_dp_label(group: tuple[str, ...], level: str) -> str:
    """Legend text of a run without DP on a frontier plot: its level, "(no DP)" added unless the name says so
    (no-dp, nodp), after its group's levels when the study has other axes."""
    name = level if re.search(r"no-?dp", level, flags=re.IGNORECASE) else f"{level} (no DP)"
    return f"{' / '.join(group)}: {name}" if group else name


def study_frontier(
    summary: Sequence[dict[str, Any]], modes: dict[tuple[str, ...], str], axis: str, path: Path, *, title: str
) -> Path:
    """Test accuracy (mean, error bar one sample sd) against record-level epsilon: one line per level of
    the other axes; that group's runs without DP (e.g. federated, centralised) as horizontal lines in its colour,
    one dash pattern each.
    Other modes' epsilons bound other things (a client, a paper formula) and stay in the table, off this plot."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for s in summary:
        groups.setdefault(tuple(v for a, v in s["levels"].items() if a != axis), []).append(s)
    for i, (group, entries) in enumerate(groups.items()):
        colour = f"C{i}"
        label = " / ".join(group) or "record-level DP"
        dp = sorted((s for s in entries if modes[tuple(s["levels"].values())] == "sample" and s["epsilon"]),
                    key=lambda s: s["epsilon"][0])
        if dp:
            ax.errorbar([s["epsilon"][0] for s in dp], [s["test_accuracy"][0] for s in dp],
                        yerr=[0.0 if math.isnan(s["test_accuracy"][1]) else s["test_accuracy"][1] for s in dp],
                        color=colour, marker="o", capsize=3, label=label)
        nodp = [s for s in entries if modes[tuple(s["levels"].values())] == "none"]
        for s, style in zip(nodp, itertools.cycle(["--", (0, (6, 2, 1, 2)), (0, (1, 1))])):
            level = s["levels"][axis]
            ax.axhline(s["test_accuracy"][0], color=colour, linestyle=style, linewidth=1,
                       label=no_dp_label(group, level))
    for key, label, style in (("zero_shot_accuracy", "zero-shot", "-."), ("majority_class_accuracy",
                                                                           "always the majority class", ":")):
        values = [s[key][0] for s in summary if s[key]]
        if values:
            ax.axhline(sum(values) / len(values), color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 2, 4, 8 rather than 2^k
    ax.set_xlabel("epsilon, record-level (each run's delta and accountant: see the table)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
