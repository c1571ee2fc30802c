"""One worker per sink: a bounded buffer, batching, delivery confirmation, reconnects.

Every sink gets its own task and its own buffer, so a dead or slow bus never delays
another sink or the upstream (unless its policy is ``block``, which by design slows
the whole pipeline to the pace of that sink).

``buffer.max_events`` bounds the events a sink holds: queued *and* in flight (the
batch handed to the driver and not yet confirmed), in the worker's
:class:`~bridge.sinks.buffer.SinkBuffer`. ``buffer.when_full`` decides what happens
when it holds that many:

``drop_oldest`` (default)
    the oldest queued event is dropped to make room; the freshest prices survive
    (when every held event is in flight, none can be dropped: the arriving one is).
``drop_newest``
    the arriving event is dropped; what is queued is kept.
``block``
    the router waits for room: upstream updates queue up in the pipeline's intake
    (where the oldest payloads are shed whole, counted as ``intake_full``, once it
    is full too).
``conflate``
    at most one event per (kind, symbol, topic) is queued: a newer update of a queued
    symbol replaces it in place (counted as ``conflated``), so a recovering sink
    publishes the latest price of every symbol first instead of a stale backlog.
    When ``max_events`` distinct symbols are held the oldest is dropped.

With ``buffer.disk`` the buffer is a :class:`~bridge.sinks.spool_buffer.SpoolBuffer`:
every accepted event is also in the sink's disk spool until the bus confirmed it,
``max_events`` bounds only what is held in memory, ``when_full`` applies at
``disk.max_bytes``, and a restart delivers what the spool holds first.

A buffered event is a :class:`~bridge.sinks.Message`: its encoded body (an exact-size
bytes object), its topic and key (shared per symbol) and the event's light header
(shared by all the event's messages); about 0.8-1 KB per event, measured by
``tests/unit/pipeline/test_memory.py``.

An event leaves the worker only when the driver confirmed it (``publish`` returned)
or when it is dropped for a counted reason (``buffer_full``, ``rejected``,
``dead_lettered``, ``shutdown``). A batch whose ``publish`` raised anything but an
explicit refusal (:class:`~bridge.sinks.SinkRejectedError`) stays in flight and is
published again: after a backoff, on the same connection for a
:class:`~bridge.sinks.SinkRetryError`, after a reconnect otherwise, a driver bug (an
exception type the driver did not map) included. ``dropped{reason="driver_error"}``
is kept as a series for dashboards and stays 0; driver bugs are counted by type in
:attr:`SinkStats.driver_errors`. ``offered`` counts the events the
worker *accepted* (or dropped on arrival); a ``block`` offer that waits for room is
not offered yet: it shows in :attr:`SinkWorker.blocked` (metric
``aleno_bridge_sink_blocked_offers``) and is counted as offered when it is queued, or
as offered and dropped (``shutdown``) when the worker stops first. So at every
moment, not only between batches::

    offered == published + sum(dropped.values()) + conflated + depth
    depth <= capacity

A ``dead_letter`` sink receives the events the bus refused for good
(:class:`~bridge.sinks.SinkRejectedError`), never those of a bus that is down: they
are counted here as ``dropped{reason="dead_lettered"}`` and offered to the
dead-letter sink without waiting (a full dead-letter buffer under ``block`` drops
them as its own ``buffer_full``). They keep their topic, key and body and carry
three CloudEvents extension attributes: ``deadletterreason`` (the driver's
:attr:`~bridge.sinks.SinkRejectedError.reason`, ``rejected`` by default),
``deadlettersink`` (this sink's name) and ``deadlettererror`` (the error text,
secrets redacted, at most 1,000 characters); inside the envelope for a structured
(``cloudevents-json``) body, as attributes (headers, user properties) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar, cast, overload

from bridge.config.schema import SinkSpec
from bridge.core.backoff import Backoff
from bridge.core.logs import quiet, redact
from bridge.core.state import SinkSnapshot, SinkState, frozen_counts
from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkError,
    SinkRetryError,
    is_io_error,
    topic_rules,
)
from bridge.sinks.buffer import Policy, SinkBuffer
from bridge.sinks.spool_buffer import SpoolBuffer

log = logging.getLogger("aleno_bridge.runner")

T = TypeVar("T")

#: the longest ``deadlettererror`` attribute (the error text of a big partial rejection
#: names every refused message)
MAX_DEAD_LETTER_ERROR: Final = 1000
#: the time ``stop`` keeps for closing the driver, at most (a quarter of its budget
#: when that is smaller)
CLOSE_RESERVE_S: Final = 1.0
#: distinct driver-bug exception types logged with their traceback, per sink (at most)
MAX_LOGGED_BUGS: Final = 100
#: records the bridge's dispatcher validates, encodes and routes between two checks of
#: the sinks' room (and two yields to the event loop)
DISPATCH_CHUNK: Final = 500


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
    #: the last permanent refusal by the bus (``SinkRejectedError``), and when
    last_rejection: str | None = None
    last_rejection_at: float | None = None
    rejections: int = 0
    #: ``connect()`` attempts that failed or timed out (metric
    #: ``aleno_bridge_sink_connect_failures``)
    connect_failures: int = 0
    #: of those, the ones that failed with a driver bug (not an I/O or bus error)
    connect_driver_errors: int = 0
    #: failed ``connect()`` and ``publish()`` calls that raised what no bus raises (a
    #: bug in the driver), by exception type (metric
    #: ``aleno_bridge_sink_driver_errors_total{error}``); the batch was kept and retried
    driver_errors: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


class _Buffered(Generic[T]):
    """An attribute of a :class:`SinkWorker` that its :class:`SinkBuffer` keeps: read
    and set through (``worker.capacity = 2`` resizes the buffer)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    @overload
    def __get__(self, worker: None, owner: type[SinkWorker]) -> _Buffered[T]: ...
    @overload
    def __get__(self, worker: SinkWorker, owner: type[SinkWorker]) -> T: ...

    def __get__(self, worker: SinkWorker | None, owner: type[SinkWorker]) -> T | _Buffered[T]:
        if worker is None:
            return self
        return cast(T, getattr(worker.buffer, self.attr))

    def __set__(self, worker: SinkWorker, value: T) -> None:
        setattr(worker.buffer, self.attr, value)


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
        self.safe_token = topic_rules(spec.driver, spec.options).safe_token
        quiet(spec.driver.quiet_loggers)
        self.required = spec.common.required
        capacity = spec.common.buffer.max_events
        self.stats = SinkStats()
        #: the events this sink holds: queued and in flight (a batch is held in flight:
        #: it can never be larger than the buffer); with ``buffer.disk``, on disk too
        buffer = spec.common.buffer
        batch_max = min(spec.common.batch.max_events, capacity)
        linger_s = spec.common.batch.linger_ms / 1000.0
        self.buffer = (
            SinkBuffer(self.stats, buffer.when_full, capacity, batch_max, linger_s)
            if buffer.disk is None else
            SpoolBuffer(self.stats, buffer.when_full, capacity, batch_max, linger_s,
                        buffer.disk, spec.name, self.format)
        )
        #: the room :attr:`saturated` asks for: one dispatcher chunk, or half the buffer
        self.headroom = max(1, min(DISPATCH_CHUNK, capacity // 2))
        retry = spec.common.retry
        self.publish_timeout_s = retry.publish_timeout_s
        self.connect_timeout_s = retry.connect_timeout_s
        # the one place the driver learns its time: it bounds its own waits below these
        self.sink.budget = Budget(retry.publish_timeout_s, retry.connect_timeout_s)
        #: driver-bug exception types already logged with their traceback
        self._logged_bugs: set[str] = set()
        self.backoff = Backoff(retry.initial_backoff_s, retry.max_backoff_s)
        self.state = SinkState.IDLE
        #: the (state, cause type) of the last state line logged
        self._logged: tuple[SinkState, str | None] = (SinkState.IDLE, None)
        self.connected = False
        #: where refused events go (set by the bridge from ``dead_letter:``)
        self.dead_letter: SinkWorker | None = None
        self._on_latency = on_latency
        # set when the drain deadline passed: the loop returns at its next step even if
        # a cancellation was swallowed (asyncio.wait_for on Python < 3.12 can do that)
        self._abandoned = False
        self._task: asyncio.Task[None] | None = None

    # -- buffer (a SinkBuffer; its settings and state are read and set here too) ------

    #: ``buffer.when_full``
    policy = _Buffered[Policy]("policy")
    #: ``buffer.max_events``: the events held at most, queued and in flight
    capacity = _Buffered[int]("capacity")
    batch_max = _Buffered[int]("batch_max")
    linger_s = _Buffered[float]("linger_s")
    #: ``block`` offers waiting for room (not yet counted as offered)
    blocked = _Buffered[int]("blocked")
    _queue = _Buffered[deque[Message]]("queue")
    _conflated = _Buffered[OrderedDict[tuple[str, str, str], Message]]("conflation")
    _inflight = _Buffered[list[Message]]("inflight")
    _stopping = _Buffered[bool]("stopping")
    _stop_reason = _Buffered[str]("stop_reason")

    @property
    def depth(self) -> int:
        """Events accepted but not yet confirmed or dropped (queued + in flight)."""
        return self.buffer.depth

    @property
    def saturated(self) -> bool:
        """Connected and its buffer has no room for a dispatcher chunk (``headroom``
        events): routing more to it now would only drop what it holds. A sink that is
        not connected is never saturated (its policy applies: the bridge keeps routing
        to it, see :mod:`bridge.app`)."""
        return self.connected and self.buffer.full(self.headroom)

    async def wait_room(self, timeout_s: float) -> None:
        """Return when a batch left the buffer, or after ``timeout_s``."""
        await self.buffer.wait_room(timeout_s)

    def offer(self, message: Message, wait: bool = True) -> Awaitable[None] | None:
        """Accept ``message`` under the buffer policy; never blocks except for ``block``,
        where it returns an awaitable that completes once the message is queued (or,
        with ``wait=False``, drops it as ``buffer_full``)."""
        return self.buffer.offer(message, wait)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"sink:{self.name}")
        return self._task

    @property
    def ready(self) -> bool:
        """Connected and the last publish (if any) succeeded."""
        return self.connected and (self.stats.last_publish_ok or self.stats.offered == 0)

    def snapshot(self) -> SinkSnapshot:
        """This sink's state, buffer and counters now, for operator code."""
        st = self.stats
        rejected_at = st.last_rejection_at
        return SinkSnapshot(
            name=self.name,
            driver=self.spec.common.driver,
            state=self.state,
            ready=self.ready,
            required=self.required,
            depth=self.depth,
            capacity=self.capacity,
            blocked=self.blocked,
            offered=st.offered,
            published=st.published,
            conflated=st.conflated,
            dropped=frozen_counts(st.dropped),
            failed_batches=st.failed_batches,
            reconnects=st.reconnects,
            rejections=st.rejections,
            connect_failures=st.connect_failures,
            driver_errors=frozen_counts(st.driver_errors),
            spool=self.buffer.spool_snapshot(),
            last_error=st.last_error,
            last_rejection=st.last_rejection,
            seconds_since_rejection=(
                None if rejected_at is None else max(0.0, time.time() - rejected_at)
            ),
        )

    def _set_state(self, state: SinkState, error: BaseException | None = None,
                   prefix: str = "", *, quiet: bool = False) -> None:
        """Record the state and its cause; log only a change of state or of the
        cause's type, so a failure retried for minutes is one line, not one per attempt.

        ``quiet``: connected again while a failed batch waits to be retried; not news
        until that batch is published (then ``connected`` is logged once).
        """
        detail = f"{prefix}{type(error).__name__}: {error}" if error is not None else None
        self.state = state
        self.stats.last_error = detail
        cause = None if error is None else f"{prefix}{type(error).__name__}"
        if quiet or (state, cause) == self._logged:
            return
        self._logged = (state, cause)
        extra = {"sink": self.name, "driver": self.spec.common.driver, "state": state}
        if error is not None:
            log.warning("sink %s (%s) is %s: %s", self.name, self.spec.common.driver, state,
                        detail, extra=extra)
        else:
            log.info("sink %s (%s) is %s", self.name, self.spec.common.driver, state,
                     extra=extra)

    async def _connect(self) -> bool:
        if self.state == SinkState.IDLE:
            self._set_state(SinkState.CONNECTING)
        try:
            await asyncio.wait_for(self.sink.connect(), self.connect_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.connect_failures += 1
            if is_io_error(self.sink, exc):
                self._set_state(SinkState.FAILING, exc)
            else:
                self._connect_bug(exc)
            await self._safe_close()
            return False
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.connected = True
        self._set_state(SinkState.CONNECTED, quiet=bool(self.buffer.inflight))
        return True

    def _connect_bug(self, exc: Exception) -> None:
        """``connect()`` raised what no bus raises: a bug in the driver. Shown as
        ``driver_error`` in the state, logged with its traceback once per exception
        type; connecting is still retried with backoff (the bus may be fine)."""
        self.stats.connect_driver_errors += 1
        self._driver_bug(exc, "connect()", "retrying with backoff")

    def _driver_bug(self, exc: Exception, call: str, then: str) -> None:
        """Count a driver bug by type, log its traceback once per type, show it in
        the state."""
        kind = type(exc).__name__
        errors = self.stats.driver_errors
        errors[kind] = errors.get(kind, 0) + 1
        if kind not in self._logged_bugs and len(self._logged_bugs) < MAX_LOGGED_BUGS:
            self._logged_bugs.add(kind)
            log.error(
                "sink %s (%s): %s failed with a bug in the driver (%s is not an I/O or bus "
                "error it mapped); %s", self.name, self.spec.common.driver, call, kind, then,
                exc_info=exc, extra={"sink": self.name, "driver_error": kind},
            )
        self._set_state(SinkState.FAILING, exc, prefix="driver_error: ")

    async def _safe_close(self, timeout_s: float = 5.0) -> None:
        self.connected = False
        try:
            await asyncio.wait_for(self.sink.close(), timeout_s)
        except Exception as exc:  # closing a broken connection may fail; that is fine
            log.debug("sink %s: close failed: %s", self.name, exc)

    async def _pause(self) -> None:
        delay = self.backoff.next()
        if self.buffer.stopping:
            delay = min(delay, 0.5)
        await asyncio.sleep(delay)

    async def _run(self) -> None:
        buffer = self.buffer
        while not self._abandoned:
            if not self.connected:
                if buffer.stopping and not buffer.depth:
                    return
                if not await self._connect():
                    await self._pause()
                    continue
            if not buffer.inflight:
                batch = await buffer.next_batch()
                if batch is None:
                    return
                buffer.inflight = batch
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self.sink.publish(buffer.inflight), self.publish_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed_batches += 1
                self.stats.last_publish_ok = False
                if isinstance(exc, SinkRetryError):
                    # the connection is fine: the same batch again, after the backoff
                    self._set_state(SinkState.FAILING, exc)
                    await self._pause()
                elif self.sink.is_retriable(exc):
                    self._set_state(SinkState.FAILING, exc)
                    await self._safe_close()
                    await self._pause()
                elif isinstance(exc, SinkError):
                    self._rejected(exc)
                else:
                    # an exception the driver did not map: keep the batch, suspect the
                    # connection, retry; only an explicit refusal drops
                    self._driver_bug(exc, f"publish() of {len(buffer.inflight)} event(s)",
                                     "the batch is kept and retried after a reconnect")
                    await self._safe_close()
                    await self._pause()
                continue
            elapsed = time.perf_counter() - started
            if self._on_latency is not None:
                self._on_latency(self.name, elapsed)
            self.stats.published += len(buffer.inflight)
            self.stats.last_publish_ok = True
            buffer.done()
            self.backoff.reset()
            if self._logged != (SinkState.CONNECTED, None):
                self._set_state(SinkState.CONNECTED)

    # -- permanent refusals ---------------------------------------------------------

    def _rejected(self, exc: SinkError) -> None:
        """The bus refused (part of) the in-flight batch for good: count the rest as
        published, dead-letter or drop the refused ones, record the refusal."""
        batch = self.buffer.inflight
        n = len(batch)
        refused = _refused_messages(batch, getattr(exc, "refused", None))
        if refused is not None:
            count = len(refused)
        else:
            declared = getattr(exc, "rejected", None)
            count = n if declared is None else max(0, min(n, declared))
            if count == n:
                refused = list(batch)
        detail = f"{type(exc).__name__}: {exc}"
        stats = self.stats
        stats.rejections += 1
        stats.last_rejection = detail
        stats.last_rejection_at = time.time()
        stats.last_error = detail
        stats.published += n - count
        dl = self.dead_letter
        if dl is not None and refused:
            reason = str(getattr(exc, "reason", None) or "rejected")
            ext = {
                "deadletterreason": reason,
                "deadlettersink": self.name,
                "deadlettererror": redact(str(exc))[:MAX_DEAD_LETTER_ERROR],
            }
            log.warning(
                "sink %s: the bus refused %d of %d event(s) for good; sent to dead-letter "
                "sink %s: %s", self.name, count, n, dl.name, detail,
                extra={"sink": self.name, "dead_letter": dl.name, "refused": count},
            )
            stats.drop("dead_lettered", count)
            for m in refused:
                dl.offer(m.with_extensions(ext), wait=False)
        else:
            why = ""
            if dl is not None and count:
                why = (" (the driver did not say which ones, so none could be dead-lettered: "
                       "it should raise SinkRejectedError(..., refused=[...]))")
            log.error(
                "sink %s dropped %d of %d event(s) the bus rejected: %s%s",
                self.name, count, n, detail, why, extra={"sink": self.name},
            )
            stats.drop("rejected", count)
        self.buffer.done()

    # -- stopping ---------------------------------------------------------------------

    def begin_stop(self, reason: str = "shutdown") -> None:
        """Accept nothing more (later offers count as ``dropped{reason=...}``, by
        default ``shutdown``; blocked ones are released and counted so); keep delivering
        what is held."""
        self.buffer.begin_stop(reason)

    async def stop(self, timeout_s: float, reason: str = "shutdown") -> int:
        """Stop accepting, deliver what is held, close: all within ``timeout_s``.

        Delivery gets ``timeout_s`` minus what closing the driver may take
        (:data:`CLOSE_RESERVE_S`, or a quarter of ``timeout_s`` if smaller). Returns the
        number of events that could not be delivered (counted as
        ``dropped{reason=...}``: ``shutdown``, or the reason :meth:`begin_stop` was
        given first); with a disk spool none: they stay in the spool for the next start.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        drain_until = deadline - min(CLOSE_RESERVE_S, timeout_s / 4)
        self.begin_stop(reason)
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), max(0.0, drain_until - loop.time()))
            if not task.done():
                self._abandoned = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(task),
                                           max(0.01, (deadline - loop.time()) / 2))
        lost = self.discard()
        await self._close_buffer()
        if self.state != SinkState.CLOSED:
            await self._safe_close(max(0.01, deadline - loop.time()))
            self._set_state(SinkState.CLOSED)
        return lost

    async def _close_buffer(self) -> None:
        """Close the spool (if any): what it still holds waits there for the next start."""
        try:
            await self.buffer.close()
        except Exception as exc:  # the shutdown must go on; the spool stays consistent
            log.error("sink %s: closing its spool failed: %s", self.name, exc,
                      extra={"sink": self.name})
        kept = self.depth if self.buffer.spool_snapshot() is not None else 0
        if kept:
            log.info("sink %s: %d event(s) kept in its spool for the next start", self.name,
                     kept, extra={"sink": self.name, "spooled": kept})

    def discard(self) -> int:
        """Drop what the worker still holds, counted under its stop reason, and end its
        task if it still runs (a drain cut short: the deadline passed, or the task that
        waited for it was cancelled). Returns the events dropped."""
        task = self._task
        if task is not None and not task.done() and not self._abandoned:
            self._abandoned = True
            task.cancel()
        return self.buffer.discard()


def _refused_messages(
    batch: Sequence[Message], refused: Sequence[int | Message] | None
) -> list[Message] | None:
    """The messages of ``batch`` a driver named as refused (by index or by identity);
    ``None`` when it named none."""
    if not refused:
        return None
    ids = {id(m) for m in refused if isinstance(m, Message)}
    indices = {i for i in refused if isinstance(i, int)}
    return [m for i, m in enumerate(batch) if i in indices or id(m) in ids]
