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

What is watched is what is subscribed. The stale and gap machinery of a symbol starts
afresh whenever it is (re)subscribed: a symbol that leaves the subscribed set (its last
lease ended and its grace with it, a reload removed it, it moved from one API key's
connection to another) leaves the cache, the stale set and the damping state at once
(:meth:`MarketState.sync_wanted`, told by the sources whenever their set changes), so
the time it was deliberately unsubscribed is never reported as ``stale`` or ``gap``, and
no status event says it went (nobody is missing anything). Records received before it
left but routed after it came back (an intake backlog) are not cached either.

Status events are damped per symbol (:class:`Damping`): at most
``source.status_damping.max_events`` ``stale`` / ``fresh`` / ``gap`` events of one symbol
in any ``window_s``; more are suppressed and counted
(``aleno_bridge_status_events_suppressed_total{status}``), and the next event of that
symbol carries ``data.suppressed`` (counts by status). Nothing a consumer relies on is
lost: when the symbol's budget allows again and its state (stale or fresh) is not the one
its last emitted event said, that state is emitted (``data.damped: true``), so a consumer
never stays on ``stale`` for a symbol that flows, nor on ``fresh`` for one that is silent.

Ids are deterministic: derived from the status, the symbol and the upstream send times
the status is about (never from this process's clock), so two replicas of a shard that
saw the same records produce the same ids, and a consumer deduplicates them like
prices. ``down`` has no send time of its own: its id names the last update seen.

Cost on the data path: one dict look-up and two comparisons per event
(:meth:`MarketState.observe`), and one identity test of the subscribed set per chunk;
damping costs only when a status event is due. The stale watch runs beside it, at most
every half second, over the cached symbols and the damping records. Memory: one
:data:`Entry` (the envelope's bytes and three numbers) per symbol this process
subscribes; a sharded bridge holds its own share.

The cache is in :mod:`bridge.pipeline.lastvalues`, the status events and their damping
in :mod:`bridge.pipeline.status`; :class:`MarketState` here ties them to the flow, and
this module re-exports every name of both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Final

from bridge.core.envelope import DEFAULT_SOURCE, Event
from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import DAMPED_STATUSES, STATUSES, MarketSnapshot, frozen_counts

# the cache and the status events live in modules of their own; every name stays
# importable from here
from bridge.pipeline.lastvalues import BODY as BODY
from bridge.pipeline.lastvalues import PRICE as PRICE
from bridge.pipeline.lastvalues import RECEIVED as RECEIVED
from bridge.pipeline.lastvalues import SENT_MS as SENT_MS
from bridge.pipeline.lastvalues import (
    SNAPSHOT_FORMAT,
    Entry,
    LastValue,
    LastValues,
    entry_of,
    monotonic_ms,
)
from bridge.pipeline.status import (
    DAMP_MAX_EVENTS,
    DAMP_WINDOW_S,
    NO_EXTRA,
    STATUS_KIND,
    UPSTREAM_SUBJECT,
    Damping,
    StatusEvent,
)

#: a jump of ``sentTimestampMs`` beyond this many update intervals is a ``gap``
#: (one missed update makes a jump of two intervals; the margin absorbs jitter)
GAP_FACTOR: Final = 1.9
#: how often the stale watch looks at most (it looks four times per stale period)
STALE_SCAN_MAX_S: Final = 0.5
#: how long a record received before its symbol was unsubscribed may still be waiting
#: in the intake (records older than this are not told from new ones; an intake that
#: holds records for minutes sheds them first, see bridge.app)
GONE_MARK_S: Final = 300.0


class MarketState:
    """The last value cache and the status events derived from the flow.

    ``emit(events)`` receives status events produced outside the data path (``down``,
    ``up``, ``stale``, damped corrections); :meth:`observe` returns the ones the data
    path produces (``fresh``, ``gap``) for the dispatcher to route after the chunk.

    ``wanted``, when given, says which symbols are subscribed (by kind, a set replaced
    whole on every change, like :attr:`bridge.upstream.client.AlenoSource.wanted`): a symbol that
    leaves it is forgotten (:meth:`sync_wanted`), and the stale watch skips the others.
    ``damping``: the status damping (:class:`Damping`, default
    :data:`DAMP_MAX_EVENTS` per :data:`DAMP_WINDOW_S`). ``clock``: wall-clock
    milliseconds, the clock of the events' ``received_ms`` (the normalizer's).
    ``on_forget(kind, symbols)`` is told the symbols forgotten (the router drops their
    per-symbol gates).
    """

    def __init__(
        self,
        emit: Callable[[list[Event]], None],
        *,
        stale_after_s: float,
        update_interval_s: float,
        source: str = DEFAULT_SOURCE,
        wanted: Callable[[], Mapping[str, AbstractSet[str]] | None] | None = None,
        damping: Damping | None = None,
        clock: Callable[[], int] | None = None,
        on_forget: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.values = LastValues()
        self.emit = emit
        self.stale_after_s = stale_after_s
        self.set_interval(update_interval_s)
        self.source = source
        self._wanted = wanted
        self.damping = damping if damping is not None else Damping()
        #: told ``(kind, symbols)`` when symbols are forgotten (the router drops their
        #: per-symbol gates: a re-subscribed symbol is not "unchanged" from before)
        self.on_forget: Callable[[str, list[str]], None] | None = on_forget
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._up_since = time.monotonic()
        #: the connections that are down: since when, and why
        self._down: dict[str, float] = {}
        self._down_reasons: dict[str, str] = {}
        self._last_sent_ms = 0
        #: the subscribed sets last looked at, by kind (the very objects, see sync_wanted)
        self._seen: dict[str, AbstractSet[str]] = {}
        #: (kind, symbol) -> when (``clock``) it was forgotten; in that order. A record
        #: received before is not cached (see observe); dropped after GONE_MARK_S
        self._gone_at: dict[tuple[str, str], int] = {}

    @property
    def stale(self) -> int:
        """How many symbols are stale now (the ``aleno_bridge_stale_symbols`` gauge)."""
        return self.values.stale

    @property
    def link_up(self) -> bool:
        """No connection is down: the stale watch runs only then."""
        return not self._down

    def set_interval(self, update_interval_s: float) -> None:
        """The upstream cadence the gap detection expects (a reload may change it)."""
        self.gap_ms = GAP_FACTOR * update_interval_s * 1000.0
        self.interval_ms = int(update_interval_s * 1000)

    def snapshot(self) -> MarketSnapshot:
        return MarketSnapshot(len(self.values), self.stale, frozen_counts(self.counts),
                              frozen_counts(self.damping.suppressed))

    def _count(self, events: list[Event]) -> list[Event]:
        for ev in events:
            status = ev.data["status"]
            self.counts[status] = self.counts.get(status, 0) + 1
        return events

    # -- what is subscribed ------------------------------------------------------------

    def sync_wanted(self) -> None:
        """Forget the symbols that left the subscribed set, or came back to it, since the
        last look: their stale and gap machinery starts afresh with their next record.

        Every path that unsubscribes a symbol changes the set: a lease's end (after its
        grace), a reload, a move to another API key's connection (which removes it from
        one connection and adds it to the other). The symbol book calls this whenever
        the set changes (:class:`~bridge.upstream.symbols.SymbolBook`), so even a move
        made within one step is seen; the data path and the stale watch look too, which costs one
        identity test per kind while nothing changed (each kind's set is replaced whole
        on a change, never modified).
        """
        if self._wanted is None:
            return
        wanted = self._wanted()
        if wanted is None:
            return
        for kind in PRICE_KINDS:
            now = wanted.get(kind)
            seen = self._seen.get(kind)
            if now is None or now is seen:
                continue
            self._seen[kind] = now
            if seen is None:
                continue  # the first look: nothing was unsubscribed yet
            changed = seen ^ now
            if changed:
                self.forget(kind, changed)

    def forget(self, kind: str, symbols: Iterable[str]) -> int:
        """The symbols were unsubscribed: drop their last values, their stale mark and
        their damping, and emit nothing (nobody misses what nobody subscribes). Records
        received until now are not cached any more (an intake backlog). Returns how many
        had a last value."""
        symbols = list(symbols)
        if not symbols:
            return 0
        now_ms = self._clock()
        gone = self._gone_at
        for s in symbols:
            key = (kind, s)
            self.damping.forget(key)
            gone.pop(key, None)
            gone[key] = now_ms  # the most recent last (see _drop_gone_marks)
        if self.on_forget is not None:
            self.on_forget(kind, symbols)
        return self.values.forget(kind, symbols)

    def _drop_gone_marks(self) -> None:
        gone = self._gone_at
        if not gone:
            return
        horizon = self._clock() - int(GONE_MARK_S * 1000)
        old = []
        for key, at in gone.items():
            if at > horizon:
                break
            old.append(key)
        for key in old:
            del gone[key]

    # -- the data path ---------------------------------------------------------------

    def observe(self, kind: str, events: list[Event],
                now: float | None = None) -> list[Event] | None:
        """Cache ``events`` (one kind) as last values; the ``fresh`` and ``gap``
        status events they cause, or ``None``. ``now``: their arrival
        (``time.monotonic()``, the default)."""
        if not events:
            return None
        if self._wanted is not None:
            wanted = self._wanted()
            if wanted is not None and wanted.get(kind) is not self._seen.get(kind):
                self.sync_wanted()
        values = self.values.by_kind(kind)
        stale = self.values.stale_of(kind)
        gone = self._gone_at
        mono = time.monotonic() if now is None else now
        now_ms = monotonic_ms(mono)
        gap_ms = self.gap_ms
        out: list[Event] | None = None
        new = False
        for ev in events:
            symbol = ev.symbol
            prev = values.get(symbol)
            if prev is None:
                if gone:
                    at = gone.get((kind, symbol))
                    if at is not None:
                        if ev.received_ms <= at:
                            continue  # received before it was unsubscribed: not ours
                        del gone[(kind, symbol)]
                values[symbol] = entry_of(ev, now_ms)
                new = True
                continue
            delta = ev.sent_ms - prev[SENT_MS]
            if delta <= 0:
                continue  # a repeated or older record: the cache keeps the newer one
            if delta > gap_ms or (stale and symbol in stale):
                was_stale = symbol in stale
                if delta > gap_ms:
                    extra = self.damping.let(kind, symbol, "gap", mono, was_stale)
                    if extra is not None:
                        if out is None:
                            out = []
                        out.append(self._gap(kind, prev, ev, extra))
                if was_stale:
                    stale.discard(symbol)
                    extra = self.damping.let(kind, symbol, "fresh", mono, True)
                    if extra is not None:
                        if out is None:
                            out = []
                        out.append(self._fresh(kind, prev, ev, now_ms, extra))
            values[symbol] = entry_of(ev, now_ms)
        if new:
            self.values.changed(kind)
        last = events[-1].sent_ms
        if last > self._last_sent_ms:
            self._last_sent_ms = last
        return self._count(out) if out else None

    def _gap(self, kind: str, prev: Entry, ev: Event,
             extra: Mapping[str, Any] = NO_EXTRA) -> Event:
        step = self.interval_ms
        last = prev[SENT_MS]
        missed = max(1, round((ev.sent_ms - last) / step) - 1) if step else 1
        return StatusEvent("gap", ev.symbol, ev.sent_ms, {
            "feed": kind, "symbol": ev.symbol,
            "lastSeenMs": last, "resumedMs": ev.sent_ms,
            "missingFromMs": min(last + step, ev.sent_ms - 1),
            "missingToMs": max(ev.sent_ms - step, last + 1),
            "missedUpdates": missed, **extra,
        }, self.source)

    def _fresh(self, kind: str, prev: Entry, ev: Event, now_ms: int,
               extra: Mapping[str, Any] = NO_EXTRA) -> Event:
        return StatusEvent("fresh", ev.symbol, ev.sent_ms, {
            "feed": kind, "symbol": ev.symbol, "sentTimestampMs": ev.sent_ms,
            "price": ev.price,
            "silentForMs": now_ms - prev[RECEIVED], **extra,
        }, self.source)

    def _stale(self, kind: str, symbol: str, entry: Entry, now_ms: int,
               extra: Mapping[str, Any] = NO_EXTRA) -> Event:
        return StatusEvent("stale", symbol, entry[SENT_MS], {
            "feed": kind, "symbol": symbol,
            "lastSentTimestampMs": entry[SENT_MS], "lastPrice": entry[PRICE],
            "silentForMs": now_ms - entry[RECEIVED],
            "staleAfterMs": int(self.stale_after_s * 1000), **extra,
        }, self.source)

    # -- beside the data path ----------------------------------------------------------

    def scan_stale(self, now: float | None = None) -> list[Event]:
        """Mark the symbols silent for ``stale_after_s`` while the link is up, and make
        right what damping held back once a symbol's budget allows; emit and return
        these status events."""
        now = time.monotonic() if now is None else now
        self.sync_wanted()
        out = self._settle(now)
        self.damping.prune(now)
        self._drop_gone_marks()
        cutoff = now - self.stale_after_s
        if self.link_up and self._up_since <= cutoff:
            # (not within a stale period of the link coming up)
            out += self._mark_stale(now, cutoff)
        if out:
            self.emit(self._count(out))
        return out

    def _mark_stale(self, now: float, cutoff: float) -> list[Event]:
        wanted = self._wanted() if self._wanted is not None else None
        now_ms, cutoff_ms = monotonic_ms(now), monotonic_ms(cutoff)
        out: list[Event] = []
        for kind in PRICE_KINDS:
            subscribed = wanted.get(kind) if wanted is not None else None
            stale = self.values.stale_of(kind)
            for symbol, entry in self.values.by_kind(kind).items():
                if entry[RECEIVED] > cutoff_ms or symbol in stale:
                    continue
                if subscribed is not None and symbol not in subscribed:
                    continue
                stale.add(symbol)
                extra = self.damping.let(kind, symbol, "stale", now, False)
                if extra is not None:
                    out.append(self._stale(kind, symbol, entry, now_ms, extra))
        return out

    def _settle(self, now: float) -> list[Event]:
        """The corrections damping owes: a symbol whose last emitted ``stale`` /
        ``fresh`` is not its state now gets its state, once its budget allows."""
        damping = self.damping
        pending = damping.pending()
        if not pending:
            return []
        now_ms = monotonic_ms(now)
        out: list[Event] = []
        for key in pending:
            kind, symbol = key
            entry = self.values.by_kind(kind).get(symbol)
            told = damping.told_stale(key)
            if entry is None or told is None:
                damping.forget(key)
                continue
            is_stale = symbol in self.values.stale_of(kind)
            if told == is_stale:
                damping.settled(key)
                continue
            if not damping.room(key, now):
                continue  # still held down
            status = "stale" if is_stale else "fresh"
            extra = damping.let(kind, symbol, status, now, told)
            if extra is None:  # pragma: no cover - room() said there is
                continue
            damping.settled(key)
            data = {"damped": True, **extra}
            if is_stale:
                out.append(self._stale(kind, symbol, entry, now_ms, data))
            else:
                out.append(StatusEvent("fresh", symbol, entry[SENT_MS], {
                    "feed": kind, "symbol": symbol, "sentTimestampMs": entry[SENT_MS],
                    "price": entry[PRICE], "silentForMs": 0, **data,
                }, self.source))
        return out

    def retire(self, connection: str) -> None:
        """A connection gave up for good (its symbols moved to the others): it is no
        longer down, it is gone, so its outage no longer holds the stale watch off.
        Emits nothing (its ``down`` was told; the symbols flow on other connections)."""
        if self._down.pop(connection, None) is not None:
            self._down_reasons.pop(connection, None)
            self._up_since = time.monotonic()

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
    "DAMPED_STATUSES",
    "DAMP_MAX_EVENTS",
    "DAMP_WINDOW_S",
    "GAP_FACTOR",
    "SNAPSHOT_FORMAT",
    "STATUSES",
    "STATUS_KIND",
    "UPSTREAM_SUBJECT",
    "Damping",
    "Entry",
    "LastValue",
    "LastValues",
    "MarketState",
    "StatusEvent",
    "monotonic_ms",
]
