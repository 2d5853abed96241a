"""Throughput of DP-SGD logical batches: one process on every core, against one process per core.

    python bench/parallel_cells.py [--repeats 5] [--steps 2] [--batch 128] [--last-n-layers 10]

A study runs many independent cells. On a machine with few cores, torch's intra-op threads scale
poorly on the small matrices of LoRA training, so several single-threaded cells side by side may
finish more batches per second than one cell on all cores. Each worker process loads the demo's
model and adapter (SmolLM2-135M-Instruct, FFA-LoRA rank 4 on q_proj,v_proj of the top
layers, frozen-prefix cache on), samples one logical batch of Financial PhraseBank training records,
and on every "go" runs `--steps` DP-SGD gradient computations of it. Per repeat, the wide worker
(all cores) runs alone, then the narrow workers (one thread each) run at once; the wall time of a
variant is from "go" to the last worker's answer. Medians over interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from dp_batch import dp_batch_step  # bench/, beside this script


def worker(args: argparse.Namespace) -> None:
    """Set up one DP batch, print "ready", then answer every "go" line with the seconds its steps took."""
    torch.set_num_threads(args.worker)
    step = dp_batch_step(
        dtype=args.dtype, last_n_layers=args.last_n_layers, batch=args.batch, microbatch_size=args.microbatch
    )
    step()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{time.perf_counter() - start:.4f}", flush=True)


def spawn(threads: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", str(threads), "--batch", str(args.batch), "--microbatch",
           str(args.microbatch), "--last-n-layers", str(args.last_n_layers), "--steps", str(args.steps),
           "--dtype", args.dtype]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def ready(w: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """Wait until the worker has set up (one at a time, so that set-ups do not oversubscribe the cores)."""
    assert w.stdout is not None
    if w.stdout.readline().strip() != "ready":
        raise SystemExit("a worker failed to start")
    return w


def go(workers: list[subprocess.Popen[str]]) -> float:
    """Start every worker's steps at once; wall seconds until the last one answers."""
    start = time.perf_counter()
    for w in workers:
        assert w.stdin is not None
        w.stdin.write("go\n")
        w.stdin.flush()
    for w in workers:
        assert w.stdout is not None
        float(w.stdout.readline())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="DP batches per worker per repeat")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--microbatch", type=int, default=16)
    parser.add_argument("--last-n-layers", type=int, default=10)
    parser.add_argument("--dtype", default="auto", help="model.dtype of the frozen weights")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    cores = os.cpu_count() or 1
    wide, narrow = [ready(spawn(cores, args))], [ready(spawn(1, args)) for _ in range(cores)]
    wide_s, narrow_s = [], []
    for _ in range(args.repeats):
        wide_s.append(go(wide))
        narrow_s.append(go(narrow))
    for w in wide + narrow:
        assert w.stdin is not None
        w.stdin.close()
        w.wait()
    wide_rate = args.steps / statistics.median(wide_s)  # batches per second
    narrow_rate = cores * args.steps / statistics.median(narrow_s)
    print(f"{time.strftime('%Y-%m-%d')} {platform.machine()}, {cores} cores, torch {torch.__version__}, {args.dtype}, "
          f"last {args.last_n_layers} layers, batch {args.batch} in micro-batches of {args.microbatch}, "
          f"{args.repeats} repeats")
    print("| layout | DP batches / s | throughput |")
    print("|---|---|---|")
    print(f"| 1 process x {cores} threads | {wide_rate:.3f} | 1.00x |")
    print(f"| {cores} processes x 1 thread | {narrow_rate:.3f} | {narrow_rate / wide_rate:.2f}x |")


if __name__ == "__main__":
    main()
