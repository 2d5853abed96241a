"""Where an accuracy gap between two cells of a study lies, label by label, seed by seed.

    python bench/label_gap.py docs/results/runs/gap-by-label-fpb training=dp-eps8 training=federated-nodp

A diagnostic, not a speed benchmark; it reads committed run records only (no model). Each cell is named
by its levels (`axis=level`, comma-separated for several axes), and its runs are paired with the other
cell's by seed. Accuracy is the support-weighted mean of the recalls, so the gap splits exactly:

    acc(other) - acc(cell) = sum over labels y of  n_y / n * (recall_y(other) - recall_y(cell)),

and the script prints each seed's gap, each label's recall difference (in points) and its share of the
gap (in points of accuracy; the shares sum to the gap). Records written before 2026-12-07 have no
confusion matrix and are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dplora_core.evaluate import accuracy, recall_per_label, true_counts
from dplora_core.io import read_json
from flows.study import same_test_split


def cell_runs(records: Path, levels: dict[str, str]) -> dict[int, dict[str, Any]]:
    """The test confusion of each seed's run of the cell with these levels: {seed: {labels, counts}}."""
    runs = {}
    for path in sorted(records.glob("*.json")):
        row = read_json(path)["row"]
        if row["levels"] == levels and "test_confusion" in row:
            runs[row["seed"]] = row["test_confusion"]
    return runs


def parse_levels(text: str) -> dict[str, str]:
    """'training=dp-eps8,rank=4' -> {'training': 'dp-eps8', 'rank': '4'}."""
    return dict(part.split("=", 1) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, help="a study's folder of run records")
    parser.add_argument("cell", type=parse_levels, help="the cell that scores lower, e.g. training=dp-eps8")
    parser.add_argument("other", type=parse_levels, help="the cell it is compared with")
    args = parser.parse_args()
    low, high = cell_runs(args.records, args.cell), cell_runs(args.records, args.other)
    seeds = sorted(low.keys() & high.keys())
    if not seeds:
        raise SystemExit(f"{args.records}: no seed has a recorded confusion matrix for both cells")
    labels = low[seeds[0]]["labels"]
    for seed in seeds:  # the split is exact only on one test split: the same labels, the same count of each
        if low[seed]["labels"] != labels or not same_test_split(low[seed], high[seed]):
            raise SystemExit(f"{args.records}: seed {seed}'s two runs were tested on different splits")
    print("| seed | accuracy gap | " + " | ".join(f"{y}: recall diff., share of gap" for y in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for seed in seeds:
        a, b = low[seed]["counts"], high[seed]["counts"]
        support = true_counts(b)
        n = sum(support)
        recall_a, recall_b = recall_per_label(a), recall_per_label(b)
        cells = []
        for true, ra, rb in zip(support, recall_a, recall_b, strict=True):
            if ra is None or rb is None:  # a label without test records
                cells.append("-")
                continue
            cells.append(f"{100 * (rb - ra):+.1f}, {100 * true / n * (rb - ra):+.2f}")
        print(f"| {seed} | {100 * (accuracy(b) - accuracy(a)):+.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
