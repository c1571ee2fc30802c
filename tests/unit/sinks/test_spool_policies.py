"""A spool filled to ``max_bytes`` under each ``when_full`` policy: the disk use stays
bounded (``max_bytes`` plus one segment, measured on the files), the counters add up,
and what is delivered afterwards is what the policy promises."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.sinks.spool_buffer import SpoolBuffer
from bridge.sinks.spool_format import segment_size
from bridge.sinks.worker import SinkWorker
from bridge.testing import MemorySink, messages, sample_events, wait_until
from tests.unit.sinks.test_spool import balanced, spooled

MAX_BYTES = 1 << 20
#: what the issue allows: max_bytes plus one segment (and the few bytes of the ledger,
#: the lock and spool.json)
BOUND = MAX_BYTES + segment_size(MAX_BYTES) + 4096


def on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


async def filled(path: Path, policy: str, n: int, symbols: int
                 ) -> tuple[SinkWorker, MemorySink, list[str]]:
    """A spooled sink whose bus is down, offered ``n`` events of ``symbols`` symbols;
    the disk use and the counters are checked all along. Returns the worker, its sink
    and the ids offered."""
    w, sink = spooled(path, policy, max_bytes=MAX_BYTES, batch=100)
    sink.down = True
    w.start()
    ms = messages(sample_events(symbols=symbols, updates=n // symbols), "t")
    for i, m in enumerate(ms):
        assert w.offer(m) is None
        if i % 100 == 0:
            await asyncio.sleep(0.005)  # the writer thread writes and deletes meanwhile
            assert on_disk(path) <= BOUND
            assert isinstance(w.buffer, SpoolBuffer) and w.buffer.store.used <= BOUND
            assert balanced(w)
    await asyncio.sleep(0.1)
    assert on_disk(path) <= BOUND and balanced(w)
    return w, sink, [m.id for m in ms]


async def test_drop_newest_keeps_the_oldest_and_bounds_the_disk(tmp_path: Path) -> None:
    w, sink, ids = await filled(tmp_path, "drop_newest", 3000, 10)
    kept = w.depth
    assert 1000 < kept < 1400 and w.stats.dropped == {"buffer_full": 3000 - kept}
    sink.down = False
    await wait_until(lambda: w.stats.published == kept, 10)
    assert [m.id for m in sink.received] == ids[:kept]
    assert balanced(w)
    await w.stop(1)


async def test_drop_oldest_keeps_the_newest_and_bounds_the_disk(tmp_path: Path) -> None:
    w, sink, ids = await filled(tmp_path, "drop_oldest", 3000, 10)
    kept = w.depth
    assert 900 < kept < 1400 and w.stats.dropped["buffer_full"] == 3000 - kept
    sink.down = False
    await wait_until(lambda: w.depth == 0, 10)
    got = [m.id for m in sink.received]
    # the newest survive, in order; the oldest were dropped a segment at a time
    assert got == ids[-len(got):]
    assert balanced(w) and w.stats.published == kept
    await w.stop(1)


async def test_conflate_keeps_the_latest_per_symbol_on_disk_too(tmp_path: Path) -> None:
    w, sink, ids = await filled(tmp_path, "conflate", 4000, 20)
    assert w.stats.conflated > 1000 and "buffer_full" not in w.stats.dropped
    sink.down = False
    await wait_until(lambda: w.depth == 0, 10)
    got = sink.received
    # the latest update of every symbol is delivered; each symbol's updates in order
    latest = {i.rsplit(":", 1)[0]: i for i in ids}
    assert set(latest.values()) <= {m.id for m in got}
    by_symbol: dict[str, list[int]] = {}
    for m in got:
        by_symbol.setdefault(m.event.symbol, []).append(m.event.sent_ms)
    assert all(times == sorted(times) for times in by_symbol.values())
    assert balanced(w)
    await w.stop(1)


async def test_conflate_with_more_symbols_than_fit_drops_the_oldest(tmp_path: Path) -> None:
    w, _, _ = await filled(tmp_path, "conflate", 3000, 3000)  # a symbol per event
    assert w.stats.dropped["buffer_full"] > 1000
    await w.stop(0.5)


async def test_block_waits_for_room_and_loses_nothing(tmp_path: Path) -> None:
    w, sink = spooled(tmp_path, "block", max_bytes=MAX_BYTES, batch=100)
    sink.down = True
    w.start()
    ms = messages(sample_events(symbols=10, updates=300), "t")
    waited = 0
    peak = 0
    for i, m in enumerate(ms):
        pending = w.offer(m)
        if pending is not None:
            waited += 1
            if waited == 1:
                assert balanced(w)  # a waiting offer is not offered yet
                peak = on_disk(tmp_path)
                sink.down = False  # the bus comes back: room is made as it confirms
            await asyncio.wait_for(pending, 10)
        if i % 100 == 0:
            peak = max(peak, on_disk(tmp_path))
    await wait_until(lambda: w.stats.published == len(ms), 10)
    assert waited > 0 and peak <= BOUND
    assert [m.id for m in sink.received] == [m.id for m in ms]
    assert w.stats.dropped == {} and balanced(w)
    await w.stop(1)
