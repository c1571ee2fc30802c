"""The simulator's protocol logic without a socket: acknowledgements, limits, records.

Over a real Socket.IO connection: tests/integration/test_simulator.py.
"""

from __future__ import annotations

from typing import Any

from bridge.normalize import Normalizer
from bridge.simulator import (
    BAD_PAYLOAD,
    LIMIT_REACHED,
    MAX_SYMBOLS_PER_REQUEST,
    NONE_SUPPORTED,
    TOO_MANY,
    Simulator,
    _Client,
    default_equities,
    default_tickers,
    normalize_symbol,
)


def connected(max_subscriptions: int = 250, **kw: Any) -> tuple[Simulator, str]:
    """A simulator with one client connected (no socket: its session is registered)."""
    sim = Simulator(port=0, seed=1, max_subscriptions=max_subscriptions, **kw)
    sim._clients["sid"] = _Client("demo-key")
    return sim, "sid"


def test_the_built_in_universe_has_at_least_50_tickers_and_50_equities() -> None:
    assert len(set(default_tickers())) >= 50 and len(set(default_equities())) >= 50
    assert all(t.endswith("/USD") for t in default_tickers())
    sim = Simulator(port=0)
    assert sim.tickers == default_tickers() and sim.equities == default_equities()
    assert sim.url == "http://127.0.0.1:0"


def test_symbols_are_trimmed_and_upper_cased() -> None:
    assert normalize_symbol("  btc/usd ") == "BTC/USD"
    sim, sid = connected(tickers=[" btc/usd", "ETH/USD"])
    assert sim.tickers == ["BTC/USD", "ETH/USD"]
    ack = sim._update(sid, ["btc/usd "], ticker=True, subscribe=True)
    assert ack == {"status": "ok", "involvedSubscriptions": ["BTC/USD"],
                   "subscriptionsAfterUpdate": ["BTC/USD"]}


def test_unsupported_symbols_make_a_partial_or_an_error_ack() -> None:
    sim, sid = connected()
    ack = sim._update(sid, ["BTC/USD", "NOPE/USD"], ticker=True, subscribe=True)
    assert ack["status"] == "partial" and ack["rejectedSubscriptions"] == ["NOPE/USD"]
    assert ack["subscriptionsAfterUpdate"] == ["BTC/USD"]
    ack = sim._update(sid, ["NOPE/USD"], ticker=True, subscribe=True)
    assert ack["status"] == "error" and ack["error"] == NONE_SUPPORTED
    assert ack["subscriptionsAfterUpdate"] == ["BTC/USD"]  # nothing changed


def test_a_malformed_or_oversized_request_is_an_error() -> None:
    sim, sid = connected()
    for bad in (None, "BTC/USD", [1, 2], {"BTC/USD": 1}):
        ack = sim._update(sid, bad, ticker=True, subscribe=True)
        assert ack["status"] == "error" and ack["error"] == BAD_PAYLOAD, bad
    ack = sim._update(sid, ["AAPL"] * (MAX_SYMBOLS_PER_REQUEST + 1), ticker=False,
                      subscribe=True)
    assert ack["status"] == "error" and ack["error"] == TOO_MANY


def test_the_limit_counts_tickers_and_equities_together_and_refuses_a_request_whole() -> None:
    sim, sid = connected(max_subscriptions=3)
    assert sim._update(sid, ["BTC/USD", "ETH/USD"], ticker=True, subscribe=True)["status"] == "ok"
    ack = sim._update(sid, default_equities()[:2], ticker=False, subscribe=True)
    assert ack["status"] == "error" and ack["error"] == LIMIT_REACHED
    assert ack["subscriptionsAfterUpdate"] == []
    assert sim._update(sid, default_equities()[:1], ticker=False, subscribe=True)["status"] == "ok"
    assert sim.subscriptions() == [({"BTC/USD", "ETH/USD"}, {default_equities()[0]})]


def test_unsubscribe_removes_only_what_was_named() -> None:
    sim, sid = connected()
    sim._update(sid, ["BTC/USD", "ETH/USD"], ticker=True, subscribe=True)
    ack = sim._update(sid, ["eth/usd"], ticker=True, subscribe=False)
    assert ack["status"] == "ok" and ack["subscriptionsAfterUpdate"] == ["BTC/USD"]


def test_an_unknown_session_is_refused() -> None:
    sim = Simulator(port=0)
    ack = sim._update("nobody", ["BTC/USD"], ticker=True, subscribe=True)
    assert ack["status"] == "error"


def test_records_are_valid_aleno_records() -> None:
    sim = Simulator(port=0, seed=3)
    norm = Normalizer()
    sent = 1_732_480_000_000
    tickers = [sim.ticker_state(s, sent) for s in sim.tickers]
    equities = [sim.equity_state(s, sent) for s in sim.equities]
    assert len(norm.tickers(tickers)) == len(tickers)
    assert len(norm.equities(equities)) == len(equities)
    assert norm.invalid == {}
    one = tickers[0]
    assert set(one) == {"id", "aggregated", "cex", "dex", "sentTimestampMs"}
    assert set(one["dex"]) == {"price", "h24UsdVolume", "usdTvl"}
    assert set(equities[0]) == {"sentTimestampMs", "symbol", "price"}


def test_permessage_deflate_is_offered_by_default_and_can_be_turned_off() -> None:
    from engineio.async_drivers.aiohttp import WebSocket

    on, off = Simulator(port=0), Simulator(port=0, compression=False)
    assert on.compression and not off.compression
    assert on.ws_compression == [] and off.ws_compression == []
    # each simulator installs its own WebSocket driver; python-engineio's is untouched
    driver = on.sio.eio._async["websocket"]
    assert issubclass(driver, WebSocket) and driver is not WebSocket
    assert off.sio.eio._async["websocket"] is not driver
    import engineio.async_drivers.aiohttp as eio_aiohttp
    assert eio_aiohttp._async["websocket"] is WebSocket


def test_the_simulate_command_offers_deflate_unless_told_not_to() -> None:
    from bridge.cli import _parser

    assert _parser().parse_args(["simulate"]).compression is True
    assert _parser().parse_args(["simulate", "--no-compression"]).compression is False
