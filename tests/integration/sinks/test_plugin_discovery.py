"""Driver discovery through real entry points: a broken plugin never hides the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[3]


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


@pytest.mark.parametrize("hidden", [("nats",), ("aiokafka", "nats", "paho")])
def test_a_builtin_driver_without_its_library_shows_the_extra_to_install(
    tmp_path: Path, hidden: tuple[str, ...]
) -> None:
    """An installation without an extra, simulated by packages on PYTHONPATH that shadow
    the client libraries and fail to import like a missing one."""
    for module in hidden:
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "bridge", "plugins"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    driver_of = {"aiokafka": "kafka", "nats": "nats", "paho": "mqtt"}
    missing = {driver_of[m] for m in hidden}
    for name in ("kafka", "nats", "mqtt"):
        row = next(line for line in lines if f" {name} " in line)
        hint = f"pip install 'aleno-bridge[{name}]'"
        if name in missing:
            assert "failed:" in row and hint in row, row
            assert f"hint: the {name} driver needs its client library: {hint}" in lines
        else:
            assert " ok " in row and hint not in r.stdout, row
    all_hint = "hint: every built-in bus driver at once: pip install 'aleno-bridge[all]'"
    assert (all_hint in lines) == (len(missing) > 1)
