"""The disk spool (buffer.disk): its format, restart and replay, the lock, the memory
cache in front of it, and what it does with a corrupt or torn file. Real files in a
temporary directory; the sink is the in-memory driver of the plugin kit."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from bridge.config import SinkCommon, SinkSpec
from bridge.sinks import Message
from bridge.sinks.spool import SpoolStore
from bridge.sinks.spool_buffer import SpoolBuffer
from bridge.sinks.spool_format import (
    MAGIC,
    SpoolLockedError,
    frame,
    message,
    meta_of,
    parse,
    read_ledger,
    scan_spool,
    segment_paths,
)
from bridge.sinks.worker import SinkWorker
from bridge.testing import MemoryOptions, MemorySink, messages, sample_events, wait_until


def spooled(path: Path, policy: str = "drop_oldest", max_events: int = 100, batch: int = 10,
            max_bytes: int = 1 << 20, fmt: str = "cloudevents-json",
            sink: MemorySink | None = None) -> tuple[SinkWorker, MemorySink]:
    sink = sink or MemorySink("m")
    common = SinkCommon.model_validate({
        "driver": "memory",
        "format": fmt,
        "buffer": {"max_events": max_events, "when_full": policy,
                   "disk": {"path": str(path), "max_bytes": max_bytes,
                            "fsync_interval_ms": 20}},
        "batch": {"max_events": batch, "linger_ms": 0},
        "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05},
    })
    return SinkWorker(SinkSpec("m", common, MemorySink, MemoryOptions()), sink), sink


def balanced(w: SinkWorker) -> bool:
    s = w.stats
    return s.offered == s.published + sum(s.dropped.values()) + s.conflated + w.depth


def store(w: SinkWorker) -> SpoolStore:
    assert isinstance(w.buffer, SpoolBuffer)
    return w.buffer.store


def msgs(symbols: int, updates: int, fmt: str = "cloudevents-json") -> list[Message]:
    return messages(sample_events(symbols=symbols, updates=updates), "prices.t", fmt)


def same(a: Message, b: Message) -> bool:
    """Everything a driver reads of a message."""
    ea, eb = a.event, b.event
    return ((a.topic, a.key, a.body, a.content_type, dict(a.attributes))
            == (b.topic, b.key, b.body, b.content_type, dict(b.attributes))
            and all(getattr(ea, f) == getattr(eb, f) for f in (
                "kind", "symbol", "base", "quote", "id", "sent_ms", "received_ms", "time",
                "price", "source", "type")))


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary", "raw"])
def test_a_record_carries_everything_the_driver_reads(fmt: str) -> None:
    m = msgs(1, 1, fmt)[0]
    data = frame(7, meta_of(m), m.body)
    got = parse(data)
    assert got.corrupt == 0 and not got.torn and [r.seq for r in got.records] == [7]
    back = message(got.records[0].meta, got.records[0].body, fmt)
    assert same(back, m)
    assert back.attributes == m.attributes and (fmt != "cloudevents-binary" or m.attributes)


def test_a_corrupt_frame_is_skipped_and_the_next_ones_are_read() -> None:
    ms = msgs(1, 4)
    frames = [frame(i, meta_of(m), m.body) for i, m in enumerate(ms)]
    flipped = bytearray(frames[1])
    flipped[len(flipped) // 2] ^= 0x40
    bad_length = bytearray(frames[2])
    bad_length[5] ^= 0x01
    data = frames[0] + bytes(flipped) + bytes(bad_length) + frames[3] + frames[0][:30]
    got = parse(data)
    assert [r.seq for r in got.records] == [0, 3]
    assert got.corrupt == 3 and got.torn  # two bad frames (one region each), one torn tail
    assert MAGIC not in b"".join(m.body for m in ms)  # a body never fakes a frame start


async def test_a_restart_replays_the_spool_in_order_before_new_events(tmp_path: Path) -> None:
    w, sink = spooled(tmp_path, max_events=20)
    sink.down = True
    old = msgs(5, 60)
    for m in old:
        assert w.offer(m) is None
    # memory holds at most max_events: the rest is on disk only
    assert w.depth == 300 and isinstance(w.buffer, SpoolBuffer)
    assert len(w.buffer.cache) <= 20 and w.buffer.disk_queued >= 280
    w.start()
    await asyncio.sleep(0.1)
    assert await w.stop(0.5) == 0  # nothing is lost at shutdown: it stays spooled
    assert w.depth == 300 and balanced(w)

    w2, sink2 = spooled(tmp_path, max_events=20)
    assert w2.stats.offered == 300 and isinstance(w2.buffer, SpoolBuffer)
    assert w2.buffer.restored == 300
    new = messages(sample_events(symbols=5, updates=4, start_ms=1_900_000_000_000), "prices.t")
    for m in new:
        w2.offer(m)
    w2.start()
    await wait_until(lambda: w2.stats.published == 320, 10)
    assert [m.id for m in sink2.received] == [m.id for m in old + new]
    assert all(same(a, b) for a, b in zip(sink2.received, old + new, strict=True))
    assert balanced(w2)
    await w2.stop(1)
    # everything was confirmed: the next start has nothing to replay
    w3, _ = spooled(tmp_path)
    assert w3.stats.offered == 0 and w3.depth == 0
    await w3.stop(0.1)
    assert segment_paths(tmp_path) == []


async def test_confirmed_events_are_released_as_the_bus_confirms(tmp_path: Path) -> None:
    """The ledger follows the confirmations and segments are deleted as they are done,
    so a restart replays only what was not confirmed."""
    w, sink = spooled(tmp_path, batch=50, max_events=1000)
    w.start()
    ms = msgs(10, 100)
    for m in ms[:600]:
        w.offer(m)
    await wait_until(lambda: w.stats.published == 600, 10)
    sink.hold()  # the next batch stays in flight, unconfirmed
    for m in ms[600:]:
        w.offer(m)
    await wait_until(lambda: store(w).ledger_wanted == 600 and len(w.buffer.inflight) == 50)
    # the writer's next rounds write the records and the ledger
    await wait_until(lambda: store(w).written_seq == 999 and read_ledger(tmp_path)[0] == 600)
    assert read_ledger(tmp_path) == (600, False)
    # killed here: the next start replays the 400 unconfirmed, not the 600 confirmed
    scan = scan_spool(tmp_path)
    assert scan.events == 400 and scan.corrupt == 0
    sink.release()
    await wait_until(lambda: w.stats.published == 1000, 10)
    await w.stop(1)


async def test_two_processes_cannot_share_a_spool(tmp_path: Path) -> None:
    w, _ = spooled(tmp_path)
    with pytest.raises(SpoolLockedError, match="in use by another process"):
        spooled(tmp_path)
    await w.stop(0.1)
    w2, _ = spooled(tmp_path)  # free again once closed
    await w2.stop(0.1)


async def test_a_torn_tail_and_flipped_bytes_are_cut_out_counted_and_the_rest_delivered(
    tmp_path: Path,
) -> None:
    w, sink = spooled(tmp_path)
    sink.down = True
    ms = msgs(4, 30)
    for m in ms:
        w.offer(m)
    w.start()
    await w.stop(0.2)
    segments = segment_paths(tmp_path)
    first, last = segments[0][1], segments[-1][1]
    # flip bytes inside the third record of the first segment
    data = bytearray(first.read_bytes())
    records = parse(bytes(data)).records
    hit = records[2]
    data[(hit.start + hit.end) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    # and cut the last segment in the middle of its last record (a torn write)
    tail = parse(last.read_bytes()).records[-1]
    os.truncate(last, tail.start + (tail.end - tail.start) // 2)
    lost = {records[2].seq, tail.seq}

    w2, sink2 = spooled(tmp_path)
    snap = w2.snapshot().spool
    assert snap is not None and snap.corrupt_records == 2
    assert snap.events == len(ms) - 2 and w2.stats.offered == len(ms) - 2
    w2.start()
    await wait_until(lambda: w2.stats.published == len(ms) - 2, 10)
    assert [m.id for m in sink2.received] == [m.id for i, m in enumerate(ms) if i not in lost]
    await w2.stop(1)
    assert scan_spool(tmp_path).corrupt == 0  # repaired at open: verify finds it clean


async def test_a_sink_that_keeps_up_never_reads_the_disk(tmp_path: Path) -> None:
    w, sink = spooled(tmp_path, max_events=1000, batch=100)
    w.start()
    reads = 0
    real = store(w).read

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal reads
        reads += 1
        return real(*args, **kw)

    store(w).read = counting  # type: ignore[method-assign]
    ms = msgs(20, 50)
    for i in range(0, len(ms), 100):
        for m in ms[i:i + 100]:
            w.offer(m)
        await wait_until(lambda n=i + 100: w.stats.published == n, 10)  # type: ignore[misc]
    assert reads == 0 and [m.id for m in sink.received] == [m.id for m in ms]
    await w.stop(1)


async def test_the_snapshot_shows_the_backlog_and_its_age(tmp_path: Path) -> None:
    w, sink = spooled(tmp_path, max_events=10)
    sink.down = True
    for m in msgs(5, 20):
        w.offer(m)
    snap = w.snapshot().spool
    assert snap is not None
    assert snap.events == 100 and snap.on_disk_only == 90 and snap.bytes == store(w).used
    assert snap.oldest_age_s is not None and snap.oldest_age_s > 0
    assert snap.error is None and snap.max_bytes == 1 << 20
    await w.stop(0.1)


async def test_a_backlog_is_not_full_a_spool_at_max_bytes_is(tmp_path: Path) -> None:
    """The dispatcher holds back only for a sink whose next events would meet
    ``when_full``: a spool far from ``max_bytes`` takes a backlog however long."""
    w, sink = spooled(tmp_path, "drop_newest", max_events=10)
    sink.down = True
    ms = msgs(10, 200)
    for m in ms[:500]:
        w.offer(m)
    assert w.depth == 500 and not w.buffer.full(w.headroom)
    for m in ms[500:]:
        w.offer(m)
    assert w.stats.dropped["buffer_full"] > 0 and w.buffer.full(w.headroom)
    await w.stop(0.1)
