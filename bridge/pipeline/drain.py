"""The shutdown's one deadline, and the steps of the drain that keep to it.

``shutdown_timeout_s`` from the stop signal is shared by every step, in order: the
source stops (:func:`stop_source`), the intake is routed
(:meth:`bridge.pipeline.dispatcher.Dispatcher.stop`), the sinks deliver what they hold
and are closed (:func:`stop_sinks`). The last second of the budget (or a quarter of it,
if smaller) is kept for closing: the drain steps end at :attr:`Deadline.drain_until`,
the closing at :attr:`Deadline.end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

from bridge.core.state import SinkSnapshot
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks.worker import SinkWorker
from bridge.upstream.pool import UpstreamPool

#: the bridge's own log (``aleno_bridge.app``): operators filter on it
log = logging.getLogger("aleno_bridge.app")


class Deadline:
    """``budget`` seconds from now, on the running loop's clock."""

    def __init__(self, budget: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.budget = budget
        self.started = self._loop.time()
        self.end = self.started + budget
        self.drain_until = self.end - min(1.0, budget / 4)

    def left(self, until: float | None = None) -> float:
        """Seconds left until ``until`` (default: the end of the drain), at least 0."""
        return max(0.0, (self.drain_until if until is None else until) - self._loop.time())

    def elapsed(self) -> float:
        return self._loop.time() - self.started


async def stop_source(source: UpstreamPool | None, task: asyncio.Task[None] | None,
                      deadline: Deadline) -> None:
    """Stop the upstream connections; their task is cancelled if it does not end
    before the drain's deadline."""
    if source is not None:
        source.stop()
    if task is not None and not task.done():
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), deadline.left())
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError,
                                     Exception):
                await asyncio.wait_for(asyncio.shield(task),
                                       min(0.5, max(0.01, deadline.left(deadline.end))))


async def stop_sinks(workers: Mapping[str, SinkWorker], deadline: Deadline) -> dict[str, int]:
    """Drain and close every sink by the deadline; the events each could not deliver."""
    results = await asyncio.gather(*(w.stop(deadline.left(deadline.end))
                                     for w in workers.values()))
    return dict(zip(workers, results, strict=True))


def log_drained(workers: Mapping[str, SinkWorker], lost: Mapping[str, int]) -> None:
    """Log, for each sink, what it could not deliver, or what it published."""
    for name, n in lost.items():
        w = workers[name]
        if n:
            log.warning("sink %s: %d event(s) not delivered at shutdown", name, n,
                        extra={"sink": name, "undelivered": n})
        else:
            log.info("sink %s drained: %d event(s) published", name, w.stats.published,
                     extra={"sink": name, "published": w.stats.published})


def log_shutdown(deadline: Deadline, lost: Mapping[str, int], retired_lost: Mapping[str, int],
                 pipeline_dropped: Mapping[str, int], normalizer: Normalizer, router: Router,
                 sinks: Iterable[SinkSnapshot]) -> None:
    """The shutdown's last line: how long it took and what was not delivered, with
    the totals of the run (``sinks``: per sink name, over every worker reloads
    replaced or removed)."""
    intake_lost = pipeline_dropped.get("shutdown", 0)
    log.info(
        "shutdown took %.2fs (budget %gs): %d event(s) not delivered by the sinks "
        "(%d by sinks a reload replaced or removed), %d left in the intake",
        deadline.elapsed(), deadline.budget, sum(lost.values()),
        sum(retired_lost.values()), intake_lost,
        extra={
            "shutdown_s": round(deadline.elapsed(), 3),
            "undelivered": dict(lost),
            "pipeline_dropped": dict(pipeline_dropped),
            "events_received": dict(normalizer.received),
            "events_invalid": sum(normalizer.invalid.values()),
            "events_unrouted": router.unrouted,
            "events_filtered": sum(router.filtered.values()),
            "sinks": {
                s.name: {"offered": s.offered, "published": s.published,
                         "dropped": dict(s.dropped), "conflated": s.conflated,
                         "depth": s.depth}
                for s in sinks
            },
        },
    )
