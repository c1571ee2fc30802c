"""Per-sink workers: buffer policies, accounting, retries, isolation, drain."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from bridge.config import SinkCommon, SinkSpec
from bridge.sinks import Drivers, SinkRejectedError, SinkRetryError
from bridge.sinks.worker import SinkWorker
from bridge.testing import MemoryOptions, MemorySink, messages, sample_events, wait_until


def worker(policy: str = "drop_oldest", max_events: int = 100, batch: int = 10,
           sink: MemorySink | None = None, fmt: str = "cloudevents-json",
           **retry: Any) -> tuple[SinkWorker, MemorySink]:
    sink = sink or MemorySink("m")
    common = SinkCommon.model_validate({
        "driver": "memory",
        "format": fmt,
        "buffer": {"max_events": max_events, "when_full": policy},
        "batch": {"max_events": batch, "linger_ms": 0},
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, **retry},
    })
    spec = SinkSpec("m", common, MemorySink, MemoryOptions())
    return SinkWorker(spec, sink), sink


def balanced(w: SinkWorker) -> bool:
    s = w.stats
    return s.offered == s.published + sum(s.dropped.values()) + s.conflated + w.depth


def msgs(symbols: int, updates: int) -> list[Any]:
    return messages(sample_events(symbols=symbols, updates=updates), "t")


async def test_batches_are_delivered_in_order() -> None:
    w, sink = worker(batch=7)
    w.start()
    ms = msgs(3, 10)
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.stats.published == len(ms))
    assert [m.id for m in sink.received] == [m.id for m in ms]
    assert max(sink.batches) <= 7
    assert balanced(w)
    await w.stop(1)


async def test_drop_oldest_keeps_the_newest_and_counts() -> None:
    w, sink = worker("drop_oldest", max_events=5)
    ms = msgs(1, 12)
    for m in ms:
        assert w.offer(m) is None
    assert w.stats.dropped == {"buffer_full": 7} and balanced(w)
    w.start()
    await wait_until(lambda: w.depth == 0)
    assert [m.id for m in sink.received] == [m.id for m in ms[-5:]]
    assert balanced(w)
    await w.stop(1)


async def test_drop_newest_keeps_what_is_queued() -> None:
    w, sink = worker("drop_newest", max_events=5)
    ms = msgs(1, 12)
    for m in ms:
        w.offer(m)
    w.start()
    await wait_until(lambda: w.depth == 0)
    assert [m.id for m in sink.received] == [m.id for m in ms[:5]]
    assert w.stats.dropped == {"buffer_full": 7} and balanced(w)
    await w.stop(1)


async def test_block_waits_for_room_and_loses_nothing() -> None:
    w, sink = worker("block", max_events=3, batch=2)
    sink.hold()
    w.start()
    ms = msgs(1, 10)
    waited = 0
    for m in ms:
        pending = w.offer(m)
        if pending is not None:
            waited += 1
            if waited == 1:
                sink.release()
            await asyncio.wait_for(pending, 5)
    await wait_until(lambda: w.stats.published == 10)
    assert waited > 0
    assert [m.id for m in sink.received] == [m.id for m in ms]
    assert w.stats.dropped == {} and balanced(w)
    await w.stop(1)


async def test_conflate_keeps_only_the_latest_per_symbol_while_behind() -> None:
    w, sink = worker("conflate", max_events=100)
    ms = msgs(4, 25)  # 4 symbols, 25 updates each, round by round
    for m in ms:
        w.offer(m)
    assert w.depth == 4 and w.stats.conflated == 96 and balanced(w)
    w.start()
    await wait_until(lambda: w.depth == 0)
    latest = {m.event.symbol: m.id for m in ms}
    assert sorted(m.id for m in sink.received) == sorted(latest.values())
    assert balanced(w)
    await w.stop(1)


async def test_conflate_full_of_distinct_symbols_drops_the_oldest() -> None:
    w, _ = worker("conflate", max_events=3)
    for m in msgs(5, 1):
        w.offer(m)
    assert w.depth == 3 and w.stats.dropped == {"buffer_full": 2} and balanced(w)


async def test_failed_batches_are_retried_not_lost() -> None:
    w, sink = worker(batch=5)
    sink.fail_next(3)
    w.start()
    ms = msgs(2, 10)
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.stats.published == 20)
    assert [m.id for m in sink.received] == [m.id for m in ms]
    assert w.stats.failed_batches == 3 and sink.connects >= 2 and w.stats.reconnects >= 1
    assert balanced(w)
    await w.stop(1)


async def test_a_rejected_batch_is_dropped_and_counted() -> None:
    w, sink = worker(batch=5)
    sink.fail_next(1, SinkRejectedError("m", "too large"))
    w.start()
    for m in msgs(1, 10):
        w.offer(m)
    await wait_until(lambda: w.stats.published == 5)
    assert w.stats.dropped == {"rejected": 5} and balanced(w)
    await w.stop(1)


async def test_a_down_bus_does_not_slow_a_healthy_sink_beside_it() -> None:
    """The healthy sink's throughput with a dead neighbour equals its throughput beside
    a neighbour that is not running. Both runs offer every event to both workers (the
    dispatcher's cost), so the ratio measures only what the dead sink's reconnect loop
    takes from the healthy one."""

    async def run(with_dead: bool) -> float:
        healthy, hs = worker("drop_oldest", max_events=100_000, batch=500)
        dead, ds = worker("drop_oldest", max_events=1000, batch=500,
                          sink=MemorySink("dead"), connect_timeout_s=0.05)
        ds.down = True
        healthy.start()
        if with_dead:
            dead.start()
        ms = msgs(10, 2000)
        started = time.perf_counter()
        for m in ms:
            healthy.offer(m)
            dead.offer(m)
        await wait_until(lambda: healthy.stats.published == len(ms), 20)
        elapsed = time.perf_counter() - started
        assert dead.stats.published == 0 and dead.stats.dropped["buffer_full"] > 0
        assert balanced(dead)
        await healthy.stop(1)
        await dead.stop(0.1)
        return len(ms) / elapsed

    alone = max([await run(False) for _ in range(3)])
    beside = max([await run(True) for _ in range(3)])
    assert beside > 0.7 * alone, (
        f"healthy sink: {alone:.0f}/s beside an idle neighbour, {beside:.0f}/s beside a dead one")


async def test_a_partly_rejected_batch_counts_the_delivered_rest_as_published() -> None:
    w, sink = worker(batch=5)
    sink.fail_next(1, SinkRejectedError("m", "2 too large", rejected=2))
    w.start()
    for m in msgs(1, 5):
        w.offer(m)
    await wait_until(lambda: w.depth == 0)
    assert w.stats.dropped == {"rejected": 2} and w.stats.published == 3 and balanced(w)
    await w.stop(1)


async def test_a_driver_bug_keeps_the_batch_retries_it_and_logs_once_per_type(
    caplog: Any,
) -> None:
    """An exception type the driver did not map loses nothing: the batch is retried
    after a reconnect, counted by type, its traceback logged once per type."""
    w, sink = worker(batch=5, policy="block")
    sink.fail_next(3, KeyError("oops"))
    sink.fail_next(1, TypeError("bad"))
    w.start()
    ms = msgs(1, 10)
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.stats.published == 10, 10, "every event published")
    assert [m.id for m in sink.received] == [m.id for m in ms]
    assert w.stats.dropped == {} and balanced(w)
    assert w.stats.driver_errors == {"KeyError": 3, "TypeError": 1}
    assert sink.connects == 5, "each driver error makes the connection suspect"
    traces = [r for r in caplog.records if r.exc_info and "bug in the driver" in r.getMessage()]
    assert [type(r.exc_info[1]).__name__ for r in traces] == ["KeyError", "TypeError"]
    snap = w.snapshot()
    assert snap.driver_errors == {"KeyError": 3, "TypeError": 1}
    await w.stop(1)


async def test_a_driver_bug_shows_on_readyz_until_a_publish_succeeds() -> None:
    from bridge.core.state import SinkState

    w, sink = worker(batch=5)
    sink.fail_next(10_000, ValueError("unmapped"))
    w.start()
    w.offer(msgs(1, 1)[0])
    await wait_until(lambda: w.stats.driver_errors.get("ValueError", 0) >= 2, 10,
                     "the batch retried")
    snap = w.snapshot()
    assert not snap.ready and snap.state == SinkState.FAILING
    assert (snap.last_error or "").startswith("driver_error: ValueError")
    assert w.depth == 1 and w.stats.dropped == {}
    sink._fail.clear()
    await wait_until(lambda: w.stats.published == 1, 10, "published once the bug is gone")
    assert w.snapshot().ready
    await w.stop(1)


async def test_a_retry_error_keeps_the_connection_and_logs_one_state_change(
    caplog: Any,
) -> None:
    w, sink = worker(batch=5, initial_backoff_s=0.01, max_backoff_s=0.02)
    for i in range(30):
        sink.fail_next(1, SinkRetryError("m", f"INSERT not allowed (attempt {i})"))
    caplog.set_level("INFO", "aleno_bridge.runner")
    w.start()
    ms = msgs(1, 5)
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.stats.published == 5, 10, "published after 30 refusals")
    await w.stop(1)
    assert sink.connects == 1, "a retry error never reconnects"
    assert w.stats.failed_batches == 30 and w.stats.dropped == {} and w.stats.reconnects == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "aleno_bridge.runner"]
    failing = [ln for ln in lines if "is failing" in ln]
    connected = [ln for ln in lines if "is connected" in ln]
    assert len(failing) == 1 and "SinkRetryError" in failing[0], lines
    assert len(connected) == 2, lines  # the first connect, and the recovery


async def test_a_retried_connection_error_logs_failing_and_recovered_once(
    caplog: Any,
) -> None:
    """A publish failing with a connection error, reconnecting fine each time: one
    ``failing`` line and one ``connected`` once the batch got through, not one pair per
    attempt."""
    w, sink = worker(batch=5, initial_backoff_s=0.01, max_backoff_s=0.02)
    sink.fail_next(20, ConnectionError("reset by peer"))
    caplog.set_level("INFO", "aleno_bridge.runner")
    w.start()
    w.offer(msgs(1, 1)[0])
    await wait_until(lambda: w.stats.published == 1, 10, "published after 20 failures")
    await w.stop(1)
    assert sink.connects == 21
    lines = [r.getMessage() for r in caplog.records if r.name == "aleno_bridge.runner"]
    assert len([ln for ln in lines if "is failing" in ln]) == 1, lines
    assert len([ln for ln in lines if "is connected" in ln]) == 2, lines


async def test_stop_drains_then_reports_what_was_not_delivered() -> None:
    w, sink = worker(batch=10)
    w.start()
    for m in msgs(2, 10):
        w.offer(m)
    assert await w.stop(2) == 0
    assert w.stats.published == 20 and len(sink.received) == 20
    assert sink.closes >= 1

    w2, sink2 = worker()
    sink2.down = True
    w2.start()
    for m in msgs(2, 5):
        w2.offer(m)
    assert await w2.stop(0.2) == 10
    assert w2.stats.dropped == {"shutdown": 10} and balanced(w2)


async def test_close_is_called_once_per_failure_and_at_stop() -> None:
    w, sink = worker()
    w.start()
    w.offer(msgs(1, 1)[0])
    await wait_until(lambda: w.stats.published == 1)
    await w.stop(1)
    await w.stop(1)  # a second stop is harmless
    assert sink.closes >= 1


def test_injected_drivers_replace_entry_points() -> None:
    d = Drivers(injected={"memory": MemorySink})
    assert d.names() == ["memory"] and d.get("memory") is MemorySink


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "conflate"])
async def test_counters_add_up_over_a_run_with_drops(policy: str) -> None:
    w, sink = worker(policy, max_events=20, batch=5)
    sink.options = MemoryOptions(latency_ms=2)
    w.start()
    for m in msgs(7, 60):
        w.offer(m)
        if w.stats.offered % 50 == 0:
            await asyncio.sleep(0.003)
        assert balanced(w)
    await w.stop(5)
    s = w.stats
    assert s.offered == 420
    assert s.offered == s.published + sum(s.dropped.values()) + s.conflated
    assert s.published == len(sink.received)
    assert sum(s.dropped.values()) + s.conflated > 0


# -- issue 8: counters, capacity, rejections, dead letters, shutdown -----------------


async def test_counters_balance_while_a_block_offer_waits() -> None:
    """A ``block`` offer waiting for room is not offered yet: the invariant holds at
    every moment, and the waiting offer shows in ``blocked``."""
    w, sink = worker("block", max_events=3, batch=2)
    sink.hold()
    w.start()
    ms = msgs(1, 6)
    pending = None
    for m in ms:
        pending = w.offer(m)
        assert balanced(w)
        if pending is not None:
            break
    assert pending is not None
    waiter = asyncio.ensure_future(pending)
    await asyncio.sleep(0.02)
    assert not waiter.done() and w.blocked == 1
    assert balanced(w), (w.stats, w.depth)
    sink.release()
    await asyncio.wait_for(waiter, 5)
    assert w.blocked == 0 and balanced(w)
    await w.stop(1)
    assert balanced(w)


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "conflate", "block"])
async def test_depth_never_exceeds_capacity_with_a_batch_in_flight(policy: str) -> None:
    """The batch handed to a hung driver still counts against ``max_events``."""
    w, sink = worker(policy, max_events=10, batch=4)
    sink.hold()
    w.start()
    for m in msgs(30, 3):
        pending = w.offer(m)
        if pending is not None:  # block: it may wait only because the buffer is full
            assert w.depth == w.capacity
            waiter = asyncio.ensure_future(pending)
            await asyncio.sleep(0.01)
            assert not waiter.done() and w.depth == w.capacity and balanced(w)
            sink.release()
            await asyncio.wait_for(waiter, 5)
            break
        await asyncio.sleep(0)
        assert w.depth <= w.capacity, f"depth {w.depth} > capacity {w.capacity}"
        assert balanced(w)
    else:
        assert w.depth == w.capacity
    sink.release()
    await w.stop(1)


async def test_a_batch_larger_than_the_buffer_is_cut_to_the_buffer() -> None:
    w, sink = worker("drop_oldest", max_events=5, batch=50)
    sink.hold()
    w.start()
    for m in msgs(1, 12):
        w.offer(m)
        await asyncio.sleep(0)
        assert w.depth <= 5 and balanced(w)
    sink.release()
    await wait_until(lambda: w.depth == 0)
    assert max(sink.batches) <= 5 and balanced(w)
    await w.stop(1)


async def test_a_rejection_is_recorded_for_readiness() -> None:
    w, sink = worker(batch=5)
    sink.fail_next(1, SinkRejectedError("m", "message too large for the bus"))
    w.start()
    for m in msgs(1, 5):
        w.offer(m)
    await wait_until(lambda: w.depth == 0)
    assert w.stats.rejections == 1
    assert w.stats.last_rejection is not None and "too large" in w.stats.last_rejection
    assert w.stats.last_error is not None and "too large" in w.stats.last_error
    await w.stop(1)


def dl_pair(fmt: str = "cloudevents-json", dl_policy: str = "drop_oldest"
            ) -> tuple[SinkWorker, MemorySink, SinkWorker, MemorySink]:
    w, sink = worker(batch=5, fmt=fmt)
    dead, dsink = worker(dl_policy, batch=50, sink=MemorySink("dead"))
    w.dead_letter = dead
    return w, sink, dead, dsink


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary"])
async def test_refused_events_go_to_the_dead_letter_sink_with_why(fmt: str) -> None:
    w, sink, dead, dsink = dl_pair(fmt)
    exc = SinkRejectedError("m", "topic 'x' not authorized", reason="not_authorized")
    sink.fail_next(1, exc)
    w.start()
    dead.start()
    ms = messages(sample_events(symbols=1, updates=10), "t", fmt)
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.depth == 0 and dead.stats.published == 5)
    assert w.stats.dropped == {"dead_lettered": 5} and w.stats.published == 5
    assert balanced(w) and balanced(dead)
    got = dsink.received
    assert [m.id for m in got] == [m.id for m in ms[:5]]
    assert all(m.topic == "t" and m.key == ms[0].key for m in got)
    for m in got:
        if fmt == "cloudevents-json":
            env = orjson.loads(m.body)
            ext = {k: env[k] for k in env if k.startswith("deadletter")}
            assert env["data"]["symbol"] == m.event.symbol and not m.attributes
        else:
            ext = {k: v for k, v in m.attributes.items() if k.startswith("deadletter")}
            assert m.attributes["id"] == m.id
            assert orjson.loads(m.body)["symbol"] == m.event.symbol
        assert ext["deadletterreason"] == "not_authorized"
        assert ext["deadlettersink"] == "m"
        assert "not authorized" in ext["deadlettererror"]
        assert all(k.isalnum() and k.islower() for k in ext)
    await w.stop(1)
    await dead.stop(1)


async def test_only_the_refused_messages_of_a_partial_rejection_are_dead_lettered() -> None:
    w, sink, dead, dsink = dl_pair()
    ms = msgs(1, 5)
    sink.fail_next(1, SinkRejectedError("m", "2 too large", refused=[1, ms[3]]))
    w.start()
    dead.start()
    for m in ms:
        w.offer(m)
    await wait_until(lambda: w.depth == 0 and dead.stats.published == 2)
    assert [m.id for m in dsink.received] == [ms[1].id, ms[3].id]
    assert w.stats.dropped == {"dead_lettered": 2} and w.stats.published == 3
    assert balanced(w) and balanced(dead)
    await w.stop(1)
    await dead.stop(1)


async def test_a_partial_rejection_given_as_a_count_only_is_dropped_not_dead_lettered(
    caplog: Any,
) -> None:
    w, sink, dead, dsink = dl_pair()
    sink.fail_next(1, SinkRejectedError("m", "2 too large", rejected=2))
    w.start()
    dead.start()
    for m in msgs(1, 5):
        w.offer(m)
    await wait_until(lambda: w.depth == 0)
    assert w.stats.dropped == {"rejected": 2} and w.stats.published == 3
    assert dead.stats.offered == 0 and not dsink.received
    assert any("did not say which" in r.getMessage() for r in caplog.records)
    await w.stop(1)
    await dead.stop(1)


async def test_a_bus_that_is_down_never_dead_letters() -> None:
    w, sink, dead, _ = dl_pair()
    sink.fail_next(3)  # ConnectionError: retriable
    w.start()
    dead.start()
    for m in msgs(1, 10):
        w.offer(m)
    await wait_until(lambda: w.stats.published == 10)
    assert w.stats.failed_batches == 3 and w.stats.dropped == {}
    assert dead.stats.offered == 0
    await w.stop(1)
    await dead.stop(1)


async def test_dead_lettering_never_waits_on_a_full_block_dead_letter_sink() -> None:
    w, sink, dead, dsink = dl_pair(dl_policy="block")
    dead.capacity = 2
    sink.fail_next(1, SinkRejectedError("m", "refused"))
    w.start()  # the dead-letter worker is not started: its buffer fills up
    for m in msgs(1, 5):
        w.offer(m)
    await wait_until(lambda: w.depth == 0)
    assert w.stats.dropped == {"dead_lettered": 5}
    assert dead.stats.offered == 5 and dead.stats.dropped == {"buffer_full": 3}
    assert balanced(dead) and dead.blocked == 0
    await w.stop(1)
    await dead.stop(0.1)


async def test_stop_finishes_within_its_budget_even_when_close_hangs() -> None:
    class HangingClose(MemorySink):
        async def close(self) -> None:
            await asyncio.sleep(30)

    w, sink = worker(sink=HangingClose("m"))
    sink.down = True
    w.start()
    for m in msgs(2, 5):
        w.offer(m)
    started = time.monotonic()
    assert await w.stop(1.0) == 10
    assert time.monotonic() - started < 1.3
    assert w.stats.dropped == {"shutdown": 10} and balanced(w)
