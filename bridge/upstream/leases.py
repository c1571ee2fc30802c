"""The lease table of :class:`~bridge.upstream.subscriptions.Subscriptions`: the live
leases with their owners, the symbols they hold (in the order they became leased), the
symbols in grace after their last lease ended, the caps checked before a lease is
granted, and the choice of the leased symbols to evict for configured ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Final

from bridge.config.schema import LeaseConfig
from bridge.core.kinds import PRICE_KINDS
from bridge.upstream.protocol import SubscriptionResult, SubscriptionStatus

_ACCEPTED: Final = SubscriptionResult(SubscriptionStatus.ACCEPTED)
_PENDING: Final = SubscriptionResult(SubscriptionStatus.PENDING)


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


@dataclass(slots=True)
class Lease:
    id: str
    owner: str
    holder: str
    kind: str
    symbols: frozenset[str]
    ttl_s: float
    expires_at: float
    #: symbols taken from it since its last renew, and why (``None``: none, the usual)
    evicted: dict[str, str] | None = None


class LeaseTable:
    """The live leases and the symbols they hold or left in grace (see the module).

    It asks nothing of the upstream: the :class:`~bridge.upstream.subscriptions.Subscriptions`
    that owns it does, under its lock.
    """

    def __init__(self, config: LeaseConfig) -> None:
        self.config = config
        self.leases: dict[str, Lease] = {}
        #: owner -> ids of its leases
        self.by_owner: dict[str, set[str]] = {}
        #: (kind, symbol) -> ids of the live leases holding it; in the order the symbols
        #: became leased (the most recent last: the first evicted)
        self.holders: dict[tuple[str, str], set[str]] = {}
        #: (kind, symbol) -> when it is unsubscribed unless leased or pinned again
        self.grace: dict[tuple[str, str], float] = {}

    # -- read side ----------------------------------------------------------------------

    def leased(self) -> dict[str, frozenset[str]]:
        """The symbols held by at least one live lease, by kind."""
        out: dict[str, set[str]] = {k: set() for k in PRICE_KINDS}
        for kind, s in self.holders:
            out[kind].add(s)
        return {k: frozenset(v) for k, v in out.items()}

    def in_grace(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {k: set() for k in PRICE_KINDS}
        for kind, s in self.grace:
            out[kind].add(s)
        return {k: frozenset(v) for k, v in out.items()}

    def lease_ids(self, holder: str | None = None, *, owner: str | None = None) -> list[str]:
        """The live leases' ids (with that holder label, of that owner)."""
        ids = self.leases if owner is None else self.by_owner.get(owner, set())
        return [i for i in ids if (le := self.leases.get(i)) is not None
                and (holder is None or le.holder == holder)]

    def owner_of(self, lease_id: str, now: float) -> str | None:
        """Who a live lease belongs to (``None``: no live lease has this id)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.expires_at <= now:
            return None
        return lease.owner

    def live_lease(self, lease_id: str, now: float, owner: str | None = None) -> Lease:
        """The live lease ``lease_id`` (of ``owner``, when given), else
        :class:`LeaseNotFound`."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.expires_at <= now \
                or (owner is not None and lease.owner != owner):
            # another owner's lease is answered like no lease: no existence oracle
            msg = f"no live lease {lease_id[:64]!r} (released, expired or never granted)"
            raise LeaseNotFound(msg)
        return lease

    def ttl(self, ttl_s: float | None) -> float:
        """The TTL granted for ``ttl_s`` (default ``default_ttl_s``, at most
        ``max_ttl_s``); :class:`LeaseError` when it is not positive."""
        ttl = self.config.default_ttl_s if ttl_s is None else float(ttl_s)
        if not ttl > 0:  # NaN too
            msg = "ttl_s must be a positive number of seconds"
            raise LeaseError(msg)
        return min(ttl, self.config.max_ttl_s)

    # -- caps -----------------------------------------------------------------------------

    def check_caps(self, kind: str, wanted: list[str], owner: str, max_symbols: int | None,
                   clock: Callable[[], float], pinned: Mapping[str, Set[str]]) -> None:
        """Raise :class:`LeaseCapError` when a lease of ``wanted`` for ``owner`` would
        pass a cap."""
        problem = self.cap_problem(kind, wanted, owner, max_symbols, clock())
        if problem is not None:
            # leases the clock passed may still count until the next expire(): end them
            self.end_due(clock(), pinned)
            problem = self.cap_problem(kind, wanted, owner, max_symbols, clock())
        if problem is not None:
            raise problem

    def cap_problem(self, kind: str, wanted: list[str], owner: str,
                    max_symbols: int | None, now: float) -> LeaseCapError | None:
        """The cap a lease of ``wanted`` for ``owner`` would pass (``None``: none)."""
        cfg = self.config
        if len(self.leases) >= cfg.max_leases:
            return LeaseCapError(
                "source.leases.max_leases",
                f"{len(self.leases)} leases are live, the most this bridge keeps "
                f"(source.leases.max_leases: {cfg.max_leases}); try again later")
        keys = {(kind, s) for s in wanted}
        extra = sum(1 for k in keys if k not in self.holders and k not in self.grace)
        total = len(self.holders) + len(self.grace) + extra
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
            for lease_id in self.by_owner.get(owner, ()):
                lease = self.leases[lease_id]
                if lease.expires_at > now:
                    keys.update((lease.kind, s) for s in lease.symbols)
                    if len(keys) > cap:
                        break
        if len(keys) > cap:
            return LeaseCapError(
                name, f"{owner!r} would hold {len(keys)} symbol(s) with this lease, more "
                f"than it may ({name}: {cap})")
        return None

    # -- changes --------------------------------------------------------------------------

    def grant(self, kind: str, wanted: list[str], held: frozenset[str], owner: str,
              holder: str, ttl: float, now: float) -> Lease:
        """A new lease of ``held`` (the symbols of ``wanted`` the upstream holds)."""
        lease = Lease(uuid.uuid4().hex, owner, holder, kind, held, ttl, now + ttl)
        self.leases[lease.id] = lease
        self.by_owner.setdefault(owner, set()).add(lease.id)
        for s in wanted:  # in the request's order: the last is evicted first
            if s not in held:
                continue
            self.holders.setdefault((kind, s), set()).add(lease.id)
            self.grace.pop((kind, s), None)
        return lease

    def renew(self, lease: Lease, ttl: float, now: float,
              upstream: Set[str]) -> LeaseReply:
        """Extend ``lease`` to ``ttl`` from ``now``; the reply holds its symbols
        (``upstream``: those subscribed now) and, once, those evicted since the last
        renew."""
        lease.ttl_s = ttl
        lease.expires_at = now + ttl
        results = {s: _ACCEPTED if s in upstream else _PENDING for s in sorted(lease.symbols)}
        if lease.evicted:
            for s, why in sorted(lease.evicted.items()):
                results[s] = SubscriptionResult(SubscriptionStatus.EVICTED, why)
            lease.evicted = None
        return LeaseReply(lease.id, lease.kind, lease.holder, ttl, lease.expires_at,
                          results, lease.owner)

    def end(self, lease: Lease, now: float, pinned: Mapping[str, Set[str]]) -> None:
        """End ``lease``: its symbols no other lease holds enter their grace period
        (unless ``pinned``)."""
        self.leases.pop(lease.id, None)
        mine = self.by_owner.get(lease.owner)
        if mine is not None:
            mine.discard(lease.id)
            if not mine:
                del self.by_owner[lease.owner]
        for s in lease.symbols:
            key = (lease.kind, s)
            ids = self.holders.get(key)
            if ids is None:
                continue
            ids.discard(lease.id)
            if not ids:
                del self.holders[key]
                if s not in pinned[lease.kind]:
                    self.grace[key] = now + self.config.grace_s

    def end_due(self, now: float, pinned: Mapping[str, Set[str]]) -> None:
        """End the leases the clock passed."""
        for lease in [le for le in self.leases.values() if le.expires_at <= now]:
            self.end(lease, now, pinned)

    def drop(self, key: tuple[str, str], why: str) -> None:
        """Take a symbol from every lease holding it (and from grace), telling them why."""
        self.grace.pop(key, None)
        s = key[1]
        for lease_id in self.holders.pop(key, ()):
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            lease.symbols = lease.symbols - {s}
            if lease.evicted is None:
                lease.evicted = {}
            lease.evicted[s] = why

    def victims(self, count: int, held: Mapping[str, Set[str]],
                pinned: Mapping[str, Set[str]]) -> list[tuple[str, str]]:
        """Up to ``count`` symbols held only for leases, to evict: in grace first, then
        the most recently leased."""
        victims: list[tuple[str, str]] = []
        for key in self.grace:
            if len(victims) >= count:
                break
            kind, s = key
            if s in held[kind] and s not in pinned[kind]:
                victims.append(key)
        for key in reversed(self.holders):
            if len(victims) >= count:
                break
            if key[1] not in pinned[key[0]]:
                victims.append(key)
        return victims

    def evict(self, count: int, held: Mapping[str, Set[str]],
              pinned: Mapping[str, Set[str]], why: str) -> dict[str, list[str]]:
        """Take up to ``count`` symbols held only for leases from their leases (see
        :meth:`victims`), telling them ``why``; returns them by kind."""
        by_kind: dict[str, list[str]] = {}
        for key in self.victims(count, held, pinned):
            self.drop(key, why)
            by_kind.setdefault(key[0], []).append(key[1])
        return by_kind


__all__ = [
    "Lease",
    "LeaseCapError",
    "LeaseError",
    "LeaseNotFound",
    "LeaseReply",
    "LeaseTable",
]
