"""Status events (``ai.aleno.status.v1``) and their damping per symbol.

:class:`StatusEvent` is the event; :class:`Damping` the budget of ``stale`` / ``fresh`` /
``gap`` events per symbol. What makes them, and when, is
:class:`bridge.pipeline.market.MarketState` (the module :mod:`bridge.pipeline.market`
describes the whole and re-exports every name here).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from bridge.core.envelope import Event, EventHeader, iso_time
from bridge.core.state import DAMPED_STATUSES

#: the kind of status events (``match: {kind: status}``)
STATUS_KIND: Final = "status"
#: the subject (and routing symbol) of the events about the upstream connection
UPSTREAM_SUBJECT: Final = "upstream"
#: the default damping: at most this many damped status events per symbol ...
DAMP_MAX_EVENTS: Final = 4
#: ... in any window of this many seconds (``source.status_damping``)
DAMP_WINDOW_S: Final = 60.0


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


#: the extra ``data`` of a status event when nothing was suppressed
NO_EXTRA: Final[Mapping[str, Any]] = MappingProxyType({})


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
        return NO_EXTRA

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


__all__ = [
    "DAMP_MAX_EVENTS",
    "DAMP_WINDOW_S",
    "NO_EXTRA",
    "STATUS_KIND",
    "UPSTREAM_SUBJECT",
    "Damping",
    "StatusEvent",
]
