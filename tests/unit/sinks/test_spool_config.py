"""``buffer.disk`` in the configuration, ``validate``, reloads, ``/readyz`` and the
metrics of a spooled sink."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

import pytest

from bridge.app import Bridge
from bridge.cli.main import main
from bridge.config import ConfigError, Settings, parse_config
from bridge.core import metrics as m
from bridge.sinks import Drivers
from bridge.sinks.spool_buffer import SpoolBuffer
from bridge.sinks.spool_format import segment_name
from bridge.testing import MemoryOptions, MemorySink, sample_events, wait_until

DRIVERS = Drivers(injected={"memory": MemorySink})


def settings(sinks: str, extra: str = "") -> Settings:
    return parse_config(f"sinks:\n{sinks}\nhttp: {{enabled: false}}\n{extra}\n", env={},
                        drivers=DRIVERS)


def problems(sinks: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        settings(sinks)
    return list(err.value.problems)


def disk(path: Path | str, extra: str = "") -> str:
    return f"{{path: '{path}', max_bytes: 2MiB, fsync_interval_ms: 20{extra}}}"


def test_every_problem_of_buffer_disk_names_its_path(tmp_path: Path) -> None:
    found = problems(
        f"  a: {{driver: memory, buffer: {{disk: {disk(tmp_path / 'a')}}}}}\n"
        f"  b: {{driver: memory, buffer: {{disk: {disk(tmp_path / 'a' / 'b')}}}}}\n"
        f"  c: {{driver: memory, buffer: {{disk: {{path: '{tmp_path}/c', max_bytes: 1KiB}}}}}}\n"
        f"  d: {{driver: memory, buffer: {{disk: {{path: '', fsync_interval_ms: -1}}}}}}\n")
    assert any(p.startswith("sinks.b.buffer.disk.path: ") and "sink 'a'" in p for p in found)
    assert any(p.startswith("sinks.c.buffer.disk.max_bytes: ") for p in found)
    assert any(p.startswith("sinks.d.buffer.disk.path: ") for p in found)
    assert any(p.startswith("sinks.d.buffer.disk.fsync_interval_ms: ") for p in found)


def test_validate_prints_the_worst_case_disk_use(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sinks:\n"
                   f"  a: {{driver: console, buffer: {{disk: {{path: '{tmp_path}/a', "
                   "max_bytes: 1GiB}}}\n"
                   f"  b: {{driver: console, buffer: {{disk: {{path: '{tmp_path}/b', "
                   "max_bytes: 64MiB}}}\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["validate", "-c", str(cfg)]) == 0
    # max_bytes plus one segment (8 MiB at most; 1/16 of max_bytes)
    assert "disk with every spool full: at most 1,100 MiB (a: 1,032 MiB, b: 68 MiB)" in (
        out.getvalue())
    assert not list(tmp_path.glob("a*"))  # validating opens no spool


async def test_a_reload_that_changes_a_spooled_sink_needs_a_restart(tmp_path: Path) -> None:
    s = settings(f"  a: {{driver: memory, buffer: {{disk: {disk(tmp_path / 'a')}}}}}")
    bridge = Bridge(s, sinks={"a": MemorySink("a")}, with_source=False)
    await bridge.start()
    try:
        changed = settings(f"  a: {{driver: memory, batch: {{max_events: 7}}, "
                           f"buffer: {{disk: {disk(tmp_path / 'a')}}}}}")
        outcome = await bridge.reload(changed)
        assert outcome.result == "refused"
        assert any(p.startswith("sinks.a (it has buffer.disk") for p in outcome.changes)
        # a new sink with a spool of its own is applied
        added = settings(f"  a: {{driver: memory, buffer: {{disk: {disk(tmp_path / 'a')}}}}}\n"
                         f"  b: {{driver: memory, buffer: {{disk: {disk(tmp_path / 'b')}}}}}")
        outcome = await bridge.reload(added)
        assert outcome.result == "applied" and (tmp_path / "b" / "lock").exists()
    finally:
        await bridge.shutdown()


async def test_readyz_shows_the_spool_and_fails_only_when_it_cannot_write(
    tmp_path: Path,
) -> None:
    s = settings(f"  a: {{driver: memory, batch: {{linger_ms: 0}}, "
                 f"buffer: {{max_events: 10, disk: {disk(tmp_path)}}}}}",
                 "shutdown_timeout_s: 1")
    sink = MemorySink("a", MemoryOptions(latency_ms=20))  # a slow bus: a backlog
    bridge = Bridge(s, sinks={"a": sink}, with_source=False)
    buffer = bridge.workers["a"].buffer
    assert isinstance(buffer, SpoolBuffer)
    await bridge.start()
    try:
        bridge.ingest(sample_events(symbols=50, updates=4))
        await wait_until(lambda: sink.received)
        ready, checks = bridge.readiness()
        spool = checks["spool:a"]
        assert ready and spool["ok"] and spool["error"] is None
        assert spool["events"] > 0 and spool["max_bytes"] == 2 << 20

        # a write that fails (the next segment's name is taken by a directory)
        await wait_until(lambda: bridge.workers["a"].depth == 0)
        buffer.store.seal_active()
        (tmp_path / segment_name(buffer.store.head)).mkdir()
        bridge.ingest(sample_events(symbols=5, updates=1, start_ms=1_900_000_000_000))
        await wait_until(lambda: buffer.store.error is not None, 5)
        ready, checks = bridge.readiness()
        assert not ready and not checks["spool:a"]["ok"]
        assert "IsADirectoryError" in checks["spool:a"]["error"]
        (tmp_path / segment_name(buffer.store.head - 5)).rmdir()
        await wait_until(lambda: buffer.store.error is None, 5)  # retried every second
        assert bridge.readiness()[0]

        text = "\n".join(f"{s.name} {s.labels} {s.value}"
                         for fam in bridge.registry.collect() for s in fam.samples)
        for name in (m.SPOOL_EVENTS, m.SPOOL_BYTES, m.SPOOL_OLDEST_AGE, m.SPOOL_BACKLOG,
                     m.SPOOL_CORRUPT + m.TOTAL, m.SPOOL_WRITE_ERRORS + m.TOTAL):
            assert f"{name} {{'sink': 'a'}}" in text
        assert bridge.workers["a"].snapshot().spool.write_errors >= 1  # type: ignore[union-attr]
    finally:
        await asyncio.wait_for(bridge.shutdown(), 10)


def test_an_observing_tap_never_opens_the_spools(tmp_path: Path) -> None:
    """``aleno-bridge tap`` (without --publish) discards what it routes: it must neither
    take a running bridge's spool nor hand a stopped one's events to a discarding sink."""
    from bridge.cli.tap import without_spools

    s = settings(f"  a: {{driver: memory, buffer: {{max_events: 7, disk: {disk(tmp_path)}}}}}")
    tapped = without_spools(s)
    assert tapped.sinks["a"].common.buffer.disk is None
    assert tapped.sinks["a"].common.buffer.max_events == 7
    assert s.sinks["a"].common.buffer.disk is not None  # the settings themselves unchanged
    bridge = Bridge(tapped, sinks={"a": MemorySink("a")}, with_source=False)
    assert not isinstance(bridge.workers["a"].buffer, SpoolBuffer)
    assert not (tmp_path / "lock").exists()
