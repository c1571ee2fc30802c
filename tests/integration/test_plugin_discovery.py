"""Driver discovery through real entry points: a broken plugin never hides the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


@pytest.fixture
def broken_plugins(tmp_path: Path) -> dict[str, str]:
    """Two installed-looking distributions: one whose module fails to import, one
    whose entry point is not a Sink."""
    (tmp_path / "broken_sink.py").write_text("import no_such_bus_library\n")
    (tmp_path / "not_a_sink.py").write_text("class Thing:\n    pass\n")
    for dist, name, target in (("broken-sink", "broken", "broken_sink:BrokenSink"),
                               ("not-a-sink", "thing", "not_a_sink:Thing")):
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[bridge.sinks]\n{name} = {target}\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


def test_plugins_shows_failures_with_their_reason_and_the_rest(
    broken_plugins: dict[str, str]
) -> None:
    r = subprocess.run([sys.executable, "-m", "bridge", "plugins"], capture_output=True,
                       text=True, timeout=60, env={**broken_plugins, "COLUMNS": "200"})
    assert r.returncode == 1  # a driver failed to load: visible to scripts too
    out = r.stdout
    assert "broken" in out and "No module named 'no_such_bus_library'" in out
    assert "thing" in out and "not a subclass of bridge.sinks.Sink" in out
    for name in ("console", "jsonl", "kafka", "nats", "mqtt"):
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert " ok " in row, row


def test_a_configured_driver_that_fails_to_load_is_a_startup_error(
    broken_plugins: dict[str, str], tmp_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sinks:\n  b: {driver: broken}\n  c: {driver: console}\n")
    r = subprocess.run([sys.executable, "-m", "bridge", "run", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=60, env=broken_plugins)
    assert r.returncode == 2
    assert "sinks.b.driver: sink driver 'broken' failed to load: ModuleNotFoundError" in r.stderr
    assert "Traceback" not in r.stderr
