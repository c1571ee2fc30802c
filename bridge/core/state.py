"""The read model of a running bridge: what operator code (metrics, ``/readyz``,
``top``, ``tap``) may know of it.

Every part of the data path answers ``snapshot()`` with one of these frozen values,
taken at once from its plain counters; :meth:`bridge.app.Bridge.snapshot` gathers
them. Readers never touch the parts themselves, so the data path may change how it
counts without breaking them, and a snapshot can be read outside the event loop.

States are string enums: a state prints, compares and serializes exactly as its
value (``UpstreamState.SUBSCRIBED == "subscribed"``), which is what metric labels and
the ``/readyz`` JSON show.

This module imports nothing of the bridge: every other module may depend on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from bridge.core.kinds import PRICE_KINDS


class UpstreamState(StrEnum):
    """The upstream connection (see the state machine in :mod:`bridge.upstream.client`)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    SUBSCRIBED = "subscribed"
    DISCONNECTED = "disconnected"
    REFUSED = "refused"
    STOPPED = "stopped"


class SinkState(StrEnum):
    """One sink's connection to its bus (see :mod:`bridge.sinks.worker`)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILING = "failing"
    CLOSED = "closed"


#: the acknowledgement statuses of the upstream's subscribe requests
ACK_STATUSES = ("ok", "partial", "error")
#: the kinds of price events
KINDS = PRICE_KINDS
#: reasons every sink reports a drop count for, even while zero
SINK_DROP_REASONS = ("buffer_full", "rejected", "dead_lettered", "driver_error", "shutdown")
#: reasons the pipeline reports a drop count for, even while zero (``sink_removed``:
#: held by a sink a reload replaced or removed, not delivered before it was closed)
PIPELINE_DROP_REASONS = ("intake_full", "shutdown", "sink_removed")


def frozen_counts(counts: Mapping[Any, int]) -> Mapping[Any, int]:
    """A read-only copy of ``counts`` (a snapshot never changes after it is taken)."""
    return MappingProxyType(dict(counts))


@dataclass(frozen=True, slots=True)
class UpstreamSnapshot:
    """The upstream connection and its subscriptions."""

    state: UpstreamState
    #: an update arrived on the current connection
    flowing: bool
    #: seconds since the last update on the current connection (``None``: none yet)
    seconds_since_update: float | None
    #: ``source.stale_after_s``: an older last update makes the upstream not ready
    stale_after_s: float
    connects: int
    reconnects: int
    connect_failures: int
    watchdog_restarts: int
    #: subscribe acknowledgements, by status
    acks: Mapping[str, int]
    #: distinct symbols the upstream rejected as unsupported
    rejected_symbols: int
    #: symbols subscribed after the last acknowledgement, by kind
    subscriptions: Mapping[str, int]
    #: the cause of the last failed attempt or drop (cleared when data flows)
    last_error: str | None

    @property
    def ready(self) -> bool:
        """Subscribed, and a price arrived on this connection within ``stale_after_s``."""
        since = self.seconds_since_update
        return (self.state == UpstreamState.SUBSCRIBED and self.flowing
                and since is not None and since <= self.stale_after_s)


@dataclass(frozen=True, slots=True)
class NormalizerSnapshot:
    """Records received and records dropped by validation."""

    #: upstream records received, by kind
    received: Mapping[str, int]
    #: records (and unreadable packets) dropped, by (kind, reason)
    invalid: Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class RouterSnapshot:
    """Events no route wanted, and events a route's gate held back."""

    unrouted: int
    #: events a gate (``on_change``, ``min_interval``) skipped, by (route, reason)
    filtered: Mapping[tuple[str, str], int]


@dataclass(frozen=True, slots=True)
class IntakeSnapshot:
    """The bounded queue between the receive loop and the router."""

    events: int
    capacity: int
    #: events dropped before routing, by reason (``intake_full``: shed under
    #: overload, not validated; ``shutdown``)
    dropped: Mapping[str, int]
    #: upstream payloads queued (not counting the one being dispatched)
    payloads: int = 0


@dataclass(frozen=True, slots=True)
class OverloadSnapshot:
    """Whether the bridge sheds load: upstream payloads dropped whole at the intake,
    before validation, because the pipeline is behind the upstream."""

    #: a payload was shed within the last ``OVERLOAD_CLEAR_S`` (see :mod:`bridge.pipeline.intake`)
    overloaded: bool
    #: how long the current overload has lasted (``None``: not overloaded)
    seconds: float | None
    #: seconds since the last payload was shed (``None``: never)
    seconds_since_shed: float | None
    shed_payloads: int
    #: events of those payloads (the intake's ``dropped["intake_full"]``)
    shed_events: int
    #: sinks whose buffer is full now (saturated, or a ``block`` offer waiting)
    sinks_full: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SpoolSnapshot:
    """The disk spool of a sink (``buffer.disk``)."""

    path: str
    #: events held (queued and in flight): accepted, not yet confirmed nor dropped
    events: int
    #: bytes of its segment files, and the bound (``buffer.disk.max_bytes``)
    bytes: int
    max_bytes: int
    #: seconds since the oldest held event was received (``None``: holds none)
    oldest_age_s: float | None
    #: corrupt records found (at start, and any that could not be read back)
    corrupt_records: int
    #: events found in the spool at start
    restored: int = 0
    #: held events that are on disk only (not in the memory buffer): the backlog
    on_disk_only: int = 0
    #: why writing fails now (``None``: it works)
    error: str | None = None
    write_errors: int = 0


@dataclass(frozen=True, slots=True)
class SinkSnapshot:
    """One sink worker: its state, its buffer and its counters."""

    name: str
    driver: str
    state: SinkState
    #: connected, and the last publish (if any) succeeded
    ready: bool
    #: its readiness is part of the bridge's
    required: bool
    depth: int
    capacity: int
    #: ``block`` offers waiting for room (not offered yet)
    blocked: int
    offered: int
    published: int
    conflated: int
    dropped: Mapping[str, int]
    failed_batches: int
    reconnects: int
    rejections: int
    last_error: str | None
    #: the last permanent refusal by the bus, and how long ago (``None``: never)
    last_rejection: str | None
    seconds_since_rejection: float | None
    #: ``connect()`` attempts that failed or timed out (each one is retried after a backoff)
    connect_failures: int = 0
    #: ``connect()``/``publish()`` calls that failed with a bug in the driver (an exception
    #: type it did not map), by type; the batch was kept and retried
    driver_errors: Mapping[str, int] = field(default_factory=dict)
    #: the disk spool (``buffer.disk``), ``None`` for a memory-only buffer
    spool: SpoolSnapshot | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one route sends the events of one (kind, symbol): a sink, under a topic
    and a key (``None``: the route sets no key)."""

    route: str
    sink: str
    topic: str
    key: str | None


@dataclass(frozen=True, slots=True)
class ConnectionSnapshot:
    """One connection of the pool (one API key)."""

    name: str
    #: the symbols this key may hold (``None``: not known yet)
    limit: int | None
    #: ``limit`` was learned from the upstream's limit error, not configured
    limit_learned: bool
    #: symbols placed on this connection (subscribed, or on its next connect)
    symbols: int
    #: why the connection gave up for good (``None``: it runs)
    failed: str | None
    upstream: UpstreamSnapshot

    @property
    def ready(self) -> bool:
        """Carries no symbol, or carries some and a price arrived lately."""
        return self.failed is None and (self.symbols == 0 or self.upstream.ready)


#: the results of a configuration reload (``aleno_bridge_config_reloads_total{result}``)
RELOAD_RESULTS = ("applied", "unchanged", "invalid", "refused", "failed")

#: the ``data.status`` values of ``ai.aleno.status.v1`` events
STATUSES = ("down", "up", "stale", "fresh", "gap")
#: the statuses damped per symbol (``aleno_bridge_status_events_suppressed_total``);
#: ``down`` / ``up`` are per connection and never damped
DAMPED_STATUSES = ("stale", "fresh", "gap")


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    """The market state (:mod:`bridge.pipeline.market`): symbols with a last value, how many
    of them are stale now, the status events emitted so far by status, and those the
    per-symbol damping suppressed (``stale``, ``fresh``, ``gap``)."""

    symbols: int
    stale: int
    status_events: Mapping[str, int]
    status_suppressed: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubscriptionsSnapshot:
    """The desired symbol set now (:mod:`bridge.upstream.subscriptions`), for metrics and
    ``/readyz``."""

    leases: int
    #: distinct (kind, symbol) held by at least one lease
    leased: int
    pinned: int
    #: symbols whose last lease ended, waiting for their grace period to end
    in_grace: int
    #: symbols subscribed on our behalf (pinned and accepted, leased, in grace)
    held: int
    #: pinned symbols not held (refused for the limit, or rejected by the upstream)
    unplaced_pinned: int = 0
    #: leased symbols evicted for pinned ones since start
    evicted: int = 0
    #: pinned symbols not held for want of room (not counting those the upstream
    #: rejected as unsupported), by kind: ``/readyz`` fails while any is
    unplaced_by_kind: Mapping[str, int] = field(default_factory=dict)
    #: the first few of them, ``kind:SYMBOL``
    unplaced_sample: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BridgeSnapshot:
    """The whole bridge at one moment."""

    #: ``None`` for a bridge built without a source (events are ingested directly)
    upstream: UpstreamSnapshot | None
    normalizer: NormalizerSnapshot
    router: RouterSnapshot
    intake: IntakeSnapshot
    sinks: tuple[SinkSnapshot, ...]
    #: ``None`` where a snapshot is built by hand (tests)
    overload: OverloadSnapshot | None = None
    market: MarketSnapshot | None = None
    #: every upstream connection (one per API key), when the bridge has a source
    connections: tuple[ConnectionSnapshot, ...] = ()
    #: configuration reloads so far, by result (:data:`RELOAD_RESULTS`)
    reloads: Mapping[str, int] = field(default_factory=dict)
    #: the pinned-or-leased symbol set (``None`` without a source)
    symbols: SubscriptionsSnapshot | None = None
    #: the counters of sinks a reload removed (no running sink of that name): kept for
    #: the metrics until restart, never part of readiness (``sinks`` already includes
    #: the counters of the sinks a reload replaced)
    retired_sinks: tuple[SinkSnapshot, ...] = ()


def _spool_check(spool: SpoolSnapshot, redact: Callable[[str], str]) -> dict[str, Any]:
    """A sink's spool on ``/readyz``: ok while it can write, however much it holds (a
    backlog that drains is what it is for); not ok when writing fails."""
    age = spool.oldest_age_s
    return {
        "ok": spool.error is None, "path": spool.path, "events": spool.events,
        "backlog": spool.on_disk_only, "bytes": spool.bytes, "max_bytes": spool.max_bytes,
        "oldest_age_seconds": None if age is None else round(age, 3),
        "corrupt_records": spool.corrupt_records, "restored": spool.restored,
        "error": redact(spool.error) if spool.error else None,
    }


def readiness(snap: BridgeSnapshot,
              redact: Callable[[str], str]) -> tuple[bool, dict[str, Any]]:
    """Whether the bridge is ready, and the checks behind the answer (``/readyz``).

    Ready: the upstream (if any) is :attr:`UpstreamSnapshot.ready` and every required
    sink is ready. Every error text goes through ``redact``.

    A sink with a disk spool has a ``spool:<name>`` check: ok however much the spool
    holds (draining a backlog is what it is for), not ok while it cannot write; a
    required sink's failing spool makes the bridge unready.

    The ``overload`` check shows whether the bridge sheds load; it never makes the
    bridge unready by itself (``ok`` stays true): an overloaded bridge still publishes
    at its full rate, and taking it out of service or restarting it would only lose
    more. Alert on ``aleno_bridge_overloaded`` instead.
    """
    checks: dict[str, Any] = {}
    ok = True
    up = snap.upstream
    if up is not None:
        upstream_ok = up.ready
        since = up.seconds_since_update
        checks["upstream"] = {
            "ok": upstream_ok,
            "state": up.state.value,
            "seconds_since_update": None if since is None else round(since, 3),
            "error": redact(up.last_error) if up.last_error and not upstream_ok else None,
        }
        ok = ok and upstream_ok
    if len(snap.connections) > 1:  # several API keys: each connection on its own
        for conn in snap.connections:
            c_up = conn.upstream
            c_since = c_up.seconds_since_update
            checks[f"upstream:{conn.name}"] = {
                "ok": conn.ready, "state": c_up.state.value, "symbols": conn.symbols,
                "limit": conn.limit, "limit_learned": conn.limit_learned,
                "seconds_since_update": None if c_since is None else round(c_since, 3),
                "failed": redact(conn.failed) if conn.failed else None,
                "error": (redact(c_up.last_error)
                          if c_up.last_error and not conn.ready else None),
            }
    for sink in snap.sinks:
        # not ready: why (the connection error, or the refusal of the last publish)
        error = (sink.last_error or sink.last_rejection) if not sink.ready else None
        check: dict[str, Any] = {"ok": sink.ready, "state": sink.state.value,
                                 "required": sink.required,
                                 "error": redact(error) if error else None}
        if sink.driver_errors:
            check["driver_errors"] = dict(sink.driver_errors)
        if sink.last_rejection is not None:
            # visible even while ready: the bus refuses some events for good
            check["rejections"] = sink.rejections
            check["last_rejection"] = redact(sink.last_rejection)
            check["seconds_since_rejection"] = (
                None if sink.seconds_since_rejection is None
                else round(sink.seconds_since_rejection, 3)
            )
        checks[f"sink:{sink.name}"] = check
        if sink.required and not sink.ready:
            ok = False
        if sink.spool is not None:
            checks[f"spool:{sink.name}"] = spool_check = _spool_check(sink.spool, redact)
            if sink.required and not spool_check["ok"]:
                ok = False
    ov = snap.overload
    if ov is not None:
        checks["overload"] = {
            "ok": True,
            "overloaded": ov.overloaded,
            "seconds": None if ov.seconds is None else round(ov.seconds, 3),
            "seconds_since_shed": (None if ov.seconds_since_shed is None
                                   else round(ov.seconds_since_shed, 3)),
            "shed_payloads": ov.shed_payloads,
            "shed_events": ov.shed_events,
            "intake_events": snap.intake.events,
            "intake_capacity": snap.intake.capacity,
            "sinks_full": list(ov.sinks_full),
        }
    market = snap.market
    if market is not None:
        # stale symbols never make the bridge unready: the feed is up, the upstream
        # is quiet on them (the status events say which)
        checks["market"] = {"ok": True, "symbols": market.symbols,
                            "stale_symbols": market.stale}
    wanted = snap.symbols
    if wanted is not None:
        # a configured symbol that no API key has room for does not flow: the bridge
        # is not doing what its configuration says, and says so (it is retried, and
        # evicts leased symbols; a symbol the upstream does not support is not counted
        # here, it can never be placed: see the upstream's rejected symbols)
        unplaced = sum(wanted.unplaced_by_kind.values())
        checks["symbols"] = {
            "ok": unplaced == 0, "configured": wanted.pinned, "unplaced": unplaced,
            "unplaced_sample": list(wanted.unplaced_sample),
            "error": (f"{unplaced} configured symbol(s) not subscribed: no API key has "
                      "room (add a key to source.api_keys, raise a limit, or configure "
                      "fewer symbols); retried") if unplaced else None,
            "leases": wanted.leases, "leased": wanted.leased, "evicted": wanted.evicted}
        ok = ok and unplaced == 0
    return ok, checks


__all__ = [
    "ACK_STATUSES",
    "DAMPED_STATUSES",
    "KINDS",
    "PIPELINE_DROP_REASONS",
    "RELOAD_RESULTS",
    "SINK_DROP_REASONS",
    "STATUSES",
    "BridgeSnapshot",
    "ConnectionSnapshot",
    "Destination",
    "IntakeSnapshot",
    "MarketSnapshot",
    "NormalizerSnapshot",
    "OverloadSnapshot",
    "RouterSnapshot",
    "SinkSnapshot",
    "SinkState",
    "SubscriptionsSnapshot",
    "UpstreamSnapshot",
    "UpstreamState",
    "frozen_counts",
    "readiness",
]
