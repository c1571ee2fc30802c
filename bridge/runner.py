"""One worker per sink: a bounded buffer, batching, delivery confirmation, reconnects.

Every sink gets its own task and its own buffer, so a dead or slow bus never delays
another sink or the upstream (unless its policy is ``block``, which by design slows
the whole pipeline to the pace of that sink).

``buffer.when_full`` decides what happens when the buffer holds ``max_events``:

``drop_oldest`` (default)
    the oldest queued event is dropped to make room; the freshest prices survive.
``drop_newest``
    the arriving event is dropped; what is queued is kept.
``block``
    the router waits for room: upstream updates queue up in the pipeline's intake
    (and are dropped there, counted as ``pipeline_full``, once it is full too).
``conflate``
    at most one event per (kind, symbol, topic) is queued: a newer update of a queued
    symbol replaces it in place (counted as ``conflated``), so a recovering sink
    publishes the latest price of every symbol first instead of a stale backlog.
    When ``max_events`` distinct symbols are queued the oldest is dropped.

An event leaves the worker only when the driver confirmed it (``publish`` returned)
or when it is dropped for a counted reason. At every moment::

    offered == published + sum(dropped.values()) + conflated + depth
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.backoff import Backoff
from bridge.config import SinkSpec
from bridge.sinks import Message, Sink, SinkError

log = logging.getLogger("aleno_bridge.runner")


@dataclass
class SinkStats:
    """Counters of one sink; read by the metrics collector at scrape time."""

    offered: int = 0
    published: int = 0
    conflated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0
    connects: int = 0
    reconnects: int = 0
    last_error: str | None = None
    last_publish_ok: bool = False
    last_publish_at: float | None = None

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class SinkWorker:
    """Owns one :class:`Sink`, its buffer and its retry loop."""

    def __init__(
        self,
        spec: SinkSpec,
        sink: Sink[Any] | None = None,
        on_latency: Callable[[str, float], None] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.format = spec.common.format
        self.sink: Sink[Any] = sink if sink is not None else spec.driver(spec.name, spec.options)
        self.safe_token = spec.driver.safe_token
        self.required = spec.common.required
        self.policy = spec.common.buffer.when_full
        self.capacity = spec.common.buffer.max_events
        self.batch_max = spec.common.batch.max_events
        self.linger_s = spec.common.batch.linger_ms / 1000.0
        retry = spec.common.retry
        self.publish_timeout_s = retry.publish_timeout_s
        self.connect_timeout_s = retry.connect_timeout_s
        self.backoff = Backoff(retry.initial_backoff_s, retry.max_backoff_s)
        self.stats = SinkStats()
        self.state = "idle"
        self.connected = False
        self._on_latency = on_latency
        self._queue: deque[Message] = deque()
        self._conflated: OrderedDict[tuple[str, str, str], Message] = OrderedDict()
        self._inflight: list[Message] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._stopping = False
        # set when the drain deadline passed: the loop returns at its next step even if
        # a cancellation was swallowed (asyncio.wait_for on Python < 3.12 can do that)
        self._abandoned = False
        self._task: asyncio.Task[None] | None = None

    # -- buffer ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Events accepted but not yet confirmed or dropped (queued + in flight)."""
        return len(self._queue) + len(self._conflated) + len(self._inflight)

    def _queued(self) -> int:
        return len(self._queue) + len(self._conflated)

    def offer(self, message: Message) -> Awaitable[None] | None:
        """Accept ``message`` under the buffer policy; never blocks except for ``block``,
        where it returns an awaitable that completes once the message is queued."""
        stats = self.stats
        stats.offered += 1
        if self._stopping:
            stats.drop("shutdown")
            return None
        if self.policy == "conflate":
            ev = message.event
            key = (ev.kind, ev.symbol, message.topic)
            conf = self._conflated
            if key in conf:
                conf[key] = message
                stats.conflated += 1
                return None
            if len(conf) >= self.capacity:
                conf.popitem(last=False)
                stats.drop("buffer_full")
            conf[key] = message
        elif len(self._queue) < self.capacity:
            self._queue.append(message)
        elif self.policy == "drop_oldest":
            self._queue.popleft()
            stats.drop("buffer_full")
            self._queue.append(message)
        elif self.policy == "drop_newest":
            stats.drop("buffer_full")
            return None
        else:
            return self._put_when_room(message)
        self._ready.set()
        return None

    async def _put_when_room(self, message: Message) -> None:
        while len(self._queue) >= self.capacity:
            if self._stopping:
                self.stats.drop("shutdown")
                return
            self._room.clear()
            await self._room.wait()
        self._queue.append(message)
        self._ready.set()

    def _take(self) -> list[Message]:
        n = self.batch_max
        batch: list[Message]
        if self._conflated:
            batch = []
            while self._conflated and len(batch) < n:
                batch.append(self._conflated.popitem(last=False)[1])
        else:
            q = self._queue
            if len(q) <= n:
                batch = list(q)
                q.clear()
            else:
                batch = [q.popleft() for _ in range(n)]
        self._room.set()
        return batch

    async def _next_batch(self) -> list[Message] | None:
        while not self._queued():
            if self._stopping:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.linger_s and self._queued() < self.batch_max and not self._stopping:
            await asyncio.sleep(self.linger_s)
        return self._take()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"sink:{self.name}")
        return self._task

    @property
    def ready(self) -> bool:
        """Connected and the last publish (if any) succeeded."""
        return self.connected and (self.stats.last_publish_ok or self.stats.offered == 0)

    def _set_state(self, state: str, error: BaseException | None = None) -> None:
        detail = f"{type(error).__name__}: {error}" if error is not None else None
        if state != self.state or detail != self.stats.last_error:
            extra = {"sink": self.name, "driver": self.spec.common.driver, "state": state}
            if error is not None:
                log.warning(
                    "sink %s (%s) is %s: %s", self.name, self.spec.common.driver, state, detail,
                    extra=extra,
                )
            else:
                log.info("sink %s (%s) is %s", self.name, self.spec.common.driver, state,
                         extra=extra)
        self.state = state
        self.stats.last_error = detail

    async def _connect(self) -> bool:
        if self.state == "idle":
            self._set_state("connecting")
        try:
            await asyncio.wait_for(self.sink.connect(), self.connect_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._set_state("failing", exc)
            await self._safe_close()
            return False
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.connected = True
        self._set_state("connected")
        return True

    async def _safe_close(self) -> None:
        self.connected = False
        try:
            await asyncio.wait_for(self.sink.close(), 5.0)
        except Exception as exc:  # closing a broken connection may fail; that is fine
            log.debug("sink %s: close failed: %s", self.name, exc)

    async def _pause(self) -> None:
        delay = self.backoff.next()
        if self._stopping:
            delay = min(delay, 0.5)
        await asyncio.sleep(delay)

    async def _run(self) -> None:
        while not self._abandoned:
            if not self.connected:
                if self._stopping and not self.depth:
                    return
                if not await self._connect():
                    await self._pause()
                    continue
            if not self._inflight:
                batch = await self._next_batch()
                if batch is None:
                    return
                self._inflight = batch
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self.sink.publish(self._inflight), self.publish_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed_batches += 1
                self.stats.last_publish_ok = False
                if self.sink.is_retriable(exc):
                    self._set_state("failing", exc)
                    await self._safe_close()
                    await self._pause()
                elif isinstance(exc, SinkError):
                    n = len(self._inflight)
                    refused = getattr(exc, "rejected", None)
                    refused = n if refused is None else max(0, min(n, refused))
                    log.error(
                        "sink %s dropped %d of %d event(s) the bus rejected: %s: %s",
                        self.name, refused, n, type(exc).__name__, exc,
                        extra={"sink": self.name},
                    )
                    self.stats.drop("rejected", refused)
                    self.stats.published += n - refused
                    self._inflight = []
                else:
                    log.exception(
                        "sink %s (%s): the driver failed unexpectedly; dropped a batch of %d",
                        self.name, self.spec.common.driver, len(self._inflight),
                        extra={"sink": self.name},
                    )
                    self.stats.drop("driver_error", len(self._inflight))
                    self._inflight = []
                continue
            elapsed = time.perf_counter() - started
            if self._on_latency is not None:
                self._on_latency(self.name, elapsed)
            self.stats.published += len(self._inflight)
            self.stats.last_publish_ok = True
            self.stats.last_publish_at = time.time()
            self._inflight = []
            self.backoff.reset()
            if self.state != "connected":
                self._set_state("connected")

    async def stop(self, timeout_s: float) -> int:
        """Stop accepting, deliver what is buffered for up to ``timeout_s``, close.

        Returns the number of events that could not be delivered (counted as
        ``dropped{reason="shutdown"}``).
        """
        self._stopping = True
        self._ready.set()
        self._room.set()
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
            if not task.done():
                self._abandoned = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(task, 10.0)
        lost = self.depth
        if lost:
            self.stats.drop("shutdown", lost)
            self._queue.clear()
            self._conflated.clear()
            self._inflight = []
        await self._safe_close()
        self._set_state("closed")
        return lost
