"""The desired symbol set: pinned by the configuration, or leased by consumers.

A symbol is subscribed upstream while the configuration pins it or a lease on it
lives; ``grace_s`` after its last lease ended (expired or released) it is unsubscribed,
unless it was pinned or leased again meanwhile. :class:`Subscriptions` keeps that set
and drives an :class:`Upstream` (an :class:`~bridge.upstream.UpstreamPool`) with the
differences, one ``subscribe`` / ``unsubscribe`` at a time:

- a lease answers per symbol what the upstream's acknowledgement said (``accepted``,
  ``rejected``, ``limit``, ``error``, ``pending``) and holds only the symbols that were
  accepted or are pending (subscribed on the next connect); a symbol already subscribed
  for someone else costs no request;
- the upstream's per-key limit is the upstream's to enforce: a lease beyond it is
  refused with the limit error for its new symbols, and nothing subscribed moves;
- :meth:`Subscriptions.set_pinned` (a reload) applies the difference with the pinned
  set it replaces: added symbols are subscribed, removed ones unsubscribed unless a
  lease holds them;
- time comes from an injectable ``clock`` (seconds, monotonic): :meth:`Subscriptions.expire`
  ends what is due at the clock's time, :meth:`Subscriptions.run` calls it periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from bridge.schema import LeaseConfig
from bridge.source import SubscriptionResult, SubscriptionStatus, normalize_symbols

log = logging.getLogger("aleno_bridge.subscriptions")

KINDS: Final = ("ticker", "equity")


class Upstream(Protocol):
    """What the subscriptions drive: the upstream connections (an ``UpstreamPool``)."""

    async def subscribe(self, kind: str,
                        symbols: Iterable[str]) -> Mapping[str, SubscriptionResult]: ...

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> Mapping[str, SubscriptionResult]: ...

    def subscribed(self) -> Mapping[str, frozenset[str]]: ...


class LeaseError(Exception):
    """A lease request that cannot be served; the message says why."""


class LeaseNotFound(LeaseError):
    """No live lease has this id (never granted, released, or expired)."""


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """The answer to :meth:`Subscriptions.lease` and :meth:`Subscriptions.renew`."""

    #: ``None`` when the lease holds no symbol (every one was refused)
    lease_id: str | None
    kind: str
    holder: str
    #: the TTL granted (the one asked for, cut to ``max_ttl_s``)
    ttl_s: float
    #: when the lease ends, on the subscriptions' clock (``None``: no lease)
    expires_at: float | None
    #: per symbol (normalized), what the upstream's acknowledgement said
    results: Mapping[str, SubscriptionResult]

    @property
    def held(self) -> list[str]:
        """The symbols the lease holds (accepted, or pending the next connect)."""
        return [s for s, r in self.results.items() if r.held]


@dataclass(frozen=True, slots=True)
class PinDiff:
    """What :meth:`Subscriptions.set_pinned` changed, per kind and symbol."""

    added: Mapping[str, Mapping[str, SubscriptionResult]]
    removed: Mapping[str, Mapping[str, SubscriptionResult]]

    @property
    def empty(self) -> bool:
        return not any(self.added.values()) and not any(self.removed.values())


@dataclass(frozen=True, slots=True)
class SubscriptionsSnapshot:
    """The desired set now, for metrics."""

    leases: int
    #: distinct (kind, symbol) held by at least one lease
    leased: int
    pinned: int
    #: symbols whose last lease ended, waiting for their grace period to end
    in_grace: int
    #: symbols subscribed on our behalf (pinned and accepted, leased, in grace)
    held: int


@dataclass
class _Lease:
    id: str
    holder: str
    kind: str
    symbols: frozenset[str]
    ttl_s: float
    expires_at: float


class Subscriptions:
    """The pinned-or-leased symbol set, kept subscribed on an :class:`Upstream`.

    ``pinned`` is the configuration's symbol set the upstream is already subscribed to
    (the pool subscribes its configured symbols itself): no request is made for it.
    """

    def __init__(
        self,
        upstream: Upstream,
        config: LeaseConfig | None = None,
        *,
        pinned: Mapping[str, Iterable[str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.config = config or LeaseConfig()
        self.clock = clock
        self._lock = asyncio.Lock()
        self._pinned: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}
        #: what we asked the upstream for and it holds (accepted or pending)
        self._held: dict[str, set[str]] = {k: set() for k in KINDS}
        for kind, syms in (pinned or {}).items():
            _check_kind(kind)
            self._pinned[kind] = frozenset(normalize_symbols(syms))
            self._held[kind] |= self._pinned[kind]
        self._leases: dict[str, _Lease] = {}
        #: (kind, symbol) -> ids of the live leases holding it
        self._holders: dict[tuple[str, str], set[str]] = {}
        #: (kind, symbol) -> when it is unsubscribed unless leased or pinned again
        self._grace: dict[tuple[str, str], float] = {}

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

    def lease_ids(self, holder: str | None = None) -> list[str]:
        """The live leases' ids (of one holder)."""
        return [i for i, le in self._leases.items() if holder is None or le.holder == holder]

    def snapshot(self) -> SubscriptionsSnapshot:
        return SubscriptionsSnapshot(
            leases=len(self._leases), leased=len(self._holders),
            pinned=sum(map(len, self._pinned.values())), in_grace=len(self._grace),
            held=sum(map(len, self._held.values())))

    # -- pins ---------------------------------------------------------------------------

    async def set_pinned(self, pinned: Mapping[str, Iterable[str]]) -> PinDiff:
        """Replace the pinned set (a reload): subscribe what is new, unsubscribe what is
        no longer pinned unless a lease holds it. A kind missing from ``pinned`` keeps
        nothing pinned. Returns the upstream's answers for the changes."""
        for kind in pinned:
            _check_kind(kind)
        added: dict[str, dict[str, SubscriptionResult]] = {}
        removed: dict[str, dict[str, SubscriptionResult]] = {}
        async with self._lock:
            for kind in KINDS:
                new = normalize_symbols(pinned.get(kind, ()))
                old = self._pinned[kind]
                self._pinned[kind] = frozenset(new)
                for s in new:
                    self._grace.pop((kind, s), None)
                todo = [s for s in new if s not in self._held[kind]]
                if todo:
                    added[kind] = await self._subscribe(kind, todo)
                gone = [s for s in old if s not in self._pinned[kind]
                        and (kind, s) not in self._holders and s in self._held[kind]]
                if gone:
                    removed[kind] = await self._unsubscribe(kind, sorted(gone))
        return PinDiff(added, removed)

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

    # -- leases -------------------------------------------------------------------------

    def _ttl(self, ttl_s: float | None) -> float:
        ttl = self.config.default_ttl_s if ttl_s is None else float(ttl_s)
        if not ttl > 0:  # NaN too
            msg = "ttl_s must be a positive number of seconds"
            raise LeaseError(msg)
        return min(ttl, self.config.max_ttl_s)

    async def lease(self, kind: str, symbols: Iterable[str], ttl_s: float | None = None,
                    holder: str = "") -> LeaseReply:
        """Lease ``symbols`` of ``kind`` for ``ttl_s`` (default ``default_ttl_s``, at most
        ``max_ttl_s``) for ``holder``. Symbols not subscribed yet are subscribed now;
        the reply says per symbol what the upstream answered, and the lease holds the
        accepted and pending ones. Raises :class:`LeaseError` when leases are off, the
        TTL is not positive or no symbol is given."""
        if not self.config.enabled:
            msg = "leases are disabled (source.leases.enabled: false)"
            raise LeaseError(msg)
        _check_kind(kind)
        ttl = self._ttl(ttl_s)
        wanted = normalize_symbols(symbols)
        if not wanted:
            msg = "no symbol to lease"
            raise LeaseError(msg)
        async with self._lock:
            results: dict[str, SubscriptionResult] = {}
            allowed = self._holder_room(holder, kind, wanted, results)
            upstream = self.upstream.subscribed().get(kind, frozenset())
            todo = [s for s in allowed if s not in self._held[kind]]
            for s in allowed:
                if s in self._held[kind]:
                    results[s] = SubscriptionResult(
                        SubscriptionStatus.ACCEPTED if s in upstream
                        else SubscriptionStatus.PENDING)
            if todo:
                results.update(await self._subscribe(kind, todo))
            held = frozenset(s for s in allowed if results[s].held)
            ordered = {s: results[s] for s in wanted}
            if not held:
                return LeaseReply(None, kind, holder, ttl, None, ordered)
            lease = _Lease(uuid.uuid4().hex, holder, kind, held, ttl, self.clock() + ttl)
            self._leases[lease.id] = lease
            for s in held:
                self._holders.setdefault((kind, s), set()).add(lease.id)
                self._grace.pop((kind, s), None)
            return LeaseReply(lease.id, kind, holder, ttl, lease.expires_at, ordered)

    def _holder_room(self, holder: str, kind: str, wanted: list[str],
                     results: dict[str, SubscriptionResult]) -> list[str]:
        cap = self.config.max_per_holder
        if cap is None:
            return wanted
        mine = {(le.kind, s) for le in self._leases.values() if le.holder == holder
                for s in le.symbols}
        allowed: list[str] = []
        for s in wanted:
            if (kind, s) in mine:
                allowed.append(s)
            elif len(mine) < cap:
                mine.add((kind, s))
                allowed.append(s)
            else:
                results[s] = SubscriptionResult(
                    SubscriptionStatus.ERROR,
                    f"holder {holder!r} holds {cap} symbol(s), the most one holder may "
                    "lease (source.leases.max_per_holder)")
        return allowed

    async def renew(self, lease_id: str, ttl_s: float | None = None) -> LeaseReply:
        """Extend a live lease to ``ttl_s`` from now (cut to ``max_ttl_s``). Raises
        :class:`LeaseNotFound` for a lease that is not live."""
        ttl = self._ttl(ttl_s)
        async with self._lock:
            lease = self._live_lease(lease_id)
            lease.ttl_s = ttl
            lease.expires_at = self.clock() + ttl
            upstream = self.upstream.subscribed().get(lease.kind, frozenset())
            results = {s: SubscriptionResult(SubscriptionStatus.ACCEPTED if s in upstream
                                             else SubscriptionStatus.PENDING)
                       for s in sorted(lease.symbols)}
            return LeaseReply(lease.id, lease.kind, lease.holder, ttl, lease.expires_at,
                              results)

    async def release(self, lease_id: str) -> None:
        """End a lease now; its symbols are unsubscribed ``grace_s`` later unless held
        otherwise. Raises :class:`LeaseNotFound` for a lease that is not live."""
        async with self._lock:
            lease = self._live_lease(lease_id)
            self._end(lease, self.clock())
            await self._collect(self.clock())

    def _live_lease(self, lease_id: str) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.expires_at <= self.clock():
            msg = f"no live lease {lease_id[:64]!r} (released, expired or never granted)"
            raise LeaseNotFound(msg)
        return lease

    def _end(self, lease: _Lease, now: float) -> None:
        self._leases.pop(lease.id, None)
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

    # -- time ---------------------------------------------------------------------------

    async def expire(self) -> int:
        """End the leases due at the clock's time and unsubscribe the symbols whose grace
        period is over; returns the number of symbols unsubscribed."""
        async with self._lock:
            now = self.clock()
            for lease in [le for le in self._leases.values() if le.expires_at <= now]:
                self._end(lease, now)
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
        return sum(map(len, due.values()))

    async def run(self, stop: asyncio.Event, interval_s: float = 0.5) -> None:
        """Call :meth:`expire` every ``interval_s`` until ``stop`` is set; a failure is
        logged and the next round tries again."""
        while not stop.is_set():
            try:
                await self.expire()
            except Exception:
                log.exception("lease expiry failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- the upstream ---------------------------------------------------------------------

    async def _subscribe(self, kind: str, symbols: list[str]) -> dict[str, SubscriptionResult]:
        results = dict(await self.upstream.subscribe(kind, symbols))
        for s in symbols:
            r = results.get(s)
            if r is None:
                results[s] = SubscriptionResult(SubscriptionStatus.ERROR, "no answer")
            elif r.held:
                self._held[kind].add(s)
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
    "LeaseError",
    "LeaseNotFound",
    "LeaseReply",
    "PinDiff",
    "Subscriptions",
    "SubscriptionsSnapshot",
    "Upstream",
]
