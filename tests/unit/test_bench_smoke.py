"""bench/pipeline.py stays runnable: a tiny run must finish and print its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_pipeline_bench_runs_on_a_tiny_input() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline.py"), "--quick"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines()
            if line.split()[:1] and line.split()[0] in ("cloudevents-json", "cloudevents-binary",
                                                        "raw")]
    assert len(rows) == 3 * 2 * 2, r.stdout  # formats x kinds x sizes
    for row in rows:
        assert row.rstrip().endswith("%")
        assert int(row.split()[3].replace(",", "")) > 0
