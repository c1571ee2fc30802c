"""Prometheus metrics of one bridge.

The hot path only bumps plain integers (in :class:`~bridge.sinks.worker.SinkStats`, the
normalizer, the router and the source); :class:`SnapshotCollector` reads them through
the bridge's read model (:class:`~bridge.core.state.BridgeSnapshot`) and turns them into
metric families when ``/metrics`` is scraped, so no lock is taken per event. Only the
two histograms are observed directly, once per upstream batch and once per sink batch.

Every metric name is a constant here; readers of the exposition (``top``) use them.

Names follow Prometheus conventions: ``aleno_bridge_`` prefix, ``_total`` counters,
seconds. Labels never carry a symbol (unbounded cardinality) nor a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.core.state import (
    ACK_STATUSES,
    DAMPED_STATUSES,
    KINDS,
    PIPELINE_DROP_REASONS,
    RELOAD_RESULTS,
    SINK_DROP_REASONS,
    STATUSES,
    BridgeSnapshot,
    SinkSnapshot,
    SinkState,
    SpoolSnapshot,
    UpstreamState,
)

#: the suffix of a counter's sample in the exposition (the names below are families)
TOTAL: Final = "_total"

UPSTREAM_STATE: Final = "aleno_bridge_upstream_state"
UPSTREAM_CONNECTS: Final = "aleno_bridge_upstream_connects"
UPSTREAM_RECONNECTS: Final = "aleno_bridge_upstream_reconnects"
UPSTREAM_CONNECT_FAILURES: Final = "aleno_bridge_upstream_connect_failures"
UPSTREAM_WATCHDOG_RESTARTS: Final = "aleno_bridge_upstream_watchdog_restarts"
UPSTREAM_ACKS: Final = "aleno_bridge_upstream_acks"
UPSTREAM_REJECTED_SYMBOLS: Final = "aleno_bridge_upstream_rejected_symbols"
UPSTREAM_SUBSCRIPTIONS: Final = "aleno_bridge_upstream_subscriptions"
UPSTREAM_SECONDS_SINCE_UPDATE: Final = "aleno_bridge_upstream_seconds_since_update"
LAST_VALUES: Final = "aleno_bridge_last_values"
STALE_SYMBOLS: Final = "aleno_bridge_stale_symbols"
CONFIGURED_SYMBOLS: Final = "aleno_bridge_configured_symbols"
SYMBOLS_UNPLACED: Final = "aleno_bridge_symbols_unplaced"
LEASES: Final = "aleno_bridge_leases"
LEASED_SYMBOLS: Final = "aleno_bridge_leased_symbols"
LEASED_EVICTED: Final = "aleno_bridge_leased_symbols_evicted"
STATUS_EVENTS: Final = "aleno_bridge_status_events"
STATUS_EVENTS_SUPPRESSED: Final = "aleno_bridge_status_events_suppressed"
CONFIG_RELOADS: Final = "aleno_bridge_config_reloads"
UPSTREAM_CONNECTION_UP: Final = "aleno_bridge_upstream_connection_up"
UPSTREAM_CONNECTION_SYMBOLS: Final = "aleno_bridge_upstream_connection_symbols"
UPSTREAM_CONNECTION_LIMIT: Final = "aleno_bridge_upstream_connection_limit"
UPSTREAM_LAG_SECONDS: Final = "aleno_bridge_upstream_lag_seconds"
EVENTS_RECEIVED: Final = "aleno_bridge_events_received"
EVENTS_INVALID: Final = "aleno_bridge_events_invalid"
EVENTS_UNROUTED: Final = "aleno_bridge_events_unrouted"
EVENTS_FILTERED: Final = "aleno_bridge_events_filtered"
PIPELINE_DROPPED: Final = "aleno_bridge_pipeline_dropped"
INTAKE_EVENTS: Final = "aleno_bridge_intake_events"
INTAKE_CAPACITY: Final = "aleno_bridge_intake_capacity"
INTAKE_PAYLOADS: Final = "aleno_bridge_intake_payloads"
OVERLOADED: Final = "aleno_bridge_overloaded"
PAYLOADS_SHED: Final = "aleno_bridge_payloads_shed"
SINK_STATE: Final = "aleno_bridge_sink_state"
SINK_UP: Final = "aleno_bridge_sink_up"
SINK_QUEUE_DEPTH: Final = "aleno_bridge_sink_queue_depth"
SINK_QUEUE_CAPACITY: Final = "aleno_bridge_sink_queue_capacity"
SINK_EVENTS_OFFERED: Final = "aleno_bridge_sink_events_offered"
SINK_BLOCKED_OFFERS: Final = "aleno_bridge_sink_blocked_offers"
SINK_REJECTIONS: Final = "aleno_bridge_sink_rejections"
SINK_EVENTS_PUBLISHED: Final = "aleno_bridge_sink_events_published"
SINK_EVENTS_DROPPED: Final = "aleno_bridge_sink_events_dropped"
SINK_EVENTS_CONFLATED: Final = "aleno_bridge_sink_events_conflated"
SINK_PUBLISH_FAILURES: Final = "aleno_bridge_sink_publish_failures"
SINK_RECONNECTS: Final = "aleno_bridge_sink_reconnects"
SINK_CONNECT_FAILURES: Final = "aleno_bridge_sink_connect_failures"
SINK_DRIVER_ERRORS: Final = "aleno_bridge_sink_driver_errors"
SINK_PUBLISH_SECONDS: Final = "aleno_bridge_sink_publish_seconds"
SPOOL_EVENTS: Final = "aleno_bridge_spool_events"
SPOOL_BYTES: Final = "aleno_bridge_spool_bytes"
SPOOL_MAX_BYTES: Final = "aleno_bridge_spool_max_bytes"
SPOOL_OLDEST_AGE: Final = "aleno_bridge_spool_oldest_age_seconds"
SPOOL_BACKLOG: Final = "aleno_bridge_spool_backlog_events"
SPOOL_CORRUPT: Final = "aleno_bridge_spool_corrupt_records"
SPOOL_RESTORED: Final = "aleno_bridge_spool_restored_events"
SPOOL_WRITE_ERRORS: Final = "aleno_bridge_spool_write_errors"
BARS: Final = "aleno_bridge_bars"
BAR_LATE_UPDATES: Final = "aleno_bridge_bar_late_updates"
BAR_IGNORED_UPDATES: Final = "aleno_bridge_bar_ignored_updates"
BARS_OPEN: Final = "aleno_bridge_bars_open"

#: the bridge's state at scrape time
SnapshotSource = Callable[[], BridgeSnapshot]
#: the bars' counters at scrape time (:meth:`bridge.pipeline.bars.BarBuilder.counts`)
BarsSource = Callable[[], Mapping[str, Any]]


class Metrics:
    """The registry of one bridge (one per :class:`~bridge.app.Bridge`, so tests can
    run several bridges in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            UPSTREAM_LAG_SECONDS,
            "Receive time minus the upstream sentTimestampMs, per update batch.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            SINK_PUBLISH_SECONDS,
            "Time from handing a batch to the driver to the bus confirming it.",
            ["sink"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=self.registry,
        )

    def attach(self, snapshot: SnapshotSource) -> None:
        """Export what ``snapshot()`` returns at every scrape."""
        self.registry.register(SnapshotCollector(snapshot))

    def observe_publish(self, sink: str, seconds: float) -> None:
        self.publish_latency.labels(sink).observe(seconds)

    def attach_bars(self, counts: BarsSource) -> None:
        """Export the bars' counters (a bridge with a ``bars`` section)."""
        self.registry.register(BarsCollector(counts))


class BarsCollector(Collector):
    """The OHLC bars' metric families, read per scrape."""

    def __init__(self, counts: BarsSource) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts()
        bars = CounterMetricFamily(BARS, "Final bars published, by interval and whether "
                                   "they say gap: true.", labels=["interval", "gap"])
        for interval, n in c["final"].items():
            gaps = c["gaps"][interval]
            bars.add_metric([interval, "false"], n - gaps)
            bars.add_metric([interval, "true"], gaps)
        yield bars
        late = CounterMetricFamily(BAR_LATE_UPDATES, "Updates that arrived after their "
                                   "bar was final (counted and dropped), by interval.",
                                   labels=["interval"])
        for interval, n in c["late"].items():
            late.add_metric([interval], n)
        yield late
        ignored = CounterMetricFamily(BAR_IGNORED_UPDATES, "Updates not added to any bar, "
                                      "by reason: duplicate (a send time already taken), "
                                      "out_of_order (older than the newest taken).",
                                      labels=["reason"])
        for reason, n in c["ignored"].items():
            ignored.add_metric([reason], n)
        yield ignored
        open_ = GaugeMetricFamily(BARS_OPEN, "Bars in progress (not final yet).")
        open_.add_metric([], c["open"])
        yield open_


class SnapshotCollector(Collector):
    """Metric families of one :class:`~bridge.core.state.BridgeSnapshot`, taken per scrape."""

    def __init__(self, snapshot: SnapshotSource) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        src = snap.upstream

        up = GaugeMetricFamily(UPSTREAM_STATE,
                               "1 for the current state of the upstream connection.",
                               labels=["state"])
        for us in UpstreamState:
            up.add_metric([us.value], 1.0 if src is not None and src.state == us else 0.0)
        yield up

        connects = CounterMetricFamily(UPSTREAM_CONNECTS,
                                       "Successful connections to the upstream.")
        connects.add_metric([], src.connects if src else 0)
        yield connects
        reconnects = CounterMetricFamily(UPSTREAM_RECONNECTS,
                                         "Connections to the upstream after the first one.")
        reconnects.add_metric([], src.reconnects if src else 0)
        yield reconnects
        failures = CounterMetricFamily(UPSTREAM_CONNECT_FAILURES,
                                       "Failed connection attempts to the upstream.")
        failures.add_metric([], src.connect_failures if src else 0)
        yield failures
        watchdog = CounterMetricFamily(UPSTREAM_WATCHDOG_RESTARTS,
                                       "Reconnects because the feed went silent.")
        watchdog.add_metric([], src.watchdog_restarts if src else 0)
        yield watchdog

        acks = CounterMetricFamily(UPSTREAM_ACKS,
                                   "Subscription acknowledgements by status.", labels=["status"])
        for status in ACK_STATUSES:
            acks.add_metric([status], (src.acks.get(status, 0) if src else 0))
        yield acks
        rejected = GaugeMetricFamily(UPSTREAM_REJECTED_SYMBOLS,
                                     "Distinct symbols the upstream rejected as unsupported.")
        rejected.add_metric([], src.rejected_symbols if src else 0)
        yield rejected
        subscribed = GaugeMetricFamily(UPSTREAM_SUBSCRIPTIONS,
                                       "Symbols subscribed after the last acknowledgement.",
                                       labels=["kind"])
        for kind in KINDS:
            subscribed.add_metric([kind], src.subscriptions.get(kind, 0) if src else 0)
        yield subscribed
        since = src.seconds_since_update if src is not None else None
        last = GaugeMetricFamily(UPSTREAM_SECONDS_SINCE_UPDATE,
                                 "Seconds since the last price update arrived (-1: none yet).")
        last.add_metric([], -1.0 if since is None else since)
        yield last

        received = CounterMetricFamily(EVENTS_RECEIVED,
                                       "Upstream records received, by kind.", labels=["kind"])
        for kind, n in snap.normalizer.received.items():
            received.add_metric([kind], n)
        yield received
        invalid = CounterMetricFamily(EVENTS_INVALID,
                                      "Upstream records dropped by validation, by reason.",
                                      labels=["kind", "reason"])
        for (kind, reason), n in sorted(snap.normalizer.invalid.items()):
            invalid.add_metric([kind, reason], n)
        yield invalid
        unrouted = CounterMetricFamily(EVENTS_UNROUTED, "Valid events that matched no route.")
        unrouted.add_metric([], snap.router.unrouted)
        yield unrouted
        filtered = CounterMetricFamily(EVENTS_FILTERED,
                                       "Events a route gate skipped (on_change, min_interval).",
                                       labels=["route", "reason"])
        for (route, reason), n in sorted(snap.router.filtered.items()):
            filtered.add_metric([route, reason], n)
        yield filtered
        intake_dropped = snap.intake.dropped
        pipeline = CounterMetricFamily(PIPELINE_DROPPED,
                                       "Events dropped before routing, by reason: "
                                       "intake_full (shed under overload, whole upstream "
                                       "payloads, before validation), shutdown (still in "
                                       "the intake at the shutdown deadline), sink_removed "
                                       "(held by a sink a reload replaced or removed and "
                                       "not delivered before it was closed; also that "
                                       "sink's dropped{reason=\"sink_removed\"}).",
                                       labels=["reason"])
        for reason in sorted({*PIPELINE_DROP_REASONS, *intake_dropped}):
            pipeline.add_metric([reason], intake_dropped.get(reason, 0))
        yield pipeline
        intake = GaugeMetricFamily(INTAKE_EVENTS, "Events received and waiting to be routed.")
        intake.add_metric([], snap.intake.events)
        yield intake
        intake_cap = GaugeMetricFamily(INTAKE_CAPACITY,
                                       "intake_max_events: the most events the intake holds.")
        intake_cap.add_metric([], snap.intake.capacity)
        yield intake_cap
        payloads = GaugeMetricFamily(INTAKE_PAYLOADS,
                                     "Upstream payloads queued for the router.")
        payloads.add_metric([], snap.intake.payloads)
        yield payloads
        ov = snap.overload
        overloaded = GaugeMetricFamily(OVERLOADED,
                                       "1 while the bridge sheds load (an upstream payload "
                                       "was shed within the last 5 s).")
        overloaded.add_metric([], 1.0 if ov is not None and ov.overloaded else 0.0)
        yield overloaded
        shed = CounterMetricFamily(PAYLOADS_SHED,
                                   "Upstream payloads shed whole at the intake under "
                                   "overload (their events: pipeline_dropped intake_full).")
        shed.add_metric([], ov.shed_payloads if ov is not None else 0)
        yield shed
        market = snap.market
        cached = GaugeMetricFamily(LAST_VALUES,
                                   "Symbols with a last value in the cache (snapshots).")
        cached.add_metric([], market.symbols if market is not None else 0)
        yield cached
        stale = GaugeMetricFamily(STALE_SYMBOLS,
                                  "Symbols without an update for source.symbol_stale_after_s "
                                  "while the upstream is up.")
        stale.add_metric([], market.stale if market is not None else 0)
        yield stale
        wanted = snap.symbols
        for name, doc, value in (
            (CONFIGURED_SYMBOLS, "Symbols the configuration pins (this shard's).",
             wanted.pinned if wanted else 0),
            (LEASES, "Live leases in this process.", wanted.leases if wanted else 0),
            (LEASED_SYMBOLS, "Distinct symbols held by live leases.",
             wanted.leased if wanted else 0),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        unplaced = GaugeMetricFamily(SYMBOLS_UNPLACED, "Configured symbols not subscribed: "
                                     "no API key has room (retried; /readyz fails).",
                                     labels=["kind"])
        for kind in KINDS:
            unplaced.add_metric([kind], wanted.unplaced_by_kind.get(kind, 0) if wanted else 0)
        yield unplaced
        evicted = CounterMetricFamily(LEASED_EVICTED, "Leased symbols evicted to make room "
                                      "for configured ones.")
        evicted.add_metric([], wanted.evicted if wanted else 0)
        yield evicted
        statuses = CounterMetricFamily(STATUS_EVENTS,
                                       "Status events emitted (ai.aleno.status.v1), by status.",
                                       labels=["status"])
        for status in STATUSES:
            statuses.add_metric([status],
                                market.status_events.get(status, 0) if market is not None else 0)
        yield statuses
        suppressed = CounterMetricFamily(STATUS_EVENTS_SUPPRESSED,
                                         "Status events held back by the per-symbol damping "
                                         "(source.status_damping), by status.",
                                         labels=["status"])
        for status in DAMPED_STATUSES:
            suppressed.add_metric([status], market.status_suppressed.get(status, 0)
                                  if market is not None else 0)
        yield suppressed
        reloads = CounterMetricFamily(CONFIG_RELOADS,
                                      "Configuration reloads (SIGHUP or a change of the file), "
                                      "by result.", labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], snap.reloads.get(result, 0))
        yield reloads
        conn_up = GaugeMetricFamily(UPSTREAM_CONNECTION_UP,
                                    "1 while an upstream connection (one per API key) is "
                                    "ready: it carries no symbol, or prices flow on it.",
                                    labels=["connection"])
        conn_symbols = GaugeMetricFamily(UPSTREAM_CONNECTION_SYMBOLS,
                                         "Symbols placed on an upstream connection.",
                                         labels=["connection"])
        conn_limit = GaugeMetricFamily(UPSTREAM_CONNECTION_LIMIT,
                                       "The symbols an API key may hold, configured or "
                                       "learned (-1: not known yet).", labels=["connection"])
        for conn in snap.connections:
            conn_up.add_metric([conn.name], 1.0 if conn.ready else 0.0)
            conn_symbols.add_metric([conn.name], conn.symbols)
            conn_limit.add_metric([conn.name], -1 if conn.limit is None else conn.limit)
        yield conn_up
        yield conn_symbols
        yield conn_limit

        state = GaugeMetricFamily(SINK_STATE, "1 for the current state of a sink.",
                                  labels=["sink", "driver", "state"])
        up_ = GaugeMetricFamily(SINK_UP,
                                "1 when the sink is connected and its last publish succeeded.",
                                labels=["sink"])
        depth = GaugeMetricFamily(SINK_QUEUE_DEPTH,
                                  "Events accepted by a sink but not yet confirmed or dropped.",
                                  labels=["sink"])
        capacity = GaugeMetricFamily(SINK_QUEUE_CAPACITY,
                                     "buffer.max_events of a sink.", labels=["sink"])
        offered = CounterMetricFamily(SINK_EVENTS_OFFERED,
                                      "Events a sink accepted or dropped on arrival "
                                      "(offered = published + dropped + conflated + depth).",
                                      labels=["sink"])
        blocked = GaugeMetricFamily(SINK_BLOCKED_OFFERS,
                                    "Events waiting for room in a full 'block' sink (not "
                                    "offered yet).", labels=["sink"])
        rejections = CounterMetricFamily(SINK_REJECTIONS,
                                         "Publishes the bus refused for good (in part or "
                                         "whole; the events: dropped rejected/dead_lettered).",
                                         labels=["sink"])
        published = CounterMetricFamily(SINK_EVENTS_PUBLISHED,
                                        "Events the bus confirmed.", labels=["sink"])
        dropped = CounterMetricFamily(SINK_EVENTS_DROPPED,
                                      "Events a sink dropped, by reason.",
                                      labels=["sink", "reason"])
        conflated = CounterMetricFamily(SINK_EVENTS_CONFLATED,
                                        "Queued events replaced by a newer update of the same "
                                        "symbol (when_full: conflate).", labels=["sink"])
        failed = CounterMetricFamily(SINK_PUBLISH_FAILURES,
                                     "Batches whose publish failed (then retried or dropped).",
                                     labels=["sink"])
        reconn = CounterMetricFamily(SINK_RECONNECTS,
                                     "Connections of a sink after the first one.", labels=["sink"])
        connect_failed = CounterMetricFamily(SINK_CONNECT_FAILURES,
                                             "Failed connection attempts of a sink (connect() "
                                             "raised or timed out).", labels=["sink"])
        driver_errors = CounterMetricFamily(SINK_DRIVER_ERRORS,
                                            "connect()/publish() calls that failed with a bug "
                                            "in the driver (an exception type it did not "
                                            "map), by type; the batch was kept and retried.",
                                            labels=["sink", "error"])

        def counted(sink: SinkSnapshot) -> None:
            """The series every sink keeps until restart, a retired one too."""
            name = sink.name
            depth.add_metric([name], sink.depth)
            offered.add_metric([name], sink.offered)
            rejections.add_metric([name], sink.rejections)
            published.add_metric([name], sink.published)
            for reason in sorted({*SINK_DROP_REASONS, *sink.dropped}):
                dropped.add_metric([name, reason], sink.dropped.get(reason, 0))
            conflated.add_metric([name], sink.conflated)
            failed.add_metric([name], sink.failed_batches)
            reconn.add_metric([name], sink.reconnects)
            connect_failed.add_metric([name], sink.connect_failures)
            for kind, n in sorted(sink.driver_errors.items()):
                driver_errors.add_metric([name, kind], n)

        for sink in snap.sinks:
            name = sink.name
            for ss in SinkState:
                state.add_metric([name, sink.driver, ss.value], 1.0 if sink.state == ss else 0.0)
            up_.add_metric([name], 1.0 if sink.ready else 0.0)
            capacity.add_metric([name], sink.capacity)
            blocked.add_metric([name], sink.blocked)
            counted(sink)
        for sink in snap.retired_sinks:
            # a sink a reload removed: its counters stay until restart (no state, no
            # up: it is gone, not down), and what it still holds while it drains
            counted(sink)
        yield from (state, up_, depth, capacity, offered, blocked, published, dropped, conflated,
                    failed, reconn, connect_failed, driver_errors, rejections)
        yield from _spool_metrics(snap.sinks)


def _spool_metrics(sinks: Iterable[SinkSnapshot]) -> Iterator[Metric]:
    """The disk spools (``buffer.disk``), one series per sink that has one."""
    gauges: list[tuple[str, str, Callable[[SpoolSnapshot], float]]] = [
        (SPOOL_EVENTS, "Events a sink's spool holds: accepted, not yet confirmed nor dropped.",
         lambda s: s.events),
        (SPOOL_BYTES, "Bytes of a sink's spool files.", lambda s: s.bytes),
        (SPOOL_MAX_BYTES, "buffer.disk.max_bytes of a sink.", lambda s: s.max_bytes),
        (SPOOL_OLDEST_AGE, "Seconds since the oldest event a spool holds was received "
         "(0: holds none).", lambda s: s.oldest_age_s or 0.0),
        (SPOOL_BACKLOG, "Events a spool holds on disk only (not in the memory buffer).",
         lambda s: s.on_disk_only),
    ]
    counters: list[tuple[str, str, Callable[[SpoolSnapshot], float]]] = [
        (SPOOL_CORRUPT, "Corrupt spool records found (torn tails and bad frames cut out at "
         "start, records that could not be read back).", lambda s: s.corrupt_records),
        (SPOOL_RESTORED, "Events found in the spool at start (delivered before new ones).",
         lambda s: s.restored),
        (SPOOL_WRITE_ERRORS, "Failed writes to a spool (retried; /readyz fails meanwhile).",
         lambda s: s.write_errors),
    ]
    spooled = [(s.name, s.spool) for s in sinks if s.spool is not None]
    for name, doc, value in gauges:
        gauge = GaugeMetricFamily(name, doc, labels=["sink"])
        for sink, spool in spooled:
            gauge.add_metric([sink], value(spool))
        yield gauge
    for name, doc, value in counters:
        counter = CounterMetricFamily(name, doc, labels=["sink"])
        for sink, spool in spooled:
            counter.add_metric([sink], value(spool))
        yield counter
