"""The desired symbol set (bridge/subscriptions.py): pins, leases, grace, limits.

The upstream here is a model of the pool (:class:`ModelUpstream`): a symbol universe, a
per-key limit counted over tickers and equities, a request that would pass the limit
refused whole with the limit error (as the simulator does), a connection that drops
and re-issues its desired set when it comes back. The same random walk runs against
the real simulator through the real pool in
tests/integration/test_live_subscriptions.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from bridge.schema import LeaseConfig
from bridge.source import SubscriptionResult, SubscriptionStatus, normalize_symbols
from bridge.subscriptions import LeaseError, LeaseNotFound, Subscriptions
from bridge.upstream import LIMIT_ERROR

ACCEPTED = SubscriptionStatus.ACCEPTED
PENDING = SubscriptionStatus.PENDING
LIMIT = SubscriptionStatus.LIMIT
REJECTED = SubscriptionStatus.REJECTED
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

    def total(self) -> int:
        return sum(map(len, self.desired.values()))

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


UNIVERSE = {"ticker": [f"T{i}/USD" for i in range(40)], "equity": [f"E{i}" for i in range(30)]}
#: symbols the upstream does not support
UNKNOWN = {"ticker": ["NOPE/USD", "ZZZ/USD"], "equity": ["NOPE"]}


@dataclass
class WalkLease:
    kind: str
    symbols: frozenset[str]
    expires_at: float
    holder: str


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

    def live(self) -> dict[str, WalkLease]:
        return {i: le for i, le in self.leases.items() if le.expires_at > self.clock.now}

    def leased(self, kind: str) -> set[str]:
        return {s for le in self.live().values() if le.kind == kind for s in le.symbols}

    def end_due(self) -> None:
        """Leases the clock passed end now (the subscriptions notice at ``expire()``)."""
        for i, le in list(self.leases.items()):
            if le.expires_at <= self.clock.now:
                self.end(i)

    def end(self, lease_id: str) -> None:
        le = self.leases.pop(lease_id)
        self.ended.append(lease_id)
        for s in le.symbols:
            if s not in self.leased(le.kind) and s not in self.pinned[le.kind]:
                self.grace_until[(le.kind, s)] = self.clock.now + self.grace

    def check(self) -> None:
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


async def walk(seed: int, steps: int) -> Walk:
    rng = random.Random(seed)
    clock = Clock()
    grace = rng.choice([0.0, 3.0, 10.0])
    cfg = LeaseConfig(enabled=True, max_ttl_s=60, default_ttl_s=20, grace_s=grace)
    up = ModelUpstream(limit=rng.choice([8, 25, 60]), universe=UNIVERSE)
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
            holder = rng.choice(["a", "b", "c"])
            ttl = rng.choice([None, 1.0, 5.0, 30.0, 600.0])
            asked = some(kind)
            before = {k: set(v) for k, v in up.desired.items()}
            reply = await subs.lease(kind, asked, ttl, holder)
            assert set(reply.results) == set(normalize_symbols(asked))
            assert reply.ttl_s == min(ttl or 20, 60)
            for s, r in reply.results.items():
                if s in UNKNOWN[kind]:
                    assert r.status == REJECTED
                elif s in before[kind]:
                    # already subscribed for someone: no request, no refusal
                    assert r.held
                elif r.status == LIMIT:
                    assert r.error is not None and "Subscription limit reached" in r.error
                    assert sum(map(len, before.values())) + 1 > 0
                else:
                    assert r.status == (ACCEPTED if up.connected else PENDING), r
            if reply.lease_id is not None:
                assert reply.expires_at == clock.now + reply.ttl_s
                w.leases[reply.lease_id] = WalkLease(kind, frozenset(reply.held),
                                                     clock.now + reply.ttl_s, holder)
                for s in reply.held:
                    w.grace_until.pop((kind, s), None)
                    # a pin the upstream refused before is held now: pinned from here on
                    w.refused_pins[kind].discard(s)
            else:
                assert not reply.held
        elif op < 0.55 and (w.leases or w.ended):
            lease_id = rng.choice(sorted(w.leases) + w.ended[-3:])
            ttl = rng.choice([None, 2.0, 40.0])
            if lease_id in w.live():
                reply = await subs.renew(lease_id, ttl)
                w.leases[lease_id].expires_at = clock.now + (ttl or 20)
                assert reply.expires_at == w.leases[lease_id].expires_at
                assert set(reply.held) == set(w.leases[lease_id].symbols)
            else:
                with pytest.raises(LeaseNotFound):
                    await subs.renew(lease_id, ttl)
        elif op < 0.65 and (w.leases or w.ended):
            lease_id = rng.choice(sorted(w.leases) + w.ended[-3:])
            if lease_id in w.live():
                w.end(lease_id)
                await subs.release(lease_id)
            else:
                with pytest.raises(LeaseNotFound):
                    await subs.release(lease_id)
        elif op < 0.88:
            clock.now += rng.choice([0.1, 0.5, 1.0, 2.0, 5.0, 12.0])
            w.end_due()
            await subs.expire()
        elif op < 0.94 and up.connected:
            up.drop()
        else:
            up.reconnect()
        w.check()
    return w


@pytest.mark.parametrize("seed", range(8))
async def test_random_walk_holds_the_invariants(seed: int) -> None:
    w = await walk(seed, 1500)
    # the walk went through the interesting states, not just around them
    assert w.ended and w.up.requests > 50


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


async def test_one_holder_holds_at_most_max_per_holder_symbols() -> None:
    subs, up, _ = make(max_per_holder=3)
    a = await subs.lease("ticker", ["T1/USD", "T2/USD"], holder="a")
    b = await subs.lease("equity", ["E1", "E2", "T1/USD"], holder="a")
    assert [r.status for r in b.results.values()] == [ACCEPTED, SubscriptionStatus.ERROR,
                                                      SubscriptionStatus.ERROR]
    assert "max_per_holder" in (b.results["E2"].error or "")
    # renewing what one holds costs nothing; another holder has its own room
    again = await subs.lease("ticker", ["T1/USD"], holder="a")
    assert again.results["T1/USD"].held
    other = await subs.lease("ticker", ["T5/USD", "T6/USD", "T7/USD"], holder="b")
    assert len(other.held) == 3 and a.lease_id is not None
    assert up.subs["equity"] == {"E1"}


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
