"""How much the upload codecs change an update: each codec applied to the round-to-round differences of the
global adapter of finished runs (the average of the clients' noised updates, which the run logged to MLflow).

    python bench/codec_error.py outputs/goals-fp32-dp-eps8-s1 [...] [--seed 0]

For each run, round r >= 2 and codec it prints ||decode(encode(d)) - d|| / ||d|| and the cosine between the
decoded and the true difference, d = x_r - x_(r-1) over the uploaded tensors (B only under freeze_a). A client
encodes its own update the same way (dplora_core.compression.encode_update against the adapter it started
from); the global difference is the closest logged stand-in. Reads adapters only: no training, no data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from release_average import round_adapters  # bench/, beside this script

from dplora_core.adapters import AdapterState, from_bytes, upload_state
from dplora_core.compression import Codec, decode_update, encode_update
from dplora_core.config import ExperimentConfig, predating_fields

CODECS: tuple[Codec, ...] = ("float16", "int8")


def flat(state: AdapterState) -> torch.Tensor:
    """Every tensor of `state` in one vector, in key order."""
    return torch.cat([state[k].flatten() for k in sorted(state)])


def codec_error(start: AdapterState, end: AdapterState, codec: Codec, *, seed: int) -> tuple[float, float]:
    """(relative error, cosine) of `codec` on the update end - start, encoded against start."""
    g = torch.Generator().manual_seed(seed)
    decoded = decode_update(encode_update(end, start, codec=codec, generator=g), start, codec=codec, source=codec)
    true, got = flat(end) - flat(start), flat(decoded) - flat(start)  # (d,)
    error = float((got - true).norm() / true.norm())
    return error, float(torch.nn.functional.cosine_similarity(got, true, dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding training.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of int8's stochastic rounding")
    args = parser.parse_args()
    print("| run | round | " + " | ".join(f"{c} rel. error (cosine)" for c in CODECS) + " |")
    print("|---|---|" + "---|" * len(CODECS))
    for run in args.runs:
        training = json.loads((run / "training.json").read_text())
        cfg = ExperimentConfig.model_validate(predating_fields(training["config"]))  # as it ran
        states = [
            upload_state(from_bytes(b, source=f"{run.name} round {r}"), freeze_a=cfg.lora.freeze_a)
            for r, b in enumerate(round_adapters(cfg, training["mlflow_run_id"], training["rounds"]), 1)
        ]
        for r in range(1, len(states)):
            cells = [codec_error(states[r - 1], states[r], c, seed=args.seed) for c in CODECS]
            print(f"| {run.name} | {r + 1} | " + " | ".join(f"{e:.2e} ({cos:.6f})" for e, cos in cells) + " |")


if __name__ == "__main__":
    main()
