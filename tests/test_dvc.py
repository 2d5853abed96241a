"""DVC as users run it: `dvc repro`, `dvc push` to the default remote, `dvc pull` into a fresh clone."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_then_pull_into_a_fresh_clone_restores_the_data(raw_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(raw_dir)  # where dvc.yaml's ingest stage copies from
    remote = tmp_path / "remote"
    first, second = tmp_path / "first", tmp_path / "second"
    run(tmp_path, "git", "clone", "-q", str(ROOT), str(first))
    run(first, "dvc", "remote", "modify", "--local", "local", "url", str(remote))  # stand-in for the default
    run(first, "dvc", "repro", "prepare")  # ingest, then prepare
    run(first, "dvc", "push", "ingest", "prepare")

    run(tmp_path, "git", "clone", "-q", str(ROOT), str(second))
    shutil.copy(first / "dvc.lock", second / "dvc.lock")  # what `git commit dvc.lock` after the repro carries
    run(second, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    run(second, "dvc", "pull", "ingest", "prepare")
    for folder in ("data/raw", "data/prepared"):
        assert digests(second / folder) == digests(first / folder) != {}
    assert "up to date" in run(second, "dvc", "status", "ingest", "prepare").lower()
