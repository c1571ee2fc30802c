"""The intake: upstream payloads queued for the dispatcher, bounded, shed when full.

:meth:`Intake.on_payload` runs in the Socket.IO receive loop and never blocks it: it
does only what every payload needs (check the array, count it, observe the lag).
Validation and encoding happen in the dispatcher (:mod:`bridge.pipeline.dispatcher`),
so a payload shed under overload costs nothing more.

The intake queues at most ``intake_max_events`` events besides the payload being
routed; when a payload does not fit, the oldest queued payloads are shed whole
(``aleno_bridge_pipeline_dropped_total{reason="intake_full"}``), and the bridge counts
as overloaded until it has shed nothing for :data:`OVERLOAD_CLEAR_S` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from bridge.core.envelope import Event
from bridge.core.kinds import TICKER_EVENT
from bridge.core.metrics import Metrics
from bridge.core.state import IntakeSnapshot, OverloadSnapshot, frozen_counts
from bridge.pipeline.normalize import Normalizer

#: the bridge's own log (``aleno_bridge.app``): operators filter on it
log = logging.getLogger("aleno_bridge.app")

#: seconds without shedding after which an overloaded bridge counts as recovered
OVERLOAD_CLEAR_S: Final = 5.0


class Batch:
    """One upstream payload in the intake: its records, not yet validated (``events``
    is ``None``), or events ingested ready-made (:meth:`Intake.ingest`)."""

    __slots__ = ("events", "kind", "received_ms", "records", "size")

    def __init__(self, kind: str, records: list[Any] | None, events: list[Event] | None,
                 received_ms: int, size: int) -> None:
        self.kind = kind
        self.records = records
        self.events = events
        self.received_ms = received_ms
        self.size = size


class Intake:
    """The bounded queue between the receive loop and the dispatcher, and its counters.

    ``sinks_full`` names the sinks that are full (logged when shedding begins, and
    in the overload snapshot).
    """

    def __init__(self, max_events: int, normalizer: Normalizer, metrics: Metrics,
                 sinks_full: Callable[[], list[str]]) -> None:
        self.normalizer = normalizer
        self._lag = metrics.lag
        self._sinks_full = sinks_full
        #: events dropped between the receive loop and the router, by reason
        #: (``intake_full``, ``shutdown``, ``sink_removed``)
        self.dropped: dict[str, int] = {}
        #: upstream batches waiting for the dispatcher, and the events they hold
        #: (including the not yet routed rest of the batch being dispatched)
        self.max_events = max_events
        self.events = 0
        #: of those, the events of the batches not yet started: ``max_events`` bounds
        #: these (the batch being dispatched is held besides, so the intake holds at
        #: most twice as many events)
        self.queued_events = 0
        self.batches: deque[Batch] = deque()
        #: overload: since when (monotonic) the bridge sheds, the last shed, and totals
        self.overload_clear_s = OVERLOAD_CLEAR_S
        self.overloaded_since: float | None = None
        self.last_shed = 0.0
        self.shed_payloads = 0
        self._episode_shed = [0, 0]  # payloads, events shed in the current episode
        #: set when a batch is queued; ``idle`` when the dispatcher has routed them all
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        #: set by :meth:`close`: nothing is queued any more, only counted
        self.closing = False

    def on_payload(self, event_name: str, payload: Any) -> None:
        """Queue one upstream payload for the dispatcher (called in the receive loop).

        Only what every payload needs is done here: the array is checked and counted,
        the upstream lag observed. Validation and encoding happen in the dispatcher,
        so a payload shed under overload costs nothing more (see :meth:`admit`).
        """
        kind = "ticker" if event_name == TICKER_EVENT else "equity"
        records = self.normalizer.records(kind, payload)
        if not records:
            return
        received = self.normalizer.now_ms()
        first = records[0]
        sent = first.get("sentTimestampMs") if type(first) is dict else None
        # a send time the normalizer will drop (clock_skew, too_old) is no lag
        if type(sent) is int and self.normalizer.timely(sent, received):
            self._lag.labels(kind).observe(max(0.0, (received - sent) / 1000.0))
        self.admit(Batch(kind, records, None, received, len(records)))

    def ingest(self, events: list[Event]) -> None:
        """Queue ready-made ``events`` (one upstream batch) for the dispatcher, under
        the same rules as an upstream payload."""
        if events:
            self.admit(Batch(events[0].kind, None, events, events[0].received_ms,
                             len(events)))

    def admit(self, batch: Batch) -> None:
        """Queue ``batch``; when the intake cannot hold it, shed the *oldest* queued
        batches, whole, until it fits (stale prices go first). A batch bigger than the
        whole intake is taken whole once nothing else is queued: cutting it would leave
        the symbols at its end unpublished for good (one upstream tick of every symbol
        can exceed ``intake_max_events``; the upstream frame limit bounds its size).

        Shed events are counted as ``pipeline_dropped{reason="intake_full"}``. The batch
        being dispatched is never shed: its rest is routed, so every symbol of an
        upstream snapshot keeps being published under overload.
        """
        if self.closing:
            self.drop("shutdown", batch.size)
            return
        intake = self.batches
        shed_payloads = shed_events = 0
        room = self.max_events - self.queued_events
        while batch.size > room and intake:
            old = intake.popleft()
            shed_payloads += 1
            shed_events += old.size
            self.events -= old.size
            self.queued_events -= old.size
            room += old.size
        if shed_events:
            self._shed(shed_payloads, shed_events)
        elif self.overloaded_since is not None:
            self.check_recovered()
        self.events += batch.size
        self.queued_events += batch.size
        intake.append(batch)
        self.idle.clear()
        self.ready.set()

    def _shed(self, payloads: int, events: int) -> None:
        self.drop("intake_full", events)
        self.shed_payloads += payloads
        self.last_shed = time.monotonic()
        self._episode_shed[0] += payloads
        self._episode_shed[1] += events
        if self.overloaded_since is None:
            self.overloaded_since = self.last_shed
            saturated = self._sinks_full()
            log.warning(
                "overloaded: the pipeline is behind the upstream; shedding the oldest "
                "upstream payloads before validating them (intake %d/%d events; sinks "
                "full: %s); counted as aleno_bridge_pipeline_dropped_total"
                "{reason=\"intake_full\"}",
                self.events, self.max_events, ", ".join(saturated) or "none",
                extra={"overloaded": True, "sinks_full": saturated},
            )

    def check_recovered(self) -> None:
        """End the overload episode once nothing was shed for ``overload_clear_s``."""
        since = self.overloaded_since
        if since is None:
            return
        now = time.monotonic()
        if now - self.last_shed < self.overload_clear_s:
            return
        payloads, events = self._episode_shed
        log.info(
            "recovered from overload after %.1fs: shed %d upstream payload(s), %d event(s)",
            self.last_shed - since, payloads, events,
            extra={"overloaded": False, "shed_payloads": payloads, "shed_events": events},
        )
        self.overloaded_since = None
        self._episode_shed = [0, 0]

    def drop(self, reason: str, n: int) -> None:
        """Count ``n`` events dropped before routing, for ``reason``."""
        if n > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def discard(self) -> None:
        """Drop every queued batch (counted as ``shutdown``)."""
        n = sum(batch.size for batch in self.batches)
        self.batches.clear()
        self.queued_events = 0
        self.events -= n
        self.drop("shutdown", n)
        self.idle.set()

    def close(self) -> None:
        """Queue nothing more: what is admitted from now on is counted as ``shutdown``;
        the dispatcher wakes up to see it."""
        self.closing = True
        self.ready.set()

    async def flush(self) -> None:
        """Wait until every queued upstream batch has been routed."""
        await self.idle.wait()

    def snapshot(self) -> IntakeSnapshot:
        return IntakeSnapshot(self.events, self.max_events, frozen_counts(self.dropped),
                              len(self.batches))

    def overload(self) -> OverloadSnapshot:
        self.check_recovered()
        since = self.overloaded_since
        now = time.monotonic()
        return OverloadSnapshot(
            overloaded=since is not None,
            seconds=None if since is None else now - since,
            seconds_since_shed=None if not self.shed_payloads else now - self.last_shed,
            shed_payloads=self.shed_payloads,
            shed_events=self.dropped.get("intake_full", 0),
            sinks_full=tuple(self._sinks_full()),
        )
