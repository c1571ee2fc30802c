"""OHLC bars by event time: the builder (pure: no I/O, the clock is passed in).

What a bar is
-------------
A bar of ``interval`` covers ``[start, end)`` with ``start`` a multiple of the interval
since the epoch (aligned to UTC) and ``end = start + interval``, and holds the prices
(:attr:`Event.price <bridge.core.envelope.EventHeader.price>`: the aggregated price of a
ticker, the price of an equity) of the updates of one symbol whose ``sentTimestampMs``
falls in it: ``open`` / ``close`` of the first and last of them by send time, ``high``,
``low``, and ``count``. The bridge's clock never decides which bar an update belongs to.

- **Order.** A symbol's updates are taken in send order (the rule of the last-value
  cache and of the ``gap`` status): an update not newer than the newest taken for the
  symbol is a ``duplicate`` (the same send time: the same update, the same envelope id)
  or ``out_of_order``, and counted, not added.
- **Final.** A bar is final when the clock passed ``end + grace_ms`` (:meth:`BarBuilder.close`).
  An update that arrives later for an interval already closed is **late**: counted per
  interval and dropped (a final bar is published once and never revised; choose
  ``grace_ms`` above the upstream lag, ``aleno_bridge_upstream_lag_seconds``).
- **No update, no bar.** An interval in which the symbol sent nothing (or nothing the
  bridge took) has no bar.
- **Gaps.** A bar says ``gap: true`` whenever the bridge may have missed an update of the
  symbol inside it. Between two consecutive updates of a symbol there is a *hole* when
  their send times are further apart than the hole threshold (``min(GAP_FACTOR x
  source.update_interval_s, source.symbol_stale_after_s)``: what makes a ``gap`` or a
  ``stale`` status event) or when an upstream connection went ``down`` between them
  (however short the outage). Every bar that shares a millisecond with a hole is a gap;
  so is the first bar of a symbol (the bridge did not see what came before its first
  update, unless that update is the first millisecond of the bar) and a bar whose last
  update is further than the threshold from its end when it becomes final (the symbol
  fell silent inside it). Within the threshold of its end a bar counts as seen: an
  update missed there shows as a hole in the next bar.

Cost on the data path (:meth:`BarBuilder.add`): per update, one dict look-up (the
symbol's state: its newest send time and its open bar of each interval) and a few
stores into the bar of each interval (when every interval is a multiple of the
shortest, an update in the open bar of the shortest goes to the open bar of each
without looking further); a new bar (the first update of a symbol in an interval) is
one list and one append. Bars and states are plain lists, not objects, on
purpose: making one costs a sixth of an object's ``__init__``, and at the upstream's
cadence every update of a symbol opens a new 1 s bar. Memory: one state per symbol and
the open bars (about ``1 + grace / interval`` per symbol and interval). The events
(:class:`BarEvent`) are made only when a bar becomes final, or, with ``partial``, after
each update of it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import translate
from typing import Any, Final

import orjson

from bridge.core.envelope import (
    DEFAULT_SOURCE,
    JSON,
    SPECVERSION,
    Event,
    EventHeader,
    iso_time,
)
from bridge.core.kinds import BAR_KIND, PRICE_KINDS, TYPES

#: states of symbols silent for this long beyond the hole threshold and the grace are
#: dropped (their next update follows a hole anyway); looked at at most this often
PRUNE_EVERY_MS: Final = 10_000
#: why an update is not added to any bar (besides ``late``, which is per interval)
IGNORED: Final = ("duplicate", "out_of_order")

#: A bar in progress: a list, indexed by these (the hot path spells the numbers).
Bar = list[Any]
START: Final = 0
END: Final = 1
OPEN: Final = 2
HIGH: Final = 3
LOW: Final = 4
CLOSE: Final = 5
COUNT: Final = 6
FIRST_MS: Final = 7
LAST_MS: Final = 8
GAP: Final = 9
#: an update of the symbol in a later bar came: the end of this one is decided
SUPERSEDED: Final = 10
SYMBOL: Final = 11
FEED: Final = 12
INTERVAL: Final = 13

#: A symbol's state: ``[newest send time taken, outage epoch it was taken in, its open
#: bar of interval 0 (or None), of interval 1, ...]``.
State = list[Any]
#: where the bars start in a state
BARS_AT: Final = 2
BAR_TYPE: Final = TYPES[BAR_KIND]


def bar_id(feed: str, symbol: str, interval: str, start: int) -> str:
    """The id of the final bar of (feed, symbol, interval, start): the same in every
    replica and on every retry, so it deduplicates downstream like a price's id."""
    return f"bar:{feed}:{symbol}:{interval}:{start}"


def bar_key(symbol: str, interval: str) -> str:
    """The last-value cache's name of the last final bar of (symbol, interval)."""
    return f"{symbol}@{interval}"


#: the wire format whose body the cache keeps and a final bar is made with
STRUCTURED: Final = "cloudevents-json"


def bar_data(bar: Bar, final: bool) -> dict[str, Any]:
    """The ``data`` of the bar event of ``bar``."""
    return {
        "kind": BAR_KIND, "feed": bar[FEED], "symbol": bar[SYMBOL],
        "interval": bar[INTERVAL], "start": bar[START], "end": bar[END],
        "open": bar[OPEN], "high": bar[HIGH], "low": bar[LOW], "close": bar[CLOSE],
        "count": bar[COUNT], "final": final, "gap": bar[GAP],
        "firstSentMs": bar[FIRST_MS], "lastSentMs": bar[LAST_MS],
    }


def final_body(bar: Bar, source: str = DEFAULT_SOURCE) -> bytes:
    """The final bar event of ``bar`` in :data:`STRUCTURED`, byte for byte what
    ``BarEvent(bar, True, ...).encoded(STRUCTURED)`` makes, without the event: what the
    last-value cache keeps of a final bar no route selects."""
    body = orjson.dumps({
        "specversion": SPECVERSION,
        "id": bar_id(bar[FEED], bar[SYMBOL], bar[INTERVAL], bar[START]),
        "source": source,
        "type": BAR_TYPE,
        "subject": bar[SYMBOL],
        "time": iso_time(bar[START]),
        "datacontenttype": JSON,
        "data": bar_data(bar, True),
    })
    # a bytes object of its own size (orjson's is a 4 KiB buffer: see envelope._exact)
    return memoryview(body).tobytes()


class BarEvent(Event):
    """An ``ai.aleno.bar.v1`` event (kind ``bar``): the bar's fields in ``data``; its
    subject is the symbol. A partial bar (``final: false``) has an id of its own per
    update (``...:partial:<count>``), so it never takes the place of the final bar in a
    bus's deduplication. Its light header is made when it is first routed."""

    __slots__ = ("feed", "interval")

    def __init__(self, bar: Bar, final: bool, received_ms: int,
                 source: str = DEFAULT_SOURCE) -> None:
        start, symbol = bar[START], bar[SYMBOL]
        close = bar[CLOSE]
        self.data = self.raw = bar_data(bar, final)
        eid = bar_id(bar[FEED], symbol, bar[INTERVAL], start)
        self.id = eid if final else f"{eid}:partial:{bar[COUNT]}"
        self.feed = bar[FEED]
        self.interval = bar[INTERVAL]
        self.kind = BAR_KIND
        self.symbol = symbol
        self.sent_ms = start
        self.received_ms = received_ms
        self.time = iso_time(start)
        self.prices = (bar[OPEN], bar[HIGH], bar[LOW], close, bar[COUNT], final, bar[GAP])
        self.source = source
        self.price = close
        self._encoded = {}
        self._body = None
        self._format = None

    @property
    def base(self) -> str:  # type: ignore[override]
        return self.symbol.partition("/")[0]

    @property
    def quote(self) -> str:  # type: ignore[override]
        return self.symbol.partition("/")[2]

    @property
    def header(self) -> EventHeader:
        """The light header (made on first use: most final bars are only cached)."""
        try:
            h = self._header
        except AttributeError:
            h = self._header = object.__new__(EventHeader)
            h.kind = BAR_KIND
            h.symbol = symbol = self.symbol
            h.base, _, h.quote = symbol.partition("/")
            h.id = self.id
            h.sent_ms = self.sent_ms
            h.received_ms = self.received_ms
            h.time = self.time
            h.price = self.price
            h.source = self.source
            h._body = None
            h._format = None
        return Event.header.fget(self)  # type: ignore[attr-defined,no-any-return]

    @property
    def key(self) -> str:
        """Its name in the last-value cache (:func:`bar_key`)."""
        return bar_key(self.symbol, self.interval)


class _Interval:
    """The open bars of one interval, by start (what :meth:`BarBuilder.close` finalizes);
    each symbol's current one is in its state, at ``slot``."""

    __slots__ = ("buckets", "final", "gaps", "label", "late", "since", "size", "slot",
                 "watermark")

    def __init__(self, label: str, size: int, since: int, slot: int) -> None:
        self.label = label
        self.size = size
        self.slot = slot
        #: bars starting before this (wall ms: when the builder began) were not seen whole
        self.since = since
        #: every bar ending at or before this is final; an update before it is late
        self.watermark = 0
        #: start -> the open bars of that start
        self.buckets: dict[int, list[Bar]] = {}
        self.late = 0
        #: final bars made, and how many of them said ``gap: true``
        self.final = 0
        self.gaps = 0


class BarBuilder:
    """Builds the bars of every configured interval from the price events, in the order
    the dispatcher routes them (see the module for the rules).

    ``intervals``: ``(label, milliseconds)``, shortest first. ``kinds``: the price feeds
    taken. ``symbols``: shell-style globs (upper case). ``hole_ms()``: the hole threshold
    now (read once per call, so a reload of the source's cadence applies at once).
    ``now_ms``: the wall clock when the builder begins (bars starting before it are
    gaps). ``partial``: :meth:`add` returns the bars it changed as partial events.
    """

    def __init__(self, intervals: Sequence[tuple[str, int]], *, grace_ms: int,
                 hole_ms: Callable[[], float], now_ms: int,
                 kinds: Sequence[str] = PRICE_KINDS, symbols: Sequence[str] = ("*",),
                 partial: bool = False, source: str = DEFAULT_SOURCE) -> None:
        if not intervals:
            msg = "bars need at least one interval"
            raise ValueError(msg)
        self.grace_ms = grace_ms
        self.partial = partial
        self.source = source
        self._hole_ms = hole_ms
        self.kinds = tuple(k for k in PRICE_KINDS if k in kinds)
        self.intervals = [_Interval(label, size, now_ms, BARS_AT + i)
                          for i, (label, size) in enumerate(intervals)]
        self._slots = [(iv.slot, iv.size, iv) for iv in self.intervals]
        smallest = self.intervals[0].size
        #: every interval a multiple of the shortest (1s, 1m, 5m, 1h): an update in the
        #: symbol's open bar of the shortest is in its open bar of every interval
        self._nested = all(iv.size % smallest == 0 for iv in self.intervals)
        self._no_bars: list[None] = [None] * len(self.intervals)
        #: per feed: symbol -> its :data:`State`
        self._states: dict[str, dict[str, State]] = {k: {} for k in self.kinds}
        patterns = [s.strip().upper() for s in symbols]
        #: symbol -> taken or not (``None``: every symbol is taken)
        self._wanted: dict[str, bool] | None = None if "*" in patterns else {}
        self._match = re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match
        #: bumped by every upstream ``down``: an update taken in an older epoch is
        #: followed by a hole
        self.epoch = 0
        self.ignored: dict[str, int] = dict.fromkeys(IGNORED, 0)
        self._pruned_at = now_ms

    # -- the data path -----------------------------------------------------------------

    def add(self, kind: str, events: Sequence[Event]) -> list[Event] | None:
        """Add the price events of one kind to their bars. Returns the partial bars they
        changed (with ``partial``), else ``None``."""
        states = self._states.get(kind)
        if states is None or not events:
            return None
        hole_ms = self._hole_ms()
        epoch = self.epoch
        wanted = self._wanted
        slots = self._slots
        nested = self._nested
        smallest = slots[0][1]
        no_bars = self._no_bars
        touched: dict[int, Bar] | None = {} if self.partial else None
        for ev in events:
            symbol = ev.symbol
            if wanted is not None:
                take = wanted.get(symbol)
                if take is None:
                    take = wanted[symbol] = self._match(symbol) is not None
                if not take:
                    continue
            sent = ev.sent_ms
            st = states.get(symbol)
            if st is None:
                st = states[symbol] = [sent, epoch, *no_bars]
                hole = True
                last = -1  # nothing known before it: a hole from the beginning of time
            else:
                last = st[0]
                if sent <= last:
                    self.ignored["duplicate" if sent == last else "out_of_order"] += 1
                    continue
                hole = sent - last > hole_ms or st[1] != epoch
                st[0] = sent
                st[1] = epoch
            price = ev.price
            missed = hole and sent - last > 1  # a millisecond between them is missed
            # the common case: the update is in the symbol's open bar of the shortest
            # interval, so (nested) in its open bar of every interval (see _nested)
            same = nested and (first := st[2]) is not None \
                and first[0] == sent - sent % smallest
            for slot, size, iv in slots:
                bar = st[slot]
                if same or (bar is not None and bar[0] == sent - sent % size):  # START
                    bar[5] = price  # CLOSE
                    bar[8] = sent  # LAST_MS
                    bar[6] += 1  # COUNT
                    if price > bar[3]:  # HIGH
                        bar[3] = price
                    elif price < bar[4]:  # LOW
                        bar[4] = price
                    if missed:
                        bar[9] = True  # GAP
                else:
                    if bar is not None:  # the symbol's bar before this one ends here
                        bar[10] = True  # SUPERSEDED
                        if hole and last + 1 < bar[1]:  # END
                            bar[9] = True
                    start = sent - sent % size
                    if start < iv.watermark:
                        iv.late += 1
                        continue
                    bar = st[slot] = [start, start + size, price, price, price, price, 1,
                                      sent, sent, (hole and sent > start) or start < iv.since,
                                      False, symbol, kind, iv.label]
                    bucket = iv.buckets.get(start)
                    if bucket is None:
                        iv.buckets[start] = [bar]
                    else:
                        bucket.append(bar)
                if touched is not None:
                    touched[id(bar)] = bar
        if not touched:
            return None
        received = events[-1].received_ms
        return [BarEvent(bar, False, received, self.source) for bar in touched.values()]

    def statuses(self, events: Iterable[Event]) -> None:
        """Take the status events routed: an upstream ``down`` puts a hole before the
        next update of every symbol (its connection's symbols and, conservatively, the
        others: the dispatcher does not know which connection carried which symbol)."""
        for ev in events:
            if ev.data.get("status") == "down":
                self.epoch += 1

    # -- beside the data path ---------------------------------------------------------

    def due_ms(self) -> int:
        """The wall-clock time (ms) at which the next bar can become final."""
        return min(iv.watermark + iv.size for iv in self.intervals) + self.grace_ms

    def close(self, now_ms: int) -> list[BarEvent]:
        """Finalize every bar whose ``end + grace_ms`` the clock ``now_ms`` passed, in
        order of interval, then start, then arrival; return them as final bar events."""
        source = self.source
        return [BarEvent(bar, True, now_ms, source) for bar in self.close_bars(now_ms)]

    def close_bars(self, now_ms: int) -> list[Bar]:
        """:meth:`close`, the final bars as they are (no events made: see
        :class:`~bridge.pipeline.barclock.BarClock`)."""
        out: list[Bar] = []
        hole_ms = self._hole_ms()
        edge = now_ms - self.grace_ms
        for iv in self.intervals:
            size = iv.size
            watermark = edge - edge % size
            if watermark <= iv.watermark:
                continue
            iv.watermark = watermark
            buckets = iv.buckets
            slot = iv.slot
            for start in sorted(s for s in buckets if s < watermark):
                for bar in buckets.pop(start):
                    if not bar[SUPERSEDED] and bar[END] - bar[LAST_MS] > hole_ms:
                        bar[GAP] = True  # the symbol fell silent inside the bar
                    st = self._states[bar[FEED]].get(bar[SYMBOL])
                    if st is not None and st[slot] is bar:
                        st[slot] = None
                    iv.final += 1
                    if bar[GAP]:
                        iv.gaps += 1
                    out.append(bar)
        if now_ms - self._pruned_at >= PRUNE_EVERY_MS:
            self._pruned_at = now_ms
            self._prune(now_ms - self.grace_ms - int(hole_ms))
        return out

    def _prune(self, before_ms: int) -> None:
        """Forget the symbols whose newest update was sent before ``before_ms`` and that
        have no bar open: their next update follows a hole whether they are remembered
        or not (a symbol unsubscribed, or silent), and an older one is late."""
        for states in self._states.values():
            old = [s for s, st in states.items()
                   if st[0] < before_ms and not any(st[BARS_AT:])]
            for s in old:
                del states[s]
                if self._wanted is not None:
                    self._wanted.pop(s, None)

    # -- for operators ----------------------------------------------------------------

    def open_bars(self) -> int:
        return sum(len(b) for iv in self.intervals for b in iv.buckets.values())

    def counts(self) -> dict[str, Any]:
        """Counters for the metrics: per interval the final bars (and gaps) and the late
        updates; the updates ignored by reason; the open bars."""
        return {
            "final": {iv.label: iv.final for iv in self.intervals},
            "gaps": {iv.label: iv.gaps for iv in self.intervals},
            "late": {iv.label: iv.late for iv in self.intervals},
            "ignored": dict(self.ignored),
            "open": self.open_bars(),
        }

    def symbols(self) -> Mapping[str, int]:
        """How many symbols each feed has a state for."""
        return {k: len(v) for k, v in self._states.items()}


__all__ = ["IGNORED", "STRUCTURED", "Bar", "BarBuilder", "BarEvent", "State", "bar_data", "bar_id",
           "bar_key", "final_body"]
