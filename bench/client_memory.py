"""Peak memory of simulating many clients: 50 clients against 2, same model, one round (issue 4 benchmark).

    python bench/client_memory.py [--clients 2 50]

Each client count runs `dplora run` on the real embedded model in its own process (tiny-test
settings: LoRA rank 2 on q,v of the top 2 layers, one local DP-SGD step of 8 records per client),
and the process's peak RSS is read from the kernel (wait4). One base model per worker process, clients
swap only adapter state, so the peak should barely grow with the number of clients. Goal: at most 1.2x.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(num_clients: int, workdir: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `dplora run` with `num_clients` clients, all in the round."""
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-test.yaml").read_text())
    cfg["name"] = f"memory-{num_clients}"
    cfg["model"]["converted_dir"] = str(ROOT / cfg["model"]["converted_dir"])
    cfg["federation"].update(num_clients=num_clients, clients_per_round=num_clients, rounds=1, local_steps=1)
    cfg["data"].update(
        raw_dir=str(ROOT / "data" / "raw"), prepared_dir=str(workdir / "prepared"), max_train_examples=8 * num_clients
    )
    cfg["privacy"]["delta"] = 1e-4  # delta * n <= 0.1 for the 8-record clients
    cfg["tracking"].update(
        mlflow_uri=f"sqlite:///{workdir / 'mlflow.db'}", artifact_dir=str(workdir / "mlartifacts"),
        output_dir=str(workdir / "outputs"),
    )
    path = workdir / f"memory-{num_clients}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(path)], cwd=workdir, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(workdir / ".prefect")},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"dplora run with {num_clients} clients failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.monotonic() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs=2, default=[2, 50])
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    print(f"{time.strftime('%Y-%m-%d')} {machine}")
    print("| clients | peak RSS | wall time |")
    print("|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            rss, wall = peak_rss_mib(n, Path(tmp))
            results.append(rss)
            print(f"| {n} | {rss:,.0f} MiB | {wall:.0f} s |")
    print(f"ratio {args.clients[1]} / {args.clients[0]} clients: {results[1] / results[0]:.2f}x (goal <= 1.20x)")


if __name__ == "__main__":
    main()
