"""The last value cache: per (kind, symbol), the latest valid event and when it arrived
(what ``/v1/snapshot`` and the NATS ``snapshot`` endpoint answer). Written by
:class:`bridge.pipeline.market.MarketState`; :mod:`bridge.pipeline.market` re-exports
every name here (see it for the whole picture).

It also keeps the last final bar of every (symbol, interval) under the kind ``bar``
(:meth:`LastValues.put_bar`, named ``SYMBOL@interval``: ``BTC/USD@1m``), written by the
bars' clock (:mod:`bridge.pipeline.barclock`) and read like the prices.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import translate
from typing import Any, Final, NamedTuple

import orjson

from bridge.core.envelope import Event
from bridge.core.kinds import BAR_KIND, PRICE_KINDS

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


def entry_of(event: Event, received_ms: int) -> Entry:
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
        # the prices, and the last final bars (``bar``: ``SYMBOL@interval`` -> entry)
        self._kinds: dict[str, dict[str, Entry]] = {k: {} for k in (*PRICE_KINDS, BAR_KIND)}
        #: the symbols of each kind marked stale (a ``stale`` event went out, no update
        #: came since)
        self._stale: dict[str, set[str]] = {k: set() for k in PRICE_KINDS}
        #: bumped whenever a symbol of the kind comes or goes
        self._version: dict[str, int] = dict.fromkeys(self._kinds, 0)
        #: the symbols of each kind in order, and the version they were sorted at
        self._sorted: dict[str, tuple[int, list[str]]] = {}

    def __len__(self) -> int:
        """The symbols with a last price (bars aside)."""
        return sum(len(self._kinds[k]) for k in PRICE_KINDS)

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
            values[event.symbol] = entry_of(event, now)
            self.changed(event.kind)
        elif event.sent_ms >= prev[SENT_MS]:
            values[event.symbol] = entry_of(event, now)

    def get(self, kind: str, symbol: str) -> LastValue | None:
        values = self._kinds.get(kind)
        if values is None:
            return None
        if kind == BAR_KIND:  # SYMBOL@interval: an interval is spelled in lower case
            name, _, interval = symbol.strip().rpartition("@")
            symbol = f"{name.upper()}@{interval.lower()}"
        else:
            symbol = symbol.strip().upper()
        entry = values.get(symbol)
        return None if entry is None else LastValue(kind, symbol, *entry)

    def forget(self, kind: str, symbols: Iterable[str]) -> int:
        """Drop the values of symbols no longer subscribed; return how many were held."""
        values = self._kinds[kind]
        stale = self._stale[kind]
        n = 0
        gone = set()
        for s in symbols:
            if values.pop(s, None) is not None:
                n += 1
            stale.discard(s)
            gone.add(s)
        self.changed(kind)
        bars = self._kinds[BAR_KIND]
        if bars:  # and the bars of those symbols
            for key in [k for k in bars if k.rpartition("@")[0] in gone]:
                del bars[key]
            self.changed(BAR_KIND)
        return n

    def put_bar(self, key: str, event: Event, received_ms: int) -> None:
        """Keep the final bar ``event`` as the last of its (symbol, interval), ``key``
        (``SYMBOL@interval``), unless a later one is cached. ``received_ms``: when it was
        made (:func:`monotonic_ms`)."""
        self.put_bar_entry(key, entry_of(event, received_ms))

    def put_bar_entry(self, key: str, entry: Entry) -> None:
        """:meth:`put_bar` of an entry made already (the bars' clock makes the body of a
        final bar without making the event when no route selects it)."""
        bars = self._kinds[BAR_KIND]
        prev = bars.get(key)
        if prev is not None and prev[SENT_MS] > entry[SENT_MS]:
            return
        bars[key] = entry
        if prev is None:
            self.changed(BAR_KIND)

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
        gone by the time its entry is read (:meth:`by_kind`): skip it.

        Bars (``kind`` ``bar``) are named ``SYMBOL@interval``: a pattern without ``@``
        selects by symbol (every interval), one with ``@`` the whole name
        (``BTC/*@1m``)."""
        values = self._kinds.get(kind)
        if not values:
            return []
        patterns = [s.strip().upper() for s in symbols] if symbols is not None else None
        if patterns is None or "*" in patterns:
            return self.symbols(kind)
        if kind == BAR_KIND:
            by_name = _glob_matcher([p for p in patterns if "@" in p] or ["@"])
            by_symbol = _glob_matcher([p for p in patterns if "@" not in p] or ["@"])
            return [k for k in self.symbols(kind)
                    if by_symbol(k.rpartition("@")[0]) or by_name(k.upper())]
        if not any(_GLOB_CHARS.intersection(p) for p in patterns):
            return [s for s in sorted(set(patterns)) if s in values]
        match = _glob_matcher(patterns)
        return [s for s in self.symbols(kind) if match(s)]


__all__ = [
    "BODY",
    "PRICE",
    "RECEIVED",
    "SENT_MS",
    "SNAPSHOT_FORMAT",
    "Entry",
    "LastValue",
    "LastValues",
    "entry_of",
    "monotonic_ms",
]
