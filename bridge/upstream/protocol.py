"""What the upstream connection, the pool, the leases and the control surface share,
without the Socket.IO client: the answer per symbol of a live (un)subscribe request
(:class:`SubscriptionStatus`, :class:`SubscriptionResult`) and how it is read from an
acknowledgement (:func:`results_of_ack`), symbol normalization, the bounded set of
rejected symbols, the request pace (:class:`RateLimit`), a connection's counters
(:class:`SourceStats`), the errors, and the protocols the leases drive
(:class:`Upstream`, :class:`Placement`).

The behaviour is described in :mod:`bridge.upstream.client` (one connection),
:mod:`bridge.upstream.pool` (several keys) and :mod:`bridge.upstream.subscriptions`
(pins and leases).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol, runtime_checkable

from bridge.core.state import UpstreamState

#: the start of the upstream's per-key limit error ("Subscription limit reached. Contact
#: us to increase limits.")
LIMIT_MARK: Final = "Subscription limit reached"
#: the price kinds and their subscribe / unsubscribe events
EVENTS: Final = {
    "ticker": ("subscribe_ticker", "unsubscribe_ticker"),
    "equity": ("subscribe_equity", "unsubscribe_equity"),
}
#: symbols per subscribe request (a Socket.IO server limits the message size, 1 MB by
#: default, and the upstream may limit the symbols of one request)
SUBSCRIBE_CHUNK: Final = 200
#: the most symbols :attr:`SourceStats.rejected_symbols` keeps (the oldest dropped first):
#: junk asked for by clients must not grow it without end. The source reads
#: :data:`bridge.upstream.client.MAX_REJECTED_SYMBOLS` (a test may lower that one)
MAX_REJECTED_SYMBOLS: Final = 10_000


class SourceError(Exception):
    """The upstream cannot be used; the message names the cause and the fix."""


class AuthError(SourceError):
    pass


class SubscriptionStatus(StrEnum):
    """What became of one symbol of a live (un)subscribe request."""

    #: the upstream acknowledged it (subscribed; for unsubscribe: no longer subscribed)
    ACCEPTED = "accepted"
    #: the upstream does not support the symbol
    REJECTED = "rejected"
    #: refused by the upstream's per-key limit; nothing subscribed before changed
    LIMIT = "limit"
    #: refused for another reason (the ack's error text), or the ack was unreadable
    ERROR = "error"
    #: not connected now: it is (un)subscribed on the next connect
    PENDING = "pending"
    #: held by a lease until the configured symbols needed its room (see
    #: :mod:`bridge.upstream.subscriptions`); no longer subscribed for that lease
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class SubscriptionResult:
    """One symbol's answer: the status and, when refused, the upstream's error text."""

    status: SubscriptionStatus
    error: str | None = None

    @property
    def held(self) -> bool:
        """The symbol is in the desired set: subscribed now, or on the next connect."""
        return self.status in (SubscriptionStatus.ACCEPTED, SubscriptionStatus.PENDING)


ACCEPTED: Final = SubscriptionResult(SubscriptionStatus.ACCEPTED)
PENDING: Final = SubscriptionResult(SubscriptionStatus.PENDING)


def normalize_symbols(symbols: Iterable[str]) -> list[str]:
    """``symbols`` as the upstream normalizes them (trimmed, upper-cased), each once, in
    order, without empty ones."""
    out: dict[str, None] = {}
    for s in symbols:
        n = s.strip().upper()
        if n:
            out[n] = None
    return list(out)


class BoundedSet(MutableSet[str]):
    """A set of at most ``maxlen`` strings: adding one more drops the oldest.

    It compares equal to a ``set`` with the same members, so readers that treated
    :attr:`SourceStats.rejected_symbols` as a set still do.
    """

    __slots__ = ("_items", "maxlen")

    def __init__(self, maxlen: int, items: Iterable[str] = ()) -> None:
        if maxlen < 1:
            msg = "maxlen must be at least 1"
            raise ValueError(msg)
        self.maxlen = maxlen
        self._items: dict[str, None] = {}
        self.update(items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"BoundedSet({len(self._items)}/{self.maxlen})"

    def add(self, value: str) -> None:
        if value in self._items:
            return
        self._items[value] = None
        while len(self._items) > self.maxlen:
            del self._items[next(iter(self._items))]

    def discard(self, value: str) -> None:
        self._items.pop(value, None)

    def update(self, values: Iterable[str]) -> None:
        for v in values:
            self.add(v)


def _rejected_set() -> BoundedSet:
    return BoundedSet(MAX_REJECTED_SYMBOLS)


class RateLimit:
    """A token bucket: ``rate`` requests per second on average, bursts of ``burst``
    (default twice the rate, at least 1).

    :meth:`take` waits until the caller's request may go: callers over the rate are
    delayed in the order they came, never refused. A caller cancelled while it waits
    has spent its token (the bucket errs on the side of fewer requests).
    """

    __slots__ = ("_at", "_tokens", "burst", "clock", "rate", "waited_s")

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            msg = "rate must be positive"
            raise ValueError(msg)
        self.rate = float(rate)
        self.burst = max(1.0, 2.0 * self.rate if burst is None else float(burst))
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()
        #: seconds callers were delayed in total (for tests and curiosity)
        self.waited_s = 0.0

    def reserve(self) -> float:
        """Take one token now; return how long the caller must wait before its request."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self) -> None:
        delay = self.reserve()
        if delay > 0:
            self.waited_s += delay
            await asyncio.sleep(delay)


@dataclass
class SourceStats:
    state: UpstreamState = UpstreamState.IDLE
    connects: int = 0
    reconnects: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    #: ``kind:symbol`` the upstream rejected as unsupported, at most
    #: :data:`MAX_REJECTED_SYMBOLS` (the oldest dropped first)
    rejected_symbols: BoundedSet = field(default_factory=_rejected_set)
    subscribed: dict[str, list[str]] = field(default_factory=dict)
    #: the last update on the current connection (None until one arrived)
    last_update_monotonic: float | None = None
    watchdog_restarts: int = 0
    connect_failures: int = 0
    #: subscribe requests that were refused, unreadable or unanswered
    failed_subscriptions: int = 0
    #: packets the client could not read, by reason
    bad_packets: dict[str, int] = field(default_factory=dict)
    #: the cause of the last failed attempt or drop (cleared when data flows)
    last_error: str | None = None
    #: permessage-deflate window bits negotiated on the current (or last) connection;
    #: 0: uncompressed
    compression: int = 0
    #: live ``subscribe_*`` / ``unsubscribe_*`` requests sent (paced by
    #: ``source.max_subscribe_requests_per_s``; the (re)connect subscription not counted)
    live_requests: int = 0


Handler = Callable[[str, Any], None]
InvalidHandler = Callable[[str, str, Any], None]
#: ``(up, cause)``: data began to flow on a connection (``True``, cause ``""``), or a
#: connection that had delivered data ended (``False`` and why)
LinkHandler = Callable[[bool, str], None]

def results_of_ack(chunk: list[str], ack: Any, subscribe: bool) -> dict[str, SubscriptionResult]:
    """Per symbol of one request, what its acknowledgement said.

    ``subscriptionsAfterUpdate`` is the truth of what is subscribed: after a subscribe,
    a symbol in it is accepted, even when the request as a whole was refused (it was
    subscribed before); after an unsubscribe, a symbol no longer in it is accepted.
    """
    if not isinstance(ack, dict):
        err = SubscriptionResult(SubscriptionStatus.ERROR, "unreadable acknowledgement")
        return dict.fromkeys(chunk, err)
    status = ack.get("status")
    raw_after = ack.get("subscriptionsAfterUpdate")
    after = {s for s in raw_after if isinstance(s, str)} if isinstance(raw_after, list) \
        else None
    raw_rejected = ack.get("rejectedSubscriptions")
    if isinstance(raw_rejected, str):
        raw_rejected = [raw_rejected]
    rejected = {s.strip().upper() for s in raw_rejected if isinstance(s, str)} \
        if isinstance(raw_rejected, list) else set()
    error = str(ack.get("error") or "") or None
    if status == "error" and error is None:
        error = "no reason given"
    elif status not in ("ok", "partial", "error"):
        error = f"unknown ack status {str(status)[:40]!r}"
    out: dict[str, SubscriptionResult] = {}
    for s in chunk:
        if s in rejected:
            out[s] = SubscriptionResult(SubscriptionStatus.REJECTED,
                                        "unsupported symbol" if error is None else error)
        elif (s in after) == subscribe if after is not None else status in ("ok", "partial"):
            out[s] = ACCEPTED
        elif error is not None and LIMIT_MARK in error and subscribe:
            out[s] = SubscriptionResult(SubscriptionStatus.LIMIT, error)
        else:
            what = "subscribed" if subscribe else "unsubscribed"
            out[s] = SubscriptionResult(SubscriptionStatus.ERROR,
                                        error or f"not {what} after the update")
    return out


class Upstream(Protocol):
    """What the subscriptions drive: the upstream connections (an ``UpstreamPool``)."""

    async def subscribe(self, kind: str,
                        symbols: Iterable[str]) -> Mapping[str, SubscriptionResult]: ...

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> Mapping[str, SubscriptionResult]: ...

    def subscribed(self) -> Mapping[str, frozenset[str]]: ...


@runtime_checkable
class Placement(Protocol):
    """What an upstream that places symbols on API keys also offers (the pool): the
    subscriptions use it to put the configured symbols first."""

    #: configured symbols that fit in no key's limit, by kind
    unplaced: dict[str, frozenset[str]]

    def capacity(self) -> int | None:
        """Symbols every usable key can hold in total (``None``: unknown)."""
        ...

    async def pin(self, kind: str,
                  symbols: Iterable[str]) -> Mapping[str, SubscriptionResult]:
        """Subscribe configured symbols (asking even where a learned limit says no)."""
        ...

    def set_unplaced(self, unplaced: Mapping[str, Iterable[str]]) -> None:
        """The configured symbols that fit nowhere now."""
        ...


__all__ = [
    "ACCEPTED",
    "EVENTS",
    "LIMIT_MARK",
    "MAX_REJECTED_SYMBOLS",
    "PENDING",
    "SUBSCRIBE_CHUNK",
    "AuthError",
    "BoundedSet",
    "Handler",
    "InvalidHandler",
    "LinkHandler",
    "Placement",
    "RateLimit",
    "SourceError",
    "SourceStats",
    "SubscriptionResult",
    "SubscriptionStatus",
    "Upstream",
    "normalize_symbols",
    "results_of_ack",
]
