"""The bench tables pasted into the docs are what the benches print today.

Only the benches that run from a fresh clone in seconds (accountant arithmetic, committed study records);
the others time the model or read a run's `outputs/`, which a clone does not have.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PASTED = {
    "snr_ceiling": (["bench/snr_ceiling.py"], "docs/results.md"),
    "label_gap": (["bench/label_gap.py", "docs/results/runs/gap-by-label-fpb", "training=dp-eps8",
                   "training=federated-nodp"], "docs/results.md"),
}


def table_lines(text: str) -> list[str]:
    """The markdown table rows of a bench's output, in order."""
    return [line for line in text.splitlines() if line.startswith("|")]


def table_under(header: str, lines: list[str]) -> list[str]:
    """The whole table of a document's lines that starts with this header row: the header and every `|` line
    after it."""
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("bench", sorted(PASTED))
def test_the_docs_table_is_the_bench_output(bench: str) -> None:
    argv, doc = PASTED[bench]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv[0]} failed:\n{done.stderr}"
    rows = table_lines(done.stdout)
    assert len(rows) >= 3, f"{argv[0]} printed no table:\n{done.stdout}"
    lines = (ROOT / doc).read_text().splitlines()
    assert rows[0] in lines, f"{doc}: no table with the header of {argv[0]}'s"
    assert table_under(rows[0], lines) == rows, f"{doc}: the table of {argv[0]} is not its output now"
