"""The simulator speaks the Aleno protocol: checked with a real Socket.IO client."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import socketio

from bridge.simulator import (
    BAD_PAYLOAD,
    LIMIT_REACHED,
    REFUSED,
    TOO_MANY,
    Simulator,
    default_equities,
    default_tickers,
)

pytestmark = pytest.mark.integration


class Client:
    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.states: list[tuple[str, float, Any]] = []
        self.error: Any = None

        @self.sio.on("new_token_states")
        async def _t(data: Any) -> None:
            self.states.append(("ticker", time.monotonic(), data))

        @self.sio.on("new_equity_states")
        async def _e(data: Any) -> None:
            self.states.append(("equity", time.monotonic(), data))

        @self.sio.event
        async def connect_error(data: Any) -> None:
            self.error = data

    async def connect(self, sim: Simulator, auth: Any = None, headers: Any = None) -> None:
        await self.sio.connect(sim.url, auth=auth, headers=headers or {},
                               socketio_path="v1/socket", transports=["websocket"],
                               wait_timeout=5)

    async def call(self, event: str, data: Any) -> Any:
        return await self.sio.call(event, data, timeout=5)


@pytest.fixture
async def client(simulator: Simulator) -> AsyncIterator[Client]:
    c = Client()
    await c.connect(simulator, auth={"apiKey": "test-key"})
    yield c
    await c.sio.disconnect()


def test_universe_is_large_enough() -> None:
    assert len(default_tickers()) >= 50 and len(default_equities()) >= 50
    assert all(t.endswith("/USD") for t in default_tickers())


async def test_auth_by_header(simulator: Simulator) -> None:
    c = Client()
    await c.connect(simulator, headers={"x-api-key": "other-key"})
    ack = await c.call("subscribe_equity", ["AAPL"])
    assert ack["status"] == "ok"
    await c.sio.disconnect()


@pytest.mark.parametrize("auth,headers", [(None, None), ({"apiKey": "wrong"}, None),
                                          (None, {"x-api-key": "wrong"}), ({"key": "x"}, None)])
async def test_missing_or_invalid_key_is_refused_with_the_exact_message(
    simulator: Simulator, auth: Any, headers: Any
) -> None:
    c = Client()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await c.connect(simulator, auth=auth, headers=headers)
    assert c.error == {"message": REFUSED}


async def test_subscribe_ok_with_all_fields_and_normalization(client: Client) -> None:
    ack = await client.call("subscribe_ticker", [" btc/usd", "ETH/USD ", "BTC/USD"])
    assert ack == {"status": "ok", "involvedSubscriptions": ["BTC/USD", "ETH/USD"],
                   "subscriptionsAfterUpdate": ["BTC/USD", "ETH/USD"]}


async def test_partial_names_rejected_symbols(client: Client) -> None:
    ack = await client.call("subscribe_equity", ["AAPL", "NOPE", "msft"])
    assert ack["status"] == "partial"
    assert ack["involvedSubscriptions"] == ["AAPL", "MSFT"]
    assert ack["rejectedSubscriptions"] == ["NOPE"]
    assert ack["subscriptionsAfterUpdate"] == ["AAPL", "MSFT"]


async def test_unsubscribe(client: Client) -> None:
    await client.call("subscribe_ticker", ["BTC/USD", "ETH/USD"])
    ack = await client.call("unsubscribe_ticker", ["btc/usd"])
    assert ack["status"] == "ok" and ack["subscriptionsAfterUpdate"] == ["ETH/USD"]
    ack = await client.call("unsubscribe_equity", ["AAPL"])
    assert ack["status"] == "ok" and ack["subscriptionsAfterUpdate"] == []


async def test_subscription_limit_refuses_the_request_whole() -> None:
    async with Simulator(port=0, api_keys=["k"], max_subscriptions=3, interval=5) as sim:
        c = Client()
        await c.connect(sim, auth={"apiKey": "k"})
        assert (await c.call("subscribe_ticker", ["BTC/USD", "ETH/USD"]))["status"] == "ok"
        ack = await c.call("subscribe_equity", ["AAPL", "MSFT"])
        assert ack["status"] == "error" and ack["error"] == LIMIT_REACHED
        assert ack["subscriptionsAfterUpdate"] == []
        assert (await c.call("subscribe_equity", ["AAPL"]))["status"] == "ok"
        await c.sio.disconnect()


async def test_updates_arrive_at_the_configured_cadence(client: Client) -> None:
    await client.call("subscribe_ticker", ["BTC/USD", "ETH/USD"])
    await client.call("subscribe_equity", ["AAPL"])
    await asyncio.sleep(1.3)
    ticks = [(t, d) for k, t, d in client.states if k == "ticker"]
    eqs = [d for k, _, d in client.states if k == "equity"]
    assert 4 <= len(ticks) <= 8, len(ticks)  # interval 0.2 s
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(ticks)]
    assert all(0.1 < g < 0.4 for g in gaps), gaps
    state = ticks[-1][1][0]
    assert set(state) == {"id", "aggregated", "cex", "dex", "sentTimestampMs"}
    assert set(state["dex"]) == {"price", "h24UsdVolume", "usdTvl"}
    assert [s["id"] for s in ticks[-1][1]] == ["BTC/USD", "ETH/USD"]
    assert set(eqs[-1][0]) == {"sentTimestampMs", "symbol", "price"}
    assert abs(state["sentTimestampMs"] - time.time() * 1000) < 5000


@pytest.mark.parametrize("payload", ["BTC/USD", None, 42, {"a": 1}, [1, 2], ["BTC/USD", None],
                                     [["nested"]]])
async def test_hostile_payloads_get_an_error_ack(client: Client, payload: Any) -> None:
    ack = await client.call("subscribe_ticker", payload)
    assert ack["status"] == "error" and ack["error"] == BAD_PAYLOAD


async def test_huge_requests_and_unknown_events_do_not_hurt(client: Client) -> None:
    ack = await client.call("subscribe_ticker", [f"S{i}/USD" for i in range(100_000)])
    assert ack["status"] == "error" and ack["error"] == TOO_MANY
    await client.sio.emit("no_such_event", {"x": 1})
    await client.sio.emit("subscribe_ticker", ["x" * 10_000])  # no ack requested
    ack = await client.call("subscribe_ticker", ["BTC/USD"])
    assert ack["status"] == "ok"


async def test_clients_are_isolated(simulator: Simulator) -> None:
    a, b = Client(), Client()
    await a.connect(simulator, auth={"apiKey": "test-key"})
    await b.connect(simulator, auth={"apiKey": "test-key"})
    await a.call("subscribe_equity", ["AAPL"])
    await asyncio.sleep(0.5)
    assert a.states and not b.states
    await a.sio.disconnect()
    await b.sio.disconnect()


# -- test hooks and the admin API ------------------------------------------------------

FAST = 0.05


def sent_times(client: Client, kind: str, symbol: str) -> list[int]:
    """The sent times of every update of ``symbol`` the client received, in order."""
    key = "id" if kind == "ticker" else "symbol"
    return [r["sentTimestampMs"] for k, _, data in client.states if k == kind
            for r in data if r[key] == symbol]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def connected(sim: Simulator, key: str) -> Client:
    c = Client()
    await c.connect(sim, auth={"apiKey": key})
    return c


async def test_a_paused_symbol_stops_while_the_others_flow_and_comes_back() -> None:
    async with Simulator(port=0, api_keys=["k"], interval=FAST) as sim:
        c = await connected(sim, "k")
        await c.call("subscribe_ticker", ["BTC/USD", "ETH/USD"])
        await until(lambda: len(sent_times(c, "ticker", "BTC/USD")) >= 2)

        sim.pause_symbols("ticker", [" btc/usd"])
        paused_ms = time.time_ns() // 1_000_000
        # a tick stamped after the pause began after it: from there on, ETH only
        await until(lambda: len([t for t in sent_times(c, "ticker", "ETH/USD")
                                 if t > paused_ms]) >= 5)
        assert [t for t in sent_times(c, "ticker", "BTC/USD") if t > paused_ms] == []
        assert c.sio.connected and sim.connections("k") == 1

        sim.resume_symbols("ticker", ["BTC/USD"])
        resumed_ms = time.time_ns() // 1_000_000
        await until(lambda: len([t for t in sent_times(c, "ticker", "ETH/USD")
                                 if t > resumed_ms]) >= 3)
        after = [t for t in sent_times(c, "ticker", "ETH/USD") if t > resumed_ms]
        assert [t for t in sent_times(c, "ticker", "BTC/USD") if t > resumed_ms] == after
        await c.sio.disconnect()


async def test_a_client_whose_every_symbol_is_paused_gets_no_event_of_that_kind() -> None:
    async with Simulator(port=0, api_keys=["k"], interval=FAST) as sim:
        c = await connected(sim, "k")
        await c.call("subscribe_equity", ["AAPL"])
        await c.call("subscribe_ticker", ["BTC/USD"])
        sim.pause_symbols("equity", ["AAPL"])
        paused_ms = time.time_ns() // 1_000_000
        await until(lambda: len([t for t in sent_times(c, "ticker", "BTC/USD")
                                 if t > paused_ms]) >= 4)
        late_equity_events = [d for k, _, d in c.states if k == "equity"
                              and d and d[0]["sentTimestampMs"] > paused_ms]
        assert late_equity_events == []  # not even an empty array
        await c.sio.disconnect()


async def test_dropped_ticks_are_exactly_the_sent_times_missing_for_the_client() -> None:
    async with Simulator(port=0, api_keys=["k"], interval=FAST) as sim:
        c = await connected(sim, "k")
        await c.call("subscribe_ticker", ["BTC/USD", "ETH/USD"])
        await until(lambda: len(sent_times(c, "ticker", "BTC/USD")) >= 2)
        sim.drop("ticker", ["btc/usd"], 3)
        await until(lambda: len(sim.dropped("ticker", "BTC/USD")) == 3)
        dropped = sim.dropped("ticker", "BTC/USD")
        await until(lambda: sent_times(c, "ticker", "BTC/USD")[-1] > dropped[-1])

        btc = sent_times(c, "ticker", "BTC/USD")
        before = max(t for t in btc if t < dropped[0])
        after = min(t for t in btc if t > dropped[-1])
        assert not set(dropped) & set(btc)
        assert [t for t in btc if before < t < after] == []
        # ETH was not dropped: it got every tick, so it shows exactly which went missing
        eth = sent_times(c, "ticker", "ETH/USD")
        assert [t for t in eth if before < t < after] == dropped
        # the cadence held: the gap spans (ticks + 1) intervals (slack for a loaded machine)
        assert 2 * FAST * 1000 < after - before < 4 * FAST * 1000 + 2000, (before, after)
        assert sim.dropped("ticker", "ETH/USD") == []
        await c.sio.disconnect()


async def test_limits_are_per_key_across_keys_and_across_connections() -> None:
    tickers, equities = default_tickers(), default_equities()
    async with Simulator(port=0, api_keys=["a", "b"], limits={"a": 50, "b": 50},
                         max_subscriptions=5, interval=5) as sim:
        a1, a2, b = (await connected(sim, "a"), await connected(sim, "a"),
                     await connected(sim, "b"))
        # two keys: 50 each, neither eats the other's
        assert (await a1.call("subscribe_ticker", tickers[:30]))["status"] == "ok"
        assert (await b.call("subscribe_ticker", tickers[:50]))["status"] == "ok"
        ack = await b.call("subscribe_equity", equities[:1])
        assert ack["status"] == "error" and ack["error"] == LIMIT_REACHED
        # two connections of one key share its 50
        assert (await a2.call("subscribe_equity", equities[:20]))["status"] == "ok"
        ack = await a2.call("subscribe_equity", equities[20:21])
        assert ack["status"] == "error" and ack["error"] == LIMIT_REACHED
        assert ack["subscriptionsAfterUpdate"] == sorted(equities[:20])
        # a feed the key already holds elsewhere costs nothing
        assert (await a2.call("subscribe_ticker", tickers[:1]))["status"] == "ok"
        assert sim.subscriptions_by_key()["a"] == {"ticker": set(tickers[:30]),
                                                   "equity": set(equities[:20])}
        assert len(sim.subscriptions()) == 3  # per connection, as before
        # a connection that goes frees what only it held
        await a1.sio.disconnect()
        await until(lambda: sim.connections("a") == 1)
        assert (await a2.call("subscribe_equity", equities[20:49]))["status"] == "ok"
        assert sim.connects == {"a": 2, "b": 1}
        await a2.sio.disconnect()
        await b.sio.disconnect()


async def test_kick_by_key_disconnects_only_that_keys_clients() -> None:
    async with Simulator(port=0, api_keys=["a", "b"], interval=FAST) as sim:
        a1, a2, b = (await connected(sim, "a"), await connected(sim, "a"),
                     await connected(sim, "b"))
        await b.call("subscribe_equity", ["AAPL"])
        assert await sim.kick("a") == 2
        await until(lambda: not a1.sio.connected and not a2.sio.connected)
        assert sim.connections("a") == 0 and sim.connections("b") == 1 and b.sio.connected
        seen = len(b.states)
        await until(lambda: len(b.states) > seen + 2)
        assert await sim.kick() == 1
        await until(lambda: not b.sio.connected)
        assert sim.connections() == 0 and sim.connects == {"a": 2, "b": 1}


async def test_the_admin_api_round_trips_and_never_shows_a_key() -> None:
    import aiohttp

    from bridge.simulator import fingerprint

    key, other = "s3cret-admin-key", "0ther-admin-key"
    async with Simulator(port=0, api_keys=[key, other], interval=FAST, admin=True,
                         limits={other: 7}) as sim, aiohttp.ClientSession(sim.url) as http:
        c, o = await connected(sim, key), await connected(sim, other)
        await c.call("subscribe_ticker", ["BTC/USD", "ETH/USD"])

        async with http.get("/admin/subscriptions") as r:
            text = await r.text()
            body = await r.json()
        assert r.status == 200 and key not in text and other not in text
        assert body["keys"][fingerprint(key)] == {
            "tickers": ["BTC/USD", "ETH/USD"], "equities": [], "connections": 1,
            "connects": 1, "limit": 250, "subscribe_requests": 1, "unsubscribe_requests": 0}
        assert body["keys"][fingerprint(other)]["limit"] == 7
        assert body["paused"] == {"ticker": [], "equity": []} and body["feed_paused"] is False

        async with http.post("/admin/pause", json={"kind": "ticker", "symbols": ["eth/usd"]}) as r:
            assert r.status == 200 and await r.json() == {"kind": "ticker",
                                                          "paused": ["ETH/USD"]}
        assert sim.paused_symbols("ticker") == {"ETH/USD"}
        async with http.post("/admin/resume", json={"kind": "ticker", "symbols": ["ETH/USD"]}) as r:
            assert r.status == 200 and (await r.json())["paused"] == []

        async with http.post("/admin/drop", json={"kind": "ticker", "symbols": ["BTC/USD"],
                                                  "ticks": 2}) as r:
            assert r.status == 204
        await until(lambda: len(sim.dropped("ticker", "BTC/USD")) == 2)
        async with http.get("/admin/dropped", params={"kind": "ticker",
                                                       "symbol": "btc/usd"}) as r:
            assert await r.json() == {"kind": "ticker", "symbol": "BTC/USD",
                                      "sentTimestampMs": sim.dropped("ticker", "BTC/USD")}

        for path, payload in [("/admin/pause", {"kind": "tickers", "symbols": ["BTC/USD"]}),
                              ("/admin/pause", {"kind": "ticker", "symbols": "BTC/USD"}),
                              ("/admin/resume", {"kind": "ticker", "symbols": ["NOPE/USD"]}),
                              ("/admin/drop", {"kind": "ticker", "symbols": ["BTC/USD"]}),
                              ("/admin/drop", {"kind": "ticker", "symbols": ["BTC/USD"],
                                               "ticks": -1})]:
            async with http.post(path, json=payload) as r:
                assert r.status == 400 and "error" in await r.json(), (path, payload)
        async with http.post("/admin/kick", data=b"[not json") as r:
            assert r.status == 400
        async with http.get("/admin/dropped", params={"kind": "ticker"}) as r:
            assert r.status == 400

        async with http.post("/admin/kick", json={"key_fingerprint": "00000000"}) as r:
            assert r.status == 404 and key not in await r.text()
        async with http.post("/admin/kick", json={"key_fingerprint": fingerprint(key)}) as r:
            assert r.status == 200 and await r.json() == {"disconnected": 1}
        await until(lambda: not c.sio.connected)
        assert o.sio.connected
        async with http.post("/admin/kick") as r:
            assert await r.json() == {"disconnected": 1}
        await until(lambda: not o.sio.connected)


async def test_the_admin_api_is_off_unless_asked_for(simulator: Simulator) -> None:
    import aiohttp

    assert simulator.admin is False
    async with aiohttp.ClientSession(simulator.url) as http:
        for method, path in [("GET", "/admin/subscriptions"), ("POST", "/admin/pause"),
                             ("POST", "/admin/resume"), ("POST", "/admin/drop"),
                             ("GET", "/admin/dropped"), ("POST", "/admin/kick")]:
            async with http.request(method, path, json={}) as r:
                assert r.status == 404, (method, path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_simulate_command_takes_key_limits_and_the_admin_flag() -> None:
    import sys

    import aiohttp

    from bridge.simulator import fingerprint

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "simulate", "--host", "127.0.0.1", "--port", str(port),
        "--api-key", "k1==", "--api-key", "k2", "--interval", "0.1",
        "--max-subscriptions", "3", "--tickers", "BTC/USD,ETH/USD", "--equities", "AAPL,MSFT",
        "--key-limit", "k1===1", "--admin",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert f"127.0.0.1:{port}/v1/socket (2 tickers, 2 equities" in line
        assert "/admin/" in line
        sim = Simulator(port=port)  # only for its url
        c = Client()
        await c.connect(sim, auth={"apiKey": "k1=="})
        assert (await c.call("subscribe_ticker", ["BTC/USD"]))["status"] == "ok"
        assert (await c.call("subscribe_ticker", ["ETH/USD"]))["error"] == LIMIT_REACHED
        async with aiohttp.ClientSession(sim.url) as http, \
                http.get("/admin/subscriptions") as r:
            keys = (await r.json())["keys"]
        assert keys[fingerprint("k1==")]["limit"] == 1 and keys[fingerprint("k2")]["limit"] == 3
        assert keys[fingerprint("k1==")]["tickers"] == ["BTC/USD"]
        await c.sio.disconnect()
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert b"k1==" not in err


async def test_a_key_limit_for_a_key_not_accepted_exits_2_without_naming_it() -> None:
    import subprocess
    import sys

    from bridge.simulator import fingerprint

    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge", "simulate", "--port", "0",
                         "--key-limit", "s3cret=5"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert fingerprint("s3cret") in done.stderr and "s3cret" not in done.stderr
    assert "--api-key" in done.stderr
