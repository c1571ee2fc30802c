"""The desired symbol set (bridge/upstream/subscriptions.py): pins, leases, grace, limits, owners,
caps, configured symbols first (eviction, retry).

The upstream here is a model of the pool (:class:`ModelUpstream`): a symbol universe, a
per-key limit counted over tickers and equities, a request that would pass the limit
refused whole with the limit error (as the simulator does), a connection that drops
and re-issues its desired set when it comes back. :class:`PlacingModel` also tells its
capacity (as the pool does once it knows its keys' limits), so that leases keep within
what the pinned symbols leave. The same random walk runs against the real simulator
through the real pool in tests/integration/upstream/test_live_subscriptions.py; the protection
of the configured symbols against the real simulator is in
tests/integration/upstream/test_lease_protection.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from bridge.config.schema import LeaseConfig
from bridge.upstream.client import (
    LIMIT_MARK,
    SubscriptionResult,
    SubscriptionStatus,
    normalize_symbols,
)
from bridge.upstream.pool import LIMIT_ERROR
from bridge.upstream.subscriptions import (
    EVICTED_ERROR,
    LOST_ERROR,
    LeaseCapError,
    LeaseError,
    LeaseNotFound,
    PinDiff,
    Placement,
    Subscriptions,
)
from bridge.upstream.symbols import SymbolBook

ACCEPTED = SubscriptionStatus.ACCEPTED
PENDING = SubscriptionStatus.PENDING
LIMIT = SubscriptionStatus.LIMIT
REJECTED = SubscriptionStatus.REJECTED
EVICTED = SubscriptionStatus.EVICTED
KINDS = ("ticker", "equity")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ModelUpstream:
    """What the pool promises, in a few lines: see the module docstring."""

    def __init__(self, limit: int, universe: Mapping[str, Iterable[str]]) -> None:
        self.limit = limit
        self.universe = {k: set(v) for k, v in universe.items()}
        self.connected = True
        self.desired: dict[str, set[str]] = {k: set() for k in KINDS}
        self.subs: dict[str, set[str]] = {k: set() for k in KINDS}
        self.requests = 0
        #: slots of the key held by another process (the upstream counts them too)
        self.external = 0

    def total(self) -> int:
        return sum(map(len, self.desired.values())) + self.external

    async def subscribe(self, kind: str,
                        symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        out: dict[str, SubscriptionResult] = {}
        new: list[str] = []
        for s in normalize_symbols(symbols):
            if s in self.desired[kind]:
                out[s] = SubscriptionResult(ACCEPTED if s in self.subs[kind] else PENDING)
            elif s not in self.universe[kind]:
                out[s] = SubscriptionResult(REJECTED, "unsupported symbol")
            else:
                new.append(s)
        if new:
            self.requests += 1
            if self.total() + len(new) > self.limit:
                out.update(dict.fromkeys(new, SubscriptionResult(LIMIT, LIMIT_ERROR)))
            else:
                self.desired[kind].update(new)
                if self.connected:
                    self.subs[kind].update(new)
                status = ACCEPTED if self.connected else PENDING
                out.update(dict.fromkeys(new, SubscriptionResult(status)))
        return out

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        self.requests += 1
        syms = normalize_symbols(symbols)
        self.desired[kind].difference_update(syms)
        self.subs[kind].difference_update(syms)
        return dict.fromkeys(syms, SubscriptionResult(ACCEPTED if self.connected else PENDING))

    def subscribed(self) -> dict[str, frozenset[str]]:
        return {k: frozenset(v) for k, v in self.subs.items()}

    def drop(self) -> None:
        self.connected = False
        self.subs = {k: set() for k in KINDS}

    def reconnect(self) -> None:
        self.connected = True
        self.subs = {k: set(v) for k, v in self.desired.items()}


class PlacingModel(ModelUpstream):
    """The model, with what the pool also offers (:class:`Placement`): its capacity
    known, configured symbols through ``pin``, the unplaced ones told."""

    def __init__(self, limit: int, universe: Mapping[str, Iterable[str]]) -> None:
        super().__init__(limit, universe)
        #: the symbol book the subscriptions keep (they become its keeper)
        self.symbols = SymbolBook()
        self.unplaced: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}
        self.pins = 0

    def capacity(self) -> int | None:
        return self.limit

    async def subscribe(self, kind: str,
                        symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        # the pool with known limits asks only for what fits, the rest is `limit`
        wanted = normalize_symbols(symbols)
        new = [s for s in wanted if s not in self.desired[kind] and s in self.universe[kind]]
        over = new[max(0, self.limit - self.total()):]
        out = await super().subscribe(kind, [s for s in wanted if s not in over])
        out.update(dict.fromkeys(over, SubscriptionResult(LIMIT, LIMIT_ERROR)))
        return {s: out[s] for s in wanted}

    async def pin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        self.pins += 1
        return await self.subscribe(kind, symbols)

    def set_unplaced(self, unplaced: Mapping[str, Iterable[str]]) -> None:
        self.unplaced = {k: frozenset(unplaced.get(k, ())) for k in KINDS}

    def shrink(self, limit: int) -> None:
        """The key's limit went down and a reconnect dropped what no longer fits (the
        most recently subscribed first), told to the symbol book's keeper."""
        self.limit = limit
        while self.total() > limit:
            kind = "equity" if self.desired["equity"] else "ticker"
            s = sorted(self.desired[kind])[-1]
            self.desired[kind].discard(s)
            self.subs[kind].discard(s)
            self.symbols.lost(kind, [s])


UNIVERSE = {"ticker": [f"T{i}/USD" for i in range(40)], "equity": [f"E{i}" for i in range(30)]}
#: symbols the upstream does not support
UNKNOWN = {"ticker": ["NOPE/USD", "ZZZ/USD"], "equity": ["NOPE"]}


@dataclass
class WalkLease:
    kind: str
    symbols: frozenset[str]
    expires_at: float
    owner: str


@dataclass
class Walk:
    """The test's own record of what it asked for and what it was told."""

    subs: Subscriptions
    up: ModelUpstream
    clock: Clock
    grace: float
    pinned: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    #: pinned symbols the upstream refused (limit, unsupported)
    refused_pins: dict[str, set[str]] = field(default_factory=lambda: {k: set() for k in KINDS})
    leases: dict[str, WalkLease] = field(default_factory=dict)
    ended: list[str] = field(default_factory=list)
    #: (kind, symbol) -> until when it must stay subscribed after its last lease
    grace_until: dict[tuple[str, str], float] = field(default_factory=dict)
    #: lease id -> symbols evicted since its last renew (its next renew names them)
    evicted: dict[str, set[str]] = field(default_factory=dict)
    evictions: int = 0
    caps_hit: int = 0

    def live(self) -> dict[str, WalkLease]:
        return {i: le for i, le in self.leases.items() if le.expires_at > self.clock.now}

    def leased(self, kind: str) -> set[str]:
        return {s for le in self.live().values() if le.kind == kind for s in le.symbols}

    def end_due(self) -> None:
        """Leases the clock passed end now (the subscriptions notice at ``expire()``)."""
        for i, le in list(self.leases.items()):
            if le.expires_at <= self.clock.now:
                self.end(i)

    def in_grace(self, kind: str) -> set[str]:
        return {s for (k, s), t in self.grace_until.items() if k == kind and t > self.clock.now}

    def evict(self, evicted: Mapping[str, frozenset[str]]) -> None:
        """Symbols the subscriptions evicted for pinned ones leave leases and grace."""
        for kind, syms in evicted.items():
            for s in syms:
                assert s not in self.pinned[kind], (kind, s)
                self.grace_until.pop((kind, s), None)
                self.evictions += 1
                for i, le in self.live().items():
                    if le.kind == kind and s in le.symbols:
                        le.symbols = le.symbols - {s}
                        self.evicted.setdefault(i, set()).add(s)

    def end(self, lease_id: str) -> None:
        le = self.leases.pop(lease_id)
        self.evicted.pop(lease_id, None)
        self.ended.append(lease_id)
        for s in le.symbols:
            if s not in self.leased(le.kind) and s not in self.pinned[le.kind]:
                self.grace_until[(le.kind, s)] = self.clock.now + self.grace

    def check(self, pins_applied: bool = False) -> None:
        """The invariants; ``pins_applied``: right after the pinned symbols were asked
        for (a reload, a retry), when none of them may wait while leases hold room."""
        up, now = self.up, self.clock.now
        desired = self.subs.desired()
        assert up.total() <= up.limit
        assert sum(map(len, up.subs.values())) <= up.limit
        for kind in KINDS:
            # the upstream's desired set is exactly what the subscriptions hold
            assert up.desired[kind] == set(desired[kind]), kind
            if up.connected:
                assert up.subs[kind] == up.desired[kind]
            leased = self.leased(kind)
            in_grace = {s for (k, s), t in self.grace_until.items() if k == kind and t > now}
            pinned = self.pinned[kind] - self.refused_pins[kind]
            # held == pinned + leased + in grace: nothing missing, nothing leaked
            assert leased <= set(desired[kind]), (kind, leased - set(desired[kind]))
            assert pinned <= set(desired[kind]), (kind, pinned - set(desired[kind]))
            assert in_grace <= set(desired[kind]), (kind, in_grace - set(desired[kind]))
            extra = set(desired[kind]) - pinned - leased - in_grace
            assert not extra, (kind, extra)
            # every symbol a reply accepted (or left pending) flows while its lease lives
            if up.connected:
                assert leased <= up.subs[kind]
            assert self.subs.leased()[kind] == leased
            assert self.subs.unplaced_pinned()[kind] == self.pinned[kind] - set(desired[kind])
        # configured symbols first: leases (and grace) hold only what the pinned leave
        nonpinned = sum(len(set(desired[k]) - self.pinned[k]) for k in KINDS)
        if pins_applied and any(self.pinned_limited.values()):
            assert nonpinned == 0, (self.pinned_limited, nonpinned)
        if isinstance(up, PlacingModel):
            effective = sum(len(self.pinned[k] - set(UNKNOWN[k])) for k in KINDS)
            assert nonpinned <= max(0, up.limit - effective), (nonpinned, effective)

    @property
    def pinned_limited(self) -> dict[str, set[str]]:
        """Pinned symbols the upstream's limit refused, still not held."""
        desired = self.subs.desired()
        return {k: {s for s in self.refused_pins[k] if s not in UNKNOWN[k]
                    and s not in desired[k]} for k in KINDS}

    def expect_cap(self, kind: str, wanted: list[str], owner: str, cfg: LeaseConfig,
                   max_symbols: int | None) -> bool:
        """Whether a lease of ``wanted`` is over one of the caps (the test's own count)."""
        if len(self.leases) >= cfg.max_leases:
            return True
        keys = {(kind, s) for s in wanted}
        held = {(k, s) for k in KINDS for s in self.leased(k) | self.in_grace(k)}
        if len(held | keys) > cfg.max_symbols:
            return True
        caps = [c for c in (max_symbols, cfg.max_per_holder) if c is not None]
        mine = {(le.kind, s) for le in self.live().values() if le.owner == owner
                for s in le.symbols}
        return bool(caps) and len(mine | keys) > min(caps)


async def walk(seed: int, steps: int, placing: bool = False) -> Walk:
    rng = random.Random(seed)
    clock = Clock()
    grace = rng.choice([0.0, 3.0, 10.0])
    cfg = LeaseConfig(enabled=True, max_ttl_s=60, default_ttl_s=20, grace_s=grace,
                      max_leases=rng.choice([4, 1000]), max_symbols=rng.choice([12, 1000]),
                      max_per_holder=rng.choice([None, 7]))
    token_cap = rng.choice([None, 5])
    limit = rng.choice([8, 25, 60])
    up = PlacingModel(limit, UNIVERSE) if placing else ModelUpstream(limit, UNIVERSE)
    subs = Subscriptions(up, cfg, clock=clock)
    w = Walk(subs, up, clock, grace)

    def some(kind: str, most: int = 6) -> list[str]:
        pool = UNIVERSE[kind] + UNKNOWN[kind]
        picked = rng.sample(pool, rng.randint(1, most))
        # the upstream normalizes; so does the bridge
        return [s.lower() if rng.random() < 0.1 else s for s in picked]

    async def set_pinned(new: dict[str, set[str]]) -> None:
        diff = await subs.set_pinned({k: sorted(v) for k, v in new.items()})
        w.pinned = {k: set(new.get(k, set())) for k in KINDS}
        applied(diff)

    def applied(diff: PinDiff) -> None:
        w.evict(diff.evicted)
        # only symbols pinned now, asked for, can have needed the room
        assert sum(map(len, diff.evicted.values())) <= sum(map(len, diff.added.values()))
        for kind in KINDS:
            for s in list(w.refused_pins[kind]):
                if s not in w.pinned[kind]:
                    w.refused_pins[kind].discard(s)
            for s, r in diff.added.get(kind, {}).items():
                if r.held:
                    w.refused_pins[kind].discard(s)
                else:
                    w.refused_pins[kind].add(s)
                    assert r.status in (LIMIT, REJECTED), r
                w.grace_until.pop((kind, s), None)
            for s in w.pinned[kind]:
                w.grace_until.pop((kind, s), None)
            for s in diff.removed.get(kind, {}):
                assert s not in w.leased(kind)
        w.check(pins_applied=True)

    for _ in range(steps):
        op = rng.random()
        kind = rng.choice(KINDS)
        if op < 0.08:
            new = {k: set(v) for k, v in w.pinned.items()}
            new[kind] |= set(normalize_symbols(some(kind, 4)))
            await set_pinned(new)
        elif op < 0.14:
            new = {k: set(v) for k, v in w.pinned.items()}
            drop = set(rng.sample(sorted(new[kind]), min(len(new[kind]), rng.randint(1, 4))))
            new[kind] -= drop
            await set_pinned(new)
        elif op < 0.17:
            # a reload: a whole new pinned set
            await set_pinned({k: set(normalize_symbols(rng.sample(UNIVERSE[k], rng.randint(0, 5))))
                              for k in KINDS})
        elif op < 0.45:
            owner = rng.choice(["a", "b", "c"])
            ttl = rng.choice([None, 1.0, 5.0, 30.0, 600.0])
            asked = some(kind)
            before = {k: set(v) for k, v in up.desired.items()}
            requests = up.requests
            if w.expect_cap(kind, normalize_symbols(asked), owner, cfg, token_cap):
                with pytest.raises(LeaseCapError):
                    await subs.lease(kind, asked, ttl, "label", owner=owner,
                                     max_symbols=token_cap)
                # refused before anything was asked of the upstream
                assert up.requests == requests
                w.caps_hit += 1
                w.check()
                continue
            reply = await subs.lease(kind, asked, ttl, f"label-{owner}", owner=owner,
                                     max_symbols=token_cap)
            assert reply.owner == owner and reply.holder == f"label-{owner}"
            assert set(reply.results) == set(normalize_symbols(asked))
            assert reply.ttl_s == min(ttl or 20, 60)
            if placing:
                # the capacity is known: new symbols beyond what the pinned leave are
                # answered `limit` without a request, the others asked in order
                reserve = sum(len(w.pinned[k] - before[k] - set(UNKNOWN[k])) for k in KINDS)
                room = max(0, up.limit - sum(map(len, before.values())) - reserve)
                fresh = [s for s in normalize_symbols(asked) if s not in before[kind]]
                for s in fresh[room:]:
                    assert reply.results[s].status == LIMIT
                    assert "capacity left after the configured symbols" in \
                        (reply.results[s].error or "")
                for s in fresh[:room]:
                    assert reply.results[s].status != LIMIT
            for s, r in reply.results.items():
                if placing and r.status == LIMIT:
                    pass
                elif s in UNKNOWN[kind]:
                    assert r.status == REJECTED
                elif s in before[kind]:
                    # already subscribed for someone: no request, no refusal
                    assert r.held
                elif r.status == LIMIT:
                    assert r.error is not None and LIMIT_MARK in r.error
                else:
                    assert r.status == (ACCEPTED if up.connected else PENDING), r
            if reply.lease_id is not None:
                assert reply.expires_at == clock.now + reply.ttl_s
                w.leases[reply.lease_id] = WalkLease(kind, frozenset(reply.held),
                                                     clock.now + reply.ttl_s, owner)
                for s in reply.held:
                    w.grace_until.pop((kind, s), None)
                    # a pin the upstream refused before is held now: pinned from here on
                    w.refused_pins[kind].discard(s)
            else:
                assert not reply.held
        elif op < 0.55 and (w.leases or w.ended):
            lease_id = rng.choice(sorted(w.leases) + w.ended[-3:])
            ttl = rng.choice([None, 2.0, 40.0])
            live = w.live().get(lease_id)
            owner = rng.choice([live.owner] * 3 + ["intruder"]) if live else "a"
            if live is not None and owner == live.owner:
                assert subs.owner_of(lease_id) == owner
                reply = await subs.renew(lease_id, ttl, owner=rng.choice([owner, None]))
                live.expires_at = clock.now + (ttl or 20)
                assert reply.expires_at == live.expires_at and reply.owner == owner
                assert set(reply.held) == set(live.symbols)
                evicted = {s: r for s, r in reply.results.items() if r.status == EVICTED}
                assert set(evicted) == w.evicted.pop(lease_id, set())
                assert all(r.error == EVICTED_ERROR for r in evicted.values())
            else:
                # another owner's lease is no lease at all, and stays as it was
                with pytest.raises(LeaseNotFound):
                    await subs.renew(lease_id, ttl, owner=owner)
        elif op < 0.65 and (w.leases or w.ended):
            lease_id = rng.choice(sorted(w.leases) + w.ended[-3:])
            live = w.live().get(lease_id)
            owner = rng.choice([live.owner] * 3 + ["intruder"]) if live else "a"
            if live is not None and owner == live.owner:
                w.end(lease_id)
                await subs.release(lease_id, owner=owner)
                assert subs.owner_of(lease_id) is None
            else:
                with pytest.raises(LeaseNotFound):
                    await subs.release(lease_id, owner=owner)
        elif op < 0.88:
            clock.now += rng.choice([0.1, 0.5, 1.0, 2.0, 5.0, 12.0])
            w.end_due()
            await subs.expire()
            if rng.random() < 0.3:
                # the retry run() makes when it is due
                applied(await subs.retry_pinned(force=True))
        elif op < 0.94 and up.connected:
            up.drop()
        else:
            up.reconnect()
        w.check()
    return w


@pytest.mark.parametrize("placing", [False, True], ids=["model", "placing"])
@pytest.mark.parametrize("seed", range(8))
async def test_random_walk_holds_the_invariants(seed: int, placing: bool) -> None:
    w = await walk(seed, 1500, placing)
    # the walk went through the interesting states, not just around them
    assert w.ended and w.up.requests > 50


async def test_the_walks_reach_evictions_and_caps() -> None:
    walks = [await walk(seed, 1500, placing) for seed in range(8) for placing in (False, True)]
    assert sum(w.evictions for w in walks) > 10
    assert sum(w.caps_hit for w in walks) > 10


async def test_every_lease_ends_and_every_leased_symbol_leaves_after_grace() -> None:
    w = await walk(99, 800)
    w.up.reconnect()
    await w.subs.set_pinned({})
    w.pinned = {k: set() for k in KINDS}
    w.clock.now += 61  # every lease ends (60 s at most), its grace begins
    w.end_due()
    await w.subs.expire()
    w.check()
    w.clock.now += w.grace
    await w.subs.expire()
    assert w.subs.desired() == {"ticker": frozenset(), "equity": frozenset()}
    assert w.up.subs == {"ticker": set(), "equity": set()}
    assert w.subs.snapshot().leases == 0


# -- single behaviours ------------------------------------------------------------------


def make(limit: int = 10, **cfg: object) -> tuple[Subscriptions, ModelUpstream, Clock]:
    clock = Clock()
    up = ModelUpstream(limit, UNIVERSE)
    conf = LeaseConfig.model_validate({"enabled": True, "grace_s": 5, **cfg})
    return Subscriptions(up, conf, clock=clock), up, clock


async def test_a_lease_over_the_limit_is_refused_and_breaks_nothing() -> None:
    subs, up, _ = make(limit=3)
    first = await subs.lease("ticker", ["T1/USD", "T2/USD"], holder="a")
    assert [r.status for r in first.results.values()] == [ACCEPTED, ACCEPTED]
    over = await subs.lease("ticker", ["T3/USD", "T4/USD"], holder="b")
    assert over.lease_id is None
    assert {r.status for r in over.results.values()} == {LIMIT}
    assert all(r.error == LIMIT_ERROR for r in over.results.values())
    assert up.subs["ticker"] == {"T1/USD", "T2/USD"}
    fits = await subs.lease("ticker", ["t3/usd", "T1/USD"], holder="b")
    assert fits.results["T3/USD"].status == ACCEPTED and fits.results["T1/USD"].held


async def test_grace_keeps_a_symbol_until_it_is_over_and_a_new_lease_keeps_it() -> None:
    subs, up, clock = make()
    a = await subs.lease("equity", ["E1"], ttl_s=10)
    assert a.lease_id is not None
    await subs.release(a.lease_id)
    clock.now += 4.9
    await subs.expire()
    assert up.subs["equity"] == {"E1"}
    b = await subs.lease("equity", ["E1"], ttl_s=10)
    requests = up.requests
    clock.now += 5
    await subs.expire()
    assert up.subs["equity"] == {"E1"} and up.requests == requests
    assert b.lease_id is not None
    clock.now += 5.1  # b expired at +10, grace until +15
    await subs.expire()
    assert up.subs["equity"] == {"E1"}
    clock.now += 5
    assert await subs.expire() == 1
    assert up.subs["equity"] == set()


async def test_a_pinned_symbol_outlives_its_leases_and_unpinning_a_leased_one_keeps_it() -> None:
    subs, up, clock = make()
    await subs.pin("ticker", ["T1/USD"])
    lease = await subs.lease("ticker", ["T1/USD", "T2/USD"], ttl_s=5)
    await subs.unpin("ticker", ["T1/USD"])
    assert up.subs["ticker"] == {"T1/USD", "T2/USD"}
    diff = await subs.pin("ticker", ["T2/USD"])
    assert diff.empty  # already subscribed: no request
    clock.now += 6  # the lease ends; T1/USD is in its grace period
    await subs.expire()
    assert up.subs["ticker"] == {"T1/USD", "T2/USD"}
    clock.now += 5
    await subs.expire()
    assert up.subs["ticker"] == {"T2/USD"}
    assert lease.lease_id not in subs.lease_ids()


async def test_set_pinned_returns_the_diff_and_applies_it() -> None:
    subs, up, _ = make(limit=4)
    await subs.set_pinned({"ticker": ["T1/USD", "T2/USD"], "equity": ["E1"]})
    diff = await subs.set_pinned({"ticker": ["T2/USD", "T3/USD", "NOPE/USD"], "equity": ["E1"]})
    assert {s: r.status for s, r in diff.added["ticker"].items()} == {
        "T3/USD": ACCEPTED, "NOPE/USD": REJECTED}
    assert list(diff.removed["ticker"]) == ["T1/USD"]
    assert "equity" not in diff.added and "equity" not in diff.removed
    assert up.subs == {"ticker": {"T2/USD", "T3/USD"}, "equity": {"E1"}}


async def test_ttl_is_cut_to_the_maximum_and_bad_requests_are_refused() -> None:
    subs, _, clock = make(max_ttl_s=30, default_ttl_s=10)
    reply = await subs.lease("ticker", ["T1/USD"], ttl_s=3600)
    assert reply.ttl_s == 30 and reply.expires_at == clock.now + 30
    assert (await subs.lease("ticker", ["T2/USD"])).ttl_s == 10
    for bad in (0, -1, float("nan")):
        with pytest.raises(LeaseError, match="ttl_s"):
            await subs.lease("ticker", ["T1/USD"], ttl_s=bad)
    with pytest.raises(LeaseError, match="no symbol"):
        await subs.lease("ticker", ["  "])
    with pytest.raises(ValueError, match="unknown kind"):
        await subs.lease("bond", ["X"])
    with pytest.raises(LeaseNotFound):
        await subs.renew("not-a-lease")
    off = Subscriptions(ModelUpstream(5, UNIVERSE), LeaseConfig())
    with pytest.raises(LeaseError, match="disabled"):
        await off.lease("ticker", ["T1/USD"])


async def test_one_owner_holds_at_most_max_per_holder_symbols_whatever_its_holder_label() -> None:
    subs, up, _ = make(max_per_holder=3)
    a = await subs.lease("ticker", ["T1/USD", "T2/USD"], holder="x", owner="a")
    requests = up.requests
    # over the cap: the whole request is refused, before anything is asked upstream
    with pytest.raises(LeaseCapError, match=r"max_per_holder: 3") as err:
        await subs.lease("equity", ["E1", "E2", "T1/USD"], holder="y", owner="a")
    assert err.value.cap == "source.leases.max_per_holder"
    assert "5 symbol(s)" in str(err.value) and up.requests == requests
    # a new label is not a new owner
    with pytest.raises(LeaseCapError):
        await subs.lease("equity", ["E1", "E2"], holder="someone-else", owner="a")
    # what one holds already costs no room; one more fits
    again = await subs.lease("ticker", ["T1/USD", "T2/USD", "T3/USD"], owner="a")
    assert len(again.held) == 3
    # another owner has its own room
    other = await subs.lease("ticker", ["T5/USD", "T6/USD", "T7/USD"], owner="b")
    assert len(other.held) == 3 and a.lease_id is not None
    assert up.subs["equity"] == set()
    # an ended lease gives its room back
    await subs.release(a.lease_id, owner="a")
    assert again.lease_id is not None
    await subs.release(again.lease_id, owner="a")
    assert (await subs.lease("equity", ["E1", "E2", "E3"], owner="a")).held


async def test_a_tokens_max_symbols_and_max_per_holder_the_smaller_wins() -> None:
    subs, _, _ = make(max_per_holder=4)
    with pytest.raises(LeaseCapError) as err:
        await subs.lease("ticker", ["T1/USD", "T2/USD", "T3/USD"], owner="t", max_symbols=2)
    assert err.value.cap == "control.auth max_symbols"
    assert "control.auth max_symbols: 2" in str(err.value)
    with pytest.raises(LeaseCapError) as err:
        await subs.lease("ticker", [f"T{i}/USD" for i in range(5)], owner="t", max_symbols=9)
    assert err.value.cap == "source.leases.max_per_holder"
    assert len((await subs.lease("ticker", ["T1/USD", "T2/USD"], owner="t",
                                 max_symbols=2)).held) == 2


async def test_global_caps_on_live_leases_and_leased_symbols() -> None:
    subs, up, clock = make(limit=100, max_leases=2, max_symbols=4, grace_s=5)
    a = await subs.lease("ticker", ["T1/USD", "T2/USD"], ttl_s=10, owner="a")
    await subs.lease("ticker", ["T2/USD"], ttl_s=30, owner="b")
    with pytest.raises(LeaseCapError, match=r"max_leases: 2") as err:
        await subs.lease("ticker", ["T1/USD"], owner="c")
    assert err.value.cap == "source.leases.max_leases"
    assert a.lease_id is not None
    await subs.release(a.lease_id)
    # in grace counts: T1 is still subscribed for the lease that ended
    with pytest.raises(LeaseCapError, match=r"max_symbols: 4") as err:
        await subs.lease("equity", ["E1", "E2", "E3"], owner="c")
    assert err.value.cap == "source.leases.max_symbols"
    assert len((await subs.lease("equity", ["E1", "E2"], owner="c")).held) == 2
    # a lease the clock passed no longer counts, even before expire() ran
    clock.now += 31
    requests = up.requests
    assert (await subs.lease("equity", ["E1"], owner="d")).held
    assert up.requests == requests


async def test_a_lease_belongs_to_its_owner() -> None:
    subs, up, _ = make()
    reply = await subs.lease("ticker", ["T1/USD"], holder="label", owner="team-a")
    lease_id = reply.lease_id
    assert lease_id is not None and reply.owner == "team-a" and reply.holder == "label"
    assert subs.owner_of(lease_id) == "team-a" and subs.owner_of("nope") is None
    assert subs.lease_ids(owner="team-a") == [lease_id] and subs.lease_ids(owner="x") == []
    assert subs.lease_ids("label") == [lease_id]
    # another owner gets the very answer an unknown id gets
    for call in (subs.renew(lease_id, owner="team-b"), subs.release(lease_id, owner="team-b"),
                 subs.release(lease_id, owner="")):
        with pytest.raises(LeaseNotFound) as err:
            await call
        with pytest.raises(LeaseNotFound) as unknown:
            await subs.renew("f" * 32)
        assert str(err.value).replace(lease_id, "f" * 32) == str(unknown.value)
    assert up.subs["ticker"] == {"T1/USD"}
    assert (await subs.renew(lease_id, owner="team-a")).owner == "team-a"
    await subs.release(lease_id, owner="team-a")
    assert subs.owner_of(lease_id) is None and subs.lease_ids(owner="team-a") == []


# -- configured symbols first -------------------------------------------------------------


def placing(limit: int, pinned: Mapping[str, Iterable[str]] | None = None,
            **cfg: object) -> tuple[Subscriptions, PlacingModel, Clock]:
    clock = Clock()
    up = PlacingModel(limit, UNIVERSE)
    for kind, syms in (pinned or {}).items():
        up.desired[kind] |= set(syms)
        up.subs[kind] |= set(syms)
    conf = LeaseConfig.model_validate({"enabled": True, "grace_s": 5, **cfg})
    subs = Subscriptions(up, conf, pinned=pinned, clock=clock)
    assert isinstance(up, Placement)
    return subs, up, clock


PINNED_8 = {"ticker": [f"T{i}/USD" for i in range(8)]}


async def test_leases_get_only_what_the_pinned_symbols_leave() -> None:
    subs, up, _ = placing(10, PINNED_8)
    first = await subs.lease("equity", ["E1"], owner="a")
    assert first.results["E1"].status == ACCEPTED
    requests = up.requests
    over = await subs.lease("ticker", ["T0/USD", "T9/USD", "T10/USD"], owner="b")
    assert over.results["T0/USD"].status == ACCEPTED  # pinned, held: costs nothing
    assert over.results["T9/USD"].status == ACCEPTED
    assert over.results["T10/USD"].status == LIMIT
    assert (over.results["T10/USD"].error or "").startswith(LIMIT_MARK)
    assert "capacity left after the configured symbols is used up" in \
        (over.results["T10/USD"].error or "")
    assert up.requests == requests + 1  # T10/USD was never asked for
    # a pinned symbol the upstream rejects reserves no room; one not placed yet does
    await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "NOPE/USD"]})
    assert subs.unplaced_pinned() == {"ticker": frozenset({"NOPE/USD"}),
                                      "equity": frozenset()}
    assert up.unplaced == {"ticker": frozenset(), "equity": frozenset()}
    up.external = 1  # another process on the key takes the slot T9/USD's eviction frees
    diff = await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "T20/USD"]})
    assert diff.evicted == {"ticker": frozenset({"T9/USD"})}
    assert diff.added["ticker"]["T20/USD"].status == LIMIT
    up.external = 0  # and leaves it: the slot is T20/USD's, not a lease's
    assert subs.unplaced_pinned()["ticker"] == {"T20/USD"}
    requests = up.requests
    refused = await subs.lease("equity", ["E4"], owner="c")
    assert refused.results["E4"].status == LIMIT and refused.lease_id is None
    assert up.requests == requests


async def test_a_pinned_symbol_refused_for_the_limit_evicts_the_latest_leased_ones() -> None:
    subs, up, clock = placing(10, PINNED_8)
    old = await subs.lease("equity", ["E1"], owner="a")
    new = await subs.lease("ticker", ["T30/USD"], owner="b")
    assert old.lease_id and new.lease_id and up.total() == 10
    diff = await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "T20/USD"]})
    assert diff.added["ticker"]["T20/USD"].status == ACCEPTED
    assert diff.evicted == {"ticker": frozenset({"T30/USD"})}  # the most recent lease's
    assert up.subs["ticker"] == {*PINNED_8["ticker"], "T20/USD"}
    assert up.subs["equity"] == {"E1"}
    assert subs.snapshot().evicted == 1
    # its holder hears it on its next renew, once; the other lease is untouched
    renewed = await subs.renew(new.lease_id)
    assert renewed.results == {"T30/USD": SubscriptionResult(EVICTED, EVICTED_ERROR)}
    assert renewed.held == [] and not renewed.results["T30/USD"].held
    assert (await subs.renew(new.lease_id)).results == {}
    assert (await subs.renew(old.lease_id)).results == {"E1": SubscriptionResult(ACCEPTED)}
    # it left the lease for good: when that ends, nothing goes to grace for it
    clock.now += 100
    await subs.expire()
    assert subs.in_grace() == {"ticker": frozenset(), "equity": frozenset({"E1"})}


async def test_symbols_in_grace_are_evicted_before_leased_ones() -> None:
    subs, up, _ = placing(10, PINNED_8)
    gone = await subs.lease("equity", ["E1"], owner="a")
    kept = await subs.lease("equity", ["E2"], owner="a")
    assert gone.lease_id and kept.lease_id
    await subs.release(gone.lease_id)
    diff = await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "T20/USD"]})
    assert diff.evicted == {"equity": frozenset({"E1"})}
    assert up.subs["equity"] == {"E2"} and subs.in_grace()["equity"] == frozenset()
    assert (await subs.renew(kept.lease_id)).held == ["E2"]


async def test_with_an_unknown_capacity_the_limit_error_evicts_too() -> None:
    subs, up, _ = make(limit=3)
    await subs.set_pinned({"ticker": ["T1/USD"]})
    lease = await subs.lease("ticker", ["T2/USD", "T3/USD"], owner="a")
    diff = await subs.set_pinned({"ticker": ["T1/USD", "T4/USD"]})
    assert diff.added["ticker"]["T4/USD"].status == ACCEPTED
    assert diff.evicted == {"ticker": frozenset({"T3/USD"})}
    assert up.subs["ticker"] == {"T1/USD", "T2/USD", "T4/USD"}
    assert lease.lease_id is not None
    reply = await subs.renew(lease.lease_id)
    assert reply.results["T3/USD"].status == EVICTED and reply.held == ["T2/USD"]


async def test_pinned_symbols_refused_are_retried_on_a_doubling_schedule() -> None:
    subs, up, clock = placing(10, PINNED_8, grace_s=0)
    # another process on the same key holds two slots: nothing of ours to evict
    up.limit = 8
    diff = await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "T20/USD", "T21/USD"]})
    assert {r.status for r in diff.added["ticker"].values()} == {LIMIT}
    assert diff.evicted == {}
    assert subs.unplaced_pinned()["ticker"] == {"T20/USD", "T21/USD"}
    assert up.unplaced["ticker"] == {"T20/USD", "T21/USD"}  # the pool is told
    assert subs.snapshot().unplaced_pinned == 2
    tries: list[float] = []
    start = clock.now
    for _ in range(200):
        clock.now += 1
        pins = up.pins
        await subs.retry_pinned()
        if up.pins > pins:
            tries.append(clock.now - start)
    # 5 s, then 10, 20, 40, 80, 160, 300, 300, ... after the previous try
    gaps = [b - a for a, b in zip([0.0, *tries], tries, strict=False)]
    assert gaps[:4] == [5, 10, 20, 40] and max(gaps) <= 300
    # the room comes back: the next due retry places them, and the schedule starts over
    up.limit = 10
    clock.now += 300
    placed = await subs.retry_pinned()
    assert {r.status for r in placed.added["ticker"].values()} == {ACCEPTED}
    assert subs.unplaced_pinned()["ticker"] == frozenset()
    assert up.unplaced["ticker"] == frozenset()
    pins = up.pins
    clock.now += 1000
    await subs.retry_pinned()
    assert up.pins == pins  # nothing left to retry


async def test_room_freed_here_brings_the_retry_forward() -> None:
    subs, up, clock = make(limit=3, grace_s=5)
    up.external = 2  # another process on the key holds two slots
    await subs.set_pinned({"ticker": ["T1/USD"]})
    diff = await subs.set_pinned({"ticker": ["T1/USD", "T2/USD"]})
    assert diff.added["ticker"]["T2/USD"].status == LIMIT and diff.evicted == {}
    for _ in range(4):  # refused again and again: the next try is 80 s away
        clock.now += 100
        await subs.retry_pinned()
    up.external = 0
    # the capacity is unknown here: a lease may take the room the other process left
    lease = await subs.lease("equity", ["E1"], ttl_s=1, owner="a")
    assert lease.lease_id is not None
    await subs.release(lease.lease_id)
    clock.now += 5
    await subs.expire()  # E1's grace ends: room freed
    placed = await subs.retry_pinned()
    assert placed.added["ticker"]["T2/USD"].status == ACCEPTED


async def test_symbols_a_reconnect_dropped_leave_leases_and_pinned_ones_are_retried() -> None:
    subs, up, clock = placing(10, {"ticker": ["T1/USD", "T2/USD"]})
    lease = await subs.lease("equity", ["E1", "E2"], owner="a")
    assert lease.lease_id is not None
    up.shrink(1)  # E2, E1, then T2/USD no longer fit: told to the keeper
    assert subs.unplaced_pinned()["ticker"] == {"T2/USD"}
    assert up.unplaced["ticker"] == {"T2/USD"} and up.unplaced["equity"] == frozenset()
    assert subs.leased()["equity"] == frozenset()
    reply = await subs.renew(lease.lease_id)
    assert {s: r.status for s, r in reply.results.items()} == {"E1": EVICTED, "E2": EVICTED}
    assert reply.results["E1"].error == LOST_ERROR
    # the retry is due at once; the room comes back
    up.limit = 10
    assert (await subs.retry_pinned()).added["ticker"]["T2/USD"].status == ACCEPTED
    assert clock.now == 1000.0


async def test_renew_does_not_wait_for_lease_requests_queued_on_the_upstream() -> None:
    subs, up, _ = make()
    lease = await subs.lease("ticker", ["T1/USD"], owner="a")
    assert lease.lease_id is not None
    gate = asyncio.Event()
    slow = up.subscribe

    async def blocked(kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        await gate.wait()
        return await slow(kind, symbols)

    up.subscribe = blocked  # type: ignore[method-assign]
    pending = asyncio.create_task(subs.lease("ticker", ["T2/USD"], owner="b"))
    await asyncio.sleep(0)
    reply = await asyncio.wait_for(subs.renew(lease.lease_id, owner="a"), 1)
    assert reply.held == ["T1/USD"]
    gate.set()
    assert (await pending).held == ["T2/USD"]


async def test_a_lease_while_disconnected_is_pending_and_flows_on_reconnect() -> None:
    subs, up, _ = make()
    up.drop()
    reply = await subs.lease("ticker", ["T1/USD"])
    assert reply.results["T1/USD"].status == PENDING and reply.lease_id is not None
    renewed = await subs.renew(reply.lease_id)
    assert renewed.results["T1/USD"].status == PENDING
    up.reconnect()
    renewed = await subs.renew(reply.lease_id)
    assert renewed.results["T1/USD"].status == ACCEPTED


async def test_while_a_learned_limit_is_rechecked_unplaced_pins_come_before_leases() -> None:
    subs, up, clock = placing(10, PINNED_8, grace_s=0)
    up.limit = 8  # another process on the key holds two slots
    diff = await subs.set_pinned({"ticker": [*PINNED_8["ticker"], "T20/USD"]})
    assert diff.added["ticker"]["T20/USD"].status == LIMIT
    clock.now += subs.retry_initial_s
    await subs.retry_pinned()  # refused again: the next try is 2 * retry_initial_s away
    # the pool re-checks a learned limit (an unsubscribe, a reconnect, time): its
    # capacity is unknown meanwhile, and the room found is the pinned symbol's first
    up.capacity = lambda: None  # type: ignore[method-assign]
    requests = up.requests
    refused = await subs.lease("equity", ["E1"], owner="a")
    assert refused.results["E1"].status == LIMIT and refused.lease_id is None
    assert "being learned or re-checked, 9 configured, 1 of them waiting for room" in \
        (refused.results["E1"].error or "")
    assert up.requests == requests
    # a key may have room again (told by the pool): the retry comes sooner than its
    # schedule, though not sooner than retry_initial_s after the last one
    up.limit = 10
    up.symbols.room()
    pins = up.pins
    await subs.retry_pinned()
    assert up.pins == pins
    clock.now += subs.retry_initial_s
    placed = await subs.retry_pinned()
    assert placed.added["ticker"]["T20/USD"].status == ACCEPTED
    assert subs.unplaced_pinned() == {"ticker": frozenset(), "equity": frozenset()}
    # nothing waits now: with an unknown capacity, the upstream answers leases
    assert (await subs.lease("equity", ["E1"], owner="a")).results["E1"].status == ACCEPTED
    assert up.requests == requests + 2  # the retry, and this lease
