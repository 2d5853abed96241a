"""How much accuracy a shift of the label words' scores adds to trained adapters: is a gap a threshold?

    python bench/label_offset.py outputs/gap-by-label-fpb-dp-eps8-s1 outputs/gap-by-label-fpb-federated-nodp-s1 \
        [--span 4] [--step 0.05]

A diagnostic, not a speed benchmark. Each argument is a run's output folder (its training.json holds the
config; adapter.safetensors is the adapter it released). The script scores the validation and test prompts
as evaluation does (the logit of each label word's first token), then predicts argmax(scores + b) for an
offset b per label, the first label's fixed at 0 (only differences matter), the others on a grid of
-span..span in steps of step, and prints three test accuracies per run:

- `argmax`: b = 0, what the run reported;
- `b from validation`: b that scores best on the validation records the run evaluated each round
  (`data.max_validation_examples`; of tied offsets, the smallest shift, least ||b - mean(b)||, which up to
  the grid's edges and exact ties in that norm does not depend on which label is pinned at 0). A server
  holding those records could
  apply it: post-processing of the released adapter, so the clients' guarantee is unchanged;
- `b from test`: b that scores best on test itself. No rule may pick it; it is the ceiling of every
  offset on the grid, for this adapter and this test split.

If the ceiling barely moves a run, its errors are not a matter of threshold: the adapter ranks the labels
wrongly for those records, and no shift of these scores mends it (other rules, e.g. a classifier fitted on
the scores, are not measured here).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from dplora_core.config import ExperimentConfig
from dplora_core.io import read_json
from tasks.runtime import eval_prefix, eval_prompts
from tasks.training import score_prompts


def offset_grid(num_labels: int, *, span: float, step: float) -> torch.Tensor:
    """Every offset vector with b[0] = 0 and the other entries on -span..span: (G, num_labels)."""
    points = torch.arange(-round(span / step), round(span / step) + 1, dtype=torch.float64) * step
    rest = torch.tensor(list(itertools.product(points.tolist(), repeat=num_labels - 1)), dtype=torch.float64)
    return torch.cat([torch.zeros(len(rest), 1, dtype=torch.float64), rest], dim=1)


def accuracies(scores: torch.Tensor, gold: torch.Tensor, grid: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Accuracy of argmax(scores + b) for each offset b of the grid: (G,). scores (n, L), gold (n,)."""
    out = []
    for start in range(0, len(grid), chunk):
        shifted = scores.double()[None] + grid[start : start + chunk, None]  # (g, n, L)
        out.append(shifted.argmax(dim=2).eq(gold[None]).double().mean(dim=1))  # (g,)
    return torch.cat(out)


def smallest_best(grid: torch.Tensor, accs: torch.Tensor) -> torch.Tensor:
    """The offset of highest accuracy; of ties, the smallest shift (least ||b - mean(b)||): (L,)."""
    tied = grid[accs == accs.max()]  # (k, L)
    spread = (tied - tied.mean(dim=1, keepdim=True)).norm(dim=1)  # (k,)
    return tied[int(spread.argmin())]


def split_scores(cfg: ExperimentConfig, adapter: bytes, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-word scores (n, L), gold label indices (n,)) of a split, as evaluation computes them."""
    prompts, gold, _ = eval_prompts(cfg, split)
    return score_prompts(cfg, adapter, prompts, eval_prefix(cfg, split)), torch.tensor(gold)


def offsets(b: torch.Tensor) -> str:
    return "(" + ", ".join(f"{x:+.2f}" for x in b.tolist()) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run output folders (training.json, adapter.safetensors)")
    parser.add_argument("--span", type=float, default=4.0, help="largest offset tried, in logits")
    parser.add_argument("--step", type=float, default=0.05)
    args = parser.parse_args()
    print("| run | test: argmax | b from validation | b from test (ceiling) | b from validation | b from test |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        cfg = ExperimentConfig.model_validate(read_json(run / "training.json")["config"])
        adapter = (run / "adapter.safetensors").read_bytes()
        val_scores, val_gold = split_scores(cfg, adapter, "validation")
        if len(val_gold) == 0:
            raise SystemExit(f"{run}: the config evaluates no validation records; nothing to choose an offset on")
        test_scores, test_gold = split_scores(cfg, adapter, "test")
        grid = offset_grid(val_scores.shape[1], span=args.span, step=args.step)
        on_val, on_test = accuracies(val_scores, val_gold, grid), accuracies(test_scores, test_gold, grid)
        b_val, b_test = smallest_best(grid, on_val), smallest_best(grid, on_test)
        plain = accuracies(test_scores, test_gold, torch.zeros(1, grid.shape[1], dtype=torch.float64))
        b_val_test = accuracies(test_scores, test_gold, b_val[None])
        print(f"| {run.name} | {float(plain):.4f} | {float(b_val_test):.4f} | "
              f"{float(on_test.max()):.4f} | {offsets(b_val)} | {offsets(b_test)} |", flush=True)


if __name__ == "__main__":
    main()
