"""A sink whose bus is gone does not slow the sinks beside it (real drivers, real files)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.testing import sample_events
from tests.support.proc import free_port

pytestmark = pytest.mark.integration

EVENTS = 40_000


async def jsonl_rate(tmp: Path, dead_neighbour: bool) -> tuple[float, Bridge]:
    dead_port = free_port()  # nothing listens there: the NATS "broker" is gone
    out = tmp / f"out-{dead_neighbour}-{time.monotonic_ns()}.jsonl"
    sinks = f"""
  file: {{driver: jsonl, path: "{out}", buffer: {{max_events: {EVENTS}}},
          batch: {{max_events: 1000, linger_ms: 1}}}}
"""
    if dead_neighbour:
        sinks += f"""
  gone:
    driver: nats
    servers: nats://127.0.0.1:{dead_port}
    connect_timeout_s: 0.5
    buffer: {{max_events: 1000, when_full: drop_oldest}}
    retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.2}}
"""
    settings = parse_config(f"sinks:{sinks}\nhttp: {{enabled: false}}\nshutdown_timeout_s: 0.5\n",
                            env={})
    bridge = Bridge(settings, with_source=False)
    await bridge.start()
    events = sample_events(symbols=100, updates=EVENTS // 100)
    worker = bridge.workers["file"]
    started = time.perf_counter()
    for i in range(0, len(events), 100):
        bridge.ingest(events[i:i + 100])
        await asyncio.sleep(0)
    while worker.stats.published < EVENTS:
        await asyncio.sleep(0.002)
        assert time.perf_counter() - started < 60
    rate = EVENTS / (time.perf_counter() - started)
    await bridge.shutdown()
    assert len(out.read_bytes().splitlines()) == EVENTS
    return rate, bridge


async def test_a_dead_bus_does_not_slow_the_jsonl_sink_beside_it(tmp_path: Path) -> None:
    alone = [await jsonl_rate(tmp_path, False) for _ in range(3)]
    beside = [await jsonl_rate(tmp_path, True) for _ in range(3)]
    best_alone = max(r for r, _ in alone)
    best_beside = max(r for r, _ in beside)
    print(f"jsonl sink: {best_alone:,.0f} events/s alone, {best_beside:,.0f} events/s "
          "beside a dead NATS sink")
    for _, bridge in beside:
        gone = bridge.workers["gone"].stats
        assert gone.published == 0 and gone.offered == EVENTS
        assert gone.offered == gone.published + sum(gone.dropped.values()) + gone.conflated
        assert not bridge.workers["gone"].ready
    # within noise: the dead sink costs one dict look-up and a deque append per event
    assert best_beside > 0.7 * best_alone
