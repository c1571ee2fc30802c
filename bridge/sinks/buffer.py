"""The bounded buffer of one sink worker: queue, conflation map, in-flight batch.

:class:`SinkBuffer` holds the events a :class:`~bridge.sinks.worker.SinkWorker` accepted
and has not yet seen confirmed or dropped: the queue (or, under ``conflate``, the
conflation map, one event per (kind, symbol, topic)) and the batch handed to the
driver. ``capacity`` bounds both together; ``policy`` (``buffer.when_full``) decides
what an offer does when the buffer is full (see :mod:`bridge.sinks.worker` for the
policies). It does the accounting of what it accepts, in the worker's stats, so that
at every moment::

    offered == published + sum(dropped.values()) + conflated + depth
    depth <= capacity

(``published`` and the ``rejected``/``dead_lettered`` drops are counted by the worker
when a batch leaves; :meth:`SinkBuffer.done` then makes room.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from bridge.core.state import SpoolSnapshot
from bridge.sinks import Message

#: ``buffer.when_full``
Policy = Literal["block", "drop_oldest", "drop_newest", "conflate"]


class Counts(Protocol):
    """The counters the buffer keeps (those of :class:`~bridge.sinks.worker.SinkStats`)."""

    offered: int
    conflated: int

    def drop(self, reason: str, n: int = 1) -> None: ...


class SinkBuffer:
    """The events one sink holds (queued and in flight), under its ``when_full`` policy."""

    def __init__(self, stats: Counts, policy: Policy, capacity: int, batch_max: int,
                 linger_s: float) -> None:
        self.stats = stats
        self.policy: Policy = policy
        self.capacity = capacity
        #: the largest batch :meth:`take` returns
        self.batch_max = batch_max
        #: how long :meth:`next_batch` waits for a batch to fill
        self.linger_s = linger_s
        #: ``block`` offers waiting for room (not yet counted as offered)
        self.blocked = 0
        self.queue: deque[Message] = deque()
        #: the queue under ``conflate``: the latest event per (kind, symbol, topic)
        self.conflation: OrderedDict[tuple[str, str, str], Message] = OrderedDict()
        #: the batch handed to the driver, not yet confirmed or dropped
        self.inflight: list[Message] = []
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.stopping = False
        #: the drop reason of what arrives after :meth:`begin_stop` and of what is left
        #: at the deadline (``shutdown``, or ``sink_removed`` for a sink a reload retired)
        self.stop_reason = "shutdown"

    @property
    def depth(self) -> int:
        """Events accepted but not yet confirmed or dropped (queued + in flight)."""
        return len(self.queue) + len(self.conflation) + len(self.inflight)

    def queued(self) -> int:
        return len(self.queue) + len(self.conflation)

    def full(self, headroom: int) -> bool:
        """No room for ``headroom`` more events."""
        return self.depth > self.capacity - headroom

    async def wait_room(self, timeout_s: float) -> None:
        """Return when a batch left the buffer, or after ``timeout_s``."""
        self.room.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.room.wait(), timeout_s)

    def offer(self, message: Message, wait: bool = True) -> Awaitable[None] | None:
        """Accept ``message`` under the buffer policy; never blocks except for ``block``,
        where it returns an awaitable that completes once the message is queued (or,
        with ``wait=False``, drops it as ``buffer_full``)."""
        stats = self.stats
        if self.stopping:
            stats.offered += 1
            stats.drop(self.stop_reason)
            return None
        if self.policy == "conflate":
            stats.offered += 1
            ev = message.event
            key = (ev.kind, ev.symbol, message.topic)
            conf = self.conflation
            if key in conf:
                conf[key] = message
                stats.conflated += 1
                return None
            if len(conf) + len(self.inflight) >= self.capacity:
                if conf:
                    conf.popitem(last=False)
                else:  # everything held is in flight: nothing older can go
                    stats.drop("buffer_full")
                    return None
                stats.drop("buffer_full")
            conf[key] = message
        elif len(self.queue) + len(self.inflight) < self.capacity:
            stats.offered += 1
            self.queue.append(message)
        elif self.policy == "drop_oldest":
            stats.offered += 1
            stats.drop("buffer_full")
            if not self.queue:  # everything held is in flight: nothing older can go
                return None
            self.queue.popleft()
            self.queue.append(message)
        elif self.policy == "drop_newest" or not wait:
            stats.offered += 1
            stats.drop("buffer_full")
            return None
        else:
            return self._put_when_room(message)
        self.ready.set()
        return None

    async def _put_when_room(self, message: Message) -> None:
        def put() -> None:
            self.queue.append(message)
            self.ready.set()

        await self.when_room(lambda: len(self.queue) + len(self.inflight) < self.capacity,
                             put)

    async def when_room(self, has_room: Callable[[], bool], put: Callable[[], None]) -> None:
        """A ``block`` offer: wait until ``has_room()``, then count it offered and
        ``put()`` it; counted as offered and dropped (the stop reason) if the buffer
        stops first."""
        self.blocked += 1
        try:
            while not has_room():
                if self.stopping:
                    self.stats.offered += 1
                    self.stats.drop(self.stop_reason)
                    return
                self.room.clear()
                await self.room.wait()
            self.stats.offered += 1
            put()
        finally:
            self.blocked -= 1

    def take(self) -> list[Message]:
        """Up to :attr:`batch_max` queued events, oldest first (not yet in flight)."""
        n = self.batch_max
        batch: list[Message]
        if self.conflation:
            batch = []
            while self.conflation and len(batch) < n:
                batch.append(self.conflation.popitem(last=False)[1])
        else:
            q = self.queue
            if len(q) <= n:
                batch = list(q)
                q.clear()
            else:
                batch = [q.popleft() for _ in range(n)]
        return batch

    def done(self) -> None:
        """The in-flight batch left the worker: make room for blocked offers."""
        self.inflight = []
        self.room.set()

    async def next_batch(self) -> list[Message] | None:
        """The next batch once there is one (after lingering up to :attr:`linger_s` for
        it to fill); ``None`` once stopping with nothing queued."""
        while not self.queued():
            if self.stopping:
                return None
            self.ready.clear()
            await self.ready.wait()
        if self.linger_s and self.queued() < self.batch_max and not self.stopping:
            await asyncio.sleep(self.linger_s)
        return self.take()

    def begin_stop(self, reason: str) -> None:
        """Accept nothing more: later offers, and the blocked ones (released now), are
        counted as ``dropped{reason=...}`` (the first reason given)."""
        if not self.stopping:
            self.stop_reason = reason
        self.stopping = True
        self.ready.set()
        self.room.set()

    def spool_snapshot(self) -> SpoolSnapshot | None:
        """The disk spool behind this buffer (``None``: memory only)."""
        return None

    async def close(self) -> None:
        """Release what the buffer holds outside memory (nothing here)."""

    def discard(self) -> int:
        """Drop everything held, counted under the stop reason; returns how many."""
        lost = self.depth
        if lost:
            self.stats.drop(self.stop_reason, lost)
            self.queue.clear()
            self.conflation.clear()
            self.inflight = []
        return lost
