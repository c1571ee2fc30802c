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
