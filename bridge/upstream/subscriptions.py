"""The desired symbol set: pinned by the configuration, or leased by consumers.

A symbol is subscribed upstream while the configuration pins it or a lease on it
lives; ``grace_s`` after its last lease ended (expired or released) it is unsubscribed,
unless it was pinned or leased again meanwhile. :class:`Subscriptions` keeps that set
and drives an :class:`Upstream` (an :class:`~bridge.upstream.pool.UpstreamPool`) with the
differences, one ``subscribe`` / ``unsubscribe`` at a time:

- a lease answers per symbol what the upstream's acknowledgement said (``accepted``,
  ``rejected``, ``limit``, ``error``, ``pending``) and holds only the symbols that were
  accepted or are pending (subscribed on the next connect); a symbol already subscribed
  for someone else costs no request;
- a lease belongs to its ``owner``, the authenticated principal that made it (a token's
  name, or ``anonymous``); ``holder`` is only a label the reply carries back. A renew or
  release that names another owner is answered as if the lease did not exist
  (:class:`LeaseNotFound`): a lease id seen elsewhere is not an existence oracle;
- caps, checked before anything is asked of the upstream, raise :class:`LeaseCapError`
  (the control surface answers 429) naming the cap: per owner, the distinct symbols
  its live leases would hold (the token's ``max_symbols`` and
  ``source.leases.max_per_holder``, the smaller); for the whole process, the live
  leases (``source.leases.max_leases``) and the distinct leased symbols, in grace
  included (``source.leases.max_symbols``). Memory is bounded by them, whoever asks;
- configured symbols come first. With an upstream that knows its keys' limits (a
  :class:`Placement`: the pool, with ``limit`` configured or learned), leases use only
  the room the pinned symbols leave: capacity minus every pinned symbol (placed or not,
  except those the upstream rejected as unsupported) minus what is held for leases and
  in grace. A new leased symbol beyond it is answered ``limit`` without a request;
  beyond it otherwise, the upstream's limit error says the same. While the capacity is
  not known (a learned limit being re-checked) and pinned symbols wait for room,
  leases get none: the room the re-check may find is the pinned symbols' first;
- a pinned symbol refused for the limit (on :meth:`Subscriptions.set_pinned`, on a
  retry, or when a (re)connect subscription dropped it) evicts symbols held only for
  leases to make room: those in grace first, then the most recently leased; they are
  unsubscribed, dropped from their leases, and each lease's next :meth:`Subscriptions.renew`
  reply names them ``evicted``; then the pinned symbols are asked for again;
- pinned symbols still not held, whatever refused them, are retried by
  :meth:`Subscriptions.run` on a capped, doubling schedule (``retry_initial_s`` to
  ``retry_max_s``, back to the start when one is placed), and soon after leases or pins
  freed room or a key whose limit was learned reconnected (``on_room``; not more often
  than every ``retry_initial_s``); :meth:`Subscriptions.unplaced_pinned` names them by
  kind (readiness, metrics), and the pool's ``unplaced`` says the same;
- :meth:`Subscriptions.set_pinned` (a reload) applies the difference with the pinned
  set it replaces: removed symbols are unsubscribed first (unless a lease holds them),
  then added ones are subscribed;
- time comes from an injectable ``clock`` (seconds, monotonic): :meth:`Subscriptions.expire`
  ends what is due at the clock's time, :meth:`Subscriptions.run` calls it periodically.

What the upstream is asked is paced per API key by the source itself
(``source.max_subscribe_requests_per_s``), and symbols it rejected lately are answered
by the pool without a request: junk leases cost neither memory nor requests without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from bridge.config.schema import LeaseConfig
from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import SubscriptionsSnapshot
from bridge.upstream.client import (
    LIMIT_MARK,
    SubscriptionResult,
    SubscriptionStatus,
    normalize_symbols,
)

log = logging.getLogger("aleno_bridge.subscriptions")

KINDS: Final = PRICE_KINDS
#: the error of a leased symbol taken back for the configured symbols
EVICTED_ERROR: Final = "evicted: the configured symbols need this key's capacity"
#: the error of a leased symbol a (re)connect subscription was refused for the limit
LOST_ERROR: Final = ("evicted: refused for the API keys' limit when the connection was "
                     "re-established")
#: the first delay of the retry of unplaced pinned symbols, and its cap (seconds)
RETRY_INITIAL_S: Final = 5.0
RETRY_MAX_S: Final = 300.0

_ACCEPTED: Final = SubscriptionResult(SubscriptionStatus.ACCEPTED)
_PENDING: Final = SubscriptionResult(SubscriptionStatus.PENDING)


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

    #: told ``(kind, symbols)`` when symbols were dropped because they fit nowhere
    on_unplaced: Callable[[str, list[str]], None] | None
    #: told when a key may have room again that its learned limit denied (reconnected)
    on_room: Callable[[], None] | None
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


class LeaseError(Exception):
    """A lease request that cannot be served; the message says why."""


class LeaseNotFound(LeaseError):
    """No live lease has this id (never granted, released, expired, or another owner's)."""


class LeaseCapError(LeaseError):
    """A lease request over a cap (the control surface answers 429); ``cap`` names the
    setting (``source.leases.max_leases``, ``source.leases.max_symbols``,
    ``source.leases.max_per_holder``, ``control.auth max_symbols``), the message its
    value."""

    def __init__(self, cap: str, message: str) -> None:
        super().__init__(message)
        self.cap = cap


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """The answer to :meth:`Subscriptions.lease` and :meth:`Subscriptions.renew`."""

    #: ``None`` when the lease holds no symbol (every one was refused)
    lease_id: str | None
    kind: str
    #: the label the request gave (not who owns the lease: see ``owner``)
    holder: str
    #: the TTL granted (the one asked for, cut to ``max_ttl_s``)
    ttl_s: float
    #: when the lease ends, on the subscriptions' clock (``None``: no lease)
    expires_at: float | None
    #: per symbol (normalized), what the upstream's acknowledgement said; on renew,
    #: the symbols evicted since the last renew too (``evicted``)
    results: Mapping[str, SubscriptionResult]
    #: the principal the lease belongs to (the only one that may renew or release it)
    owner: str = ""

    @property
    def held(self) -> list[str]:
        """The symbols the lease holds (accepted, or pending the next connect)."""
        return [s for s, r in self.results.items() if r.held]


@dataclass(frozen=True, slots=True)
class PinDiff:
    """What :meth:`Subscriptions.set_pinned` (or a retry of the unplaced pinned symbols)
    changed, per kind and symbol."""

    added: Mapping[str, Mapping[str, SubscriptionResult]]
    removed: Mapping[str, Mapping[str, SubscriptionResult]]
    #: symbols held for leases (or in grace) unsubscribed to make room for pinned ones
    evicted: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(self.added.values()) and not any(self.removed.values())


@dataclass(slots=True)
class _Lease:
    id: str
    owner: str
    holder: str
    kind: str
    symbols: frozenset[str]
    ttl_s: float
    expires_at: float
    #: symbols taken from it since its last renew, and why (``None``: none, the usual)
    evicted: dict[str, str] | None = None


class Subscriptions:
    """The pinned-or-leased symbol set, kept subscribed on an :class:`Upstream`.

    ``pinned`` is the configuration's symbol set the upstream is already subscribed to
    (the pool subscribes its configured symbols itself): no request is made for it.
    With a :class:`Placement` upstream, its ``unplaced`` symbols are pinned too (not
    held: retried by :meth:`run`), and the subscriptions listen to its ``on_unplaced``.
    """

    def __init__(
        self,
        upstream: Upstream,
        config: LeaseConfig | None = None,
        *,
        pinned: Mapping[str, Iterable[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.upstream = upstream
        self.config = config or LeaseConfig()
        self.clock = clock
        self._lock = asyncio.Lock()
        self._placement: Placement | None = upstream if isinstance(upstream, Placement) \
            else None
        self._pinned: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}
        #: what we asked the upstream for and it holds (accepted or pending)
        self._held: dict[str, set[str]] = {k: set() for k in KINDS}
        for kind, syms in (pinned or {}).items():
            _check_kind(kind)
            self._pinned[kind] = frozenset(normalize_symbols(syms))
            self._held[kind] |= self._pinned[kind]
        self._leases: dict[str, _Lease] = {}
        #: owner -> ids of its leases
        self._by_owner: dict[str, set[str]] = {}
        #: (kind, symbol) -> ids of the live leases holding it; in the order the symbols
        #: became leased (the most recent last: the first evicted)
        self._holders: dict[tuple[str, str], set[str]] = {}
        #: (kind, symbol) -> when it is unsubscribed unless leased or pinned again
        self._grace: dict[tuple[str, str], float] = {}
        #: pinned symbols the upstream last answered ``rejected`` (they reserve no room)
        self._unsupported_pins: set[tuple[str, str]] = set()
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = max(retry_max_s, retry_initial_s)
        self._retry_delay = retry_initial_s
        #: when the unplaced pinned symbols are tried again (``None``: nothing to retry)
        self._retry_at: float | None = None
        self._last_retry: float | None = None
        #: room was freed (grace ended, unpinned) since the last retry
        self._room_freed = False
        #: leased symbols evicted for pinned ones since start
        self.evicted_total = 0
        if self._placement is not None:
            for kind, syms in self._placement.unplaced.items():
                if kind in self._pinned and syms:
                    self._pinned[kind] = self._pinned[kind] | syms
                    self._held[kind] -= syms
            self._placement.on_unplaced = self._lost
            self._placement.on_room = self._room
            if any(self.unplaced_pinned().values()):
                self._retry_at = clock()

    # -- read side ----------------------------------------------------------------------

    @property
    def pinned(self) -> dict[str, frozenset[str]]:
        return dict(self._pinned)

    def desired(self) -> dict[str, frozenset[str]]:
        """The symbols subscribed on our behalf: pinned and held, leased, in grace."""
        return {k: frozenset(v) for k, v in self._held.items()}

    def leased(self) -> dict[str, frozenset[str]]:
        """The symbols held by at least one live lease, by kind."""
        out: dict[str, set[str]] = {k: set() for k in KINDS}
        for kind, s in self._holders:
            out[kind].add(s)
        return {k: frozenset(v) for k, v in out.items()}

    def in_grace(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {k: set() for k in KINDS}
        for kind, s in self._grace:
            out[kind].add(s)
        return {k: frozenset(v) for k, v in out.items()}

    def unplaced_pinned(self) -> dict[str, frozenset[str]]:
        """The pinned symbols not held now (refused for the limit, rejected, failed),
        by kind: the configuration asks for them and they do not flow. Retried."""
        return {k: frozenset(self._pinned[k] - self._held[k]) for k in KINDS}

    def lease_ids(self, holder: str | None = None, *, owner: str | None = None) -> list[str]:
        """The live leases' ids (with that holder label, of that owner)."""
        ids = self._leases if owner is None else self._by_owner.get(owner, set())
        return [i for i in ids if (le := self._leases.get(i)) is not None
                and (holder is None or le.holder == holder)]

    def owner_of(self, lease_id: str) -> str | None:
        """Who a live lease belongs to (``None``: no live lease has this id)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self.clock():
            return None
        return lease.owner

    def unplaced_for_room(self) -> dict[str, list[str]]:
        """The pinned symbols not held for want of room (every reason but the
        upstream's "unsupported": those can never be placed), by kind, sorted: what
        ``/readyz`` fails on."""
        return {k: sorted(s for s in self._pinned[k] - self._held[k]
                          if (k, s) not in self._unsupported_pins) for k in KINDS}

    def snapshot(self) -> SubscriptionsSnapshot:
        waiting = self.unplaced_for_room()
        return SubscriptionsSnapshot(
            leases=len(self._leases), leased=len(self._holders),
            pinned=sum(map(len, self._pinned.values())), in_grace=len(self._grace),
            held=sum(map(len, self._held.values())),
            unplaced_pinned=sum(len(self._pinned[k] - self._held[k]) for k in KINDS),
            evicted=self.evicted_total,
            unplaced_by_kind={k: len(v) for k, v in waiting.items()},
            unplaced_sample=tuple(f"{k}:{s}" for k in KINDS for s in waiting[k][:5])[:5])

    # -- pins ---------------------------------------------------------------------------

    async def set_pinned(self, pinned: Mapping[str, Iterable[str]]) -> PinDiff:
        """Replace the pinned set (a reload): unsubscribe what is no longer pinned unless
        a lease holds it, then subscribe what is new (evicting leased symbols when the
        limit refuses it). A kind missing from ``pinned`` keeps nothing pinned. Returns
        the upstream's answers for the changes and what was evicted."""
        for kind in pinned:
            _check_kind(kind)
        added: dict[str, dict[str, SubscriptionResult]] = {}
        removed: dict[str, dict[str, SubscriptionResult]] = {}
        evicted: dict[str, set[str]] = {}
        async with self._lock:
            todo: dict[str, list[str]] = {}
            gone: dict[str, list[str]] = {}
            for kind in KINDS:
                new = normalize_symbols(pinned.get(kind, ()))
                old = self._pinned[kind]
                self._pinned[kind] = frozenset(new)
                for s in new:
                    self._grace.pop((kind, s), None)
                for s in old - self._pinned[kind]:
                    self._unsupported_pins.discard((kind, s))
                todo[kind] = [s for s in new if s not in self._held[kind]]
                gone[kind] = sorted(s for s in old if s not in self._pinned[kind]
                                    and (kind, s) not in self._holders
                                    and s in self._held[kind])
            # what leaves first: its room is what the new symbols may need
            for kind in KINDS:
                if gone[kind]:
                    removed[kind] = await self._unsubscribe(kind, gone[kind])
                    self._room_freed = True
            for kind in KINDS:
                if todo[kind]:
                    added[kind] = await self._place_pinned(kind, todo[kind], evicted)
            self._after_pins(tried=any(todo.values()))
        return PinDiff(added, removed, {k: frozenset(v) for k, v in evicted.items()})

    async def pin(self, kind: str, symbols: Iterable[str]) -> PinDiff:
        """Pin ``symbols`` too (subscribed for as long as they stay pinned)."""
        _check_kind(kind)
        now = {k: list(v) for k, v in self._pinned.items()}
        now[kind] = [*now[kind], *normalize_symbols(symbols)]
        return await self.set_pinned(now)

    async def unpin(self, kind: str, symbols: Iterable[str]) -> PinDiff:
        _check_kind(kind)
        drop = set(normalize_symbols(symbols))
        now = {k: list(v) for k, v in self._pinned.items()}
        now[kind] = [s for s in now[kind] if s not in drop]
        return await self.set_pinned(now)

    async def retry_pinned(self, *, force: bool = False) -> PinDiff:
        """Ask again for the pinned symbols not held, when their retry is due (or
        ``force``): at ``retry_initial_s`` after a refusal, doubling up to
        ``retry_max_s``, back to the start when one is placed; sooner (but not more
        often than every ``retry_initial_s``) once leases or pins freed room. A symbol
        refused for the limit evicts leased ones first. :meth:`run` calls it."""
        now = self.clock()
        if not any(self._pinned[k] - self._held[k] for k in KINDS):
            self._retry_delay = self.retry_initial_s
            self._retry_at = None
            self._room_freed = False
            return PinDiff({}, {})
        due = self._retry_at is None or now >= self._retry_at or (
            self._room_freed and (self._last_retry is None
                                  or now - self._last_retry >= self.retry_initial_s))
        if not (due or force):
            return PinDiff({}, {})
        added: dict[str, dict[str, SubscriptionResult]] = {}
        evicted: dict[str, set[str]] = {}
        async with self._lock:
            self._room_freed = False
            self._last_retry = self.clock()
            for kind in KINDS:
                todo = sorted(self._pinned[kind] - self._held[kind])
                if todo:
                    added[kind] = await self._place_pinned(kind, todo, evicted)
            placed = sum(r.held for results in added.values() for r in results.values())
            if placed:
                log.info("placed %d configured symbol(s) refused before", placed,
                         extra={"placed": placed})
            self._after_pins(tried=True, placed=placed > 0)
        return PinDiff(added, {}, {k: frozenset(v) for k, v in evicted.items()})

    def _after_pins(self, *, tried: bool, placed: bool = False) -> None:
        """Schedule the retry of the pinned symbols still not held; tell the pool."""
        now = self.clock()
        if not any(self._pinned[k] - self._held[k] for k in KINDS):
            self._retry_delay = self.retry_initial_s
            self._retry_at = None
        elif tried:
            if placed:
                self._retry_delay = self.retry_initial_s
            self._retry_at = now + self._retry_delay
            if not placed:
                self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
        elif self._retry_at is None:
            self._retry_at = now + self._retry_delay
        self._push_unplaced()

    def _push_unplaced(self) -> None:
        if self._placement is None:
            return
        self._placement.set_unplaced({
            k: [s for s in self._pinned[k] - self._held[k]
                if (k, s) not in self._unsupported_pins] for k in KINDS})

    async def _place_pinned(self, kind: str, todo: list[str],
                            evicted: dict[str, set[str]]) -> dict[str, SubscriptionResult]:
        """Subscribe pinned symbols; those refused for the limit evict symbols held only
        for leases (or in grace), as many as they lack room for when the capacity is
        known (else one each), then are asked for once more."""
        results = await self._subscribe(kind, todo, pin=True)
        limited = [s for s in todo if results[s].status == SubscriptionStatus.LIMIT]
        if not limited:
            return results
        need = len(limited)
        free = 0
        capacity = self._placement.capacity() if self._placement is not None else None
        if capacity is not None:
            # the refusal may have taught the pool its limit: some may fit already
            free = max(0, capacity - sum(map(len, self._held.values())))
            need = max(0, need - free)
        if await self._evict(need, evicted) or free:
            results.update(await self._subscribe(kind, limited, pin=True))
        return results

    async def _evict(self, count: int, evicted: dict[str, set[str]]) -> int:
        """Unsubscribe up to ``count`` symbols held only for leases: in grace first, then
        the most recently leased; their leases hear it on their next renew."""
        if count <= 0:
            return 0
        victims: list[tuple[str, str]] = []
        for key in self._grace:
            if len(victims) >= count:
                break
            kind, s = key
            if s in self._held[kind] and s not in self._pinned[kind]:
                victims.append(key)
        for key in reversed(self._holders):
            if len(victims) >= count:
                break
            if key[1] not in self._pinned[key[0]]:
                victims.append(key)
        if not victims:
            return 0
        by_kind: dict[str, list[str]] = {}
        for key in victims:
            self._drop(key, EVICTED_ERROR)
            by_kind.setdefault(key[0], []).append(key[1])
        self.evicted_total += len(victims)
        for kind, syms in by_kind.items():
            evicted.setdefault(kind, set()).update(syms)
            log.warning("evicted %d leased %s symbol(s) to make room for configured ones: %s",
                        len(syms), kind, ", ".join(sorted(syms)[:50]),
                        extra={"kind": kind, "evicted": len(syms)})
            await self._unsubscribe(kind, sorted(syms))
        return len(victims)

    def _drop(self, key: tuple[str, str], why: str) -> None:
        """Take a symbol from every lease holding it (and from grace), telling them why."""
        self._grace.pop(key, None)
        s = key[1]
        for lease_id in self._holders.pop(key, ()):
            lease = self._leases.get(lease_id)
            if lease is None:
                continue
            lease.symbols = lease.symbols - {s}
            if lease.evicted is None:
                lease.evicted = {}
            lease.evicted[s] = why

    def _lost(self, kind: str, symbols: list[str]) -> None:
        """The upstream dropped ``symbols`` (they fit on no key after a (re)connect):
        leased ones leave their leases, pinned ones are retried now."""
        if kind not in self._held:
            return
        retry = False
        for s in symbols:
            self._held[kind].discard(s)
            if s in self._pinned[kind]:
                retry = True
            else:
                self._drop((kind, s), LOST_ERROR)
        if retry:
            self._retry_at = self.clock()
        self._push_unplaced()

    def _room(self) -> None:
        """A key may have room again (its learned limit is being re-checked): the pinned
        symbols not held are retried soon (not more often than ``retry_initial_s``)."""
        self._room_freed = True

    # -- leases -------------------------------------------------------------------------

    def _ttl(self, ttl_s: float | None) -> float:
        ttl = self.config.default_ttl_s if ttl_s is None else float(ttl_s)
        if not ttl > 0:  # NaN too
            msg = "ttl_s must be a positive number of seconds"
            raise LeaseError(msg)
        return min(ttl, self.config.max_ttl_s)

    async def lease(self, kind: str, symbols: Iterable[str], ttl_s: float | None = None,
                    holder: str = "", *, owner: str = "",
                    max_symbols: int | None = None) -> LeaseReply:
        """Lease ``symbols`` of ``kind`` for ``ttl_s`` (default ``default_ttl_s``, at most
        ``max_ttl_s``) for ``owner`` (``holder``: a label kept in the reply). Symbols not
        subscribed yet are subscribed now, within the room the pinned symbols leave; the
        reply says per symbol what the upstream answered, and the lease holds the
        accepted and pending ones. ``max_symbols``: the most distinct symbols the
        owner's live leases may hold (its token's). Raises :class:`LeaseCapError` over a
        cap, :class:`LeaseError` when leases are off, the TTL is not positive or no
        symbol is given."""
        if not self.config.enabled:
            msg = "leases are disabled (source.leases.enabled: false)"
            raise LeaseError(msg)
        _check_kind(kind)
        ttl = self._ttl(ttl_s)
        wanted = normalize_symbols(symbols)
        if not wanted:
            msg = "no symbol to lease"
            raise LeaseError(msg)
        # before waiting for the lock (a request over a cap is answered at once), and
        # again once it is ours (others may have leased meanwhile)
        self._check_caps(kind, wanted, owner, max_symbols)
        async with self._lock:
            self._check_caps(kind, wanted, owner, max_symbols)
            results: dict[str, SubscriptionResult] = {}
            upstream = self.upstream.subscribed().get(kind, frozenset())
            new: list[str] = []
            for s in wanted:
                if s in self._held[kind]:
                    results[s] = _ACCEPTED if s in upstream else _PENDING
                else:
                    new.append(s)
            room = self._lease_room()
            if room is not None and len(new) > room:
                refused = SubscriptionResult(SubscriptionStatus.LIMIT, self._room_error())
                keep = max(0, room)
                for s in new[keep:]:
                    results[s] = refused
                new = new[:keep]
            if new:
                results.update(await self._subscribe(kind, new))
            held = frozenset(s for s in wanted if results[s].held)
            ordered = {s: results[s] for s in wanted}
            if not held:
                return LeaseReply(None, kind, holder, ttl, None, ordered, owner)
            lease = _Lease(uuid.uuid4().hex, owner, holder, kind, held, ttl,
                           self.clock() + ttl)
            self._leases[lease.id] = lease
            self._by_owner.setdefault(owner, set()).add(lease.id)
            for s in wanted:  # in the request's order: the last is evicted first
                if s not in held:
                    continue
                self._holders.setdefault((kind, s), set()).add(lease.id)
                self._grace.pop((kind, s), None)
            return LeaseReply(lease.id, kind, holder, ttl, lease.expires_at, ordered, owner)

    def _check_caps(self, kind: str, wanted: list[str], owner: str,
                    max_symbols: int | None) -> None:
        problem = self._cap_problem(kind, wanted, owner, max_symbols)
        if problem is not None:
            # leases the clock passed may still count until the next expire(): end them
            self._end_due(self.clock())
            problem = self._cap_problem(kind, wanted, owner, max_symbols)
        if problem is not None:
            raise problem

    def _cap_problem(self, kind: str, wanted: list[str], owner: str,
                     max_symbols: int | None) -> LeaseCapError | None:
        cfg = self.config
        if len(self._leases) >= cfg.max_leases:
            return LeaseCapError(
                "source.leases.max_leases",
                f"{len(self._leases)} leases are live, the most this bridge keeps "
                f"(source.leases.max_leases: {cfg.max_leases}); try again later")
        keys = {(kind, s) for s in wanted}
        extra = sum(1 for k in keys if k not in self._holders and k not in self._grace)
        total = len(self._holders) + len(self._grace) + extra
        if total > cfg.max_symbols:
            return LeaseCapError(
                "source.leases.max_symbols",
                f"this lease would make {total} distinct leased symbols, more than this "
                f"bridge keeps (source.leases.max_symbols: {cfg.max_symbols})")
        caps: list[tuple[int, str]] = []
        if max_symbols is not None:
            caps.append((max_symbols, "control.auth max_symbols"))
        if cfg.max_per_holder is not None:
            caps.append((cfg.max_per_holder, "source.leases.max_per_holder"))
        if not caps:
            return None
        cap, name = min(caps, key=lambda c: c[0])
        if len(keys) <= cap:
            now = self.clock()
            for lease_id in self._by_owner.get(owner, ()):
                lease = self._leases[lease_id]
                if lease.expires_at > now:
                    keys.update((lease.kind, s) for s in lease.symbols)
                    if len(keys) > cap:
                        break
        if len(keys) > cap:
            return LeaseCapError(
                name, f"{owner!r} would hold {len(keys)} symbol(s) with this lease, more "
                f"than it may ({name}: {cap})")
        return None

    def _lease_room(self) -> int | None:
        """New symbols leases may still take: what the keys hold, less every pinned
        symbol (placed or not) and what is held for leases or in grace; ``None``:
        unknown (the upstream's limit error will say). While the capacity is unknown
        (a learned limit being re-checked) and pinned symbols wait for room, none:
        whatever room there is, is theirs first."""
        if self._placement is None:
            return None
        reserve = self._pinned_reserve()
        capacity = self._placement.capacity()
        if capacity is None:
            return 0 if reserve else None
        return capacity - sum(map(len, self._held.values())) - reserve

    def _pinned_reserve(self) -> int:
        """Pinned symbols not held that will need room (not those rejected)."""
        out = 0
        for kind in KINDS:
            missing = self._pinned[kind] - self._held[kind]
            out += len(missing) - sum(1 for s in missing
                                      if (kind, s) in self._unsupported_pins)
        return out

    def _room_error(self) -> str:
        capacity = self._placement.capacity() if self._placement is not None else None
        pinned = sum(map(len, self._pinned.values()))
        leased = sum(len(self._held[k] - self._pinned[k]) for k in KINDS)
        keys = "an API key's limit is being learned or re-checked" if capacity is None \
            else f"{capacity} subscription(s) across the API keys"
        waiting = self._pinned_reserve()
        return (f"{LIMIT_MARK}: the capacity left after the configured symbols is used up "
                f"({keys}, {pinned} configured, {waiting} of them waiting for room, "
                f"{leased} held for leases)")

    async def renew(self, lease_id: str, ttl_s: float | None = None, *,
                    owner: str | None = None) -> LeaseReply:
        """Extend a live lease to ``ttl_s`` from now (cut to ``max_ttl_s``). The reply
        holds its symbols and, once, those evicted since the last renew (``evicted``).
        Raises :class:`LeaseNotFound` for a lease that is not live, or that is not
        ``owner``'s (when given).

        It makes no request, so it does not wait for the lock: lease requests queued
        behind the upstream's pace cannot delay a renewal."""
        ttl = self._ttl(ttl_s)
        lease = self._live_lease(lease_id, owner)
        lease.ttl_s = ttl
        lease.expires_at = self.clock() + ttl
        upstream = self.upstream.subscribed().get(lease.kind, frozenset())
        results = {s: _ACCEPTED if s in upstream else _PENDING for s in sorted(lease.symbols)}
        if lease.evicted:
            for s, why in sorted(lease.evicted.items()):
                results[s] = SubscriptionResult(SubscriptionStatus.EVICTED, why)
            lease.evicted = None
        return LeaseReply(lease.id, lease.kind, lease.holder, ttl, lease.expires_at,
                          results, lease.owner)

    async def release(self, lease_id: str, *, owner: str | None = None) -> None:
        """End a lease now; its symbols are unsubscribed ``grace_s`` later unless held
        otherwise. Raises :class:`LeaseNotFound` for a lease that is not live, or that
        is not ``owner``'s (when given)."""
        lease = self._live_lease(lease_id, owner)
        self._end(lease, self.clock())
        async with self._lock:
            await self._collect(self.clock())

    def _live_lease(self, lease_id: str, owner: str | None = None) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self.clock() \
                or (owner is not None and lease.owner != owner):
            # another owner's lease is answered like no lease: no existence oracle
            msg = f"no live lease {lease_id[:64]!r} (released, expired or never granted)"
            raise LeaseNotFound(msg)
        return lease

    def _end(self, lease: _Lease, now: float) -> None:
        self._leases.pop(lease.id, None)
        mine = self._by_owner.get(lease.owner)
        if mine is not None:
            mine.discard(lease.id)
            if not mine:
                del self._by_owner[lease.owner]
        for s in lease.symbols:
            key = (lease.kind, s)
            ids = self._holders.get(key)
            if ids is None:
                continue
            ids.discard(lease.id)
            if not ids:
                del self._holders[key]
                if s not in self._pinned[lease.kind]:
                    self._grace[key] = now + self.config.grace_s

    def _end_due(self, now: float) -> None:
        for lease in [le for le in self._leases.values() if le.expires_at <= now]:
            self._end(lease, now)

    # -- time ---------------------------------------------------------------------------

    async def expire(self) -> int:
        """End the leases due at the clock's time and unsubscribe the symbols whose grace
        period is over; returns the number of symbols unsubscribed."""
        async with self._lock:
            now = self.clock()
            self._end_due(now)
            return await self._collect(now)

    async def _collect(self, now: float) -> int:
        due: dict[str, list[str]] = {}
        for (kind, s), at in list(self._grace.items()):
            if at <= now:
                del self._grace[(kind, s)]
                if (kind, s) not in self._holders and s not in self._pinned[kind] \
                        and s in self._held[kind]:
                    due.setdefault(kind, []).append(s)
        for kind, syms in due.items():
            await self._unsubscribe(kind, sorted(syms))
        if due:
            self._room_freed = True
        return sum(map(len, due.values()))

    async def run(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Every ``interval_s`` until ``stop`` is set: :meth:`expire`, then
        :meth:`retry_pinned` (which acts only when a retry is due); a failure is logged
        and the next round tries again."""
        while not stop.is_set():
            try:
                await self.expire()
                await self.retry_pinned()
            except Exception:
                log.exception("lease expiry or pinned-symbol retry failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- the upstream ---------------------------------------------------------------------

    async def _subscribe(self, kind: str, symbols: list[str],
                         pin: bool = False) -> dict[str, SubscriptionResult]:
        if pin and self._placement is not None:
            answers = await self._placement.pin(kind, symbols)
        else:
            answers = await self.upstream.subscribe(kind, symbols)
        results = dict(answers)
        pinned = self._pinned[kind]
        for s in symbols:
            r = results.get(s)
            if r is None:
                r = results[s] = SubscriptionResult(SubscriptionStatus.ERROR, "no answer")
            elif r.held:
                self._held[kind].add(s)
            if s in pinned:
                if r.status == SubscriptionStatus.REJECTED:
                    self._unsupported_pins.add((kind, s))
                else:
                    self._unsupported_pins.discard((kind, s))
        return results

    async def _unsubscribe(self, kind: str,
                           symbols: list[str]) -> dict[str, SubscriptionResult]:
        # no longer ours whatever the answer: the upstream's desired set dropped them
        self._held[kind].difference_update(symbols)
        return dict(await self.upstream.unsubscribe(kind, symbols))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        msg = f"unknown kind {kind!r} (ticker or equity)"
        raise ValueError(msg)


__all__ = [
    "EVICTED_ERROR",
    "LOST_ERROR",
    "LeaseCapError",
    "LeaseError",
    "LeaseNotFound",
    "LeaseReply",
    "PinDiff",
    "Placement",
    "Subscriptions",
    "SubscriptionsSnapshot",
    "Upstream",
]
