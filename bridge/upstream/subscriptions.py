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
  freed room or a key whose limit was learned reconnected (:meth:`Subscriptions.room`;
  not more often than every ``retry_initial_s``); :meth:`Subscriptions.unplaced_pinned`
  names them by kind (readiness, metrics), and the pool's ``unplaced`` says the same;
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
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from bridge.config.schema import LeaseConfig
from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import SubscriptionsSnapshot
from bridge.upstream.leases import (
    Lease,
    LeaseCapError,
    LeaseError,
    LeaseNotFound,
    LeaseReply,
    LeaseTable,
)
from bridge.upstream.pins import PinDiff, RetrySchedule, lease_room, room_error
from bridge.upstream.protocol import (
    Placement,
    SubscriptionResult,
    SubscriptionStatus,
    Upstream,
    normalize_symbols,
)
from bridge.upstream.snapshots import subscriptions_snapshot
from bridge.upstream.symbols import SymbolBook

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


class Subscriptions:
    """The pinned-or-leased symbol set, kept subscribed on an :class:`Upstream`.

    ``pinned`` is the configuration's symbol set the upstream is already subscribed to
    (the pool subscribes its configured symbols itself; by default the book's): no
    request is made for it. With a :class:`Placement` upstream, its ``unplaced``
    symbols are pinned too (not held: retried by :meth:`run`). ``symbols``: the
    :class:`~bridge.upstream.symbols.SymbolBook` whose pinned and held sets this keeps
    and whose keeper it is (:meth:`lost`, :meth:`room`); by default the upstream's.
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
        symbols: SymbolBook | None = None,
    ) -> None:
        self.upstream = upstream
        self.config = config or LeaseConfig()
        self.clock = clock
        self._lock = asyncio.Lock()
        self._placement: Placement | None = upstream if isinstance(upstream, Placement) \
            else None
        if symbols is None:
            book = getattr(upstream, "symbols", None)
            symbols = book if isinstance(book, SymbolBook) else SymbolBook()
        #: the symbol set this keeps: its pinned and held sets are the book's
        self.symbols = symbols
        symbols.keeper = self
        self._pinned: dict[str, frozenset[str]] = symbols.pinned
        #: what we asked the upstream for and it holds (accepted or pending)
        self._held: dict[str, set[str]] = symbols.held
        for kind, syms in (symbols.pinned if pinned is None else pinned).items():
            _check_kind(kind)
            self._pinned[kind] = frozenset(normalize_symbols(syms))
            self._held[kind] |= self._pinned[kind]
        #: the live leases, their symbols and those in grace
        self._table = LeaseTable(self.config)
        #: pinned symbols the upstream last answered ``rejected`` (they reserve no room)
        self._unsupported_pins: set[tuple[str, str]] = set()
        #: when the pinned symbols not held are tried again
        self._retry = RetrySchedule(retry_initial_s, retry_max_s)
        #: leased symbols evicted for pinned ones since start
        self.evicted_total = 0
        if self._placement is not None:
            for kind, syms in self._placement.unplaced.items():
                if kind in self._pinned and syms:
                    self._pinned[kind] = self._pinned[kind] | syms
                    self._held[kind] -= syms
            if any(self.unplaced_pinned().values()):
                self._retry.at = clock()

    @property
    def retry_initial_s(self) -> float:
        """The first delay of the retry of the pinned symbols not held (seconds)."""
        return self._retry.initial_s

    @property
    def retry_max_s(self) -> float:
        """The cap of that delay (seconds)."""
        return self._retry.max_s

    # -- read side ----------------------------------------------------------------------

    @property
    def pinned(self) -> dict[str, frozenset[str]]:
        return dict(self._pinned)

    def desired(self) -> dict[str, frozenset[str]]:
        """The symbols subscribed on our behalf: pinned and held, leased, in grace."""
        return {k: frozenset(v) for k, v in self._held.items()}

    def leased(self) -> dict[str, frozenset[str]]:
        """The symbols held by at least one live lease, by kind."""
        return self._table.leased()

    def in_grace(self) -> dict[str, frozenset[str]]:
        return self._table.in_grace()

    def unplaced_pinned(self) -> dict[str, frozenset[str]]:
        """The pinned symbols not held now (refused for the limit, rejected, failed),
        by kind: the configuration asks for them and they do not flow. Retried."""
        return {k: frozenset(self._pinned[k] - self._held[k]) for k in KINDS}

    def lease_ids(self, holder: str | None = None, *, owner: str | None = None) -> list[str]:
        """The live leases' ids (with that holder label, of that owner)."""
        return self._table.lease_ids(holder, owner=owner)

    def owner_of(self, lease_id: str) -> str | None:
        """Who a live lease belongs to (``None``: no live lease has this id)."""
        return self._table.owner_of(lease_id, self.clock())

    def unplaced_for_room(self) -> dict[str, list[str]]:
        """The pinned symbols not held for want of room (every reason but the
        upstream's "unsupported": those can never be placed), by kind, sorted: what
        ``/readyz`` fails on."""
        return {k: sorted(s for s in self._pinned[k] - self._held[k]
                          if (k, s) not in self._unsupported_pins) for k in KINDS}

    def snapshot(self) -> SubscriptionsSnapshot:
        return subscriptions_snapshot(self._table, self._pinned, self._held,
                                      self.evicted_total, self.unplaced_for_room())

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
                    self._table.grace.pop((kind, s), None)
                for s in old - self._pinned[kind]:
                    self._unsupported_pins.discard((kind, s))
                todo[kind] = [s for s in new if s not in self._held[kind]]
                gone[kind] = sorted(s for s in old if s not in self._pinned[kind]
                                    and (kind, s) not in self._table.holders
                                    and s in self._held[kind])
            # what leaves first: its room is what the new symbols may need
            for kind in KINDS:
                if gone[kind]:
                    removed[kind] = await self._unsubscribe(kind, gone[kind])
                    self._retry.room_freed = True
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
            self._retry.clear()
            self._retry.room_freed = False
            return PinDiff({}, {})
        if not (self._retry.due(now) or force):
            return PinDiff({}, {})
        added: dict[str, dict[str, SubscriptionResult]] = {}
        evicted: dict[str, set[str]] = {}
        async with self._lock:
            self._retry.tried(self.clock())
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
        waiting = any(self._pinned[k] - self._held[k] for k in KINDS)
        self._retry.after(self.clock(), waiting=waiting, tried=tried, placed=placed)
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
        by_kind = self._table.evict(count, self._held, self._pinned, EVICTED_ERROR)
        self.evicted_total += sum(map(len, by_kind.values()))
        for kind, syms in by_kind.items():
            evicted.setdefault(kind, set()).update(syms)
            log.warning("evicted %d leased %s symbol(s) to make room for configured ones: %s",
                        len(syms), kind, ", ".join(sorted(syms)[:50]),
                        extra={"kind": kind, "evicted": len(syms)})
            await self._unsubscribe(kind, sorted(syms))
        return sum(map(len, by_kind.values()))

    def lost(self, kind: str, symbols: list[str]) -> None:
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
                self._table.drop((kind, s), LOST_ERROR)
        if retry:
            self._retry.at = self.clock()
        self._push_unplaced()

    def room(self) -> None:
        """A key may have room again (its learned limit is being re-checked): the pinned
        symbols not held are retried soon (not more often than ``retry_initial_s``)."""
        self._retry.room_freed = True

    # -- leases -------------------------------------------------------------------------

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
        ttl = self._table.ttl(ttl_s)
        wanted = normalize_symbols(symbols)
        if not wanted:
            msg = "no symbol to lease"
            raise LeaseError(msg)
        # before waiting for the lock (a request over a cap is answered at once), and
        # again once it is ours (others may have leased meanwhile)
        self._table.check_caps(kind, wanted, owner, max_symbols, self.clock, self._pinned)
        async with self._lock:
            self._table.check_caps(kind, wanted, owner, max_symbols, self.clock, self._pinned)
            results: dict[str, SubscriptionResult] = {}
            upstream = self.upstream.subscribed().get(kind, frozenset())
            new: list[str] = []
            for s in wanted:
                if s in self._held[kind]:
                    results[s] = _ACCEPTED if s in upstream else _PENDING
                else:
                    new.append(s)
            room = lease_room(self._placement, self._pinned, self._held,
                              self._unsupported_pins)
            if room is not None and len(new) > room:
                refused = SubscriptionResult(SubscriptionStatus.LIMIT, room_error(
                    self._placement, self._pinned, self._held, self._unsupported_pins))
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
            lease = self._table.grant(kind, wanted, held, owner, holder, ttl, self.clock())
            return LeaseReply(lease.id, kind, holder, ttl, lease.expires_at, ordered, owner)

    async def renew(self, lease_id: str, ttl_s: float | None = None, *,
                    owner: str | None = None) -> LeaseReply:
        """Extend a live lease to ``ttl_s`` from now (cut to ``max_ttl_s``). The reply
        holds its symbols and, once, those evicted since the last renew (``evicted``).
        Raises :class:`LeaseNotFound` for a lease that is not live, or that is not
        ``owner``'s (when given).

        It makes no request, so it does not wait for the lock: lease requests queued
        behind the upstream's pace cannot delay a renewal."""
        ttl = self._table.ttl(ttl_s)
        lease = self._table.live_lease(lease_id, self.clock(), owner)
        return self._table.renew(lease, ttl, self.clock(),
                                 self.upstream.subscribed().get(lease.kind, frozenset()))

    async def release(self, lease_id: str, *, owner: str | None = None) -> None:
        """End a lease now; its symbols are unsubscribed ``grace_s`` later unless held
        otherwise. Raises :class:`LeaseNotFound` for a lease that is not live, or that
        is not ``owner``'s (when given)."""
        lease = self._table.live_lease(lease_id, self.clock(), owner)
        self._table.end(lease, self.clock(), self._pinned)
        async with self._lock:
            await self._collect(self.clock())

    # -- time ---------------------------------------------------------------------------

    async def expire(self) -> int:
        """End the leases due at the clock's time and unsubscribe the symbols whose grace
        period is over; returns the number of symbols unsubscribed."""
        async with self._lock:
            now = self.clock()
            self._table.end_due(now, self._pinned)
            return await self._collect(now)

    async def _collect(self, now: float) -> int:
        due: dict[str, list[str]] = {}
        grace = self._table.grace
        for (kind, s), at in list(grace.items()):
            if at <= now:
                del grace[(kind, s)]
                if (kind, s) not in self._table.holders and s not in self._pinned[kind] \
                        and s in self._held[kind]:
                    due.setdefault(kind, []).append(s)
        for kind, syms in due.items():
            await self._unsubscribe(kind, sorted(syms))
        if due:
            self._retry.room_freed = True
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
    "Lease",
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
