"""bridge.app: the assembly point, the intake bound, shutdown's one deadline and
its accounting, /readyz on rejections, dead-letter wiring and validation (issue 8)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import ConfigError, Settings, parse_config
from bridge.sinks import Drivers, SinkRejectedError
from bridge.testing import MemorySink, sample_events, until

DRIVERS = Drivers(injected={"memory": MemorySink})


def settings(sinks: str, extra: str = "", routes: str = "") -> Settings:
    text = f"sinks:\n{sinks}\n{routes}\nhttp: {{enabled: false}}\n{extra}\n"
    return parse_config(text, env={}, drivers=DRIVERS)


def problems(sinks: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        settings(sinks)
    return list(err.value.problems)


def accounted(bridge: Bridge, received: int) -> None:
    """Every received event is in exactly one place: routed to the sinks (whose own
    counters balance) or dropped before routing, by reason."""
    for w in bridge.workers.values():
        s = w.stats
        assert s.offered == s.published + sum(s.dropped.values()) + s.conflated + w.depth
    offered = sum(w.stats.offered for w in bridge.workers.values())
    per_event = len(bridge.workers)  # the tests route every event to every sink
    assert offered + per_event * sum(bridge.pipeline_dropped.values()) == per_event * received


async def test_the_intake_is_bounded_in_events_not_batches() -> None:
    """A dead ``block`` sink: the intake queues at most ``intake_max_events`` events
    besides the batch being routed, and sheds the *oldest* batches whole."""
    s = settings("  dead: {driver: memory, buffer: {max_events: 10, when_full: block}}",
                 "intake_max_events: 250\nshutdown_timeout_s: 0.5")
    sink = MemorySink("dead")
    sink.down = True
    bridge = Bridge(s, sinks={"dead": sink}, with_source=False)
    await bridge.start()
    received = 0
    for u in range(20):  # 20 upstream batches of 100 events: 2,000 events
        events = sample_events(symbols=100, updates=1, start_ms=1_732_480_000_000 + u * 1000)
        received += len(events)
        bridge.ingest(events)
        await asyncio.sleep(0)
        assert bridge.queued_events <= 250
    await asyncio.sleep(0.05)
    # the first batch is being routed (blocked), the two newest are queued
    assert bridge.queued_events == 200 and bridge.intake_events == 300
    assert bridge.pipeline_dropped["intake_full"] == received - 300
    assert bridge.shed_payloads == 17
    queued = [b.events[0].sent_ms for b in bridge._intake if b.events]
    assert queued == [1_732_480_000_000 + u * 1000 for u in (18, 19)]  # the newest kept
    overload = bridge.snapshot().overload
    assert overload is not None and overload.overloaded and overload.shed_payloads == 17
    await bridge.shutdown()
    accounted(bridge, received)
    assert bridge.pipeline_dropped["shutdown"] > 0


async def test_shutdown_keeps_one_deadline_and_counts_every_event() -> None:
    """A dead ``block`` sink, a full intake and a driver whose close hangs: shutdown
    still ends within ``shutdown_timeout_s`` and nothing is lost uncounted."""

    class Dead(MemorySink):
        async def close(self) -> None:
            await asyncio.sleep(60)

    s = settings(
        "  dead: {driver: memory, buffer: {max_events: 100, when_full: block},"
        " retry: {connect_timeout_s: 30}}\n"
        "  ok: {driver: memory}",
        "shutdown_timeout_s: 2\nintake_max_events: 5000",
    )
    dead = Dead("dead")
    dead.down = True
    bridge = Bridge(s, sinks={"dead": dead}, with_source=False)
    await bridge.start()
    received = 0
    for u in range(60):
        events = sample_events(symbols=100, updates=1, start_ms=1_732_480_000_000 + u * 1000)
        received += len(events)
        bridge.ingest(events)
    await asyncio.sleep(0.1)
    assert bridge.workers["dead"].blocked == 1
    started = time.monotonic()
    lost = await bridge.shutdown()
    took = time.monotonic() - started
    assert took <= 2.0 + 0.3, f"shutdown took {took:.2f}s with a 2s budget"
    assert lost["dead"] == 100 and lost["ok"] == 0
    assert bridge.pipeline_dropped.get("shutdown", 0) > 0
    assert bridge.intake_events == 0
    accounted(bridge, received)


async def test_shutdown_with_a_healthy_sink_delivers_everything() -> None:
    s = settings("  ok: {driver: memory, buffer: {when_full: block, max_events: 50}}",
                 "shutdown_timeout_s: 5")
    sink = MemorySink("ok")
    bridge = Bridge(s, sinks={"ok": sink}, with_source=False)
    await bridge.start()
    events = sample_events(symbols=50, updates=20)
    bridge.ingest(events)
    lost = await bridge.shutdown()
    assert lost == {"ok": 0} and len(sink.received) == len(events)
    assert bridge.pipeline_dropped.get("shutdown", 0) == 0
    accounted(bridge, len(events))


async def test_readyz_shows_why_a_sink_rejects() -> None:
    s = settings("  bus: {driver: memory, batch: {linger_ms: 0}}")
    sink = MemorySink("bus")
    sink.fail_next(1, SinkRejectedError("bus", "message too large (max_payload 1024)"))
    bridge = Bridge(s, sinks={"bus": sink}, with_source=False)
    await bridge.start()
    bridge.ingest(sample_events(symbols=1, updates=1))
    w = bridge.workers["bus"]
    deadline = time.monotonic() + 5
    while w.stats.rejections == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    ok, checks = bridge.readiness()
    check = checks["sink:bus"]
    assert not ok and check["ok"] is False
    assert check["error"] is not None and "too large" in check["error"]
    assert "too large" in check["last_rejection"] and check["rejections"] == 1
    bridge.ingest(sample_events(symbols=1, updates=1, start_ms=1_800_000_000_000))
    while w.stats.published == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    ok, checks = bridge.readiness()
    assert ok and checks["sink:bus"]["error"] is None
    assert "too large" in checks["sink:bus"]["last_rejection"]  # still visible
    await bridge.shutdown()


async def test_dead_letter_is_wired_from_the_config() -> None:
    s = settings("  bus: {driver: memory, dead_letter: dlq, batch: {linger_ms: 0}}\n"
                 "  dlq: {driver: memory}",
                 routes="routes: [{sinks: [bus]}]")
    bus, dlq = MemorySink("bus"), MemorySink("dlq")
    bus.fail_next(1, SinkRejectedError("bus", "not authorized", reason="not_authorized"))
    bridge = Bridge(s, sinks={"bus": bus, "dlq": dlq}, with_source=False)
    await bridge.start()
    events = sample_events(symbols=3, updates=1)
    bridge.ingest(events)
    deadline = time.monotonic() + 5
    while len(dlq.received) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await bridge.shutdown()
    assert bridge.workers["bus"].stats.dropped == {"dead_lettered": 3}
    env: dict[str, Any] = __import__("orjson").loads(dlq.received[0].body)
    assert env["deadletterreason"] == "not_authorized" and env["deadlettersink"] == "bus"


@pytest.mark.parametrize(("sinks", "expected"), [
    ("  bus: {driver: memory, dead_letter: bus}",
     "sinks.bus.dead_letter: a sink cannot be its own dead-letter sink"),
    ("  bus: {driver: memory, dead_letter: nope}\n  other: {driver: memory}",
     "sinks.bus.dead_letter: no sink named 'nope' (sinks: other)"),
    ("  a: {driver: memory, dead_letter: b}\n  b: {driver: memory, dead_letter: a}",
     "sinks.a.dead_letter: dead letters would go round in a loop (a -> b -> a)"),
])
def test_dead_letter_config_errors_name_their_path(sinks: str, expected: str) -> None:
    assert expected in problems(sinks)


async def test_from_settings_and_serve_run_a_bridge_until_stop() -> None:
    """The one assembly point: settings -> a bridge whose events reach the injected sink,
    drained by ``serve`` when ``stop`` is set."""
    from bridge.app import serve

    sink = MemorySink("a")
    bridge = Bridge.from_settings(settings("  a: {driver: memory, batch: {linger_ms: 0}}"),
                                  sinks={"a": sink}, http=False)
    assert bridge.source is not None and not bridge.serves_http
    bridge.source = None  # the events come from the test, not an upstream
    stop = asyncio.Event()
    task = asyncio.create_task(serve(bridge, stop))
    for _ in range(100):
        if bridge.alive():
            break
        await asyncio.sleep(0.01)
    events = sample_events(20)
    bridge.ingest(events)
    stop.set()
    lost = await asyncio.wait_for(task, 10)
    assert lost == {"a": 0}
    assert [m.event.id for m in sink.received] == [e.id for e in events]


async def test_shed_payloads_are_never_validated_and_the_newest_is_kept() -> None:
    """Under overload the intake sheds whole upstream payloads before validation: an
    invalid record in a shed payload is never looked at, and the newest payload wins."""
    from bridge.testing.sample import ticker_record

    s = settings("  mem: {driver: memory, batch: {linger_ms: 0}}", "intake_max_events: 10")
    sink = MemorySink("mem")
    sink.hold()
    bridge = Bridge(s, sinks={"mem": sink}, with_source=False)
    await bridge.start()
    t0 = time.time_ns() // 1_000_000  # records older than source.max_record_age_s are dropped
    bridge.on_payload("new_token_states", [ticker_record("A/USD", 1.0, t0)])
    await asyncio.sleep(0.01)  # routed: the sink holds it (publish is held)
    for u in range(1, 6):  # 5 payloads of 10 records, one invalid record each
        records = [ticker_record(f"S{i}/USD", 1.0 + u, t0 + u) for i in range(9)]
        bridge.on_payload("new_token_states", [*records, {"id": "BAD"}])
    assert bridge.shed_payloads == 4 and bridge.pipeline_dropped["intake_full"] == 40
    assert not bridge.normalizer.invalid  # nothing of the shed payloads was validated
    sink.release()
    await bridge.flush_intake()
    await bridge.shutdown()
    assert {m.event.sent_ms for m in sink.received} == {t0, t0 + 5}
    assert sum(bridge.normalizer.invalid.values()) == 1
    assert sum(bridge.normalizer.received.values()) == 51


async def test_a_tick_bigger_than_the_intake_is_taken_whole_when_alone() -> None:
    """One upstream tick of every symbol may exceed ``intake_max_events``: cutting it
    would leave the symbols at its end unpublished for good."""
    bridge = Bridge(settings("  a: {driver: memory}", extra="intake_max_events: 10"),
                    sinks={"a": MemorySink("a")}, with_source=False)
    tick = sample_events(25)
    assert len(tick) > 10
    bridge.ingest(tick)
    assert bridge.intake_events == len(tick)
    assert sum(bridge.pipeline_dropped.values()) == 0
    # the next tick replaces it: stale prices go first, whole
    bridge.ingest(tick[:5])
    assert bridge.intake_events == 5
    assert bridge.pipeline_dropped.get("intake_full") == len(tick)


def _samples(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(bridge.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _balanced(snap: Any) -> bool:
    return bool(snap.offered == snap.published + sum(snap.dropped.values()) + snap.conflated
                + snap.depth)


async def test_a_sink_a_reload_removes_or_replaces_is_accounted_until_restart(
        caplog: pytest.LogCaptureFixture) -> None:
    """Issue 19: 20,000 events held by a sink a reload removes are counted
    (``sink_removed``, on ``/metrics`` and in the last log line), its counters stay
    on ``/metrics``, and a replaced sink's counters go on from the old ones."""
    from bridge.app import serve

    budget = 0.5

    def config(with_held: bool, linger_ms: int) -> Settings:
        held = ("  held: {driver: memory, buffer: {max_events: 20000}, "
                "batch: {max_events: 500, linger_ms: 0}}\n") if with_held else ""
        return settings(f"  keep: {{driver: memory, buffer: {{max_events: 30000}}, "
                        f"batch: {{linger_ms: {linger_ms}}}}}\n{held}",
                        f"shutdown_timeout_s: {budget}")

    held, keep = MemorySink("held"), MemorySink("keep")
    held.hold()  # its bus hangs: nothing it holds can be delivered
    bridge = Bridge(config(True, 0), sinks={"held": held, "keep": keep}, with_source=False,
                    http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(bridge, stop))
    await until(bridge.alive, 5, "the bridge runs", task=task)
    events = sample_events(symbols=1000, updates=20)
    for i in range(0, len(events), 1000):
        bridge.ingest(events[i:i + 1000])
        await bridge.flush_intake()
    await until(lambda: len(keep.received) == 20_000
                and bridge.workers["held"].depth == 20_000, 10, "routed", task=task)

    outcome = await bridge.reload(config(False, 5))
    assert {"sink held removed", "sink keep replaced"} <= set(outcome.changes), outcome
    snap = bridge.snapshot()
    (keep_snap,) = snap.sinks
    assert keep_snap.published == 20_000 and _balanced(keep_snap)  # not back to 0
    (gone,) = snap.retired_sinks
    assert (gone.name, gone.offered, gone.depth) == ("held", 20_000, 20_000)
    assert not any(c.startswith("sink:held") for c in bridge.readiness()[1])

    await until(lambda: not bridge._retiring, budget + 5, "the removed sink closed")
    m = _samples(bridge)
    pipeline = "aleno_bridge_pipeline_dropped_total"
    assert m[(pipeline, (("reason", "sink_removed"),))] == 20_000
    assert m[("aleno_bridge_sink_events_dropped_total",
              (("reason", "sink_removed"), ("sink", "held")))] == 20_000
    assert m[("aleno_bridge_sink_events_offered_total", (("sink", "held"),))] == 20_000
    assert ("aleno_bridge_sink_up", (("sink", "held"),)) not in m  # gone, not down
    assert all(_balanced(s) for s in (*bridge.snapshot().sinks,
                                      *bridge.snapshot().retired_sinks))

    bridge.ingest(sample_events(symbols=100, updates=1, start_ms=events[-1].sent_ms + 1000))
    await until(lambda: _samples(bridge)[("aleno_bridge_sink_events_published_total",
                                          (("sink", "keep"),))] == 20_100, 5, "published")
    with caplog.at_level("INFO", "aleno_bridge.app"):
        stop.set()
        lost = await asyncio.wait_for(task, 10)
    assert lost == {"keep": 0, "held": 20_000}
    assert "(20000 by sinks a reload replaced or removed)" in caplog.text
    assert "aleno-bridge stopped; undelivered events: 20000" in caplog.text


async def test_a_reload_of_only_hot_settings_is_applied_and_none_after_shutdown() -> None:
    """``shutdown_timeout_s`` (or ``reload``) alone is a change applied, named; once
    the shutdown began a reload is refused (it would start sinks nothing stops)."""
    sink = MemorySink("a")
    bridge = Bridge(settings("  a: {driver: memory}", "shutdown_timeout_s: 1"),
                    sinks={"a": sink}, with_source=False)
    await bridge.start()
    outcome = await bridge.reload(settings("  a: {driver: memory}",
                                           "shutdown_timeout_s: 2\nreload: {debounce_s: 3}"))
    assert (outcome.result, outcome.changes) == ("applied", ["shutdown_timeout_s", "reload"])
    assert bridge.workers["a"].sink is sink  # unchanged sink untouched
    await bridge.shutdown()
    outcome = await bridge.reload(settings("  a: {driver: memory}", "shutdown_timeout_s: 1"))
    assert outcome.result == "refused" and "shutting down" in outcome.message
    assert dict(bridge.snapshot().reloads) == {"applied": 1, "refused": 1}
