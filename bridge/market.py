"""Market state: the last value of every symbol, and the status events that say when a
price can no longer be trusted.

The bridge is more than a pipe: a consumer that starts late wants the current price
now, and a consumer must be able to tell a quiet symbol from a dead feed. This module
keeps, per (kind, symbol), the latest valid event and when it arrived
(:class:`LastValues`: what ``/v1/snapshot`` and the NATS ``snapshot`` endpoint answer),
and derives the status events (:class:`MarketState`), CloudEvents of type
``ai.aleno.status.v1`` routed like prices with ``match: {kind: status}``:

``down`` / ``up``
    a connection that delivered data ended (with the reason), and data flows again
    (with the outage length and the reason of the outage);
``stale`` / ``fresh``
    a symbol had no update for ``source.symbol_stale_after_s`` while the connection was
    up; ``fresh`` on its next update. Only symbols that updated at least once are
    watched (a symbol the upstream never sent is named by the subscription ack, not
    here), and the clock of every symbol restarts when a connection comes up, so a
    reconnect does not make every symbol stale at once;
``gap``
    a symbol's ``sentTimestampMs`` jumped by more than :data:`GAP_FACTOR` times
    ``source.update_interval_s``: updates were missed (after a reconnect, or dropped
    upstream). ``data.missingFromMs`` / ``missingToMs`` are the first and last missing
    send times the cadence predicts; ``lastSeenMs`` / ``resumedMs`` the updates around
    the hole.

Ids are deterministic: derived from the status, the symbol and the upstream send times
the status is about (never from this process's clock), so two replicas of a shard that
saw the same records produce the same ids, and a consumer deduplicates them like
prices. ``down`` has no send time of its own: its id names the last update seen.

Cost on the data path: one dict look-up and two comparisons per event
(:meth:`MarketState.observe`); the stale watch runs beside it, at most every half
second, over the cached symbols. Memory: one :class:`LastValue` (and the latest event
it holds) per symbol this process subscribes; a sharded bridge holds its own share.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from fnmatch import translate
from typing import Any, Final

from bridge.envelope import DEFAULT_SOURCE, Event, EventHeader, iso_time
from bridge.state import STATUSES, MarketSnapshot, frozen_counts

#: a jump of ``sentTimestampMs`` beyond this many update intervals is a ``gap``
#: (one missed update makes a jump of two intervals; the margin absorbs jitter)
GAP_FACTOR: Final = 1.9
#: the kind of status events (``match: {kind: status}``)
STATUS_KIND: Final = "status"
#: the subject (and routing symbol) of the events about the upstream connection
UPSTREAM_SUBJECT: Final = "upstream"
PRICE_KINDS: Final = ("ticker", "equity")
#: how often the stale watch looks at most (it looks four times per stale period)
STALE_SCAN_MAX_S: Final = 0.5


class LastValue:
    """The latest valid event of one (kind, symbol) and when it arrived."""

    __slots__ = ("event", "received_monotonic", "stale")

    def __init__(self, event: Event, received_monotonic: float) -> None:
        self.event = event
        self.received_monotonic = received_monotonic
        #: a ``stale`` event was emitted and no update came since
        self.stale = False

    def __repr__(self) -> str:
        return f"LastValue({self.event.id!r})"


def _glob_matcher(symbols: Sequence[str]) -> Callable[[str], bool]:
    """One compiled matcher for shell-style globs (upper-cased like symbols)."""
    pattern = "|".join(f"(?:{translate(s.strip().upper())})" for s in symbols)
    return re.compile(pattern).match  # type: ignore[return-value]


_GLOB_CHARS: Final = frozenset("*?[")


class LastValues:
    """The last value cache: per kind, symbol -> :class:`LastValue`.

    Written only by the dispatcher (:meth:`MarketState.observe`); read by the control
    surface. Every method is synchronous and runs on the event loop, so a reader never
    sees a half-written entry.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, dict[str, LastValue]] = {k: {} for k in PRICE_KINDS}
        #: the symbols of each kind in order, kept between snapshots (``None``: a
        #: symbol came or went since)
        self._sorted: dict[str, list[str] | None] = dict.fromkeys(PRICE_KINDS)

    def __len__(self) -> int:
        return sum(map(len, self._kinds.values()))

    def by_kind(self, kind: str) -> dict[str, LastValue]:
        """The live mapping of one kind (symbol -> value); read-only for callers."""
        return self._kinds[kind]

    def put(self, event: Event, received_monotonic: float | None = None) -> None:
        """Keep ``event`` as the last value of its symbol unless a newer one is cached."""
        values = self._kinds[event.kind]
        now = time.monotonic() if received_monotonic is None else received_monotonic
        lv = values.get(event.symbol)
        if lv is None:
            values[event.symbol] = LastValue(event, now)
            self._sorted[event.kind] = None
        elif event.sent_ms >= lv.event.sent_ms:
            lv.event = event
            lv.received_monotonic = now

    def get(self, kind: str, symbol: str) -> LastValue | None:
        values = self._kinds.get(kind)
        return None if values is None else values.get(symbol.strip().upper())

    def forget(self, kind: str, symbols: Iterable[str]) -> int:
        """Drop the values of symbols no longer subscribed; return how many were held."""
        values = self._kinds[kind]
        self._sorted[kind] = None
        return sum(values.pop(s, None) is not None for s in symbols)

    def symbols(self, kind: str) -> list[str]:
        """The cached symbols of ``kind`` in order (shared: do not modify)."""
        order = self._sorted.get(kind)
        if order is None:
            order = self._sorted[kind] = sorted(self._kinds[kind])
        return order

    def select(self, kind: str | None = None,
               symbols: Sequence[str] | None = None) -> list[LastValue]:
        """The values of ``kind`` (``None`` or ``"*"``: tickers and equities) whose
        symbol matches one of ``symbols`` (shell-style globs, case-insensitive;
        ``None``: every symbol), sorted by (kind, symbol)."""
        kinds = PRICE_KINDS if kind in (None, "*") else (kind,)
        out: list[LastValue] = []
        patterns = [s.strip().upper() for s in symbols] if symbols is not None else None
        for k in kinds:
            values = self._kinds.get(k)
            if not values:
                continue
            if patterns is None or "*" in patterns:
                out.extend(map(values.__getitem__, self.symbols(k)))
            elif not any(_GLOB_CHARS.intersection(p) for p in patterns):
                out.extend(values[s] for s in sorted(set(patterns)) if s in values)
            else:
                match = _glob_matcher(patterns)
                out.extend(values[s] for s in self.symbols(k) if match(s))
        return out


class StatusEvent(Event):
    """An ``ai.aleno.status.v1`` event: ``kind`` is ``status``; the symbol is the
    symbol the status is about, or ``upstream`` for ``down`` / ``up``."""

    __slots__ = ()

    def __init__(self, status: str, symbol: str, ref_ms: int, data: dict[str, Any],
                 source: str, id_: str | None = None) -> None:
        base, _, quote = symbol.partition("/")
        payload = {"kind": STATUS_KIND, "status": status, **data}
        feed = data.get("feed")
        eid = id_ or f"status:{status}:{feed + ':' if feed else ''}{symbol}:{ref_ms}"
        when = iso_time(ref_ms)
        received = time.time_ns() // 1_000_000
        self.kind = STATUS_KIND
        self.symbol = symbol
        self.base = base
        self.quote = quote
        self.sent_ms = ref_ms
        self.received_ms = received
        self.time = when
        self.data = payload
        self.raw = payload
        self.prices = (status,)
        self.source = source
        self.price = data.get("price")  # type: ignore[assignment]
        self.id = eid
        self._encoded = {}
        self._body = None
        self._format = None
        h = self._header = object.__new__(EventHeader)
        for name in ("kind", "symbol", "base", "quote", "id", "sent_ms", "received_ms",
                     "time", "price", "source", "_body", "_format"):
            setattr(h, name, getattr(self, name))

    @property
    def status(self) -> str:
        return str(self.data["status"])


class MarketState:
    """The last value cache and the status events derived from the flow.

    ``emit(events)`` receives status events produced outside the data path (``down``,
    ``up``, ``stale``); :meth:`observe` returns the ones the data path produces
    (``fresh``, ``gap``) for the dispatcher to route after the chunk.
    ``wanted``, when given, says which symbols are subscribed: the stale watch skips
    the others.
    """

    def __init__(
        self,
        emit: Callable[[list[Event]], None],
        *,
        stale_after_s: float,
        update_interval_s: float,
        source: str = DEFAULT_SOURCE,
        wanted: Callable[[], Mapping[str, Container[str]] | None] | None = None,
    ) -> None:
        self.values = LastValues()
        self.emit = emit
        self.stale_after_s = stale_after_s
        self.set_interval(update_interval_s)
        self.source = source
        self._wanted = wanted
        self.stale = 0
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._up_since = time.monotonic()
        #: the connections that are down: since when, and why
        self._down: dict[str, float] = {}
        self._down_reasons: dict[str, str] = {}
        self._last_sent_ms = 0

    @property
    def link_up(self) -> bool:
        """No connection is down: the stale watch runs only then."""
        return not self._down

    def set_interval(self, update_interval_s: float) -> None:
        """The upstream cadence the gap detection expects (a reload may change it)."""
        self.gap_ms = GAP_FACTOR * update_interval_s * 1000.0
        self.interval_ms = int(update_interval_s * 1000)

    def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(len(self.values), self.stale, frozen_counts(self.counts))

    def _count(self, events: list[Event]) -> list[Event]:
        for ev in events:
            status = ev.data["status"]
            self.counts[status] = self.counts.get(status, 0) + 1
        return events

    # -- the data path ---------------------------------------------------------------

    def observe(self, kind: str, events: list[Event]) -> list[Event] | None:
        """Cache ``events`` (one kind) as last values; the ``fresh`` and ``gap``
        status events they cause, or ``None``."""
        if not events:
            return None
        values = self.values.by_kind(kind)
        now = time.monotonic()
        gap_ms = self.gap_ms
        out: list[Event] | None = None
        for ev in events:
            lv = values.get(ev.symbol)
            if lv is None:
                values[ev.symbol] = LastValue(ev, now)
                self.values._sorted[kind] = None
                continue
            prev = lv.event
            delta = ev.sent_ms - prev.sent_ms
            if delta <= 0:
                continue  # a repeated or older record: the cache keeps the newer one
            if delta > gap_ms or lv.stale:
                if out is None:
                    out = []
                if delta > gap_ms:
                    out.append(self._gap(kind, prev, ev))
                if lv.stale:
                    lv.stale = False
                    self.stale -= 1
                    out.append(self._fresh(kind, lv, ev, now))
            lv.event = ev
            lv.received_monotonic = now
        last = events[-1].sent_ms
        if last > self._last_sent_ms:
            self._last_sent_ms = last
        return self._count(out) if out else None

    def _gap(self, kind: str, prev: Event, ev: Event) -> Event:
        step = self.interval_ms
        missed = max(1, round((ev.sent_ms - prev.sent_ms) / step) - 1) if step else 1
        return StatusEvent("gap", ev.symbol, ev.sent_ms, {
            "feed": kind, "symbol": ev.symbol,
            "lastSeenMs": prev.sent_ms, "resumedMs": ev.sent_ms,
            "missingFromMs": min(prev.sent_ms + step, ev.sent_ms - 1),
            "missingToMs": max(ev.sent_ms - step, prev.sent_ms + 1),
            "missedUpdates": missed,
        }, self.source)

    def _fresh(self, kind: str, lv: LastValue, ev: Event, now: float) -> Event:
        return StatusEvent("fresh", ev.symbol, ev.sent_ms, {
            "feed": kind, "symbol": ev.symbol, "sentTimestampMs": ev.sent_ms,
            "price": ev.price,
            "silentForMs": int((now - lv.received_monotonic) * 1000),
        }, self.source)

    # -- beside the data path ----------------------------------------------------------

    def scan_stale(self, now: float | None = None) -> list[Event]:
        """Mark the symbols silent for ``stale_after_s`` while the link is up; emit and
        return their ``stale`` events."""
        if not self.link_up:
            return []
        now = time.monotonic() if now is None else now
        cutoff = now - self.stale_after_s
        if self._up_since > cutoff:
            return []  # the link came up less than a stale period ago
        wanted = self._wanted() if self._wanted is not None else None
        out: list[Event] = []
        for kind in PRICE_KINDS:
            subscribed = wanted.get(kind) if wanted is not None else None
            for symbol, lv in self.values.by_kind(kind).items():
                if lv.stale or lv.received_monotonic > cutoff:
                    continue
                if subscribed is not None and symbol not in subscribed:
                    continue
                lv.stale = True
                self.stale += 1
                prev = lv.event
                out.append(StatusEvent("stale", symbol, prev.sent_ms, {
                    "feed": kind, "symbol": symbol,
                    "lastSentTimestampMs": prev.sent_ms, "lastPrice": prev.price,
                    "silentForMs": int((now - lv.received_monotonic) * 1000),
                    "staleAfterMs": int(self.stale_after_s * 1000),
                }, self.source))
        if out:
            self.emit(self._count(out))
        return out

    def link(self, up: bool, cause: str, connection: str = "") -> None:
        """An upstream connection came up (data flows) or went down: emit ``up`` /
        ``down``. While a connection is down no symbol is declared stale (``down`` says
        it all); when it comes up, the stale watch waits a whole period again (see
        :meth:`scan_stale`), so a reconnect does not make every symbol stale at once.

        ``connection`` names the connection when the bridge has several API keys
        (``data.connection``, and part of the id); each has its own up/down.
        Both ids name the last update seen before the outage: replicas of a shard that
        lost the same upstream at the same point agree on them.
        """
        now = time.monotonic()
        last = self._last_sent_ms
        wall = time.time_ns() // 1_000_000
        named = {"connection": connection} if connection else {}
        tag = f"{connection}:" if connection else ""
        down_at = self._down.get(connection)
        if up:
            self._up_since = now
            if down_at is None:
                return  # the first connection, or no outage to report
            del self._down[connection]
            reason = self._down_reasons.pop(connection, "")
            ev = StatusEvent("up", UPSTREAM_SUBJECT, wall, {
                **named, "reason": reason, "outageMs": int((now - down_at) * 1000),
                "lastSentTimestampMs": last or None,
            }, self.source, id_=f"status:up:{UPSTREAM_SUBJECT}:{tag}{last}")
        else:
            if down_at is not None:
                return
            self._down[connection] = now
            self._down_reasons[connection] = cause
            ev = StatusEvent("down", UPSTREAM_SUBJECT, wall, {
                **named, "reason": cause, "lastSentTimestampMs": last or None,
            }, self.source, id_=f"status:down:{UPSTREAM_SUBJECT}:{tag}{last}")
        self.emit(self._count([ev]))


__all__ = [
    "GAP_FACTOR",
    "STATUSES",
    "STATUS_KIND",
    "UPSTREAM_SUBJECT",
    "LastValue",
    "LastValues",
    "MarketState",
    "StatusEvent",
]
