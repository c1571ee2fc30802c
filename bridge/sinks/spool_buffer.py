"""A sink buffer with a disk spool behind it (``buffer.disk``).

Every event the sink accepts is appended to the spool (:class:`~bridge.sinks.spool.
SpoolStore`) and stays there until the bus confirmed it (or it is dropped for a counted
reason); a restart delivers what a previous process left before anything new. The
queue is one FIFO: the oldest part may be on disk only, the newest part is also held in
memory (:attr:`SpoolBuffer.cache`, at most ``max_events`` together with the batch in
flight), so a sink that keeps up never reads the disk, and one that is behind reads its
backlog in order, batch by batch, in a worker thread.

``when_full`` applies when the spool reaches ``max_bytes``:

``block``
    the offer waits until the bus confirmed enough to make room.
``drop_newest``
    the arriving event is dropped.
``drop_oldest``
    the oldest segment's queued events are dropped (a segment is 1/16 of ``max_bytes``,
    at most 8 MiB): room is made a segment at a time, because only whole files free disk.
``conflate``
    the oldest segment's events are compacted: those that are the latest queued event
    of their (kind, symbol, topic) are appended again (they move to the back of the
    queue), the others count as ``conflated``; once every old segment was compacted and
    the spool is still full (more distinct symbols than fit), it drops like
    ``drop_oldest``.

The counters add up as for the memory buffer (:mod:`bridge.sinks.buffer`), with the
events restored at start counted as offered (and in :attr:`SpoolBuffer.restored`)::

    offered == published + sum(dropped.values()) + conflated + depth

where ``depth`` is what the spool holds (queued and in flight). At shutdown nothing is
dropped: what is held stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import Final

from bridge.config.schema import DiskConfig
from bridge.core.state import SpoolSnapshot
from bridge.sinks import Message
from bridge.sinks.buffer import Counts, Policy, SinkBuffer
from bridge.sinks.spool import Segment, SpoolStore
from bridge.sinks.spool_format import OVERHEAD, frame, message, meta_of

log = logging.getLogger("aleno_bridge.spool")

#: what one spooled event costs on disk, about (for :meth:`SpoolBuffer.full`)
EVENT_BYTES: Final = 1024
#: how long the worker waits before reading again when the writer is behind
READ_RETRY_S: Final = 0.05
#: the drop reason of records a read found corrupt (written in this run, then damaged)
CORRUPT: Final = "spool_corrupt"

#: one event held in memory: its seq, the message, its segment, where it starts in it
Cached = tuple[int, Message, Segment, int]
#: a batch read from disk: the seqs, the messages, the offset after the last one
Loaded = tuple[list[int], list[Message], int]


class SpoolBuffer(SinkBuffer):
    """The events one sink holds, on disk with the newest also in memory (see the module
    docstring)."""

    def __init__(self, stats: Counts, policy: Policy, capacity: int, batch_max: int,
                 linger_s: float, disk: DiskConfig, sink: str, fmt: str) -> None:
        super().__init__(stats, policy, capacity, batch_max, linger_s)
        self.path = disk.path
        self.fmt = fmt
        self.store = store = SpoolStore(disk.path, int(disk.max_bytes),
                                        disk.fsync_interval_ms / 1000.0, sink)
        #: the newest queued events, in memory too (a suffix of the queue)
        self.cache: deque[Cached] = deque()
        #: events queued (not in flight), of which the oldest ``disk_queued`` are on disk only
        self.queued_n = store.restored
        self.disk_queued = store.restored
        #: where the next disk-only event is: (segment, offset)
        self.cursor: tuple[Segment, int] | None = None
        if store.restored:
            first = store.segments[0]
            self.cursor = (first, first.start)
        #: events found in the spool at start (counted as offered)
        self.restored = store.restored
        stats.offered += store.restored
        #: every event with a smaller seq was handed to the driver or dropped
        self.taken_upto = store.released
        self._inflight_segs: list[tuple[Segment, int]] = []
        self._inflight_first = -1
        #: under ``conflate``: the seq of the latest queued event per (kind, symbol, topic)
        self.latest: dict[tuple[str, str, str], int] = {}
        #: bumped whenever queued events leave other than by a read (a read in progress
        #: then reads again)
        self._gen = 0
        #: the next disk batch, being read: ((segment, offset, gen), its read)
        self._ahead: tuple[tuple[Segment, int, int], asyncio.Future[Loaded]] | None = None
        if store.restored:
            log.info("sink %s: %d event(s) restored from the spool %s; they are delivered "
                     "before new ones", sink, store.restored, self.path,
                     extra={"sink": sink, "restored": store.restored,
                            "corrupt": store.corrupt})

    @property
    def depth(self) -> int:
        return self.queued_n + len(self.inflight)

    def queued(self) -> int:
        return self.queued_n

    def full(self, headroom: int) -> bool:
        """No room on disk for ``headroom`` more events (or a segment, if less): what
        arrives now meets ``when_full``. A backlog alone is not full."""
        store = self.store
        return store.used > store.max_bytes - min(headroom * EVENT_BYTES, store.segment_bytes)

    # -- in ---------------------------------------------------------------------------

    def offer(self, message: Message, wait: bool = True) -> Awaitable[None] | None:
        stats = self.stats
        if self.stopping:
            stats.offered += 1
            stats.drop(self.stop_reason)
            return None
        meta = meta_of(message)
        size = OVERHEAD + len(meta) + len(message.body)
        store = self.store
        if size > store.max_record:
            stats.offered += 1
            stats.drop("buffer_full")
            return None
        if store.used + size > store.max_bytes and not self._make_room(size):
            if self.policy == "block" and wait:
                return self._append_when_room(message, meta, size)
            stats.offered += 1
            stats.drop("buffer_full")
            return None
        stats.offered += 1
        self._append(message, meta)
        return None

    def _make_room(self, size: int) -> bool:
        if self.policy == "drop_oldest":
            return self._drop_oldest(size)
        if self.policy == "conflate":
            return self._compact(size)
        return False

    async def _append_when_room(self, message: Message, meta: bytes, size: int) -> None:
        store = self.store
        await self.when_room(lambda: store.used + size <= store.max_bytes,
                             lambda: self._append(message, meta))

    def _append(self, message: Message, meta: bytes) -> None:
        store = self.store
        seq = store.head
        store.head = seq + 1
        data = frame(seq, meta, message.body)
        seg = store.append(seq, data, message.event.received_ms)
        self.cache.append((seq, message, seg, seg.size - len(data)))
        self.queued_n += 1
        if self.policy == "conflate":
            ev = message.event
            self.latest[(ev.kind, ev.symbol, message.topic)] = seq
        if len(self.cache) + len(self.inflight) > self.capacity:
            self._trim()
        self.ready.set()

    def _trim(self, inflight: int | None = None) -> None:
        """Keep at most ``capacity`` events in memory, with the batch in flight
        (``inflight`` events, by default the worker's): the oldest cached ones become
        disk-only."""
        cache = self.cache
        held = len(self.inflight) if inflight is None else inflight
        while cache and len(cache) + held > self.capacity:
            _, _, seg, start = cache.popleft()
            if not self.disk_queued:
                self.cursor = (seg, start)
            self.disk_queued += 1

    def _forget(self, m: Message, seq: int) -> None:
        key = (m.event.kind, m.event.symbol, m.topic)
        if self.latest.get(key) == seq:
            del self.latest[key]

    # -- making room --------------------------------------------------------------------

    def _oldest(self) -> Segment | None:
        """The segment of the oldest queued event."""
        if self.disk_queued and self.cursor is not None:
            return self.cursor[0]
        return self.cache[0][2] if self.cache else None

    def _drop_oldest(self, size: int) -> bool:
        store = self.store
        while store.used + size > store.max_bytes:
            target = self._oldest()
            if target is None:
                return False
            self.stats.drop("buffer_full", self._leave(target))
        return True

    def _leave(self, target: Segment) -> int:
        """Take every queued event of ``target`` (the oldest segment) out of the queue;
        returns how many."""
        n = target.queued
        cache = self.cache
        conflate = self.policy == "conflate"
        popped = 0
        while cache and cache[0][2] is target:
            seq, m, _, _ = cache.popleft()
            popped += 1
            if conflate:
                self._forget(m, seq)
        self.disk_queued -= n - popped
        self.queued_n -= n
        target.queued = 0
        self.taken_upto = max(self.taken_upto, target.last_seq + 1)
        store = self.store
        nxt = store.after(target)
        if target is store.active:
            store.seal_active()
        else:
            store.release(target)
        self.cursor = (nxt, nxt.start) if self.disk_queued and nxt is not None else None
        self._gen += 1
        if not self.inflight:
            store.set_released(self.taken_upto)
        return n

    def _compact(self, size: int) -> bool:
        """``conflate`` at ``max_bytes``: compact the oldest segments (module docstring)."""
        store = self.store
        store.seal_active()
        boundary = store.head
        while store.used + size > store.max_bytes:
            target = self._oldest()
            if target is None:
                return False
            if target.first_seq >= boundary:
                # every old segment is compacted; what still takes room may be a
                # segment the batch in flight pins (freed when the bus confirms it):
                # its kept events are not dropped for that (one segment over, at most)
                pinned = sum(s.size for s in store.segments if s.inflight and not s.queued)
                if store.used + size - pinned <= store.max_bytes:
                    return True
                return self._drop_oldest(size)
            held: list[tuple[int, Message]] = []
            cached = sum(1 for _ in _front(self.cache, target))
            on_disk = target.queued - cached
            if on_disk > 0 and self.cursor is not None:
                before = self.cache[0][0] if self.cache else store.head
                recs, _ = store.read(target, self.cursor[1], on_disk, before, wait_s=1.0)
                if len(recs) < on_disk:  # not written (the disk fails): compact nothing
                    return False
                held += [(r.seq, message(r.meta, r.body, self.fmt)) for r in recs]
            held += [(seq, m) for seq, m, _, _ in _front(self.cache, target)]
            latest = self.latest
            kept = [m for seq, m in held
                    if latest.get((m.event.kind, m.event.symbol, m.topic)) == seq]
            self.stats.conflated += self._leave(target) - len(kept)
            for m in kept:
                self._append(m, meta_of(m))
        return True

    # -- out ----------------------------------------------------------------------------

    def take(self) -> list[Message]:
        """Up to ``batch_max`` events from memory (only once no event is on disk only)."""
        cache = self.cache
        batch: list[Message] = []
        segs: list[tuple[Segment, int]] = []
        conflate = self.policy == "conflate"
        first = last = -1
        n = self.batch_max
        while cache and len(batch) < n:
            seq, m, seg, _ = cache.popleft()
            if first < 0:
                first = seq
            last = seq
            batch.append(m)
            seg.queued -= 1
            seg.inflight += 1
            if segs and segs[-1][0] is seg:
                segs[-1] = (seg, segs[-1][1] + 1)
            else:
                segs.append((seg, 1))
            if conflate:
                self._forget(m, seq)
        if batch:
            self.queued_n -= len(batch)
            self._inflight_first = first
            self.taken_upto = last + 1
            self._inflight_segs = segs
        return batch

    async def next_batch(self) -> list[Message] | None:
        while True:
            while not self.queued_n:
                if self.stopping:
                    return None
                self.ready.clear()
                await self.ready.wait()
            if (not self.disk_queued and self.linger_s and self.queued_n < self.batch_max
                    and not self.stopping):
                await asyncio.sleep(self.linger_s)
            batch = await self._read() if self.disk_queued else self.take()
            if batch:
                return batch

    async def _read(self) -> list[Message]:
        """The next batch from disk (empty when the queue changed meanwhile). The batch
        after it is read meanwhile (while this one is published)."""
        if self.cursor is None:
            return []
        seg, offset = self.cursor
        key = (seg, offset, self._gen)
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0] != key:
            ahead = (key, self._load(seg, offset))
        seqs, batch, end = await ahead[1]
        if self.cursor is None or key != (*self.cursor, self._gen):
            return []
        if not batch:
            if end >= seg.size and seg.sealed:
                self._past(seg)
            else:  # not written yet (the writer is behind or failing)
                await asyncio.sleep(READ_RETRY_S)
            return []
        n = len(batch)
        seg.queued -= n
        seg.inflight += n
        seg.first_ms = batch[-1].event.received_ms
        self._inflight_segs = [(seg, n)]
        self.disk_queued -= n
        self.queued_n -= n
        self._inflight_first = seqs[0]
        self.taken_upto = seqs[-1] + 1
        if self.policy == "conflate":
            for seq, m in zip(seqs, batch, strict=True):
                self._forget(m, seq)
        self.cursor = (seg, end)
        if not self.disk_queued:
            self.cursor = None
        elif end >= seg.size and seg.sealed:
            self._past(seg)
        self._trim(n)  # the batch is in flight once the worker holds it
        if self.cursor is not None:
            nseg, noff = self.cursor
            self._ahead = ((nseg, noff, self._gen), self._load(nseg, noff))
        return batch

    def _load(self, seg: Segment, offset: int) -> asyncio.Future[Loaded]:
        """Read and decode the next batch of ``seg`` from ``offset`` in a worker thread."""
        before = self.cache[0][0] if self.cache else self.store.head
        store, limit, fmt = self.store, self.batch_max, self.fmt

        def load() -> Loaded:
            recs, end = store.read(seg, offset, limit, before)
            return [r.seq for r in recs], [message(r.meta, r.body, fmt) for r in recs], end

        fut = asyncio.ensure_future(asyncio.to_thread(load))
        # a read that is not used (the queue changed) must not log its error
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        return fut

    def _past(self, seg: Segment) -> None:
        """Every disk-only event of ``seg`` was read: go on with the next segment.
        Events that were never read (damaged after they were written) are dropped and
        counted."""
        cached = sum(1 for _ in _front(self.cache, seg))
        lost = seg.queued - cached
        if lost > 0:
            seg.queued -= lost
            self.disk_queued -= lost
            self.queued_n -= lost
            self.store.corrupt += lost
            self.stats.drop(CORRUPT, lost)
            log.error("spool %s: %d event(s) of %s could not be read back (damaged on "
                      "disk); dropped", self.path, lost, seg.path.name)
        nxt = self.store.after(seg)
        self.store.release(seg)
        self.cursor = (nxt, nxt.start) if self.disk_queued and nxt is not None else None

    def done(self) -> None:
        for seg, n in self._inflight_segs:
            seg.inflight -= n
            self.store.release(seg)
        self._inflight_segs = []
        self.store.set_released(self.taken_upto)
        super().done()

    # -- reading and stopping --------------------------------------------------------------

    def spool_snapshot(self) -> SpoolSnapshot:
        store = self.store
        oldest = 0
        if self.inflight:
            oldest = self.inflight[0].event.received_ms
        elif self.disk_queued and self.cursor is not None:
            oldest = self.cursor[0].first_ms
        elif self.cache:
            oldest = self.cache[0][1].event.received_ms
        age = max(0.0, time.time() - oldest / 1000.0) if oldest and self.depth else None
        return SpoolSnapshot(path=self.path, events=self.depth, bytes=store.used,
                             max_bytes=store.max_bytes, oldest_age_s=age,
                             corrupt_records=store.corrupt, restored=self.restored,
                             on_disk_only=self.disk_queued, error=store.error,
                             write_errors=store.write_errors)

    def discard(self) -> int:
        """Nothing is dropped: what is held stays in the spool for the next start."""
        return 0

    async def close(self) -> None:
        """Write what was accepted, sync it, record what was released, unlock."""
        self.store.set_released(self._inflight_first if self.inflight else self.taken_upto)
        await asyncio.to_thread(self.store.close)


def _front(cache: deque[Cached], seg: Segment) -> list[tuple[int, Message, Segment, int]]:
    """The cached events of ``seg`` (the oldest segment: they are at the front)."""
    out = []
    for item in cache:
        if item[2] is not seg:
            break
        out.append(item)
    return out
