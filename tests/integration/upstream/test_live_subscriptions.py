"""A live symbol set against the real simulator: the upstream pool over one or several
API keys, per-key limits, and leases (bridge/upstream/pool.py, bridge/upstream/subscriptions.py).

Records are checked where the source hands them over (``on_payload``): what the
simulator really sent, not what anyone says it sent.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from pydantic import SecretStr

from bridge.config.schema import LeaseConfig, SourceConfig
from bridge.simulator import LIMIT_REACHED, Simulator
from bridge.testing import wait_until
from bridge.upstream.client import AuthError, SubscriptionStatus
from bridge.upstream.pool import UpstreamKey, UpstreamPool
from bridge.upstream.subscriptions import LeaseNotFound, Subscriptions

pytestmark = pytest.mark.integration

INTERVAL = 0.2
KINDS = ("ticker", "equity")


class Records:
    """Every record handed to ``on_payload``: (kind, symbol) -> [(arrived, sentTimestampMs)]."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[tuple[float, int]]] = {}

    def __call__(self, event: str, payload: Any) -> None:
        kind = "ticker" if event == "new_token_states" else "equity"
        now = time.monotonic()
        for rec in payload if isinstance(payload, list) else []:
            if isinstance(rec, dict):
                sym = rec.get("id") if kind == "ticker" else rec.get("symbol")
                self.seen.setdefault((kind, str(sym)), []).append(
                    (now, int(rec.get("sentTimestampMs", 0))))

    def since(self, t: float) -> set[tuple[str, str]]:
        return {k for k, v in self.seen.items() if v and v[-1][0] >= t}


def config(sim: Simulator, tickers: Iterable[str] = (), equities: Iterable[str] = (),
           **extra: Any) -> SourceConfig:
    return SourceConfig.model_validate({
        "url": sim.url, "tickers": list(tickers), "equities": list(equities),
        "stale_after_s": 3, "backoff": {"initial_s": 0.05, "max_s": 0.3},
        "connect_timeout_s": 3,
        # these tests drive hundreds of live requests: the per-key pace (5/s by default,
        # tests/integration/upstream/test_lease_protection.py) would only slow them down
        "max_subscribe_requests_per_s": 1000, **extra})


Start = Callable[..., UpstreamPool]


@pytest.fixture
async def start_pool() -> AsyncIterator[Start]:
    """Run pools as tasks; every one is stopped at the end."""
    running: list[tuple[UpstreamPool, asyncio.Task[None]]] = []

    def start(cfg: SourceConfig, keys: list[UpstreamKey], records: Records) -> UpstreamPool:
        pool = UpstreamPool(cfg, keys, records)
        running.append((pool, asyncio.create_task(pool.run())))
        return pool

    yield start
    for pool, task in running:
        pool.stop()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)


def flat(by_kind: dict[str, set[str]] | dict[str, frozenset[str]]) -> set[tuple[str, str]]:
    return {(k, s) for k, syms in by_kind.items() for s in syms}


async def test_two_keys_of_50_carry_100_symbols_and_one_key_down_leaves_the_other_flowing(
    start_pool: Start,
) -> None:
    async with Simulator(port=0, api_keys=["key-a", "key-b"], limits={"key-a": 50, "key-b": 50},
                         interval=INTERVAL, seed=3) as sim:
        tickers, equities = sim.tickers[:50], sim.equities[:50]
        records = Records()
        # no limit configured: the pool learns it from the first limit error
        pool = start_pool(config(sim, tickers, equities),
                          [UpstreamKey("a", _secret("key-a")), UpstreamKey("b", _secret("key-b"))],
                          records)
        everything = {("ticker", s) for s in tickers} | {("equity", s) for s in equities}
        t0 = time.monotonic()
        await wait_until(lambda: records.since(t0) >= everything, 10, "all 100 flowing")
        by_key = sim.subscriptions_by_key()
        assert {k: sum(map(len, v.values())) for k, v in by_key.items()} == \
            {"key-a": 50, "key-b": 50}
        assert flat(by_key["key-a"]) | flat(by_key["key-b"]) == everything
        snaps = {c.name: c for c in pool.connection_snapshots()}
        assert snaps["a"].limit == 50 and snaps["a"].limit_learned
        assert pool.wanted == {"ticker": frozenset(tickers), "equity": frozenset(equities)}
        await wait_until(lambda: pool.snapshot().ready, 5, "aggregate ready")

        # key a's connection is kicked (and kept away): b's 50 keep flowing meanwhile
        b_syms = flat(by_key["key-b"])
        b_connects = sim.connects["key-b"]
        assert await sim.kick("key-a") == 1
        t1 = time.monotonic()
        await asyncio.sleep(3 * INTERVAL)
        assert records.since(t1) >= b_syms
        assert sim.connects["key-b"] == b_connects
        # a comes back with its own 50, b never reconnected
        await wait_until(lambda: flat(sim.subscriptions_by_key().get("key-a", {})) ==
                         flat(by_key["key-a"]), 10, "key a resubscribed")
        t2 = time.monotonic()
        await wait_until(lambda: records.since(t2) >= everything, 5, "all 100 again")
        assert sim.connects["key-b"] == b_connects
        assert pool.connection_snapshots()[0].upstream.reconnects >= 1


async def test_configured_limits_pack_and_a_refused_key_does_not_stop_the_other(
    start_pool: Start,
) -> None:
    async with Simulator(port=0, api_keys=["key-b"], interval=INTERVAL) as sim:
        tickers = sim.tickers[:20]
        records = Records()
        cfg = config(sim, tickers, max_auth_failures=1)
        pool = start_pool(cfg, [UpstreamKey("a", _secret("not-accepted"), 10),
                                UpstreamKey("b", _secret("key-b"), 30)], records)
        retired: list[str] = []
        pool.on_connection_retired = retired.append
        # a is refused and gives up; its 10 symbols move to b, which has room
        everything = {("ticker", s) for s in tickers}
        t0 = time.monotonic()
        await wait_until(lambda: records.since(t0) >= everything, 10, "all 20 on key b")
        await wait_until(lambda: retired == ["a"], 5, "a retired (the market forgets its down)")
        snaps = {c.name: c for c in pool.connection_snapshots()}
        assert snaps["a"].failed and "refused the API key" in snaps["a"].failed
        assert snaps["a"].symbols == 0 and snaps["b"].symbols == 20
        assert "not-accepted" not in repr(pool) and "key-b" not in repr(pool)
        # b is full at 30: 10 more fit, the next ones are refused with the limit error
        more = sim.tickers[20:32]
        results = await pool.subscribe("ticker", more)
        assert [r.status for r in results.values()] == [SubscriptionStatus.ACCEPTED] * 10 + \
            [SubscriptionStatus.LIMIT] * 2
        assert results[more[-1]].error == LIMIT_REACHED


async def test_every_key_refused_raises(start_pool: Start) -> None:
    async with Simulator(port=0, api_keys=["key-x"], interval=INTERVAL) as sim:
        keys = [UpstreamKey("a", _secret("bad-1")), UpstreamKey("b", _secret("bad-2"))]
        pool = UpstreamPool(config(sim, sim.tickers[:2], max_auth_failures=1), keys, Records())
        with pytest.raises(AuthError, match="every upstream connection gave up") as err:
            await asyncio.wait_for(pool.run(), 10)
        assert "bad-1" not in str(err.value) and "bad-2" not in str(err.value)


async def test_a_lease_over_the_limit_gets_what_fits_while_existing_ones_keep_flowing(
    start_pool: Start,
) -> None:
    async with Simulator(port=0, api_keys=["k"], limits={"k": 4}, interval=INTERVAL) as sim:
        records = Records()
        pool = start_pool(config(sim, ["BTC/USD", "ETH/USD"]), [UpstreamKey("k", _secret("k"))],
                          records)
        await wait_until(lambda: pool.sources[0].live, 5, "subscribed")
        subs = Subscriptions(pool, LeaseConfig(enabled=True),
                             pinned={"ticker": ["BTC/USD", "ETH/USD"]})
        ok = await subs.lease("ticker", ["SOL/USD"], holder="c1")
        assert ok.results["SOL/USD"].status == SubscriptionStatus.ACCEPTED
        # the upstream refuses the request for 2 whole; 1 fits: the pool asks again for
        # each half and learns the limit (4) from the single symbol refused
        part = await subs.lease("equity", ["AAPL", "MSFT"], holder="c2")
        assert part.lease_id is not None and part.held == ["AAPL"]
        assert part.results["MSFT"].status == SubscriptionStatus.LIMIT
        assert "Subscription limit reached" in (part.results["MSFT"].error or "")
        assert pool.capacity() == 4
        # the key is full now: refused without a request, nothing changes
        requests = sim.subscribe_requests["k"]
        over = await subs.lease("equity", ["MSFT", "NVDA"], holder="c3")
        assert over.lease_id is None
        assert {r.status for r in over.results.values()} == {SubscriptionStatus.LIMIT}
        assert all("Subscription limit reached" in (r.error or "") for r in over.results.values())
        assert sim.subscribe_requests["k"] == requests
        t0 = time.monotonic()
        mine = {("ticker", "BTC/USD"), ("ticker", "ETH/USD"), ("ticker", "SOL/USD"),
                ("equity", "AAPL")}
        await wait_until(lambda: records.since(t0) >= mine, 3, "existing ones flowing")
        assert sim.subscriptions() == [({"BTC/USD", "ETH/USD", "SOL/USD"}, {"AAPL"})]
        assert pool.sources[0].stats.connects == 1


async def test_random_walk_against_the_simulator(start_pool: Start) -> None:
    """The unit test's random walk (tests/unit/upstream/test_subscriptions.py), a few hundred
    operations, against two keys of the real simulator through the real pool."""
    rng = random.Random(11)
    limits = {"key-a": 8, "key-b": 12}
    async with Simulator(port=0, api_keys=list(limits), limits=limits, interval=INTERVAL,
                         seed=5) as sim:
        universe = {"ticker": sim.tickers[:30], "equity": sim.equities[:20]}
        records = Records()
        pool = start_pool(config(sim, universe["ticker"][:3]),
                          [UpstreamKey("a", _secret("key-a"), 8),
                           UpstreamKey("b", _secret("key-b"))], records)
        now = [0.0]
        grace = 2.0
        subs = Subscriptions(pool, LeaseConfig(enabled=True, grace_s=grace, max_ttl_s=30,
                                               default_ttl_s=5),
                             pinned={"ticker": universe["ticker"][:3]}, clock=lambda: now[0])
        accepted: dict[str, tuple[set[tuple[str, str]], float]] = {}
        started = time.monotonic()

        async def settled() -> None:
            await wait_until(lambda: all(s.live for s in pool.sources)
                             and all(sim.connections(k) == 1 for k in limits)
                             and pool.pending_moves == 0, 10, "connections live")

        async def check(flowing: bool = False) -> None:
            await settled()
            desired = flat(subs.desired())
            by_key = sim.subscriptions_by_key()
            upstream = set().union(*(flat(v) for v in by_key.values()))
            assert upstream == desired == flat(pool.subscribed())
            for key, feeds in by_key.items():
                assert sum(map(len, feeds.values())) <= limits[key], key
            live = {s for syms, exp in accepted.values() if exp > now[0] for s in syms}
            assert live <= upstream
            if flowing and desired:
                t = time.monotonic()
                await wait_until(lambda: records.since(t) >= desired, 3, "desired flowing")

        await check()
        kicks = 0
        seen: dict[SubscriptionStatus, int] = {}
        for step in range(300):
            kind = rng.choice(KINDS)
            op = rng.random()
            if op < 0.1:
                pins = {k: sorted(rng.sample(universe[k], rng.randint(0, 4))) for k in KINDS}
                diff = await subs.set_pinned(pins)
                # a configured symbol evicts leased ones when a key has no room
                for k, syms in diff.evicted.items():
                    for lid, (held, exp) in accepted.items():
                        accepted[lid] = (held - {(k, s) for s in syms}, exp)
            elif op < 0.45:
                syms = rng.sample(universe[kind], rng.randint(1, 4)) + \
                    (["NOPE/USD" if kind == "ticker" else "NOPE"] if rng.random() < 0.1 else [])
                reply = await subs.lease(kind, syms, rng.choice([None, 2.0, 10.0]),
                                         rng.choice(["x", "y"]))
                for r in reply.results.values():
                    seen[r.status] = seen.get(r.status, 0) + 1
                    if r.status == SubscriptionStatus.LIMIT:
                        assert "Subscription limit reached" in (r.error or "")
                if reply.lease_id is not None:
                    assert reply.expires_at is not None
                    accepted[reply.lease_id] = ({(kind, s) for s in reply.held},
                                                reply.expires_at)
            elif op < 0.55 and accepted:
                lease_id = rng.choice(sorted(accepted))
                syms, exp = accepted[lease_id]
                if exp > now[0]:
                    reply = await subs.renew(lease_id, 10.0)
                    assert reply.expires_at is not None
                    accepted[lease_id] = (syms, reply.expires_at)
                else:
                    with pytest.raises(LeaseNotFound):
                        await subs.renew(lease_id)
            elif op < 0.65 and accepted:
                lease_id = rng.choice(sorted(accepted))
                syms, exp = accepted.pop(lease_id)
                if exp > now[0]:
                    await subs.release(lease_id)
            elif op < 0.95:
                now[0] += rng.choice([0.5, 1.0, 3.0])
                await subs.expire()
            else:
                await sim.kick(rng.choice(list(limits)))
                kicks += 1
            await check(flowing=step % 60 == 59)
        assert kicks >= 3
        # the walk went through the interesting answers, not just around them
        assert seen.get(SubscriptionStatus.ACCEPTED, 0) > 50, seen
        assert seen.get(SubscriptionStatus.LIMIT, 0) > 10, seen
        assert seen.get(SubscriptionStatus.REJECTED, 0) > 0, seen
        assert time.monotonic() - started < 45


def _secret(value: str) -> SecretStr:
    return SecretStr(value)
