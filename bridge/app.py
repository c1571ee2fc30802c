"""Wiring and lifecycle of one bridge process.

Flow of one upstream payload::

    AlenoSource (receive loop) -> Bridge.on_payload: Normalizer -> intake queue
      -> dispatcher task: Router.dispatch -> SinkWorker.offer (per sink buffer)
      -> SinkWorker task: Sink.publish(batch)

``on_payload`` never blocks the Socket.IO receive loop: normalized events go into a
bounded intake queue consumed by one dispatcher task, which keeps the upstream order.
Only a ``block`` sink can make the dispatcher wait; when the intake is full too,
upstream batches are dropped and counted (``aleno_bridge_pipeline_dropped_total``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from bridge.config import Settings
from bridge.envelope import Event
from bridge.logs import redact
from bridge.metrics import Metrics
from bridge.normalize import TICKER_EVENT, Normalizer
from bridge.routing import Router
from bridge.runner import SinkWorker
from bridge.sinks import Sink
from bridge.source import AlenoSource

log = logging.getLogger("aleno_bridge.app")

INTAKE_BATCHES: Final = 1024
GC_THRESHOLDS: Final = (50_000, 50, 100)


def tune_gc() -> None:
    """Tune the cyclic garbage collector for the hot path (called by ``run``).

    Records, events and messages are short-lived and acyclic: reference counting frees
    them. The cyclic collector would only rescan what the sink buffers hold, again and
    again (25-45% of the hot path in ``bench/pipeline.py``). Objects built at start-up
    are frozen out of its reach and young objects are collected less often; cycles
    are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Bridge:
    """One source, one router, one worker per sink, and their metrics.

    ``sinks`` injects ready driver instances by sink name (tests and ``tap``);
    every other sink is built from its configured driver.
    """

    def __init__(
        self,
        settings: Settings,
        sinks: Mapping[str, Sink[Any]] | None = None,
        with_source: bool = True,
    ) -> None:
        self.settings = settings
        cfg = settings.config
        self.metrics = Metrics()
        self.normalizer = Normalizer(source=cfg.source.endpoint)
        self.workers: dict[str, SinkWorker] = {
            name: SinkWorker(spec, (sinks or {}).get(name), self.metrics.observe_publish)
            for name, spec in settings.sinks.items()
        }
        self.router: Router = Router(settings.routes, self.workers)
        self.source: AlenoSource | None = None
        if with_source:
            key = settings.api_key.get_secret_value() if settings.api_key else None
            self.source = AlenoSource(cfg.source, key, self.on_payload)
        self.pipeline_dropped = 0
        self.http_port: int | None = None
        self._intake: asyncio.Queue[list[Event]] = asyncio.Queue(INTAKE_BATCHES)
        self._dispatcher: asyncio.Task[None] | None = None
        self._taps: list[Callable[[Event], None]] = []
        self.started_at = time.time()
        self.metrics.attach(self)

    # -- data path -------------------------------------------------------------

    def on_payload(self, event_name: str, payload: Any) -> None:
        """Normalize one upstream payload and queue its events for routing."""
        if event_name == TICKER_EVENT:
            events = self.normalizer.tickers(payload)
            kind = "ticker"
        else:
            events = self.normalizer.equities(payload)
            kind = "equity"
        if not events:
            return
        self.metrics.lag.labels(kind).observe(
            max(0.0, (events[0].received_ms - events[0].sent_ms) / 1000.0)
        )
        self.ingest(events)

    def ingest(self, events: list[Event]) -> None:
        try:
            self._intake.put_nowait(events)
        except asyncio.QueueFull:
            self.pipeline_dropped += len(events)

    def add_tap(self, tap: Callable[[Event], None]) -> None:
        self._taps.append(tap)

    async def _dispatch_forever(self) -> None:
        dispatch = self.router.dispatch
        while True:
            events = await self._intake.get()
            for tap in self._taps:
                for ev in events:
                    tap(ev)
            try:
                for ev in events:
                    for waiter in dispatch(ev):
                        await waiter
            finally:
                self._intake.task_done()

    async def flush_intake(self) -> None:
        """Wait until every queued upstream batch has been routed (for tests and drain)."""
        await self._intake.join()

    # -- health ------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ok = True
        if self.source is not None:
            since = self.source.seconds_since_update()
            stale = self.settings.config.source.stale_after_s
            upstream_ok = (
                self.source.stats.state == "subscribed"
                and self.source.subscribed
                and since is not None
                and since <= stale
            )
            checks["upstream"] = {
                "ok": upstream_ok,
                "state": self.source.stats.state,
                "seconds_since_update": None if since is None else round(since, 3),
            }
            ok = ok and upstream_ok
        for name, w in self.workers.items():
            error = w.stats.last_error if not w.ready else None
            checks[f"sink:{name}"] = {"ok": w.ready, "state": w.state, "required": w.required,
                                      "error": redact(error) if error else None}
            if w.required and not w.ready:
                ok = False
        return ok, checks

    def alive(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the sink workers and the dispatcher (not the source)."""
        for w in self.workers.values():
            w.start()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="dispatcher")

    async def run(self, stop: asyncio.Event) -> dict[str, int]:
        """Run until ``stop`` is set, then drain; return undelivered events per sink.

        Raises :class:`~bridge.source.SourceError` when the upstream gives up (bad key).
        """
        from bridge.http import serve_http

        await self.start()
        http = await serve_http(self) if self.settings.config.http.enabled else None
        tasks: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait(), name="stop")}
        source_task = None
        if self.source is not None:
            source_task = asyncio.create_task(self.source.run(), name="source")
            tasks.add(source_task)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if t is not source_task:
                    t.cancel()
            lost = await self.shutdown(source_task)
            if http is not None:
                await http.cleanup()
        if source_task is not None and source_task.done() and not source_task.cancelled():
            exc = source_task.exception()
            if exc is not None:
                raise exc
        return lost

    async def shutdown(self, source_task: asyncio.Task[None] | None = None) -> dict[str, int]:
        """Stop the source, route what was received, drain every sink up to
        ``shutdown_timeout_s`` and close them; log what could not be delivered."""
        if self.source is not None:
            self.source.stop()
        if source_task is not None and not source_task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(source_task), 5.0)
            if not source_task.done():
                source_task.cancel()
        deadline = time.monotonic() + self.settings.config.shutdown_timeout_s
        if self._dispatcher is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush_intake(), self.settings.config.shutdown_timeout_s)
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        remaining = max(0.0, deadline - time.monotonic())
        results = await asyncio.gather(*(w.stop(remaining) for w in self.workers.values()))
        lost = dict(zip(self.workers, results, strict=True))
        for name, n in lost.items():
            w = self.workers[name]
            if n:
                log.warning("sink %s: %d event(s) not delivered at shutdown", name, n,
                            extra={"sink": name, "undelivered": n})
            else:
                log.info("sink %s drained: %d event(s) published", name, w.stats.published,
                         extra={"sink": name, "published": w.stats.published})
        return lost
