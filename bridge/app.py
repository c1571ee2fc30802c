"""Wiring and lifecycle of one bridge process.

Flow of one upstream payload::

    AlenoSource (receive loop) -> Bridge.on_payload: Normalizer -> intake queue
      -> dispatcher task: Router.dispatch -> SinkWorker.offer (per sink buffer)
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
``docs/operations.md``).

Shutdown has one deadline, ``shutdown_timeout_s`` from the stop signal, shared by
every step: stopping the source, routing what the intake holds, draining the sinks
and closing them (see :meth:`Bridge.shutdown`). Nothing is lost uncounted: events
still in the intake at the deadline are counted as
``aleno_bridge_pipeline_dropped_total{reason="shutdown"}``, events held by a sink as
``aleno_bridge_sink_events_dropped_total{reason="shutdown"}``, and events held by a
sink a reload replaced or removed as ``{reason="sink_removed"}`` in both (see
:mod:`bridge.config.reload`).

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry

from bridge import __version__
from bridge.config import ConfigError, HttpConfig, Settings
from bridge.config.reload import (
    SINK_REMOVED,
    ConfigWatcher,
    ReloadOutcome,
    ReloadQueue,
    RetiredSinks,
    load_settings,
    pinned_changed,
    restart_needed,
    same_sink,
    settings_changed,
)
from bridge.config.settings import upstream_keys
from bridge.control.core import Control, NatsControl, start_nats_control
from bridge.control.http import serve_control, serve_http
from bridge.control.thread import ControlLoop
from bridge.core.envelope import Event
from bridge.core.kinds import PRICE_KINDS, TICKER_EVENT
from bridge.core.logs import Redactor
from bridge.core.metrics import Metrics
from bridge.core.state import (
    BridgeSnapshot,
    Destination,
    IntakeSnapshot,
    OverloadSnapshot,
    frozen_counts,
    readiness,
)
from bridge.pipeline.market import STALE_SCAN_MAX_S, STATUS_KIND, Damping, MarketState
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks import Sink
from bridge.sinks.worker import DISPATCH_CHUNK, SinkWorker
from bridge.upstream.pool import UpstreamPool
from bridge.upstream.sharding import configured_symbols
from bridge.upstream.subscriptions import Subscriptions

log = logging.getLogger("aleno_bridge.app")

GC_THRESHOLDS: Final = (50_000, 50, 100)
#: seconds without shedding after which an overloaded bridge counts as recovered
OVERLOAD_CLEAR_S: Final = 5.0
#: the longest the dispatcher waits for a saturated sink before it looks again
ROOM_POLL_S: Final = 0.05
#: what a retired sink still gets to close when the shutdown's deadline cuts its drain
RETIRE_CUT_S: Final = 0.2

#: sees every event before it is routed (``aleno-bridge tap``, tests)
Tap = Callable[[Event], None]


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


class _Batch:
    """One upstream payload in the intake: its records, not yet validated (``events``
    is ``None``), or events ingested ready-made (:meth:`Bridge.ingest`)."""

    __slots__ = ("events", "kind", "received_ms", "records", "size")

    def __init__(self, kind: str, records: list[Any] | None, events: list[Event] | None,
                 received_ms: int, size: int) -> None:
        self.kind = kind
        self.records = records
        self.events = events
        self.received_ms = received_ms
        self.size = size


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
        self.workers: dict[str, SinkWorker] = {
            name: SinkWorker(spec, (sinks or {}).get(name), self.metrics.observe_publish)
            for name, spec in settings.sinks.items()
        }
        _link_dead_letters(settings, self.workers)
        self.router: Router = Router(settings.routes, self.workers)
        #: configuration reloads, by result (``aleno_bridge_config_reloads_total``)
        self.reloads: dict[str, int] = {}
        self._reload_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[Any]] = set()
        #: the sinks reloads replaced or removed: their counters and what they lost
        self.retired = RetiredSinks()
        #: set when :meth:`shutdown` begins: no reload is applied after that
        self._shutting_down = False
        #: the upstream connections (one per API key) and the symbols they carry
        self.source: UpstreamPool | None = None
        #: the desired symbol set: pinned by the configuration, or leased by consumers
        self.subscriptions: Subscriptions | None = None
        if with_source:
            keys = settings.api_keys or tuple(upstream_keys(cfg.source, settings.api_key))
            self.source = UpstreamPool(cfg.source, keys, self.on_payload,
                                       self.normalizer.reject)
            self.subscriptions = Subscriptions(
                self.source, cfg.source.leases,
                pinned={k: sorted(self.source.wanted[k]) for k in PRICE_KINDS})
        #: the last value of every symbol and the status events (``ai.aleno.status.v1``)
        self.market = MarketState(
            self.ingest,
            stale_after_s=cfg.source.symbol_stale_after_s,
            update_interval_s=cfg.source.update_interval_s,
            source=cfg.source.endpoint,
            wanted=self._wanted,
            damping=Damping(cfg.source.status_damping.max_events,
                            cfg.source.status_damping.window_s),
            clock=self.normalizer.now_ms,
        )
        self.last_values = self.market.values
        # the router (replaced by a reload: read it when called) forgets them too
        self.market.on_forget = lambda kind, symbols: self.router.forget(kind, symbols)
        if self.source is not None:
            # a symbol that leaves the subscribed set (lease end, reload, a move to
            # another key's connection) is forgotten at once, even when it comes back
            # within the same step: no false gap or stale for a deliberate unsubscribe
            for src in self.source.sources:
                src.on_wanted = _then(src.on_wanted, self.market.sync_wanted)
            if len(self.source.sources) > 1:
                self.source.on_connection_link = (
                    lambda name, up, cause: self.market.link(up, cause, name))
                self.source.on_connection_retired = self.market.retire
            else:
                self.source.on_link = self.market.link
        self._stale_watch: asyncio.Task[None] | None = None
        #: the control surface (``/v1/`` on the HTTP server and the NATS service)
        self.control: Control | None = Control(self)
        #: events dropped between the receive loop and the router, by reason
        #: (``intake_full``, ``shutdown``)
        self.pipeline_dropped: dict[str, int] = {}
        self.http_port: int | None = None
        #: the control listener's port (``control.http``), once it listens
        self.control_port: int | None = None
        #: upstream batches waiting for the dispatcher, and the events they hold
        #: (including the not yet routed rest of the batch being dispatched)
        self.intake_max_events: int = cfg.intake_max_events
        self.intake_events = 0
        #: of those, the events of the batches not yet started: ``intake_max_events``
        #: bounds these (the batch being dispatched is held besides, so the intake
        #: holds at most twice as many events)
        self.queued_events = 0
        self._intake: deque[_Batch] = deque()
        #: overload: since when (monotonic) the bridge sheds, the last shed, and totals
        self.overload_clear_s = OVERLOAD_CLEAR_S
        self._overloaded_since: float | None = None
        self._last_shed = 0.0
        self.shed_payloads = 0
        self._episode_shed = [0, 0]  # payloads, events shed in the current episode
        #: the sinks whose fullness holds the dispatcher back (not ``block``: those
        #: make it wait already)
        self._elastic = [w for w in self.workers.values() if w.policy != "block"]
        self._intake_ready = asyncio.Event()
        self._intake_idle = asyncio.Event()
        self._intake_idle.set()
        self._closing = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._taps: list[Tap] = []
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

    # -- data path -------------------------------------------------------------

    def on_payload(self, event_name: str, payload: Any) -> None:
        """Queue one upstream payload for the dispatcher (called in the receive loop).

        Only what every payload needs is done here: the array is checked and counted,
        the upstream lag observed. Validation and encoding happen in the dispatcher,
        so a payload shed under overload costs nothing more (see :meth:`_admit`).
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
            self.metrics.lag.labels(kind).observe(max(0.0, (received - sent) / 1000.0))
        self._admit(_Batch(kind, records, None, received, len(records)))

    def _wanted(self) -> Mapping[str, frozenset[str]] | None:
        return self.source.wanted if self.source is not None else None

    def ingest(self, events: list[Event]) -> None:
        """Queue ready-made ``events`` (one upstream batch) for the dispatcher, under
        the same rules as an upstream payload."""
        if events:
            self._admit(_Batch(events[0].kind, None, events, events[0].received_ms,
                               len(events)))

    def _admit(self, batch: _Batch) -> None:
        """Queue ``batch``; when the intake cannot hold it, shed the *oldest* queued
        batches, whole, until it fits (stale prices go first). A batch bigger than the
        whole intake is taken whole once nothing else is queued: cutting it would leave
        the symbols at its end unpublished for good (one upstream tick of every symbol
        can exceed ``intake_max_events``; the upstream frame limit bounds its size).

        Shed events are counted as ``pipeline_dropped{reason="intake_full"}``. The batch
        being dispatched is never shed: its rest is routed, so every symbol of an
        upstream snapshot keeps being published under overload.
        """
        if self._closing:
            self._pipeline_drop("shutdown", batch.size)
            return
        intake = self._intake
        shed_payloads = shed_events = 0
        room = self.intake_max_events - self.queued_events
        while batch.size > room and intake:
            old = intake.popleft()
            shed_payloads += 1
            shed_events += old.size
            self.intake_events -= old.size
            self.queued_events -= old.size
            room += old.size
        if shed_events:
            self._shed(shed_payloads, shed_events)
        elif self._overloaded_since is not None:
            self._check_recovered()
        self.intake_events += batch.size
        self.queued_events += batch.size
        intake.append(batch)
        self._intake_idle.clear()
        self._intake_ready.set()

    def _shed(self, payloads: int, events: int) -> None:
        self._pipeline_drop("intake_full", events)
        self.shed_payloads += payloads
        self._last_shed = time.monotonic()
        self._episode_shed[0] += payloads
        self._episode_shed[1] += events
        if self._overloaded_since is None:
            self._overloaded_since = self._last_shed
            saturated = [w.name for w in self.workers.values()
                         if w.saturated or w.blocked]
            log.warning(
                "overloaded: the pipeline is behind the upstream; shedding the oldest "
                "upstream payloads before validating them (intake %d/%d events; sinks "
                "full: %s); counted as aleno_bridge_pipeline_dropped_total"
                "{reason=\"intake_full\"}",
                self.intake_events, self.intake_max_events, ", ".join(saturated) or "none",
                extra={"overloaded": True, "sinks_full": saturated},
            )

    def _check_recovered(self) -> None:
        since = self._overloaded_since
        if since is None:
            return
        now = time.monotonic()
        if now - self._last_shed < self.overload_clear_s:
            return
        payloads, events = self._episode_shed
        log.info(
            "recovered from overload after %.1fs: shed %d upstream payload(s), %d event(s)",
            self._last_shed - since, payloads, events,
            extra={"overloaded": False, "shed_payloads": payloads, "shed_events": events},
        )
        self._overloaded_since = None
        self._episode_shed = [0, 0]

    def _pipeline_drop(self, reason: str, n: int) -> None:
        if n > 0:
            self.pipeline_dropped[reason] = self.pipeline_dropped.get(reason, 0) + n

    def add_tap(self, tap: Tap) -> None:
        """Call ``tap`` with every event, in upstream order, before it is routed."""
        self._taps.append(tap)

    def destinations(self, kind: str, symbol: str) -> tuple[Destination, ...]:
        """Where the events of (kind, symbol) go: route, sink, topic and key."""
        return tuple(
            Destination(hit.route, t.worker.name, t.topic, t.key)
            for hit in self.router.hits(kind, symbol)
            for t in hit.targets
        )

    def _saturated(self) -> SinkWorker | None:
        """A sink the dispatcher waits for: when every connected non-``block`` sink is
        :attr:`~bridge.sinks.worker.SinkWorker.saturated`, routing more would only make them
        drop what they hold (``buffer_full``), after paying for its validation and
        encoding. One sink with room (or none connected) lets the dispatcher go on."""
        found = None
        for w in self._elastic:
            if w.connected:
                if not w.saturated:
                    return None
                found = w
        return found

    async def _dispatch_forever(self) -> None:
        """Route the intake in order until :meth:`shutdown` closes it; what is left
        then (or when this task is cancelled) is counted as dropped (``shutdown``).

        A batch is validated, encoded and routed in chunks of
        :data:`~bridge.sinks.worker.DISPATCH_CHUNK` records; before each chunk the dispatcher
        waits while every connected sink is saturated, and after each it yields to the
        event loop, so the sink workers and the Socket.IO reader keep their share of
        the CPU. Meanwhile newer payloads queue up in the intake, where the oldest are
        shed whole when it is full (:meth:`_admit`).
        """
        intake = self._intake
        observe = self.market.observe
        while True:
            if not intake:
                self._intake_idle.set()
                if self._overloaded_since is not None:
                    self._check_recovered()
                if self._closing:
                    return
                self._intake_ready.clear()
                await self._intake_ready.wait()
                continue
            if self._closing:
                self._discard_intake()
                return
            batch = intake.popleft()
            size = batch.size
            self.queued_events -= size
            done = 0  # records of the batch validated (and routed, or being routed)
            routed_all = True
            try:
                while done < size:
                    while (full := self._saturated()) is not None and not self._closing:
                        await full.wait_room(ROOM_POLL_S)
                    if self._closing:
                        routed_all = False
                        break
                    end = min(size, done + DISPATCH_CHUNK)
                    if batch.records is not None:
                        wanted = self._wanted()
                        events = self.normalizer.validate(
                            batch.kind, batch.records[done:end], batch.received_ms,
                            wanted[batch.kind] if wanted else None)
                    else:
                        assert batch.events is not None
                        events = batch.events[done:end]
                    chunk = end - done
                    done = end
                    if batch.kind != STATUS_KIND:
                        # the last values, and the status events they cause (fresh, gap)
                        statuses = observe(batch.kind, events)
                        if statuses:
                            events = events + statuses
                    for tap in self._taps:
                        for ev in events:
                            tap(ev)
                    routed = 0
                    # read per chunk: a reload swaps the router between two chunks
                    dispatch = self.router.dispatch
                    try:
                        for ev in events:
                            waiters = dispatch(ev)
                            routed += 1
                            if waiters:
                                for waiter in waiters:
                                    await waiter
                                if self._closing:
                                    break
                    except asyncio.CancelledError:
                        # the event being offered may not have reached every sink
                        routed -= 1
                        raise
                    finally:
                        self.intake_events -= chunk
                        if routed < len(events):
                            self._pipeline_drop("shutdown", len(events) - routed)
                            routed_all = False
                    if not routed_all:
                        break
                    await asyncio.sleep(0)  # the sinks and the reader get their turn
            finally:
                rest = size - done
                if rest:
                    self.intake_events -= rest
                    self._pipeline_drop("shutdown", rest)

    def _discard_intake(self) -> None:
        n = sum(batch.size for batch in self._intake)
        self._intake.clear()
        self.queued_events = 0
        self.intake_events -= n
        self._pipeline_drop("shutdown", n)
        self._intake_idle.set()

    async def flush_intake(self) -> None:
        """Wait until every queued upstream batch has been routed (for tests and drain)."""
        await self._intake_idle.wait()

    # -- reload -------------------------------------------------------------------

    async def reload_file(self, path: str, text: str | None = None) -> ReloadOutcome:
        """Read, validate and apply the configuration file at ``path`` (SIGHUP and the
        file watch call this), or ``text``, its content as the watch saw it settle; see
        :mod:`bridge.config.reload`.

        The file is read (only a regular file, bounded) and parsed in a worker thread:
        2,000 symbols take a few tenths of a second to validate, which the data path's
        loop must not wait for.
        """
        try:
            new = await asyncio.to_thread(load_settings, path, text)
        except ConfigError as exc:
            self._count_reload("invalid")
            log.error("configuration reload refused, the running configuration stays: %s",
                      self.redact(str(exc)), extra={"reload": "invalid",
                                                    "problems": exc.problems})
            return ReloadOutcome("invalid", message=str(exc))
        return await self.reload(new)

    async def reload(self, new: Settings) -> ReloadOutcome:
        """Apply ``new`` to the running bridge, or refuse it whole (see
        :mod:`bridge.config.reload`). Reloads run one at a time; none is applied once the
        shutdown began (it would start sinks nothing stops)."""
        async with self._reload_lock:
            if self._shutting_down:
                msg = "configuration reload refused: the bridge is shutting down"
                log.warning(msg, extra={"reload": "refused"})
                self._count_reload("refused")
                return ReloadOutcome("refused", message=msg)
            try:
                outcome = await self._reload(new)
            except Exception as exc:
                log.exception("configuration reload failed")
                outcome = ReloadOutcome("failed", message=f"{type(exc).__name__}: {exc}")
            self._count_reload(outcome.result)
            return outcome

    def _count_reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    async def _reload(self, new: Settings) -> ReloadOutcome:
        old = self.settings
        blocked = restart_needed(old, new)
        if blocked:
            msg = ("configuration reload refused: " + ", ".join(blocked)
                   + " changed, which needs a restart; the running configuration stays")
            log.error(msg, extra={"reload": "refused", "needs_restart": blocked})
            return ReloadOutcome("refused", blocked, msg)
        changes: list[str] = []
        # secrets of the old sinks stay redacted while those drain
        self.redact = Redactor([*old.secrets(), *new.secrets()])
        # sinks: unchanged ones stay, new and changed ones are built and started first
        workers: dict[str, SinkWorker] = {}
        retired: list[SinkWorker] = []
        for name, spec in new.sinks.items():
            current = self.workers.get(name)
            if current is not None and same_sink(current.spec, spec):
                workers[name] = current
                continue
            workers[name] = SinkWorker(spec, None, self.metrics.observe_publish)
            workers[name].start()
            changes.append(f"sink {name} " + ("replaced" if current is not None else "added"))
            if current is not None:
                retired.append(current)
        for name, current in self.workers.items():
            if name not in new.sinks:
                retired.append(current)
                changes.append(f"sink {name} removed")
        _link_dead_letters(new, workers)
        router = Router(new.routes, workers)
        if [r.model_dump() for r in old.routes] != [r.model_dump() for r in new.routes]:
            changes.append("routes")
        changes += settings_changed(old, new)
        # the swap: the dispatcher reads the router once per chunk
        self.workers = workers
        self._elastic = [w for w in workers.values() if w.policy != "block"]
        self.router = router
        self.settings = new
        self.market.stale_after_s = new.config.source.symbol_stale_after_s
        self.market.set_interval(new.config.source.update_interval_s)
        damping = new.config.source.status_damping
        self.market.damping.configure(damping.max_events, damping.window_s)
        self.normalizer.set_time_bounds(new.config.source.max_clock_skew_s,
                                        new.config.source.max_record_age_s)
        for w in retired:
            self._retire(w)
        if self.subscriptions is not None:
            self.subscriptions.config = new.config.source.leases
        if pinned_changed(old.config, new.config):
            changes += await self._apply_symbols(new)
        if not changes:
            log.info("configuration reloaded: nothing changed", extra={"reload": "unchanged"})
            return ReloadOutcome("unchanged")
        log.info("configuration reloaded: %s", "; ".join(changes),
                 extra={"reload": "applied", "changes": changes})
        return ReloadOutcome("applied", changes)

    async def _apply_symbols(self, new: Settings) -> list[str]:
        """Subscribe and unsubscribe the configured symbols that changed, on the live
        connections (no reconnect); a symbol a lease still holds stays subscribed."""
        subs = self.subscriptions
        if subs is None:
            return []
        diff = await subs.set_pinned(configured_symbols(new.config.source))
        out: list[str] = []
        for kind in PRICE_KINDS:
            added, removed = diff.added.get(kind, {}), diff.removed.get(kind, {})
            if added:
                took = sum(1 for r in added.values() if r.held)
                out.append(f"+{len(added)} {kind}(s)"
                           + (f" ({len(added) - took} refused)" if took < len(added) else ""))
            if removed:
                # (the market forgot them already: the sources tell it what leaves)
                out.append(f"-{len(removed)} {kind}(s)")
        return out

    def _retire(self, worker: SinkWorker) -> None:
        """Drain and close a sink that a reload replaced or removed, in the background,
        within ``shutdown_timeout_s`` (or the shutdown's deadline, if sooner).

        Nothing it held vanishes: what it could not deliver (held at the deadline, or
        routed to it after the swap by the chunk being dispatched) is counted as its
        ``dropped{reason="sink_removed"}`` and as
        ``pipeline_dropped{reason="sink_removed"}``, and its counters stay in
        :attr:`retired` (``/metrics``, the shutdown's account) until the process ends.
        """
        why = "replaced" if worker.name in self.workers else "removed"
        self.retired.add(worker)
        worker.begin_stop(SINK_REMOVED)

        async def retire() -> None:
            try:
                await worker.stop(self.settings.config.shutdown_timeout_s, SINK_REMOVED)
            except asyncio.CancelledError:
                # the shutdown's deadline came first: close now, count what is left
                with contextlib.suppress(Exception):
                    await worker.stop(RETIRE_CUT_S, SINK_REMOVED)
                raise
            finally:
                worker.discard()
                lost = self.retired.closed(worker)
                self._pipeline_drop(SINK_REMOVED, lost)
                if lost:
                    log.warning(
                        "sink %s (%s by a reload): %d event(s) not delivered before it was "
                        "closed; counted as aleno_bridge_pipeline_dropped_total"
                        "{reason=\"sink_removed\"}", worker.name, why, lost,
                        extra={"sink": worker.name, "undelivered": lost})
                else:
                    log.info("sink %s (%s by a reload) drained and closed", worker.name, why,
                             extra={"sink": worker.name})

        task = asyncio.create_task(retire(), name=f"retire-{worker.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- read model -------------------------------------------------------------

    def snapshot(self) -> BridgeSnapshot:
        """The state of every part now (metrics, ``/readyz``, ``top`` and ``tap`` read it)."""
        return BridgeSnapshot(
            upstream=self.source.snapshot() if self.source is not None else None,
            normalizer=self.normalizer.snapshot(),
            router=self.router.snapshot(),
            intake=IntakeSnapshot(self.intake_events, self.intake_max_events,
                                  frozen_counts(self.pipeline_dropped), len(self._intake)),
            overload=self._overload_snapshot(),
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

    def _overload_snapshot(self) -> OverloadSnapshot:
        self._check_recovered()
        since = self._overloaded_since
        now = time.monotonic()
        return OverloadSnapshot(
            overloaded=since is not None,
            seconds=None if since is None else now - since,
            seconds_since_shed=None if not self.shed_payloads else now - self._last_shed,
            shed_payloads=self.shed_payloads,
            shed_events=self.pipeline_dropped.get("intake_full", 0),
            sinks_full=tuple(w.name for w in self.workers.values() if w.saturated or w.blocked),
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
        return self._dispatcher is not None and not self._dispatcher.done()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the sink workers and the dispatcher (not the source)."""
        for w in self.workers.values():
            w.start()
        self._dispatcher = asyncio.create_task(self._dispatch_forever(), name="dispatcher")
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
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._shutting_down = True
        budget = self.settings.config.shutdown_timeout_s
        if self._stale_watch is not None:
            self._stale_watch.cancel()
        deadline = started + budget
        drain_until = deadline - min(1.0, budget / 4)

        def left(until: float = drain_until) -> float:
            return max(0.0, until - loop.time())

        if self.source is not None:
            self.source.stop()
        if source_task is not None and not source_task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(source_task), left())
            if not source_task.done():
                source_task.cancel()
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError,
                                         Exception):
                    await asyncio.wait_for(asyncio.shield(source_task),
                                           min(0.5, max(0.01, left(deadline))))
        dispatcher = self._dispatcher
        if dispatcher is not None and not dispatcher.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush_intake(), left())
        # from here on nothing new is routed: what the intake still holds is counted,
        # offers still waiting on a ``block`` sink are released and counted by it
        self._closing = True
        self._intake_ready.set()
        for w in self.workers.values():
            w.begin_stop()
        if dispatcher is not None and not dispatcher.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(dispatcher),
                                       min(0.5, max(0.01, left(deadline))))
            if not dispatcher.done():
                dispatcher.cancel()
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(dispatcher), 0.1)
        self._discard_intake()  # ingested after the dispatcher ended, if anything
        results = await asyncio.gather(*(w.stop(left(deadline)) for w in self.workers.values()))
        if self._retiring:  # sinks a reload replaced, still draining: same deadline
            retiring = set(self._retiring)
            _, late = await asyncio.wait(retiring, timeout=max(0.01, left(deadline)))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=0.5)
        lost = dict(zip(self.workers, results, strict=True))
        for name, n in lost.items():
            w = self.workers[name]
            if n:
                log.warning("sink %s: %d event(s) not delivered at shutdown", name, n,
                            extra={"sink": name, "undelivered": n})
            else:
                log.info("sink %s drained: %d event(s) published", name, w.stats.published,
                         extra={"sink": name, "published": w.stats.published})
        # and what the sinks reloads replaced or removed could not deliver
        retired_lost = dict(self.retired.undelivered)
        for name, n in retired_lost.items():
            lost[name] = lost.get(name, 0) + n
        intake_lost = self.pipeline_dropped.get("shutdown", 0)
        sinks = [*(self.retired.merged(w.snapshot()) for w in self.workers.values()),
                 *self.retired.orphans(self.workers)]
        log.info(
            "shutdown took %.2fs (budget %gs): %d event(s) not delivered by the sinks "
            "(%d by sinks a reload replaced or removed), %d left in the intake",
            loop.time() - started, budget, sum(lost.values()), sum(retired_lost.values()),
            intake_lost,
            extra={
                "shutdown_s": round(loop.time() - started, 3),
                "undelivered": lost,
                "pipeline_dropped": dict(self.pipeline_dropped),
                "events_received": dict(self.normalizer.received),
                "events_invalid": sum(self.normalizer.invalid.values()),
                "events_unrouted": self.router.unrouted,
                "events_filtered": sum(self.router.filtered.values()),
                # totals per sink name, over every worker reloads replaced or removed
                "sinks": {
                    s.name: {"offered": s.offered, "published": s.published,
                             "dropped": dict(s.dropped), "conflated": s.conflated,
                             "depth": s.depth}
                    for s in sinks
                },
            },
        )
        return lost


def _then(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    """``first`` (if any), then ``then``: a listener added behind one already set."""
    if first is None:
        return then

    def both() -> None:
        first()
        then()
    return both


def _link_dead_letters(settings: Settings, workers: Mapping[str, SinkWorker]) -> None:
    for name, spec in settings.sinks.items():
        dead_letter = spec.common.dead_letter
        workers[name].dead_letter = workers.get(dead_letter) if dead_letter else None


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
