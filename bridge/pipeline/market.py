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
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from fnmatch import translate
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import orjson

from bridge.core.envelope import DEFAULT_SOURCE, Event, EventHeader, iso_time
from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import DAMPED_STATUSES, STATUSES, MarketSnapshot, frozen_counts

#: a jump of ``sentTimestampMs`` beyond this many update intervals is a ``gap``
#: (one missed update makes a jump of two intervals; the margin absorbs jitter)
GAP_FACTOR: Final = 1.9
#: the kind of status events (``match: {kind: status}``)
STATUS_KIND: Final = "status"
#: the subject (and routing symbol) of the events about the upstream connection
UPSTREAM_SUBJECT: Final = "upstream"
#: how often the stale watch looks at most (it looks four times per stale period)
STALE_SCAN_MAX_S: Final = 0.5
#: the default damping: at most this many damped status events per symbol ...
DAMP_MAX_EVENTS: Final = 4
#: ... in any window of this many seconds (``source.status_damping``)
DAMP_WINDOW_S: Final = 60.0
#: how long a record received before its symbol was unsubscribed may still be waiting
#: in the intake (records older than this are not told from new ones; an intake that
#: holds records for minutes sheds them first, see bridge.app)
GONE_MARK_S: Final = 300.0


#: the wire format of the cached envelopes (what a snapshot splices)
SNAPSHOT_FORMAT: Final = "cloudevents-json"

#: A cache entry: ``(body, sent_ms, received_ms, price)``, ``received_ms`` on the
#: monotonic clock (:func:`monotonic_ms`), so a snapshot computes ages in integers.
#: A plain tuple of
#: atomic values on purpose: the cycle collector stops tracking such a tuple the first
#: time it survives a collection, so the entries replaced every second (10,000 a second
#: at 10,000 symbols) never fill the old generation and never cost a full collection
#: (an object per entry, and the event it held, made the bridge run a 50-100 ms full
#: collection every second at 10,000 symbols: measured with ``bench/snapshot.py``).
Entry = tuple[bytes, int, int, float]
BODY: Final = 0
SENT_MS: Final = 1
RECEIVED: Final = 2
PRICE: Final = 3


class LastValue(NamedTuple):
    """A readable copy of one cached value (what :meth:`LastValues.get` returns)."""

    kind: str
    symbol: str
    #: the envelope in :data:`SNAPSHOT_FORMAT`, the bytes the sinks published
    body: bytes
    sent_ms: int
    #: when it arrived (:func:`monotonic_ms`)
    received_ms: int
    price: float

    @property
    def received_monotonic(self) -> float:
        """When it arrived, in ``time.monotonic()`` seconds."""
        return self.received_ms / 1000.0

    def envelope(self) -> dict[str, Any]:
        """The envelope, decoded."""
        env: dict[str, Any] = orjson.loads(self.body)
        return env


def monotonic_ms(seconds: float | None = None) -> int:
    """``time.monotonic()`` (or ``seconds`` on that clock) in whole milliseconds."""
    return int((time.monotonic() if seconds is None else seconds) * 1000.0)


def _entry(event: Event, received_ms: int) -> Entry:
    return (event.encoded(SNAPSHOT_FORMAT).body, event.sent_ms, received_ms, event.price)


def _glob_matcher(symbols: Sequence[str]) -> Callable[[str], bool]:
    """One compiled matcher for shell-style globs (upper-cased like symbols)."""
    pattern = "|".join(f"(?:{translate(s.strip().upper())})" for s in symbols)
    return re.compile(pattern).match  # type: ignore[return-value]


_GLOB_CHARS: Final = frozenset("*?[")


class LastValues:
    """The last value cache: per kind, symbol -> :data:`Entry`.

    Written only by the dispatcher (:meth:`MarketState.observe`) on the event loop;
    read by the control surface, which answers snapshots on a thread of its own
    (:mod:`bridge.control.thread`). Reading from that thread is safe without a lock
    because every write is one dict store of an immutable entry (a reader sees the old
    entry or the new one, never half of one), and the readers only make single calls
    into C that hold the GIL throughout (``dict.get``, ``sorted(dict)``). The sorted
    symbol list is cached with the version of the key set it was made from, so a
    symbol that comes or goes while a reader sorts is seen by the next reader.
    """

    def __init__(self) -> None:
        self._kinds: dict[str, dict[str, Entry]] = {k: {} for k in PRICE_KINDS}
        #: the symbols of each kind marked stale (a ``stale`` event went out, no update
        #: came since)
        self._stale: dict[str, set[str]] = {k: set() for k in PRICE_KINDS}
        #: bumped whenever a symbol of the kind comes or goes
        self._version: dict[str, int] = dict.fromkeys(PRICE_KINDS, 0)
        #: the symbols of each kind in order, and the version they were sorted at
        self._sorted: dict[str, tuple[int, list[str]]] = {}

    def __len__(self) -> int:
        return sum(map(len, self._kinds.values()))

    @property
    def stale(self) -> int:
        """How many symbols are stale now."""
        return sum(map(len, self._stale.values()))

    def by_kind(self, kind: str) -> dict[str, Entry]:
        """The live mapping of one kind (symbol -> entry); read-only for callers."""
        return self._kinds[kind]

    def stale_of(self, kind: str) -> set[str]:
        """The live set of the stale symbols of one kind; read-only for callers."""
        return self._stale[kind]

    def changed(self, kind: str) -> None:
        """A symbol of ``kind`` came or went (the sorted list is made again)."""
        self._version[kind] += 1

    def put(self, event: Event, received_monotonic: float | None = None) -> None:
        """Keep ``event`` as the last value of its symbol unless a newer one is cached
        (``received_monotonic``: when it arrived, ``time.monotonic()`` by default)."""
        values = self._kinds[event.kind]
        now = monotonic_ms(received_monotonic)
        prev = values.get(event.symbol)
        if prev is None:
            values[event.symbol] = _entry(event, now)
            self.changed(event.kind)
        elif event.sent_ms >= prev[SENT_MS]:
            values[event.symbol] = _entry(event, now)

    def get(self, kind: str, symbol: str) -> LastValue | None:
        values = self._kinds.get(kind)
        if values is None:
            return None
        symbol = symbol.strip().upper()
        entry = values.get(symbol)
        return None if entry is None else LastValue(kind, symbol, *entry)

    def forget(self, kind: str, symbols: Iterable[str]) -> int:
        """Drop the values of symbols no longer subscribed; return how many were held."""
        values = self._kinds[kind]
        stale = self._stale[kind]
        n = 0
        for s in symbols:
            if values.pop(s, None) is not None:
                n += 1
            stale.discard(s)
        self.changed(kind)
        return n

    def symbols(self, kind: str) -> list[str]:
        """The cached symbols of ``kind`` in order (shared: do not modify)."""
        version = self._version[kind]
        cached = self._sorted.get(kind)
        if cached is not None and cached[0] == version:
            return cached[1]
        order = sorted(self._kinds[kind])  # one C call: atomic for another thread
        self._sorted[kind] = (version, order)
        return order

    def select(self, kind: str, symbols: Sequence[str] | None = None) -> list[str]:
        """The cached symbols of ``kind`` that match one of ``symbols`` (shell-style
        globs, case-insensitive; ``None``: every symbol), in order. A symbol may be
        gone by the time its entry is read (:meth:`by_kind`): skip it."""
        values = self._kinds.get(kind)
        if not values:
            return []
        patterns = [s.strip().upper() for s in symbols] if symbols is not None else None
        if patterns is None or "*" in patterns:
            return self.symbols(kind)
        if not any(_GLOB_CHARS.intersection(p) for p in patterns):
            return [s for s in sorted(set(patterns)) if s in values]
        match = _glob_matcher(patterns)
        return [s for s in self.symbols(kind) if match(s)]


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


class _Flaps:
    """The damping state of one symbol: when its last status events went out, what
    they told consumers, and what was suppressed since."""

    __slots__ = ("suppressed", "times", "told_stale")

    def __init__(self, told_stale: bool) -> None:
        #: monotonic seconds of the emitted events within the window, oldest first
        self.times: deque[float] = deque()
        #: the state the last emitted ``stale`` / ``fresh`` told consumers
        self.told_stale = told_stale
        #: suppressed since the last emitted event, by status (``None``: nothing)
        self.suppressed: dict[str, int] | None = None


_NO_EXTRA: Final[Mapping[str, Any]] = MappingProxyType({})


class Damping:
    """At most ``max_events`` ``stale`` / ``fresh`` / ``gap`` events per symbol in any
    ``window_s`` (a sliding window; ``source.status_damping``).

    Why: a symbol that flaps (2 s on, 2 s off) would emit a status event every few
    seconds for as long as it flaps, and 150 such symbols thousands a minute, drowning
    the events that matter. What is suppressed is counted (:attr:`suppressed`, the
    metric) and reported with the symbol's next emitted event; the state a consumer
    acts on (stale or fresh) is made right by :meth:`MarketState.scan_stale` once the
    symbol's budget allows (see the module).

    Memory: one small record per symbol that emitted a status event within the window
    (or has a correction pending); the stale watch drops the others (:meth:`prune`).
    """

    def __init__(self, max_events: int = DAMP_MAX_EVENTS,
                 window_s: float = DAMP_WINDOW_S) -> None:
        self.configure(max_events, window_s)
        #: (kind, symbol) -> its record, the least recently touched first
        self._flaps: dict[tuple[str, str], _Flaps] = {}
        #: symbols with something suppressed: their state may need a correction
        self._pending: set[tuple[str, str]] = set()
        #: suppressed events since start, by status
        self.suppressed: dict[str, int] = dict.fromkeys(DAMPED_STATUSES, 0)

    def configure(self, max_events: int, window_s: float) -> None:
        """Set the budget (the records kept apply the new one from their next event)."""
        if max_events < 1 or not window_s > 0:
            msg = "status damping needs max_events >= 1 and window_s > 0"
            raise ValueError(msg)
        self.max_events = max_events
        self.window_s = window_s

    def __len__(self) -> int:
        return len(self._flaps)

    def _room(self, flaps: _Flaps, now: float) -> bool:
        times = flaps.times
        horizon = now - self.window_s
        while times and times[0] <= horizon:
            times.popleft()
        return len(times) < self.max_events

    def let(self, kind: str, symbol: str, status: str, now: float,
            told_stale: bool) -> Mapping[str, Any] | None:
        """May a ``status`` event of (kind, symbol) go out at ``now`` (monotonic s)?
        ``None``: no, it is suppressed (and counted); else the extra ``data`` the event
        carries (``suppressed``, what was held back since the symbol's last event).
        ``told_stale``: what consumers were told before, for a symbol without a record
        (the state before this event's transition)."""
        key = (kind, symbol)
        flaps = self._flaps.pop(key, None)
        if flaps is None:
            flaps = _Flaps(told_stale)
        self._flaps[key] = flaps  # the most recently touched last (see prune)
        if not self._room(flaps, now):
            held = flaps.suppressed
            if held is None:
                held = flaps.suppressed = {}
            held[status] = held.get(status, 0) + 1
            self.suppressed[status] = self.suppressed.get(status, 0) + 1
            self._pending.add(key)
            return None
        flaps.times.append(now)
        if status == "stale":
            flaps.told_stale = True
        elif status == "fresh":
            flaps.told_stale = False
        held = flaps.suppressed
        if held:
            flaps.suppressed = None
            return {"suppressed": held}
        return _NO_EXTRA

    def pending(self) -> list[tuple[str, str]]:
        """The symbols with something suppressed, whose state may need a correction."""
        return list(self._pending)

    def told_stale(self, key: tuple[str, str]) -> bool | None:
        """What the symbol's last emitted ``stale`` / ``fresh`` said (``None``: no record)."""
        flaps = self._flaps.get(key)
        return None if flaps is None else flaps.told_stale

    def room(self, key: tuple[str, str], now: float) -> bool:
        """The symbol may emit an event now."""
        flaps = self._flaps.get(key)
        return flaps is None or self._room(flaps, now)

    def settled(self, key: tuple[str, str]) -> None:
        """No correction is due for the symbol (what was suppressed is still reported
        with its next event, while its record lives)."""
        self._pending.discard(key)

    def forget(self, key: tuple[str, str]) -> None:
        """The symbol was unsubscribed: its damping starts afresh."""
        self._flaps.pop(key, None)
        self._pending.discard(key)

    def prune(self, now: float) -> None:
        """Drop the records of symbols without an event within the window and nothing
        pending. Records are kept in the order they were last touched, so this stops at
        the first recent one: it costs what it drops."""
        horizon = now - self.window_s
        dead: list[tuple[str, str]] = []
        for key, flaps in self._flaps.items():
            if flaps.times and flaps.times[-1] > horizon:
                break
            if key not in self._pending:
                dead.append(key)
        for key in dead:
            del self._flaps[key]


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
        self.on_forget: Callable[[str, list[str]], None] | None = None
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
        one connection and adds it to the other). The sources call this whenever their
        set changes (see :class:`~bridge.app.Bridge`), so even a move made within one
        step is seen; the data path and the stale watch look too, which costs one
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
                values[symbol] = _entry(ev, now_ms)
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
            values[symbol] = _entry(ev, now_ms)
        if new:
            self.values.changed(kind)
        last = events[-1].sent_ms
        if last > self._last_sent_ms:
            self._last_sent_ms = last
        return self._count(out) if out else None

    def _gap(self, kind: str, prev: Entry, ev: Event,
             extra: Mapping[str, Any] = _NO_EXTRA) -> Event:
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
               extra: Mapping[str, Any] = _NO_EXTRA) -> Event:
        return StatusEvent("fresh", ev.symbol, ev.sent_ms, {
            "feed": kind, "symbol": ev.symbol, "sentTimestampMs": ev.sent_ms,
            "price": ev.price,
            "silentForMs": now_ms - prev[RECEIVED], **extra,
        }, self.source)

    def _stale(self, kind: str, symbol: str, entry: Entry, now_ms: int,
               extra: Mapping[str, Any] = _NO_EXTRA) -> Event:
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
