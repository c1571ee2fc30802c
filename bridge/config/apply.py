"""A reload applied to a running bridge: what changes, what is kept, what retired sinks
still deliver.

:mod:`bridge.config.reload` decides *whether* a new file can be applied (what needs a
restart, what changed) and watches the file; this module applies it:
:class:`Reloader` swaps the sinks and routes, changes the symbol set on the open
upstream connections, and keeps the counters of the sink workers a reload replaced
or removed (:class:`RetiredSinks`) until the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bridge.config import ConfigError, Settings
from bridge.config.reload import (
    HOT_SOURCE_KEYS,
    RESULTS,
    RETIRE_CUT_S,
    SINK_REMOVED,
    ConfigWatcher,
    FileState,
    ReloadOutcome,
    ReloadQueue,
    file_digest,
    load_settings,
    pinned_changed,
    read_state,
    restart_needed,
    same_sink,
    settings_changed,
    symlink_chain,
    watched_dirs,
)
from bridge.core.kinds import PRICE_KINDS
from bridge.core.logs import Redactor
from bridge.core.state import SinkSnapshot, SinkState, frozen_counts
from bridge.pipeline.routing import Router
from bridge.sinks.worker import SinkWorker
from bridge.upstream.sharding import configured_symbols

if TYPE_CHECKING:
    from bridge.core.metrics import Metrics
    from bridge.pipeline.dispatcher import Dispatcher
    from bridge.pipeline.drain import Deadline
    from bridge.pipeline.market import MarketState
    from bridge.pipeline.normalize import Normalizer
    from bridge.upstream.subscriptions import Subscriptions

log = logging.getLogger("aleno_bridge.reload")
#: what applying a reload logs goes to the bridge's own log, as it always did
app_log = logging.getLogger("aleno_bridge.app")


# -- accounting ------------------------------------------------------------------------


def add_counts(a: SinkSnapshot, b: SinkSnapshot) -> SinkSnapshot:
    """``a`` with the counters (and the events held) of ``b`` added: one sink name's
    totals over the workers a reload replaced."""
    dropped = dict(a.dropped)
    for reason, n in b.dropped.items():
        dropped[reason] = dropped.get(reason, 0) + n
    bugs = dict(a.driver_errors)
    for kind, n in b.driver_errors.items():
        bugs[kind] = bugs.get(kind, 0) + n
    return dataclasses.replace(
        a, depth=a.depth + b.depth, blocked=a.blocked + b.blocked,
        offered=a.offered + b.offered, published=a.published + b.published,
        conflated=a.conflated + b.conflated, dropped=frozen_counts(dropped),
        failed_batches=a.failed_batches + b.failed_batches,
        reconnects=a.reconnects + b.reconnects, rejections=a.rejections + b.rejections,
        connect_failures=a.connect_failures + b.connect_failures,
        driver_errors=frozen_counts(bugs),
    )


class RetiredSinks:
    """The sink workers reloads replaced or removed: those still draining, and the
    final counters of those closed, by sink name.

    Nothing of them vanishes: :meth:`merged` adds them to the running sink of the same
    name (its counters continue where the old ones were), :meth:`orphans` gives those
    of the names no running sink has (a removed sink: its counters stay until
    restart), and :attr:`undelivered` what each name's retired workers could not
    deliver (``dropped{reason="sink_removed"}``).
    """

    def __init__(self) -> None:
        self.draining: list[SinkWorker] = []
        self._closed: dict[str, SinkSnapshot] = {}
        #: events the retired workers could not deliver, by sink name
        self.undelivered: dict[str, int] = {}

    def add(self, worker: SinkWorker) -> None:
        self.draining.append(worker)

    def closed(self, worker: SinkWorker) -> int:
        """Fold the final counters of ``worker`` (stopped) into its name's totals;
        return what it could not deliver."""
        with contextlib.suppress(ValueError):
            self.draining.remove(worker)
        snap = dataclasses.replace(worker.snapshot(), state=SinkState.CLOSED, ready=False,
                                   depth=0, blocked=0)
        name = worker.name
        old = self._closed.get(name)
        self._closed[name] = snap if old is None else add_counts(old, snap)
        lost = worker.stats.dropped.get(SINK_REMOVED, 0)
        if lost:
            self.undelivered[name] = self.undelivered.get(name, 0) + lost
        return lost

    def _totals(self, name: str) -> SinkSnapshot | None:
        total = self._closed.get(name)
        for w in self.draining:
            if w.name == name:
                snap = w.snapshot()
                total = snap if total is None else add_counts(snap, total)
        return total

    def merged(self, current: SinkSnapshot) -> SinkSnapshot:
        """``current`` with the counters of the retired workers of its name added."""
        if not self._closed and not self.draining:
            return current
        total = self._totals(current.name)
        return current if total is None else add_counts(current, total)

    def orphans(self, running: Collection[str]) -> tuple[SinkSnapshot, ...]:
        """The totals of the retired names that no running sink has."""
        names = dict.fromkeys([*self._closed, *(w.name for w in self.draining)])
        out = []
        for name in names:
            if name in running:
                continue
            total = self._totals(name)
            if total is not None:
                out.append(dataclasses.replace(total, required=False))
        return tuple(out)


def link_dead_letters(settings: Settings, workers: Mapping[str, SinkWorker]) -> None:
    """Point each worker at the worker of its ``dead_letter`` sink (if any)."""
    for name, spec in settings.sinks.items():
        dead_letter = spec.common.dead_letter
        workers[name].dead_letter = workers.get(dead_letter) if dead_letter else None


def spool_restart_needed(old: Settings, new: Settings) -> list[str]:
    """The sinks with a disk spool (``buffer.disk``) that a reload would replace or
    remove: their spool is open (and locked) by the running worker, so the change
    needs a restart (the next start delivers what the spool holds). Adding a sink with
    a spool, or a spool to a memory-only sink, is applied."""
    out = []
    for name, spec in old.sinks.items():
        if spec.common.buffer.disk is None:
            continue
        now = new.sinks.get(name)
        if now is None or not same_sink(spec, now):
            out.append(f"sinks.{name} (it has buffer.disk: its spool is open)")
    return out


class ReloadHost(Protocol):
    """What a reload changes of a running bridge (:class:`bridge.app.Bridge` is one):
    its settings and redactor are replaced, its routing state swapped through its
    dispatcher, the rest reconfigured in place."""

    settings: Settings
    redact: Redactor

    @property
    def metrics(self) -> Metrics: ...

    @property
    def market(self) -> MarketState: ...

    @property
    def normalizer(self) -> Normalizer: ...

    @property
    def subscriptions(self) -> Subscriptions | None: ...

    @property
    def dispatcher(self) -> Dispatcher: ...


class Reloader:
    """Applies reloads to one running bridge, one at a time, and keeps their account:
    the outcomes (:attr:`counts`), the sinks they replaced or removed
    (:attr:`retired`) and those still draining (:attr:`retiring`)."""

    def __init__(self, host: ReloadHost) -> None:
        self.host = host
        #: configuration reloads, by result (``aleno_bridge_config_reloads_total``)
        self.counts: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self.retiring: set[asyncio.Task[Any]] = set()
        #: the sinks reloads replaced or removed: their counters and what they lost
        self.retired = RetiredSinks()
        #: set when the shutdown begins: no reload is applied after that
        self.shutting_down = False

    async def reload_file(self, path: str, text: str | None = None) -> ReloadOutcome:
        """Read, validate and apply the configuration file at ``path``, or ``text``,
        its content as the watch saw it settle (see :meth:`bridge.app.Bridge.reload_file`)."""
        try:
            new = await asyncio.to_thread(load_settings, path, text)
        except ConfigError as exc:
            self._count("invalid")
            app_log.error("configuration reload refused, the running configuration stays: "
                          "%s", self.host.redact(str(exc)),
                          extra={"reload": "invalid", "problems": exc.problems})
            return ReloadOutcome("invalid", message=str(exc))
        return await self.reload(new)

    async def reload(self, new: Settings) -> ReloadOutcome:
        """Apply ``new``, or refuse it whole (see :meth:`bridge.app.Bridge.reload`)."""
        async with self._lock:
            if self.shutting_down:
                msg = "configuration reload refused: the bridge is shutting down"
                app_log.warning(msg, extra={"reload": "refused"})
                self._count("refused")
                return ReloadOutcome("refused", message=msg)
            try:
                outcome = await self._apply(new)
            except Exception as exc:
                app_log.exception("configuration reload failed")
                outcome = ReloadOutcome("failed", message=f"{type(exc).__name__}: {exc}")
            self._count(outcome.result)
            return outcome

    def _count(self, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1

    async def _apply(self, new: Settings) -> ReloadOutcome:
        host = self.host
        old = host.settings
        blocked = restart_needed(old, new) + spool_restart_needed(old, new)
        if blocked:
            msg = ("configuration reload refused: " + ", ".join(blocked)
                   + " changed, which needs a restart; the running configuration stays")
            app_log.error(msg, extra={"reload": "refused", "needs_restart": blocked})
            return ReloadOutcome("refused", blocked, msg)
        changes: list[str] = []
        # secrets of the old sinks stay redacted while those drain
        host.redact = Redactor([*old.secrets(), *new.secrets()])
        # sinks: unchanged ones stay, new and changed ones are built and started first
        dispatcher = host.dispatcher
        running = dispatcher.workers
        workers: dict[str, SinkWorker] = {}
        retired: list[SinkWorker] = []
        for name, spec in new.sinks.items():
            current = running.get(name)
            if current is not None and same_sink(current.spec, spec):
                workers[name] = current
                continue
            workers[name] = SinkWorker(spec, None, host.metrics.observe_publish)
            workers[name].start()
            changes.append(f"sink {name} " + ("replaced" if current is not None else "added"))
            if current is not None:
                retired.append(current)
        for name, current in running.items():
            if name not in new.sinks:
                retired.append(current)
                changes.append(f"sink {name} removed")
        link_dead_letters(new, workers)
        router = Router(new.routes, workers)
        if [r.model_dump() for r in old.routes] != [r.model_dump() for r in new.routes]:
            changes.append("routes")
        changes += settings_changed(old, new)
        # the swap: the dispatcher reads the router once per chunk
        dispatcher.use(workers, router)
        host.settings = new
        source = new.config.source
        market = host.market
        market.stale_after_s = source.symbol_stale_after_s
        market.set_interval(source.update_interval_s)
        market.damping.configure(source.status_damping.max_events,
                                 source.status_damping.window_s)
        host.normalizer.set_time_bounds(source.max_clock_skew_s, source.max_record_age_s)
        for w in retired:
            self._retire(w)
        if host.subscriptions is not None:
            host.subscriptions.config = source.leases
        if pinned_changed(old.config, new.config):
            changes += await self._apply_symbols(new)
        if not changes:
            app_log.info("configuration reloaded: nothing changed",
                         extra={"reload": "unchanged"})
            return ReloadOutcome("unchanged")
        app_log.info("configuration reloaded: %s", "; ".join(changes),
                     extra={"reload": "applied", "changes": changes})
        return ReloadOutcome("applied", changes)

    async def _apply_symbols(self, new: Settings) -> list[str]:
        """Subscribe and unsubscribe the configured symbols that changed, on the live
        connections (no reconnect); a symbol a lease still holds stays subscribed."""
        subs = self.host.subscriptions
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
        host = self.host
        why = "replaced" if worker.name in host.dispatcher.workers else "removed"
        self.retired.add(worker)
        worker.begin_stop(SINK_REMOVED)

        async def retire() -> None:
            try:
                await worker.stop(host.settings.config.shutdown_timeout_s, SINK_REMOVED)
            except asyncio.CancelledError:
                # the shutdown's deadline came first: close now, count what is left
                with contextlib.suppress(Exception):
                    await worker.stop(RETIRE_CUT_S, SINK_REMOVED)
                raise
            finally:
                worker.discard()
                lost = self.retired.closed(worker)
                host.dispatcher.intake.drop(SINK_REMOVED, lost)
                if lost:
                    app_log.warning(
                        "sink %s (%s by a reload): %d event(s) not delivered before it was "
                        "closed; counted as aleno_bridge_pipeline_dropped_total"
                        "{reason=\"sink_removed\"}", worker.name, why, lost,
                        extra={"sink": worker.name, "undelivered": lost})
                else:
                    app_log.info("sink %s (%s by a reload) drained and closed", worker.name,
                                 why, extra={"sink": worker.name})

        task = asyncio.create_task(retire(), name=f"retire-{worker.name}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def finish(self, deadline: Deadline) -> None:
        """Wait for the sinks still draining until the shutdown's deadline; cancel
        those that are late (they close at once and count what is left)."""
        if self.retiring:
            retiring = set(self.retiring)
            _, late = await asyncio.wait(retiring,
                                         timeout=max(0.01, deadline.left(deadline.end)))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=0.5)


__all__ = [
    "HOT_SOURCE_KEYS",
    "RESULTS",
    "SINK_REMOVED",
    "ConfigWatcher",
    "FileState",
    "ReloadHost",
    "ReloadOutcome",
    "ReloadQueue",
    "Reloader",
    "RetiredSinks",
    "add_counts",
    "file_digest",
    "link_dead_letters",
    "load_settings",
    "pinned_changed",
    "read_state",
    "restart_needed",
    "same_sink",
    "settings_changed",
    "spool_restart_needed",
    "symlink_chain",
    "watched_dirs",
]
