"""Configured symbols first, and a bounded upstream pressure, against the real simulator
(bridge/upstream/subscriptions.py, bridge/upstream/pool.py, bridge/upstream/client.py).

The attacks of issue 18 replayed through the real pool and real leases: anonymous leases
filling the key's limit before a reload adds configured symbols; leases of another
process on the same key; a thousand junk-symbol leases. What the upstream holds and how
many requests it got is read from the simulator itself (``subscriptions_by_key``,
``subscribe_requests``), never from the bridge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest
from pydantic import SecretStr

import bridge.upstream.client as source_module
from bridge.config.schema import LeaseConfig, SourceConfig
from bridge.simulator import Simulator
from bridge.testing import wait_until
from bridge.upstream.client import SubscriptionStatus
from bridge.upstream.pool import UpstreamKey
from bridge.upstream.subscriptions import EVICTED_ERROR
from tests.support.pools import StartPool, pool_starter

pytestmark = pytest.mark.integration

INTERVAL = 0.2
KEY = "the-key"
ACCEPTED = SubscriptionStatus.ACCEPTED
LIMIT = SubscriptionStatus.LIMIT
EVICTED = SubscriptionStatus.EVICTED
REJECTED = SubscriptionStatus.REJECTED
#: the retry schedule of unplaced configured symbols, shortened for the test
RETRY_INITIAL_S = 0.3
RETRY_MAX_S = 1.0


def config(sim: Simulator, tickers: Iterable[str] = (), **extra: Any) -> SourceConfig:
    return SourceConfig.model_validate({
        "url": sim.url, "tickers": list(tickers), "stale_after_s": 3,
        "backoff": {"initial_s": 0.05, "max_s": 0.3}, "connect_timeout_s": 3, **extra})


start_bridge = pool_starter(RETRY_INITIAL_S, RETRY_MAX_S)


def held_by_key(sim: Simulator) -> set[tuple[str, str]]:
    feeds = sim.subscriptions_by_key().get(KEY, {})
    return {(k, s) for k, syms in feeds.items() for s in syms}


LEASES = LeaseConfig(enabled=True, grace_s=0.3, default_ttl_s=30, max_ttl_s=60)


async def test_leases_get_what_the_configured_symbols_leave_and_a_reload_evicts_them(
    start_bridge: StartPool,
) -> None:
    async with Simulator(port=0, api_keys=[KEY], limits={KEY: 60}, interval=INTERVAL) as sim:
        pinned = sim.tickers[:40]
        b = start_bridge(config(sim, pinned), UpstreamKey("k", SecretStr(KEY), 60), LEASES)
        await b.live()
        # 4 anonymous requests of 10 symbols each: 20 slots are left, 2 of them get them
        requests = sim.subscribe_requests[KEY]
        replies = [await b.subs.lease("equity", sim.equities[i * 10:(i + 1) * 10],
                                      owner="anonymous") for i in range(4)]
        assert [len(r.held) for r in replies] == [10, 10, 0, 0]
        for r in replies[2:]:
            assert {x.status for x in r.results.values()} == {LIMIT}
            assert all("capacity left after the configured symbols is used up" in (x.error or "")
                       for x in r.results.values())
        # the refused ones were never asked of the upstream
        assert sim.subscribe_requests[KEY] == requests + 2
        assert len(held_by_key(sim)) == 60

        # a reload adds 5 configured symbols: they evict the 5 most recently leased
        added = sim.tickers[40:45]
        diff = await b.subs.set_pinned({"ticker": [*pinned, *added]})
        assert {s: r.status for s, r in diff.added["ticker"].items()} == \
            dict.fromkeys(added, ACCEPTED)
        evicted = set(sim.equities[15:20])
        assert diff.evicted == {"equity": frozenset(evicted)}
        upstream = held_by_key(sim)
        assert {("ticker", s) for s in [*pinned, *added]} <= upstream
        assert not {("equity", s) for s in evicted} & upstream
        assert len(upstream) == 60
        assert b.subs.unplaced_pinned() == {"ticker": frozenset(), "equity": frozenset()}
        assert b.pool.unplaced == {"ticker": frozenset(), "equity": frozenset()}
        # prices of the new configured symbols flow
        t0 = time.monotonic()
        await wait_until(lambda: {("ticker", s) for s in added} <= b.records.since(t0), 5,
                         "the added configured symbols flowing")

        # the holders hear it on renew; the other lease is untouched
        first, second = replies[0].lease_id, replies[1].lease_id
        assert first is not None and second is not None
        renewed = await b.subs.renew(second, owner="anonymous")
        assert {s: r.status for s, r in renewed.results.items() if r.status == EVICTED} == \
            dict.fromkeys(evicted, EVICTED)
        assert all(renewed.results[s].error == EVICTED_ERROR for s in evicted)
        assert set(renewed.held) == set(sim.equities[10:15])
        assert set((await b.subs.renew(first, owner="anonymous")).held) == \
            set(sim.equities[:10])
        # still pinned first: no new lease takes a slot
        more = await b.subs.lease("equity", sim.equities[40:41], owner="anonymous")
        assert more.results[sim.equities[40]].status == LIMIT


async def test_configured_symbols_refused_earlier_are_placed_once_leases_expire(
    start_bridge: StartPool,
) -> None:
    async with Simulator(port=0, api_keys=[KEY], limits={KEY: 60}, interval=INTERVAL) as sim:
        pinned = sim.tickers[:40]
        # two bridges on one key (e.g. two replicas): a holds the configured symbols,
        # b serves leases; the upstream counts the key's subscriptions over both
        a = start_bridge(config(sim, pinned), UpstreamKey("k", SecretStr(KEY)), LEASES)
        await a.live()
        ttl = 2.0
        b = start_bridge(config(sim), UpstreamKey("k", SecretStr(KEY)),
                         LeaseConfig(enabled=True, grace_s=0.3, default_ttl_s=ttl, max_ttl_s=ttl))
        await b.live()
        for i in range(2):
            reply = await b.subs.lease("equity", sim.equities[i * 10:(i + 1) * 10],
                                       owner="anonymous")
            assert len(reply.held) == 10
        leased_at = time.monotonic()
        assert len(held_by_key(sim)) == 60

        # a reload of a adds 5: the key is full and a has no lease to evict
        added = sim.tickers[40:45]
        diff = await a.subs.set_pinned({"ticker": [*pinned, *added]})
        assert {r.status for r in diff.added["ticker"].values()} == {LIMIT}
        assert diff.evicted == {}
        assert a.subs.unplaced_pinned()["ticker"] == frozenset(added)
        assert a.pool.unplaced["ticker"] == frozenset(added)
        # meanwhile a's leases cannot take the room its configured symbols wait for
        requests = sim.subscribe_requests[KEY]
        refused = await a.subs.lease("equity", sim.equities[30:31], owner="anonymous")
        assert refused.results[sim.equities[30]].status == LIMIT
        assert sim.subscribe_requests[KEY] == requests

        # b's leases expire (ttl, then grace): a's retry places the 5
        bound = ttl + 0.3 + RETRY_MAX_S + 3
        await wait_until(lambda: not a.subs.unplaced_pinned()["ticker"], bound,
                         "the refused configured symbols placed")
        assert time.monotonic() - leased_at >= ttl
        assert {("ticker", s) for s in [*pinned, *added]} <= held_by_key(sim)
        assert a.pool.unplaced["ticker"] == frozenset()
        t0 = time.monotonic()
        await wait_until(lambda: {("ticker", s) for s in added} <= a.records.since(t0), 5,
                         "the placed configured symbols flowing")


async def test_junk_leases_cost_a_bounded_pace_of_requests_and_a_bounded_rejected_set(
    start_bridge: StartPool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the bound of the rejected set (10,000) lowered, to pass it within seconds
    monkeypatch.setattr(source_module, "MAX_REJECTED_SYMBOLS", 1000)
    rate = 10.0
    burst = 2 * rate
    async with Simulator(port=0, api_keys=[KEY], interval=INTERVAL) as sim:
        b = start_bridge(config(sim, ["BTC/USD"], max_subscribe_requests_per_s=rate),
                         UpstreamKey("k", SecretStr(KEY)), LEASES)
        await b.live()
        src = b.pool.sources[0]
        # 1,000 lease requests, 200 junk symbols each, 40 distinct batches: 8,000 junk
        batches = [[f"JUNK-{i}-{j}/USD" for j in range(200)] for i in range(40)]
        requests = sim.subscribe_requests[KEY]
        t0 = time.monotonic()
        replies = await asyncio.wait_for(asyncio.gather(*(
            b.subs.lease("ticker", batches[i % 40], owner="anonymous") for i in range(1000))),
            15)
        elapsed = time.monotonic() - t0
        sent = sim.subscribe_requests[KEY] - requests
        assert all(r.lease_id is None and {x.status for x in r.results.values()} == {REJECTED}
                   for r in replies)
        # each batch asked once (the rest answered from what the upstream said), at most
        # `rate` requests a second after a burst: the callers waited for their turn
        assert sent == 40
        assert sent <= rate * elapsed + burst
        assert elapsed >= (sent - burst) / rate * 0.9
        assert src.stats.live_requests == sent
        # bounded: the rejected set and the memory of unsupported symbols
        assert len(src.stats.rejected_symbols) == 1000
        assert src.snapshot().rejected_symbols == 1000
        assert b.pool.known_unsupported() == 8000
        assert b.subs.snapshot().leases == 0 and b.subs.snapshot().held == 1
        # the configured symbol kept flowing
        t1 = time.monotonic()
        await wait_until(lambda: ("ticker", "BTC/USD") in b.records.since(t1), 3,
                         "the configured symbol flowing")
