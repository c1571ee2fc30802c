"""Placement of the symbol set across API keys, against the real simulator, whose per-key
limits refuse a whole request that would pass them (bridge/upstream/pool.py,
bridge/upstream/subscriptions.py, bridge/upstream/client.py).

The cases of issue 19: two keys of 4 carry 5 tickers + 3 equities (whatever the mix of
kinds, every configured symbol that fits is placed); a 9th configured symbol is unplaced,
visible and retried on a bounded schedule while the 8 flow; a key of 3 holding 2
tickers takes 1 of 2 equities and learns 3, not 2; a learned limit is re-checked after
an unsubscribe and after a reconnect, not kept stale. What each key holds and how many
requests it got is read from the simulator itself, never from the bridge.

Every wait is derived from the configuration below (connect timeout, backoff, the pace of
live requests, the simulator's interval, the retry schedule, the grace period).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bridge.config.schema import LeaseConfig, SourceConfig
from bridge.simulator import Simulator
from bridge.testing import wait_until
from bridge.upstream.client import SubscriptionStatus
from bridge.upstream.pool import UpstreamKey
from tests.support.pools import StartPool, pool_starter

pytestmark = pytest.mark.integration

#: the simulator's update interval
INTERVAL = 0.2
#: the retry schedule of unplaced configured symbols, shortened for the test
RETRY_INITIAL_S = 0.3
RETRY_MAX_S = 1.0
#: how often the subscriptions' loop expires leases and retries pins
RUN_INTERVAL_S = 0.05
LEASES = LeaseConfig(enabled=True, grace_s=0.3, default_ttl_s=30, max_ttl_s=60)
ACCEPTED = SubscriptionStatus.ACCEPTED
LIMIT = SubscriptionStatus.LIMIT
KINDS = ("ticker", "equity")
NONE_UNPLACED: dict[str, frozenset[str]] = {"ticker": frozenset(), "equity": frozenset()}


def config(sim: Simulator, tickers: Iterable[str] = (), equities: Iterable[str] = ()) \
        -> SourceConfig:
    return SourceConfig.model_validate({
        "url": sim.url, "tickers": list(tickers), "equities": list(equities),
        "stale_after_s": 3, "backoff": {"initial_s": 0.05, "max_s": 0.3},
        "connect_timeout_s": 3})


def placing_s(cfg: SourceConfig, symbols: int) -> float:
    """How long placing ``symbols`` may take: a connection (connect and subscribe within
    the connect timeout, after a backoff), the requests that split a refused one (at
    most 1 + 2·log2(n) per key, at the pace of live requests), then a few updates."""
    requests = 2 * (1 + 2 * math.ceil(math.log2(max(2, symbols))))
    return (cfg.connect_timeout_s + cfg.backoff.max_s
            + requests / cfg.max_subscribe_requests_per_s + 5 * INTERVAL)


def flow_s(cfg: SourceConfig) -> float:
    """How long until a subscribed symbol's record arrives: a few updates, and one
    request's pace and answer."""
    return 5 * INTERVAL + 1 / cfg.max_subscribe_requests_per_s + cfg.connect_timeout_s


start_bridge = pool_starter(RETRY_INITIAL_S, RETRY_MAX_S, RUN_INTERVAL_S, LEASES)


def held_by(sim: Simulator, key: str) -> set[tuple[str, str]]:
    feeds = sim.subscriptions_by_key().get(key, {})
    return {(k, s) for k, syms in feeds.items() for s in syms}


def flat(by_kind: dict[str, list[str]] | dict[str, frozenset[str]]) -> set[tuple[str, str]]:
    return {(k, s) for k, syms in by_kind.items() for s in syms}


def two_keys(limit: int | None) -> list[UpstreamKey]:
    return [UpstreamKey("a", SecretStr("key-a"), limit),
            UpstreamKey("b", SecretStr("key-b"), limit)]


@pytest.mark.parametrize(("tickers", "equities", "configured"), [
    (5, 3, False),  # the issue's case, limits learned from the upstream's refusals
    (3, 5, False),  # the other way round
    (5, 3, True),   # limits configured: packed before connecting
])
async def test_two_keys_of_4_carry_every_configured_symbol_whatever_the_mix_of_kinds(
    start_bridge: StartPool, tickers: int, equities: int, configured: bool,
) -> None:
    async with Simulator(port=0, api_keys=["key-a", "key-b"],
                         limits={"key-a": 4, "key-b": 4}, interval=INTERVAL) as sim:
        wanted = {"ticker": sim.tickers[:tickers], "equity": sim.equities[:equities]}
        cfg = config(sim, wanted["ticker"], wanted["equity"])
        t0 = time.monotonic()
        b = start_bridge(cfg, two_keys(4 if configured else None))
        everything = flat(wanted)
        await wait_until(lambda: b.records.since(t0) >= everything, placing_s(cfg, 8),
                         "all 8 configured symbols flowing")
        assert held_by(sim, "key-a") | held_by(sim, "key-b") == everything
        assert len(held_by(sim, "key-a")) == len(held_by(sim, "key-b")) == 4
        assert b.subs.unplaced_pinned() == NONE_UNPLACED
        assert b.pool.unplaced == NONE_UNPLACED
        assert b.subs.snapshot().unplaced_pinned == 0
        # the first key took everything and was refused: what it held then, with what
        # the split requests added, is its limit; never what it held before
        assert b.limits()["a"] == (4, not configured)


async def test_a_ninth_configured_symbol_is_unplaced_visible_and_retried_while_8_flow(
    start_bridge: StartPool,
) -> None:
    async with Simulator(port=0, api_keys=["key-a", "key-b"],
                         limits={"key-a": 4, "key-b": 4}, interval=INTERVAL) as sim:
        wanted = {"ticker": sim.tickers[:6], "equity": sim.equities[:3]}
        cfg = config(sim, wanted["ticker"], wanted["equity"])
        b = start_bridge(cfg, two_keys(None))
        await wait_until(lambda: sum(map(len, b.subs.unplaced_pinned().values())) == 1
                         and b.pool.pending_moves == 0, placing_s(cfg, 9), "one unplaced")
        unplaced = b.subs.unplaced_pinned()
        ((kind, symbol),) = flat(unplaced)
        assert b.pool.unplaced == unplaced
        assert b.subs.snapshot().unplaced_pinned == 1
        assert b.limits() == {"a": (4, True), "b": (4, True)}
        placed = flat(wanted) - {(kind, symbol)}
        t0 = time.monotonic()
        await wait_until(lambda: b.records.since(t0) >= placed, flow_s(cfg), "the 8 flowing")
        assert held_by(sim, "key-a") | held_by(sim, "key-b") == placed

        # retried, on the bounded schedule: from RETRY_INITIAL_S doubling up to
        # RETRY_MAX_S, each try one request per key (a full key is asked for one symbol)
        requests = sum(sim.subscribe_requests.values())
        window = 3 * RETRY_MAX_S
        await asyncio.sleep(window)
        asked = sum(sim.subscribe_requests.values()) - requests
        tries = math.ceil(window / RETRY_INITIAL_S) + 1
        assert 2 <= asked <= 2 * tries, asked
        assert b.subs.unplaced_pinned() == unplaced
        t1 = time.monotonic()
        await wait_until(lambda: b.records.since(t1) >= placed, flow_s(cfg), "the 8 still")

        # a reload removes a configured symbol: the room it frees is the 9th's
        gone = next(s for s in wanted["ticker"] if s != symbol)
        now = {k: [s for s in v if s != gone] for k, v in wanted.items()}
        await b.subs.set_pinned(now)
        await wait_until(lambda: b.subs.unplaced_pinned() == NONE_UNPLACED,
                         RETRY_MAX_S + placing_s(cfg, 1), "the 9th placed")
        assert b.pool.unplaced == NONE_UNPLACED
        t2 = time.monotonic()
        await wait_until(lambda: b.records.since(t2) >= flat(now), flow_s(cfg),
                         "the 8 configured now flowing")
        assert held_by(sim, "key-a") | held_by(sim, "key-b") == flat(now)


async def test_a_key_of_3_holding_2_tickers_takes_1_of_2_equities_and_learns_3(
    start_bridge: StartPool,
) -> None:
    async with Simulator(port=0, api_keys=["key-b"], limits={"key-b": 3},
                         interval=INTERVAL) as sim:
        tickers, equities = sim.tickers[:2], sim.equities[:2]
        cfg = config(sim, tickers)
        b = start_bridge(cfg, [UpstreamKey("b", SecretStr("key-b"))])
        await b.live()
        # a reload adds 2 equities: the upstream refuses the request for both whole
        diff = await b.subs.set_pinned({"ticker": tickers, "equity": equities})
        answers = diff.added["equity"]
        assert sorted(r.status for r in answers.values()) == [ACCEPTED, LIMIT]
        took = next(s for s, r in answers.items() if r.status == ACCEPTED)
        left = next(s for s, r in answers.items() if r.status == LIMIT)
        assert b.limits() == {"b": (3, True)}  # not 2
        assert held_by(sim, "key-b") == {("ticker", s) for s in tickers} | {("equity", took)}
        assert b.subs.unplaced_pinned() == {"ticker": frozenset(), "equity": frozenset({left})}
        assert b.pool.unplaced == b.subs.unplaced_pinned()
        # the key is full: a lease is refused without a request, the room is the
        # configured symbol's
        requests = sim.subscribe_requests["key-b"]
        lease = await b.subs.lease("equity", sim.equities[5:6], owner="anonymous")
        assert lease.lease_id is None and sim.subscribe_requests["key-b"] == requests
        t0 = time.monotonic()
        await wait_until(lambda: ("equity", took) in b.records.since(t0), flow_s(cfg),
                         "the equity taken flowing")


async def test_a_learned_limit_is_rechecked_after_an_unsubscribe_and_a_reconnect(
    start_bridge: StartPool,
) -> None:
    key = "the-key"
    async with Simulator(port=0, api_keys=[key], limits={key: 4}, interval=INTERVAL) as sim:
        # two bridges on one key (two replicas): the upstream counts both
        cfg_y = config(sim, sim.tickers[:2])
        y = start_bridge(cfg_y, [UpstreamKey("k", SecretStr(key))])
        x = start_bridge(config(sim), [UpstreamKey("k", SecretStr(key))])
        await y.live()
        await x.live()
        equities = sim.equities
        grace = LEASES.grace_s + 2 * RUN_INTERVAL_S + flow_s(cfg_y)

        async def x_takes(symbols: list[str]) -> str:
            reply = await x.subs.lease("equity", symbols, owner="x")
            assert reply.lease_id is not None and len(reply.held) == len(symbols)
            return reply.lease_id

        async def x_leaves(lease_id: str, holds: int) -> None:
            await x.subs.release(lease_id, owner="x")
            await wait_until(lambda: len(held_by(sim, key)) == holds, grace, "x's gone")

        # x fills the key: y is refused one symbol and learns 2 (what it holds then)
        x_lease = await x_takes(equities[:2])
        refused = await y.subs.lease("equity", equities[2:3], owner="y")
        assert refused.results[equities[2]].status == LIMIT
        assert y.limits() == {"k": (2, True)}
        # x leaves: the key has room for 2 more, y's learned limit is stale
        await x_leaves(x_lease, 2)
        requests = sim.subscribe_requests[key]
        stale = await y.subs.lease("equity", equities[2:3], owner="y")
        assert stale.results[equities[2]].status == LIMIT
        assert sim.subscribe_requests[key] == requests  # not asked: not re-checked yet

        # y unsubscribes one of its own (a reload): the learned limit is re-checked
        await y.subs.set_pinned({"ticker": sim.tickers[:1]})
        got = await y.subs.lease("equity", equities[2:5], owner="y")
        assert [r.status for r in got.results.values()] == [ACCEPTED] * 3
        assert y.limits() == {"k": (4, True)}
        t0 = time.monotonic()
        mine = {("equity", s) for s in equities[2:5]}
        await wait_until(lambda: y.records.since(t0) >= mine, flow_s(cfg_y), "y's flowing")

        # y lets go of 3, x takes them: y is refused and learns 1; x leaves again
        assert got.lease_id is not None
        await y.subs.release(got.lease_id, owner="y")
        await wait_until(lambda: len(held_by(sim, key)) == 1, grace, "y's released")
        x_lease = await x_takes(equities[5:8])
        again = await y.subs.lease("equity", equities[8:9], owner="y")
        assert again.results[equities[8]].status == LIMIT
        assert y.limits() == {"k": (1, True)}
        await x_leaves(x_lease, 1)
        requests = sim.subscribe_requests[key]
        stale = await y.subs.lease("equity", equities[8:9], owner="y")
        assert stale.results[equities[8]].status == LIMIT
        assert sim.subscribe_requests[key] == requests

        # the key's connections are re-established: y asks again, the key has room
        connects = y.pool.sources[0].stats.connects
        await sim.kick(key)
        await wait_until(lambda: y.pool.sources[0].stats.connects > connects
                         and y.pool.sources[0].flowing, placing_s(cfg_y, 1), "y reconnected")
        back = await y.subs.lease("equity", equities[8:11], owner="y")
        assert [r.status for r in back.results.values()] == [ACCEPTED] * 3
        assert y.limits() == {"k": (4, True)}
        assert len(held_by(sim, key)) == 4


async def test_a_ninth_configured_symbol_fails_readyz_and_the_gauge_of_a_running_bridge(
        tmp_path: Path) -> None:
    """The whole bridge, over HTTP: while a configured symbol has no room, ``/readyz``
    is 503 with a failing ``symbols`` check naming it, and
    ``aleno_bridge_symbols_unplaced{kind}`` counts it; the 8 others flow. Once a reload
    frees room, it is placed and the bridge is ready again."""
    import aiohttp

    from bridge.app import Bridge
    from bridge.config import parse_config

    async with Simulator(port=0, api_keys=["key-a", "key-b"],
                         limits={"key-a": 4, "key-b": 4}, interval=INTERVAL) as sim:
        tickers, equities = sim.tickers[:6], sim.equities[:3]

        def text(ts: Sequence[str]) -> str:
            return f"""
source:
  url: {sim.url}
  api_keys: [{{name: a, key: key-a}}, {{name: b, key: key-b}}]
  tickers: [{", ".join(ts)}]
  equities: [{", ".join(equities)}]
  backoff: {{initial_s: 0.05, max_s: 0.3}}
  connect_timeout_s: 3
  stale_after_s: 3
sinks: {{out: {{driver: jsonl, path: {tmp_path / "out.jsonl"}}}}}
http: {{host: 127.0.0.1, port: 0}}
reload: {{watch: false}}
shutdown_timeout_s: 3
"""
        cfg_path = tmp_path / "bridge.yaml"
        cfg_path.write_text(text(tickers))
        bridge = Bridge.from_settings(parse_config(text(tickers)))
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        cfg = config(sim, tickers, equities)
        try:
            await wait_until(lambda: bridge.http_port is not None, 10, "http up")
            base = f"http://127.0.0.1:{bridge.http_port}"
            async with aiohttp.ClientSession() as http:
                async def ready() -> tuple[int, dict[str, Any]]:
                    async with http.get(f"{base}/readyz") as r:
                        return r.status, await r.json()

                async def gauge() -> dict[str, float]:
                    async with http.get(f"{base}/metrics") as r:
                        body = await r.text()
                    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
                            for line in body.splitlines()
                            if line.startswith("aleno_bridge_symbols_unplaced{")}

                deadline = time.monotonic() + placing_s(cfg, 9) + flow_s(cfg)
                status, body = await ready()
                while time.monotonic() < deadline and (
                        body["checks"].get("symbols", {}).get("unplaced") != 1
                        or not body["checks"]["upstream"]["ok"]):
                    await asyncio.sleep(0.1)
                    status, body = await ready()
                check = body["checks"]["symbols"]
                assert status == 503 and body["ready"] is False, body
                assert check["ok"] is False and check["unplaced"] == 1, check
                assert "no API key has room" in check["error"]
                (named,) = check["unplaced_sample"]
                assert named.split(":", 1)[0] in KINDS
                assert sum((await gauge()).values()) == 1
                # the other checks are fine: the symbols check alone makes it 503
                others = {k: v for k, v in body["checks"].items() if k != "symbols"}
                assert all(v["ok"] for v in others.values()), others

                # free room: drop one configured ticker that is placed
                kind, symbol = named.split(":", 1)
                gone = next(s for s in tickers if s != symbol)
                smaller = [s for s in tickers if s != gone]
                outcome = await bridge.reload(parse_config(text(smaller)))
                assert outcome.result == "applied", outcome
                deadline = time.monotonic() + RETRY_MAX_S + 30
                while time.monotonic() < deadline and status != 200:
                    await asyncio.sleep(0.2)
                    status, body = await ready()
                assert status == 200, body
                assert body["checks"]["symbols"]["unplaced"] == 0
                assert sum((await gauge()).values()) == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
