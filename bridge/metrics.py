"""Prometheus metrics of one bridge.

The hot path only bumps plain integers (in :class:`~bridge.runner.SinkStats`, the
normalizer, the router and the source); :class:`BridgeCollector` turns them into
metric families when ``/metrics`` is scraped, so no lock is taken per event. Only the
two histograms are observed directly, once per upstream batch and once per sink batch.

Names follow Prometheus conventions: ``aleno_bridge_`` prefix, ``_total`` counters,
seconds. Labels never carry a symbol (unbounded cardinality) nor a secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from bridge.app import Bridge

SOURCE_STATES = ("idle", "connecting", "connected", "subscribed", "disconnected", "refused",
                 "stopped")
SINK_STATES = ("idle", "connecting", "connected", "failing", "closed")


class Metrics:
    """The registry of one bridge (one per :class:`~bridge.app.Bridge`, so tests can
    run several bridges in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            "aleno_bridge_upstream_lag_seconds",
            "Receive time minus the upstream sentTimestampMs, per update batch.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.publish_latency = Histogram(
            "aleno_bridge_sink_publish_seconds",
            "Time from handing a batch to the driver to the bus confirming it.",
            ["sink"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=self.registry,
        )

    def attach(self, bridge: Bridge) -> None:
        self.registry.register(BridgeCollector(bridge))

    def observe_publish(self, sink: str, seconds: float) -> None:
        self.publish_latency.labels(sink).observe(seconds)


class BridgeCollector(Collector):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        b = self.bridge
        src = b.source.stats if b.source is not None else None

        up = GaugeMetricFamily("aleno_bridge_upstream_state",
                               "1 for the current state of the upstream connection.",
                               labels=["state"])
        for s in SOURCE_STATES:
            up.add_metric([s], 1.0 if src is not None and src.state == s else 0.0)
        yield up

        connects = CounterMetricFamily("aleno_bridge_upstream_connects",
                                       "Successful connections to the upstream.")
        connects.add_metric([], src.connects if src else 0)
        yield connects
        reconnects = CounterMetricFamily("aleno_bridge_upstream_reconnects",
                                         "Connections to the upstream after the first one.")
        reconnects.add_metric([], src.reconnects if src else 0)
        yield reconnects
        failures = CounterMetricFamily("aleno_bridge_upstream_connect_failures",
                                       "Failed connection attempts to the upstream.")
        failures.add_metric([], src.connect_failures if src else 0)
        yield failures
        watchdog = CounterMetricFamily("aleno_bridge_upstream_watchdog_restarts",
                                       "Reconnects because the feed went silent.")
        watchdog.add_metric([], src.watchdog_restarts if src else 0)
        yield watchdog

        acks = CounterMetricFamily("aleno_bridge_upstream_acks",
                                   "Subscription acknowledgements by status.", labels=["status"])
        for status in ("ok", "partial", "error"):
            acks.add_metric([status], (src.acks.get(status, 0) if src else 0))
        yield acks
        rejected = GaugeMetricFamily("aleno_bridge_upstream_rejected_symbols",
                                     "Distinct symbols the upstream rejected as unsupported.")
        rejected.add_metric([], len(src.rejected_symbols) if src else 0)
        yield rejected
        subscribed = GaugeMetricFamily("aleno_bridge_upstream_subscriptions",
                                       "Symbols subscribed after the last acknowledgement.",
                                       labels=["kind"])
        for kind in ("ticker", "equity"):
            subscribed.add_metric([kind], len(src.subscribed.get(kind, [])) if src else 0)
        yield subscribed
        since = b.source.seconds_since_update() if b.source is not None else None
        last = GaugeMetricFamily("aleno_bridge_upstream_seconds_since_update",
                                 "Seconds since the last price update arrived (-1: none yet).")
        last.add_metric([], -1.0 if since is None else since)
        yield last

        received = CounterMetricFamily("aleno_bridge_events_received",
                                       "Upstream records received, by kind.", labels=["kind"])
        for kind, n in b.normalizer.received.items():
            received.add_metric([kind], n)
        yield received
        invalid = CounterMetricFamily("aleno_bridge_events_invalid",
                                      "Upstream records dropped by validation, by reason.",
                                      labels=["kind", "reason"])
        for key, n in sorted(b.normalizer.invalid.items()):
            kind, _, reason = key.partition(":")
            invalid.add_metric([kind, reason], n)
        yield invalid
        unrouted = CounterMetricFamily("aleno_bridge_events_unrouted",
                                       "Valid events that matched no route.")
        unrouted.add_metric([], b.router.unrouted if b.router else 0)
        yield unrouted
        filtered = CounterMetricFamily("aleno_bridge_events_filtered",
                                       "Events a route gate skipped (on_change, min_interval).",
                                       labels=["route", "reason"])
        if b.router is not None:
            for (route, reason), n in sorted(b.router.filtered.items()):
                filtered.add_metric([route, reason], n)
        yield filtered
        pipeline = CounterMetricFamily("aleno_bridge_pipeline_dropped",
                                       "Valid events dropped before routing, by reason: "
                                       "intake_full (a 'block' sink is behind), shutdown "
                                       "(still in the intake at the shutdown deadline).",
                                       labels=["reason"])
        for reason in sorted({"intake_full", "shutdown", *b.pipeline_dropped}):
            pipeline.add_metric([reason], b.pipeline_dropped.get(reason, 0))
        yield pipeline
        intake = GaugeMetricFamily("aleno_bridge_intake_events",
                                   "Events received and waiting to be routed.")
        intake.add_metric([], b.intake_events)
        yield intake
        intake_cap = GaugeMetricFamily("aleno_bridge_intake_capacity",
                                       "intake_max_events: the most events the intake holds.")
        intake_cap.add_metric([], b.intake_max_events)
        yield intake_cap

        state = GaugeMetricFamily("aleno_bridge_sink_state", "1 for the current state of a sink.",
                                  labels=["sink", "driver", "state"])
        up_ = GaugeMetricFamily("aleno_bridge_sink_up",
                                "1 when the sink is connected and its last publish succeeded.",
                                labels=["sink"])
        depth = GaugeMetricFamily("aleno_bridge_sink_queue_depth",
                                  "Events accepted by a sink but not yet confirmed or dropped.",
                                  labels=["sink"])
        capacity = GaugeMetricFamily("aleno_bridge_sink_queue_capacity",
                                     "buffer.max_events of a sink.", labels=["sink"])
        offered = CounterMetricFamily("aleno_bridge_sink_events_offered",
                                      "Events a sink accepted or dropped on arrival "
                                      "(offered = published + dropped + conflated + depth).",
                                      labels=["sink"])
        blocked = GaugeMetricFamily("aleno_bridge_sink_blocked_offers",
                                    "Events waiting for room in a full 'block' sink (not "
                                    "offered yet).", labels=["sink"])
        rejections = CounterMetricFamily("aleno_bridge_sink_rejections",
                                         "Publishes the bus refused for good (in part or "
                                         "whole; the events: dropped rejected/dead_lettered).",
                                         labels=["sink"])
        published = CounterMetricFamily("aleno_bridge_sink_events_published",
                                        "Events the bus confirmed.", labels=["sink"])
        dropped = CounterMetricFamily("aleno_bridge_sink_events_dropped",
                                      "Events a sink dropped, by reason.",
                                      labels=["sink", "reason"])
        conflated = CounterMetricFamily("aleno_bridge_sink_events_conflated",
                                        "Queued events replaced by a newer update of the same "
                                        "symbol (when_full: conflate).", labels=["sink"])
        failed = CounterMetricFamily("aleno_bridge_sink_publish_failures",
                                     "Batches whose publish failed (then retried or dropped).",
                                     labels=["sink"])
        reconn = CounterMetricFamily("aleno_bridge_sink_reconnects",
                                     "Connections of a sink after the first one.", labels=["sink"])
        for w in b.workers.values():
            st = w.stats
            for s in SINK_STATES:
                state.add_metric([w.name, w.spec.common.driver, s], 1.0 if w.state == s else 0.0)
            up_.add_metric([w.name], 1.0 if w.ready else 0.0)
            depth.add_metric([w.name], w.depth)
            capacity.add_metric([w.name], w.capacity)
            offered.add_metric([w.name], st.offered)
            blocked.add_metric([w.name], w.blocked)
            rejections.add_metric([w.name], st.rejections)
            published.add_metric([w.name], st.published)
            for reason in sorted({"buffer_full", "rejected", "dead_lettered", "driver_error",
                                  "shutdown", *st.dropped}):
                dropped.add_metric([w.name, reason], st.dropped.get(reason, 0))
            conflated.add_metric([w.name], st.conflated)
            failed.add_metric([w.name], st.failed_batches)
            reconn.add_metric([w.name], st.reconnects)
        yield from (state, up_, depth, capacity, offered, blocked, published, dropped, conflated,
                    failed, reconn, rejections)
