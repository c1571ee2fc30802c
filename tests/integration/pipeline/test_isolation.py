"""A sink whose bus is gone does not slow the sinks beside it (real drivers, real files)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.core.envelope import Event
from bridge.testing import sample_events
from tests.support.proc import free_port

pytestmark = pytest.mark.integration

EVENTS = 40_000


def fresh(events: list[Event]) -> list[Event]:
    """New events equal to ``events``, none encoded yet (an event keeps its encodings):
    every run encodes what it routes, at half the cost of normalizing the records again."""
    return [Event(e.kind, e.symbol, e.base, e.quote, e.sent_ms, e.received_ms, e.time,
                  e.data, e.raw, e.prices, e.source) for e in events]


async def jsonl_rate(tmp: Path, neighbour: str | None,
                     sample: list[Event]) -> tuple[float, Bridge]:
    """Events/s through a jsonl sink, alone or beside a NATS sink at ``neighbour``, of
    fresh copies of ``sample``."""
    out = tmp / f"out-{time.monotonic_ns()}.jsonl"
    sinks = f"""
  file: {{driver: jsonl, path: "{out}", buffer: {{max_events: {EVENTS}}},
          batch: {{max_events: 1000, linger_ms: 1}}}}
"""
    if neighbour:
        sinks += f"""
  gone:
    driver: nats
    servers: {neighbour}
    connect_timeout_s: 0.5
    buffer: {{max_events: 1000, when_full: drop_oldest}}
    retry: {{initial_backoff_s: 0.05, max_backoff_s: 0.2}}
"""
    # what is measured ends before the shutdown: the dead sink need not be waited for
    settings = parse_config(f"sinks:{sinks}\nhttp: {{enabled: false}}\nshutdown_timeout_s: 0.1\n",
                            env={})
    bridge = Bridge(settings, with_source=False)
    await bridge.start()
    events = fresh(sample)
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


async def test_a_dead_bus_does_not_slow_the_jsonl_sink_beside_it(
    tmp_path: Path, nats_url: str
) -> None:
    """The control is the same pipeline beside a *live* NATS sink: routing to a second
    sink costs the one dispatcher the same CPU either way, so what is measured is what
    the outage adds. Runs are interleaved, best of four each, so machine load hits
    every series alike."""
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: the broker is gone
    sample = sample_events(symbols=100, updates=EVENTS // 100)
    alone, live, beside = [], [], []
    for _ in range(4):
        alone.append(await jsonl_rate(tmp_path, None, sample))
        live.append(await jsonl_rate(tmp_path, nats_url, sample))
        beside.append(await jsonl_rate(tmp_path, dead, sample))
    best_alone = max(r for r, _ in alone)
    best_live = max(r for r, _ in live)
    best_beside = max(r for r, _ in beside)
    print(f"jsonl sink: {best_alone:,.0f} events/s alone, {best_live:,.0f} beside a live "
          f"NATS sink, {best_beside:,.0f} beside a dead one")
    for _, bridge in live:
        assert bridge.workers["gone"].stats.published > 0
    for _, bridge in beside:
        gone = bridge.workers["gone"].stats
        assert gone.published == 0 and gone.offered == EVENTS
        assert gone.offered == gone.published + sum(gone.dropped.values()) + gone.conflated
        assert not bridge.workers["gone"].ready
    # a dead neighbour costs the healthy sink no more than a live one (within noise)
    assert best_beside > 0.8 * best_live
