"""No congestion collapse (issue 11, item 3): the real simulator offers about four
times what a deliberately slow sink can publish. The bridge keeps reading the socket
(bounded lag), publishes near the sink's maximum, and sheds whole stale upstream
payloads before validating them, visibly (metric, ``/readyz``, one log line)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers, Message
from bridge.testing import MemorySink

pytestmark = pytest.mark.integration

TICKERS = [f"T{i}/USD" for i in range(2000)]
INTERVAL_S = 0.1  # 2,000 tickers every 100 ms: 20,000 events/s offered
BATCH = 100
DELAY_S = 0.02  # at most 100 events per 20 ms: the sink publishes <= 5,000 events/s
SINK_MAX_RATE = BATCH / DELAY_S


class SlowSink(MemorySink):
    """A bus that takes ``DELAY_S`` per batch and keeps only counts (no memory growth)."""

    published = 0

    async def publish(self, batch: Sequence[Message]) -> None:
        await asyncio.sleep(DELAY_S)
        self.published += len(batch)


def samples(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(bridge.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }


async def test_past_capacity_delivery_levels_off_and_the_lag_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aleno_bridge.app")
    async with Simulator(port=0, api_keys=["k"], interval=INTERVAL_S, tickers=TICKERS,
                         max_subscriptions=5000, seed=3) as sim:
        settings = parse_config(
            f"""
source: {{url: "{sim.url}", api_key: k, tickers: [{", ".join(TICKERS)}]}}
sinks:
  slow: {{driver: memory, batch: {{max_events: {BATCH}, linger_ms: 0}},
         buffer: {{max_events: 2000}}}}
http: {{enabled: false}}
""", env={}, drivers=Drivers(injected={"memory": MemorySink}))
        sink = SlowSink("slow")
        bridge = Bridge(settings, sinks={"slow": sink})
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            deadline = time.monotonic() + 10
            while sink.published < 2000:  # warmed up: subscribed and publishing
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            received0 = sum(bridge.normalizer.received.values())
            published0, t0 = sink.published, time.monotonic()
            await asyncio.sleep(4)
            dt = time.monotonic() - t0
            received = (sum(bridge.normalizer.received.values()) - received0) / dt
            delivered = (sink.published - published0) / dt
            snap = bridge.snapshot()
            ok, checks = bridge.readiness()
            got = samples(bridge)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)

    print(f"offered {len(TICKERS) / INTERVAL_S:.0f}/s, read {received:.0f}/s, "
          f"delivered {delivered:.0f}/s (sink max {SINK_MAX_RATE:.0f}/s)")
    # the socket keeps being read: (nearly) everything offered arrives
    assert received >= 0.5 * len(TICKERS) / INTERVAL_S
    # delivery levels off near the sink's maximum instead of collapsing
    assert delivered >= 0.4 * SINK_MAX_RATE  # 60-70% measured; the collapse was 1/15
    # upstream lag: at least 99% of the payloads arrived within 2.5 s of being sent
    lag = "aleno_bridge_upstream_lag_seconds"
    count = got[(lag + "_count", (("kind", "ticker"),))]
    within = got[(lag + "_bucket", (("kind", "ticker"), ("le", "2.5")))]
    assert count > 20 and within >= 0.99 * count, (within, count)
    # shedding is counted, before validation, and visible
    shed = got[("aleno_bridge_pipeline_dropped_total", (("reason", "intake_full"),))]
    assert shed > 0 and got[("aleno_bridge_payloads_shed_total", ())] > 0
    assert got[("aleno_bridge_overloaded", ())] == 1.0
    assert snap.overload is not None and snap.overload.overloaded
    assert ok, checks  # overload alone does not make the bridge unready
    assert checks["overload"]["overloaded"] is True and checks["overload"]["shed_events"] > 0
    # work is not spent on events that are then dropped: the sink drops (almost) nothing
    sink_dropped = sum(v for (name, labels), v in got.items()
                       if name == "aleno_bridge_sink_events_dropped_total")
    assert sink_dropped <= 0.05 * shed, (sink_dropped, shed)
    # one log line when shedding starts, not one per payload
    starts = [r for r in caplog.records if r.getMessage().startswith("overloaded:")]
    assert len(starts) == 1
    # every event accounted for, per sink and before the router
    w = bridge.workers["slow"]
    s = w.stats
    assert s.offered == s.published + sum(s.dropped.values()) + s.conflated + w.depth
    invalid = sum(bridge.normalizer.invalid.values())
    assert (sum(bridge.normalizer.received.values()) - invalid
            == s.offered + sum(bridge.pipeline_dropped.values()) + bridge.router.unrouted)


async def test_recovery_is_logged_once_shedding_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead ``block`` sink makes the bridge shed; once it is back and the intake
    drains, the bridge logs its recovery and the gauge falls back to 0."""
    caplog.set_level(logging.INFO, logger="aleno_bridge.app")
    from bridge.testing import sample_events

    settings = parse_config(
        "sinks: {mem: {driver: memory, buffer: {max_events: 10, when_full: block},"
        " batch: {linger_ms: 0}}}\nhttp: {enabled: false}\nintake_max_events: 100\n",
        env={}, drivers=Drivers(injected={"memory": MemorySink}))
    sink = MemorySink("mem")
    sink.hold()
    bridge = Bridge(settings, sinks={"mem": sink}, with_source=False)
    bridge.overload_clear_s = 0.2
    await bridge.start()
    for u in range(5):
        bridge.ingest(sample_events(symbols=50, updates=1, start_ms=1_732_480_000_000 + u))
        await asyncio.sleep(0)
    assert bridge.snapshot().overload.overloaded  # type: ignore[union-attr]
    sink.release()
    await bridge.flush_intake()
    await asyncio.sleep(0.3)
    assert not bridge.snapshot().overload.overloaded  # type: ignore[union-attr]
    assert samples(bridge)[("aleno_bridge_overloaded", ())] == 0.0
    await bridge.shutdown()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("overloaded:") for m in msgs) == 1
    assert sum(m.startswith("recovered from overload") for m in msgs) == 1
