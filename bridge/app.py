"""Wiring and lifecycle of one bridge process.

Flow of one upstream payload::

    AlenoSource (receive loop) -> Intake.on_payload: Normalizer -> intake queue
      -> Dispatcher task: Router.dispatch -> SinkWorker.offer (per sink buffer)
      -> SinkWorker task: Sink.publish(batch)

``on_payload`` never blocks the Socket.IO receive loop and does only what every
payload needs (check the array, count it, observe the lag): validation and encoding
happen in the dispatcher, in chunks, so a payload shed under overload costs nothing
more. The intake queues at most ``intake_max_events`` events (default 10,000: about
20 MB of decoded records) besides the payload being routed; when a payload does not
fit, the oldest queued payloads are shed whole
(``aleno_bridge_pipeline_dropped_total{reason="intake_full"}``). The dispatcher waits
while every connected non-``block`` sink is full and yields between chunks, so the
sinks and the reader keep their share of the CPU (see "Overload" in
``docs/operations.md``). The intake is :mod:`bridge.pipeline.intake`, the dispatcher
:mod:`bridge.pipeline.dispatcher`; the bridge wires them.

Shutdown has one deadline, ``shutdown_timeout_s`` from the stop signal, shared by
every step: stopping the source, routing what the intake holds, draining the sinks
and closing them (see :meth:`Bridge.shutdown` and :mod:`bridge.pipeline.drain`).
Nothing is lost uncounted: events still in the intake at the deadline are counted as
``aleno_bridge_pipeline_dropped_total{reason="shutdown"}``, events held by a sink as
``aleno_bridge_sink_events_dropped_total{reason="shutdown"}``, and events held by a
sink a reload replaced or removed as ``{reason="sink_removed"}`` in both (see
:mod:`bridge.config.reload`, which applies reloads: :class:`~bridge.config.reload.Reloader`).

Assembly: :meth:`Bridge.from_settings` is the one way settings become a bridge, and
:func:`serve` the one way the command line runs one (``run``, ``demo`` and ``tap``).
What operator code may know of a running bridge is :meth:`Bridge.snapshot` (the read
model of :mod:`bridge.core.state`); the metrics, ``/readyz``, ``top`` and ``tap`` read that.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry

from bridge import __version__
from bridge.config import HttpConfig, Settings
from bridge.config.apply import Reloader, RetiredSinks, link_dead_letters
from bridge.config.reload import ConfigWatcher, ReloadOutcome, ReloadQueue
from bridge.config.settings import upstream_keys
from bridge.control.core import Control, NatsControl, start_nats_control
from bridge.control.http import serve_control, serve_http
from bridge.control.thread import ControlLoop
from bridge.core.envelope import Event
from bridge.core.logs import Redactor
from bridge.core.metrics import Metrics
from bridge.core.state import BridgeSnapshot, Destination, frozen_counts, readiness
from bridge.pipeline.barclock import BarClock
from bridge.pipeline.dispatcher import Dispatcher, Tap
from bridge.pipeline.drain import (
    Deadline,
    log_drained,
    log_shutdown,
    stop_sinks,
    stop_source,
)
from bridge.pipeline.intake import Batch, Intake
from bridge.pipeline.market import STALE_SCAN_MAX_S, Damping, MarketState
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks import Sink
from bridge.sinks.worker import SinkWorker
from bridge.upstream.pool import UpstreamPool
from bridge.upstream.sharding import configured_symbols
from bridge.upstream.subscriptions import Subscriptions
from bridge.upstream.symbols import SymbolBook

log = logging.getLogger("aleno_bridge.app")

GC_THRESHOLDS: Final = (50_000, 50, 100)

def tune_gc() -> None:
    """Tune the cyclic garbage collector for the hot path (called by :func:`serve`).

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
    every other sink is built from its configured driver. ``with_source=False``
    builds no upstream client (events come through :meth:`ingest`). ``http=False``
    keeps :meth:`run` from serving the HTTP endpoints even when the configuration
    enables them.

    Error texts the bridge shows (``/readyz``) are redacted of the settings' secrets
    by the bridge's own :attr:`redact`.
    """

    def __init__(
        self,
        settings: Settings,
        sinks: Mapping[str, Sink[Any]] | None = None,
        with_source: bool = True,
        *,
        http: bool = True,
    ) -> None:
        self.settings = settings
        cfg = settings.config
        self.redact = Redactor(settings.secrets())
        self.serves_http = http and cfg.http.enabled
        #: ``False``: no listener at all, not even the control listener (tests, embedding)
        self._http_allowed = http
        self.metrics = Metrics()
        self.normalizer = Normalizer(source=cfg.source.endpoint,
                                     max_clock_skew_s=cfg.source.max_clock_skew_s,
                                     max_record_age_s=cfg.source.max_record_age_s)
        workers: dict[str, SinkWorker] = {
            name: SinkWorker(spec, (sinks or {}).get(name), self.metrics.observe_publish)
            for name, spec in settings.sinks.items()
        }
        link_dead_letters(settings, workers)
        router = Router(settings.routes, workers)
        #: upstream payloads waiting for the dispatcher, bounded, shed when full
        self.intake = Intake(cfg.intake_max_events, self.normalizer, self.metrics,
                             self._sinks_full)
        #: the symbol set: wanted, pinned or leased, placed on the keys' connections
        self.symbols: SymbolBook | None = None
        #: the last value of every symbol and the status events (``ai.aleno.status.v1``)
        self.market = MarketState(
            self.intake.ingest,
            stale_after_s=cfg.source.symbol_stale_after_s,
            update_interval_s=cfg.source.update_interval_s,
            source=cfg.source.endpoint,
            wanted=self._wanted,
            damping=Damping(cfg.source.status_damping.max_events,
                            cfg.source.status_damping.window_s),
            clock=self.normalizer.now_ms,
            # the router (replaced by a reload: read it when called) forgets them too
            on_forget=lambda kind, symbols: self.router.forget(kind, symbols),
        )
        self.last_values = self.market.values
        #: the upstream connections (one per API key) and the symbols they carry
        self.source: UpstreamPool | None = None
        #: the desired symbol set: pinned by the configuration, or leased by consumers
        self.subscriptions: Subscriptions | None = None
        if with_source:
            keys = settings.api_keys or tuple(upstream_keys(cfg.source, settings.api_key))
            # a symbol that leaves the subscribed set (lease end, reload, a move to
            # another key's connection) is forgotten at once, even when it comes back
            # within the same step: no false gap or stale for a deliberate unsubscribe
            self.symbols = SymbolBook(configured_symbols(cfg.source),
                                      on_change=self.market.sync_wanted)
            several = len(keys) > 1
            self.source = UpstreamPool(
                cfg.source, keys, self.intake.on_payload, self.normalizer.reject,
                symbols=self.symbols,
                on_link=None if several else self.market.link,
                on_connection_link=(lambda name, up, cause: self.market.link(up, cause, name))
                if several else None,
                on_connection_retired=self.market.retire if several else None)
            self.subscriptions = Subscriptions(self.source, cfg.source.leases)
        #: the OHLC bars (``bars``), finalized beside the data path, kept with the last values
        bars = None if cfg.bars is None else BarClock.of(
            cfg.bars, self.market, self.intake.ingest, self.last_values, cfg.source.endpoint)
        if bars is not None:
            self.metrics.attach_bars(bars.builder.counts)
        #: routes the intake to the sink workers; holds them and the router
        self.dispatcher = Dispatcher(self.intake, self.normalizer, self.market, workers,
                                     router, self._wanted, bars)
        #: applies reloads, one at a time, and keeps their account
        self._reloader = Reloader(self)
        self._stale_watch: asyncio.Task[None] | None = None
        #: the control surface (``/v1/`` on the HTTP server and the NATS service)
        self.control: Control | None = Control(self.last_values, lambda: self.settings,
                                               self.subscriptions)
        self.http_port: int | None = None
        #: the control listener's port (``control.http``), once it listens
        self.control_port: int | None = None
        self.started_at = time.time()
        self.metrics.attach(self.snapshot)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        sinks: Mapping[str, Sink[Any]] | None = None,
        http: bool = True,
    ) -> Bridge:
        """The bridge the settings describe, with its source (see the class for the
        options): what ``run``, ``demo`` and ``tap`` build and hand to :func:`serve`."""
        return cls(settings, sinks, http=http)

    # -- data path (bridge.pipeline.intake, bridge.pipeline.dispatcher) ----------

    @property
    def workers(self) -> dict[str, SinkWorker]:
        """The sink workers by sink name (a reload replaces the mapping)."""
        return self.dispatcher.workers

    @property
    def router(self) -> Router:
        """The router (a reload replaces it)."""
        return self.dispatcher.router

    def on_payload(self, event_name: str, payload: Any) -> None:
        """Queue one upstream payload for the dispatcher (see
        :meth:`~bridge.pipeline.intake.Intake.on_payload`)."""
        self.intake.on_payload(event_name, payload)

    def ingest(self, events: list[Event]) -> None:
        """Queue ready-made ``events`` (one upstream batch) for the dispatcher, under
        the same rules as an upstream payload."""
        self.intake.ingest(events)

    async def flush_intake(self) -> None:
        """Wait until every queued upstream batch has been routed (for tests and drain)."""
        await self.intake.flush()

    def add_tap(self, tap: Tap) -> None:
        """Call ``tap`` with every event, in upstream order, before it is routed."""
        self.dispatcher.taps.append(tap)

    def destinations(self, kind: str, symbol: str) -> tuple[Destination, ...]:
        """Where the events of (kind, symbol) go: route, sink, topic and key."""
        return tuple(
            Destination(hit.route, t.worker.name, t.topic, t.key)
            for hit in self.router.hits(kind, symbol)
            for t in hit.targets
        )

    def _wanted(self) -> Mapping[str, frozenset[str]] | None:
        return self.symbols.wanted if self.symbols is not None else None

    def _sinks_full(self) -> list[str]:
        return [w.name for w in self.workers.values() if w.saturated or w.blocked]

    @property
    def pipeline_dropped(self) -> dict[str, int]:
        """Events dropped between the receive loop and the router, by reason
        (``intake_full``, ``shutdown``, ``sink_removed``)."""
        return self.intake.dropped

    @property
    def intake_events(self) -> int:
        """The events the intake holds, queued or being routed."""
        return self.intake.events

    @property
    def intake_max_events(self) -> int:
        return self.intake.max_events

    @property
    def queued_events(self) -> int:
        """The events of the batches not yet started (``intake_max_events`` bounds these)."""
        return self.intake.queued_events

    @property
    def shed_payloads(self) -> int:
        return self.intake.shed_payloads

    @property
    def _intake(self) -> deque[Batch]:
        return self.intake.batches

    @property
    def overload_clear_s(self) -> float:
        """Seconds without shedding after which an overloaded bridge has recovered."""
        return self.intake.overload_clear_s

    @overload_clear_s.setter
    def overload_clear_s(self, seconds: float) -> None:
        self.intake.overload_clear_s = seconds

    # -- reload (bridge.config.reload.Reloader) ------------------------------------

    async def reload_file(self, path: str, text: str | None = None) -> ReloadOutcome:
        """Read, validate and apply the configuration file at ``path`` (SIGHUP and the
        file watch call this), or ``text``, its content as the watch saw it settle; see
        :mod:`bridge.config.reload`.

        The file is read (only a regular file, bounded) and parsed in a worker thread:
        2,000 symbols take a few tenths of a second to validate, which the data path's
        loop must not wait for.
        """
        return await self._reloader.reload_file(path, text)

    async def reload(self, new: Settings) -> ReloadOutcome:
        """Apply ``new`` to the running bridge, or refuse it whole (see
        :mod:`bridge.config.reload`). Reloads run one at a time; none is applied once the
        shutdown began (it would start sinks nothing stops)."""
        return await self._reloader.reload(new)

    @property
    def reloads(self) -> dict[str, int]:
        """Configuration reloads, by result (``aleno_bridge_config_reloads_total``)."""
        return self._reloader.counts

    @property
    def _retiring(self) -> set[asyncio.Task[Any]]:
        return self._reloader.retiring

    @property
    def retired(self) -> RetiredSinks:
        """The sinks reloads replaced or removed: their counters and what they lost."""
        return self._reloader.retired

    # -- read model -------------------------------------------------------------

    def snapshot(self) -> BridgeSnapshot:
        """The state of every part now (metrics, ``/readyz``, ``top`` and ``tap`` read it)."""
        return BridgeSnapshot(
            upstream=self.source.snapshot() if self.source is not None else None,
            normalizer=self.normalizer.snapshot(),
            router=self.router.snapshot(),
            intake=self.intake.snapshot(),
            overload=self.intake.overload(),
            # a sink's counters include those of the workers reloads replaced; a
            # removed sink's stay apart (metrics only, never readiness)
            sinks=tuple(self.retired.merged(w.snapshot()) for w in self.workers.values()),
            retired_sinks=self.retired.orphans(self.workers),
            market=self.market.snapshot(),
            connections=(self.source.connection_snapshots()
                         if self.source is not None else ()),
            reloads=frozen_counts(self.reloads),
            symbols=(self.subscriptions.snapshot()
                     if self.subscriptions is not None else None),
        )

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the bridge is ready, and the checks behind it (``/readyz``)."""
        return readiness(self.snapshot(), self.redact)

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of this bridge (``/metrics``)."""
        return self.metrics.registry

    @property
    def http_config(self) -> HttpConfig:
        return self.settings.config.http

    def alive(self) -> bool:
        return self.dispatcher.alive()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the sink workers and the dispatcher (not the source)."""
        for w in self.workers.values():
            w.start()
        self.dispatcher.start()
        self._stale_watch = asyncio.create_task(self._watch_stale(), name="stale-watch")

    async def _watch_stale(self) -> None:
        """Look for symbols gone silent (``stale`` status events), a few times per
        ``symbol_stale_after_s`` and at most every :data:`STALE_SCAN_MAX_S`."""
        period = min(STALE_SCAN_MAX_S, self.market.stale_after_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self.market.scan_stale()
            except Exception:  # the watch must outlive a bug in one scan
                log.exception("stale watch failed")

    async def run(self, stop: asyncio.Event) -> dict[str, int]:
        """Run until ``stop`` is set, then drain; return undelivered events per sink.

        Raises :class:`~bridge.upstream.client.SourceError` when the upstream gives up (bad key).
        """
        await self.start()
        nats_control: NatsControl | None = None
        control_cfg = self.settings.config.control.nats
        if self.control is not None:
            self.control.home = asyncio.get_running_loop()
        # the HTTP server and the NATS control service answer on a thread of their own,
        # beside the data path (see bridge.control.thread)
        settings = self.settings
        listener = settings.control_http if self._http_allowed else None
        thread: ControlLoop | None = None
        if self.serves_http or listener is not None or (
                control_cfg is not None and self.control is not None):
            thread = ControlLoop()
            await thread.start()
        http = control_http = None
        guard = settings.guard("http")  # one for /v1 wherever it is served
        try:
            if self.serves_http:
                on_probes = settings.v1_on_probes
                if on_probes and self.control is not None:
                    log.warning("http: /v1 is served on the probes' listener (%s:%d); this is "
                                "deprecated: set control.http (e.g. {host: 127.0.0.1, port: "
                                "9465}) to serve it on a listener of its own",
                                settings.config.http.host, settings.config.http.port)
                http = await serve_http(
                    self, thread, guard=guard,
                    v1="serve" if on_probes else "moved" if listener is not None else "none",
                    control_http=listener)
            if listener is not None:
                control_http = await serve_control(self, listener, guard,
                                                   thread)
            if control_cfg is not None and self.control is not None and thread is not None:
                nats_control = await thread.run(start_nats_control(
                    self.control, control_cfg, self.redact, settings.guard("nats")))
        except BaseException:
            for server in (http, control_http):
                if server is not None:
                    await server.cleanup()
            if thread is not None:
                await thread.stop()
            raise
        if http is not None:
            self.http_port = http.port
        if control_http is not None:
            self.control_port = control_http.port
        tasks: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait(), name="stop")}
        source_task = None
        expiry: asyncio.Task[None] | None = None
        if self.source is not None:
            source_task = asyncio.create_task(self.source.run(), name="source")
            tasks.add(source_task)
        if self.subscriptions is not None:
            expiry = asyncio.create_task(self.subscriptions.run(stop), name="leases")
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if t is not source_task:
                    t.cancel()
            if expiry is not None:
                expiry.cancel()
            lost = await self.shutdown(source_task)
            if nats_control is not None and thread is not None:
                await thread.run(nats_control.close())
            for server in (http, control_http):
                if server is not None:
                    await server.cleanup()
            if thread is not None:
                await thread.stop()
        if source_task is not None and source_task.done() and not source_task.cancelled():
            exc = source_task.exception()
            if exc is not None:
                raise exc
        return lost


    async def shutdown(self, source_task: asyncio.Task[None] | None = None) -> dict[str, int]:
        """Stop the source, route what was received, drain every sink and close them,
        all within ``shutdown_timeout_s``; log what could not be delivered.

        One deadline is shared by every step, in order: the source stops (its task is
        cancelled if it does not end in time), the intake is routed, the sinks deliver
        what they hold, and they are closed (the last second, or a quarter of the
        budget if smaller, is kept for closing). A ``block`` sink that cannot take the
        intake's events delays only until that deadline: the rest of the intake is
        then counted as ``pipeline_dropped{reason="shutdown"}``, and what a sink could
        not deliver as its ``dropped{reason="shutdown"}``. Sinks a reload replaced or
        removed and still draining get the same deadline; the undelivered events
        returned (and logged) include theirs, by sink name.
        """
        deadline = Deadline(self.settings.config.shutdown_timeout_s)
        self._reloader.shutting_down = True
        if self._stale_watch is not None:
            self._stale_watch.cancel()
        await stop_source(self.source, source_task, deadline)
        await self.dispatcher.stop(deadline)
        lost = await stop_sinks(self.workers, deadline)
        await self._reloader.finish(deadline)  # sinks a reload replaced, still draining
        log_drained(self.workers, lost)
        # and what the sinks reloads replaced or removed could not deliver
        retired_lost = dict(self.retired.undelivered)
        for name, n in retired_lost.items():
            lost[name] = lost.get(name, 0) + n
        sinks = [*(self.retired.merged(w.snapshot()) for w in self.workers.values()),
                 *self.retired.orphans(self.workers)]
        log_shutdown(deadline, lost, retired_lost, self.pipeline_dropped, self.normalizer,
                     self.router, sinks)
        return lost


def install_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT and SIGTERM (where the loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


def _watch_config(bridge: Bridge, path: str, stop: asyncio.Event
                  ) -> tuple[ReloadQueue, ConfigWatcher | None]:
    """SIGHUP reloads ``path``; so does a change of it when ``reload.watch`` is on.

    Both go through one :class:`~bridge.config.reload.ReloadQueue`: a reload runs at a time
    and what is asked meanwhile is merged into one that follows, so a burst of
    signals during a reload costs one more reload, not one per signal. Nothing is
    reloaded once ``stop`` is set.
    """
    loop = asyncio.get_running_loop()
    queue = ReloadQueue(lambda text: bridge.reload_file(path, text))

    def hangup() -> None:
        if stop.is_set():
            return
        asked = queue.request(None)
        if asked == "started":
            log.info("SIGHUP: reloading %s", path)
        elif asked == "queued":
            log.info("SIGHUP: a reload is running; %s is reloaded once more after it "
                     "(signals meanwhile are merged into that one)", path)
        else:
            log.debug("SIGHUP: merged into the reload already queued")

    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, hangup)
    if not bridge.settings.config.reload.watch:
        return queue, None

    def changed(text: str | None) -> None:
        if not stop.is_set():
            log.info("%s changed: reloading", path)
            queue.request(text)

    watcher = ConfigWatcher(Path(path), changed, lambda: bridge.settings.config.reload)
    watcher.start()
    return queue, watcher


async def serve(bridge: Bridge, stop: asyncio.Event | None = None,
                config_path: str | None = None) -> dict[str, int]:
    """Run ``bridge`` until SIGINT/SIGTERM (or ``stop`` is set), then drain it.

    With ``config_path`` (``aleno-bridge run``), SIGHUP reloads that file and, unless
    ``reload.watch`` is off, so does a change of it (see :mod:`bridge.config.reload`).

    Serves the HTTP endpoints when the bridge does (:class:`Bridge`'s ``http``), tunes
    the garbage collector for the hot path and logs the start and the end. Returns
    the events each sink could not deliver; raises
    :class:`~bridge.upstream.client.SourceError` when the upstream gives up.
    """
    if stop is None:
        stop = asyncio.Event()
    install_signals(stop)
    tune_gc()
    log.info("aleno-bridge %s starting: %d sink(s), %d route(s)", __version__,
             len(bridge.workers), len(bridge.settings.routes))
    watch = None
    if config_path is not None:
        watch = _watch_config(bridge, config_path, stop)
    try:
        lost = await bridge.run(stop)
    finally:
        if watch is not None:
            queue, watcher = watch
            if watcher is not None:
                await watcher.close()
            await queue.close()
    log.info("aleno-bridge stopped; undelivered events: %s", sum(lost.values()),
             extra={"undelivered": lost})
    return lost
