"""The Prometheus exposition is built from the bridge's read model: names, labels and
values as the operators' dashboards know them."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.core import metrics as m
from bridge.core.state import (
    BridgeSnapshot,
    IntakeSnapshot,
    NormalizerSnapshot,
    RouterSnapshot,
    SinkSnapshot,
    SinkState,
    UpstreamSnapshot,
    UpstreamState,
    frozen_counts,
)
from bridge.sinks import Drivers
from bridge.testing import MemorySink, sample_events, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def snapshot() -> BridgeSnapshot:
    return BridgeSnapshot(
        upstream=UpstreamSnapshot(
            state=UpstreamState.SUBSCRIBED, flowing=True, seconds_since_update=0.25,
            stale_after_s=10.0, connects=3, reconnects=2, connect_failures=4,
            watchdog_restarts=1, acks=frozen_counts({"ok": 5, "partial": 1, "weird": 9}),
            rejected_symbols=2, subscriptions=frozen_counts({"ticker": 7}),
            last_error=None,
        ),
        normalizer=NormalizerSnapshot(
            frozen_counts({"ticker": 100, "equity": 10}),
            frozen_counts({("ticker", "missing_symbol"): 3, ("upstream", "too_deep"): 1}),
        ),
        router=RouterSnapshot(4, frozen_counts({("r0", "unchanged"): 6})),
        intake=IntakeSnapshot(12, 1000, frozen_counts({"intake_full": 8})),
        sinks=(SinkSnapshot(
            name="bus", driver="kafka", state=SinkState.FAILING, ready=False, required=True,
            depth=5, capacity=50, blocked=1, offered=20, published=10, conflated=2,
            dropped=frozen_counts({"buffer_full": 3}), failed_batches=7, reconnects=1,
            rejections=0, last_error="down", last_rejection=None,
            seconds_since_rejection=None, connect_failures=9,
        ),),
    )


def test_every_family_is_exported_from_the_snapshot() -> None:
    metrics = m.Metrics()
    metrics.attach(snapshot)
    got = samples(metrics.registry)
    T = m.TOTAL
    expected: Samples = {
        (m.UPSTREAM_STATE, (("state", "subscribed"),)): 1.0,
        (m.UPSTREAM_STATE, (("state", "idle"),)): 0.0,
        (m.UPSTREAM_CONNECTS + T, ()): 3,
        (m.UPSTREAM_RECONNECTS + T, ()): 2,
        (m.UPSTREAM_CONNECT_FAILURES + T, ()): 4,
        (m.UPSTREAM_WATCHDOG_RESTARTS + T, ()): 1,
        (m.UPSTREAM_ACKS + T, (("status", "ok"),)): 5,
        (m.UPSTREAM_ACKS + T, (("status", "partial"),)): 1,
        (m.UPSTREAM_ACKS + T, (("status", "error"),)): 0,
        (m.UPSTREAM_REJECTED_SYMBOLS, ()): 2,
        (m.UPSTREAM_SUBSCRIPTIONS, (("kind", "ticker"),)): 7,
        (m.UPSTREAM_SUBSCRIPTIONS, (("kind", "equity"),)): 0,
        (m.UPSTREAM_SECONDS_SINCE_UPDATE, ()): 0.25,
        (m.EVENTS_RECEIVED + T, (("kind", "ticker"),)): 100,
        (m.EVENTS_INVALID + T, (("kind", "ticker"), ("reason", "missing_symbol"))): 3,
        (m.EVENTS_INVALID + T, (("kind", "upstream"), ("reason", "too_deep"))): 1,
        (m.EVENTS_UNROUTED + T, ()): 4,
        (m.EVENTS_FILTERED + T, (("reason", "unchanged"), ("route", "r0"))): 6,
        (m.PIPELINE_DROPPED + T, (("reason", "intake_full"),)): 8,
        (m.PIPELINE_DROPPED + T, (("reason", "shutdown"),)): 0,
        (m.INTAKE_EVENTS, ()): 12,
        (m.INTAKE_CAPACITY, ()): 1000,
        (m.SINK_STATE, (("driver", "kafka"), ("sink", "bus"), ("state", "failing"))): 1.0,
        (m.SINK_STATE, (("driver", "kafka"), ("sink", "bus"), ("state", "connected"))): 0.0,
        (m.SINK_UP, (("sink", "bus"),)): 0.0,
        (m.SINK_QUEUE_DEPTH, (("sink", "bus"),)): 5,
        (m.SINK_QUEUE_CAPACITY, (("sink", "bus"),)): 50,
        (m.SINK_EVENTS_OFFERED + T, (("sink", "bus"),)): 20,
        (m.SINK_BLOCKED_OFFERS, (("sink", "bus"),)): 1,
        (m.SINK_EVENTS_PUBLISHED + T, (("sink", "bus"),)): 10,
        (m.SINK_EVENTS_DROPPED + T, (("reason", "buffer_full"), ("sink", "bus"))): 3,
        (m.SINK_EVENTS_DROPPED + T, (("reason", "shutdown"), ("sink", "bus"))): 0,
        (m.SINK_EVENTS_CONFLATED + T, (("sink", "bus"),)): 2,
        (m.SINK_PUBLISH_FAILURES + T, (("sink", "bus"),)): 7,
        (m.SINK_RECONNECTS + T, (("sink", "bus"),)): 1,
        (m.SINK_CONNECT_FAILURES + T, (("sink", "bus"),)): 9,
        (m.SINK_REJECTIONS + T, (("sink", "bus"),)): 0,
    }
    for key, value in expected.items():
        assert got.get(key) == value, key
    # only the known statuses are exported, and every state once
    assert (m.UPSTREAM_ACKS + T, (("status", "weird"),)) not in got
    assert sum(1 for (n, _) in got if n == m.UPSTREAM_STATE) == len(UpstreamState)
    assert sum(1 for (n, _) in got if n == m.SINK_STATE) == len(SinkState)


def test_a_bridge_without_a_source_exports_an_idle_upstream() -> None:
    metrics = m.Metrics()
    metrics.attach(lambda: dataclasses.replace(snapshot(), upstream=None))
    got = samples(metrics.registry)
    assert all(v == 0.0 for (n, _), v in got.items() if n == m.UPSTREAM_STATE)
    assert got[(m.UPSTREAM_SECONDS_SINCE_UPDATE, ())] == -1.0
    assert got[(m.UPSTREAM_CONNECTS + m.TOTAL, ())] == 0


def test_status_events_and_those_damping_suppressed_are_counted_by_status() -> None:
    from bridge.core.state import DAMPED_STATUSES, STATUSES, MarketSnapshot

    market = MarketSnapshot(5, 1, frozen_counts({"stale": 2, "gap": 3}),
                            frozen_counts({"gap": 7}))
    metrics = m.Metrics()
    metrics.attach(lambda: dataclasses.replace(snapshot(), market=market))
    got = samples(metrics.registry)
    suppressed = {s: got[(m.STATUS_EVENTS_SUPPRESSED + m.TOTAL, (("status", s),))]
                  for s in DAMPED_STATUSES}
    assert suppressed == {"stale": 0, "fresh": 0, "gap": 7}
    assert {s: got[(m.STATUS_EVENTS + m.TOTAL, (("status", s),))] for s in STATUSES} == {
        "down": 0, "up": 0, "stale": 2, "fresh": 0, "gap": 3}
    assert got[(m.STALE_SYMBOLS, ())] == 1 and got[(m.LAST_VALUES, ())] == 5
    # no market (a snapshot built by hand): every damped status is exported, at 0
    metrics = m.Metrics()
    metrics.attach(snapshot)
    got = samples(metrics.registry)
    assert all(got[(m.STATUS_EVENTS_SUPPRESSED + m.TOTAL, (("status", s),))] == 0
               for s in DAMPED_STATUSES)


def test_metric_names_are_the_documented_ones() -> None:
    names = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str)
             and v.startswith("aleno_bridge_")}
    assert len(names) == 60  # 48, the disk spool's 8 (issue 22) and the bars' 4 (issue 23)
    assert all(n.startswith("aleno_bridge_") and not n.endswith("_total") for n in names)


async def test_a_running_bridge_is_counted_through_its_snapshot() -> None:
    settings = parse_config("sinks: {mem: {driver: memory, batch: {linger_ms: 0}}}\n"
                            "http: {enabled: false}\n",
                            env={}, drivers=Drivers(injected={"memory": MemorySink}))
    sink = MemorySink("mem")
    bridge = Bridge(settings, sinks={"mem": sink}, with_source=False)
    await bridge.start()
    try:
        bridge.ingest(sample_events(symbols=3, updates=2))
        await wait_until(lambda: len(sink.received) == 6, 5, "6 events published")
        got = samples(bridge.registry)
        assert got[(m.SINK_EVENTS_PUBLISHED + m.TOTAL, (("sink", "mem"),))] == 6
        assert got[(m.SINK_EVENTS_OFFERED + m.TOTAL, (("sink", "mem"),))] == 6
        assert got[(m.SINK_STATE, (("driver", "memory"), ("sink", "mem"),
                                   ("state", "connected")))] == 1.0
        assert got[(m.SINK_UP, (("sink", "mem"),))] == 1.0
    finally:
        await bridge.shutdown()


async def test_failed_connect_attempts_of_a_sink_are_counted() -> None:
    settings = parse_config(
        "sinks: {mem: {driver: memory, batch: {linger_ms: 0},"
        " retry: {initial_backoff_s: 0.01, max_backoff_s: 0.02}}}\nhttp: {enabled: false}\n",
        env={}, drivers=Drivers(injected={"memory": MemorySink}))
    sink = MemorySink("mem")
    sink.down = True
    bridge = Bridge(settings, sinks={"mem": sink}, with_source=False)
    key = (m.SINK_CONNECT_FAILURES + m.TOTAL, (("sink", "mem"),))
    await bridge.start()
    try:
        await wait_until(lambda: samples(bridge.registry)[key] >= 3, 5,
                         "three failed connects counted")
        sink.down = False
        await wait_until(lambda: sink.connected, 5, "connected once the bus is back")
        failures = samples(bridge.registry)[key]
        bridge.ingest(sample_events(symbols=1, updates=1))
        await wait_until(lambda: len(sink.received) == 1, 5, "published")
        assert samples(bridge.registry)[key] == failures  # a success does not count
    finally:
        await bridge.shutdown()
