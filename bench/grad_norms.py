"""Per-example gradient norms of one study cell's adapter, and how much signal clipping at C keeps.

    python bench/grad_norms.py configs/study-recipe-fp32.yaml recipe-fp32-dp-eps8-ffa10-svd-s4 \
        [--adapter outputs/recipe-fp32-dp-eps8-ffa10-svd-s4/adapter.safetensors] [--records 96] [--clip 1 0.5 0.1]

A diagnostic for choosing `privacy.max_grad_norm`, not a speed benchmark. It draws --records of client 0's
shard at random (seed 0; the shard keeps the split's order, which groups labels; the cell's partition.json
must exist: run the cell first) and, at the round-0 adapter or the given one, prints the quantiles of
||g_i|| and, for each C, ||mean_i clip_C(g_i)|| / C (the share of the clipping bound that survives
averaging) and the cosine of that mean with each label's own clipped mean. DP-SGD's noise on that mean
is sigma C sqrt(d) / B whatever the gradients, so this ratio bounds the signal side of the signal-to-noise
ratio. It is not all useful signal: clipping every example (C far below the norms) grows it with a push
towards the majority class (the cosines show it; docs/results.md, "Clipping and batch": the runs at C = 0.1
that collapsed to that class also trained A by a since-fixed bug, so they do not show it). Run it on tuning
data only: a choice of C read off private records is itself a release that no
accountant here charges.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from dplora_core.adapters import from_bytes, load_adapter_state
from dplora_core.model import init_lora_state
from dplora_core.privacy import mechanisms as M
from dplora_core.privacy.grad_sample import PerExampleGrads, per_example_grads, trainable_linears
from dplora_core.study import expand, load_study
from dplora_core.train import answer_nll, microbatch
from tasks.runtime import client_data, label_ids_of, workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study")
    parser.add_argument("cell", help="a cell's run name, e.g. recipe-fp32-dp-eps8-ffa10-svd-s4")
    parser.add_argument("--adapter", type=Path, help="adapter.safetensors to measure at (default: round 0)")
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--clip", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    args = parser.parse_args()

    study = load_study(args.study)
    cells = {c.config.name: c.config for c in expand(study, yaml.safe_load(Path(study.base).read_text()))}
    cfg = cells[args.cell]
    ws = workspace(cfg.model, cfg.lora)
    if args.adapter is not None:
        state = from_bytes(args.adapter.read_bytes(), source=str(args.adapter))
    else:
        state = init_lora_state(ws.model, seed=cfg.federation.seed, init_a=cfg.lora.init_a)
    load_adapter_state(ws.model, state, source=str(args.adapter or "round-0 adapter"))

    shard = client_data(cfg, 0)
    drawn = torch.randperm(len(shard), generator=torch.Generator().manual_seed(0))[: args.records]
    items = [shard[i] for i in sorted(drawn.tolist())]
    device = next(ws.model.parameters()).device
    grads = PerExampleGrads(trainable_linears(ws.model))
    rows = []
    for mb in microbatch(items, cfg.federation.microbatch_size, pad_id=ws.pad_id, device=device):
        with per_example_grads(grads.modules, reuse=grads):
            answer_nll(ws.model, mb, label_ids_of(cfg)).sum().backward()
        assert grads.flat is not None
        rows.append(grads.flat.clone())  # (b, d)
        ws.model.zero_grad(set_to_none=True)
    g = torch.cat(rows)  # (n, d)
    norms = M.per_example_norms(g)  # (n,)
    q = torch.quantile(norms, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], device=norms.device))
    print(f"{args.cell} at {args.adapter or 'round 0'}: d = {g.shape[1]:,}, {g.shape[0]} records of client 0")
    print("||g_i|| quantiles 10/25/50/75/90 %: " + ", ".join(f"{float(x):.3f}" for x in q))
    labels = [item.label for item in items]  # microbatch keeps the items' order
    classes = sorted(set(labels))
    print("records per label: " + ", ".join(f"{k} {labels.count(k)}" for k in classes))
    for c in args.clip:
        clipped = g * M.clip_factors(norms, c)[:, None]  # (n, d)
        mean = clipped.mean(dim=0)  # (d,)
        cosines = []  # which label's own clipped mean the overall mean points along
        for k in classes:
            of_k = torch.tensor([label == k for label in labels], device=g.device)
            cosines.append(float(torch.nn.functional.cosine_similarity(mean, clipped[of_k].mean(dim=0), dim=0)))
        print(f"C = {c:g}: {float((norms > c).float().mean()):.0%} clipped, ||mean clipped|| / C = "
              f"{float(mean.norm() / c):.3f}; cosine with each label's mean: "
              + ", ".join(f"{k} {cos:.2f}" for k, cos in zip(classes, cosines, strict=True)))


if __name__ == "__main__":
    main()
