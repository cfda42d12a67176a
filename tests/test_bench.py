"""The benchmark suite cannot rot: every measure runs at tiny sizes and lands in the table.

No figure is asserted (timings belong to `make bench`, which prints ratios measured in one
run); what is checked is that each measure starts its processes on 127.0.0.1, finishes, and
returns a well-formed row for BENCHMARKS.md.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measures() -> set[str]:
    """The suite's measures (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return set(importlib.import_module("suite").MEASURES)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_every_measure_runs_at_smoke_size_and_fills_the_table(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(
        "# Benchmarks\n\nprose before\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\nprose after\n"
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n") and text.endswith("prose after\n")
    assert "\nold\n" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| measure")]
    assert {row.split(" | ")[0].removeprefix("| ") for row in rows} == measures()
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 4 and cells[1] and cells[2], row
