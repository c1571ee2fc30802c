"""The simulator's protocol logic without a socket: acknowledgements, limits, records.

Over a real Socket.IO connection: tests/integration/simulator/test_simulator.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from bridge.pipeline.normalize import Normalizer
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
    fingerprint,
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
    from bridge.cli.main import _parser

    assert _parser().parse_args(["simulate"]).compression is True
    assert _parser().parse_args(["simulate", "--no-compression"]).compression is False


def ok(sim: Simulator, sid: str, symbols: list[str], ticker: bool = True) -> str:
    return str(sim._update(sid, symbols, ticker=ticker, subscribe=True)["status"])


def test_the_limit_is_per_key_over_the_distinct_feeds_of_all_its_connections() -> None:
    sim = Simulator(port=0, api_keys=["a", "b"], max_subscriptions=3, limits={"b": 1})
    sim._clients.update({"a1": _Client("a"), "a2": _Client("a"), "b1": _Client("b")})
    assert ok(sim, "a1", ["BTC/USD", "ETH/USD"]) == "ok"
    # a feed the key already holds on another connection costs nothing
    assert ok(sim, "a2", ["BTC/USD"]) == "ok"
    assert ok(sim, "a2", ["AAPL"], ticker=False) == "ok"  # 3 distinct feeds: the limit
    ack = sim._update("a2", ["MSFT"], ticker=False, subscribe=True)
    assert ack["status"] == "error" and ack["error"] == LIMIT_REACHED
    assert ack["subscriptionsAfterUpdate"] == ["AAPL"]  # this connection's, unchanged
    # the other key has its own limit, from `limits`
    assert sim.limit("a") == 3 and sim.limit("b") == 1
    assert ok(sim, "b1", ["MSFT"], ticker=False) == "ok"
    assert ok(sim, "b1", ["BTC/USD"]) == "error"
    assert sim.subscriptions_by_key() == {
        "a": {"ticker": {"BTC/USD", "ETH/USD"}, "equity": {"AAPL"}},
        "b": {"ticker": set(), "equity": {"MSFT"}},
    }
    assert sim.connections() == 3 and sim.connections("a") == 2 and sim.connections("c") == 0
    # a connection that goes frees only what no other connection of the key holds
    del sim._clients["a2"]
    assert ok(sim, "a1", ["SOL/USD"]) == "ok"
    assert ok(sim, "a1", ["XRP/USD"]) == "error"


def test_a_limit_for_a_key_that_is_not_accepted_is_refused_without_naming_it() -> None:
    with pytest.raises(ValueError, match=fingerprint("s3cret-key")) as info:
        Simulator(port=0, api_keys=["demo-key"], limits={"s3cret-key": 5})
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="negative"):
        Simulator(port=0, api_keys=["k"], limits={"k": -1})


def test_a_fingerprint_is_short_stable_and_hides_the_key() -> None:
    assert fingerprint("demo-key") == fingerprint("demo-key")
    assert len(fingerprint("demo-key")) == 8 and fingerprint("demo-key") != fingerprint("x")
    assert int(fingerprint("demo-key"), 16) >= 0 and "demo" not in fingerprint("demo-key")


def test_connects_count_per_key_from_zero() -> None:
    assert Simulator(port=0, api_keys=["a", "b"]).connects == {"a": 0, "b": 0}


def test_pausing_symbols_normalizes_them_and_refuses_unknown_ones() -> None:
    sim = Simulator(port=0)
    sim.pause_symbols("ticker", [" btc/usd", "ETH/USD"])
    sim.pause_symbols("equity", ["aapl"])
    assert sim.paused_symbols("ticker") == {"BTC/USD", "ETH/USD"}
    sim.resume_symbols("ticker", ["eth/usd "])
    assert sim.paused_symbols("ticker") == {"BTC/USD"}
    assert sim._left_out(1)["ticker"] == {"BTC/USD"} and sim._left_out(1)["equity"] == {"AAPL"}
    with pytest.raises(ValueError, match="NOPE/USD"):
        sim.pause_symbols("ticker", ["NOPE/USD"])
    with pytest.raises(ValueError, match="kind"):
        sim.pause_symbols("tickers", ["BTC/USD"])
    with pytest.raises(TypeError):
        sim.pause_symbols("ticker", "BTC/USD")


def test_a_drop_counts_only_updates_a_client_would_have_had() -> None:
    sim, sid = connected()
    sim.drop("ticker", ["btc/usd"], 2)
    assert sim._left_out(100)["ticker"] == set()  # nobody subscribed: nothing missed yet
    sim._update(sid, ["BTC/USD", "ETH/USD"], ticker=True, subscribe=True)
    sim.pause_symbols("ticker", ["BTC/USD"])
    assert sim._left_out(200)["ticker"] == {"BTC/USD"}  # paused, the drop waits
    sim.resume_symbols("ticker", ["BTC/USD"])
    assert sim._left_out(300)["ticker"] == {"BTC/USD"}
    assert sim._left_out(400)["ticker"] == {"BTC/USD"}
    assert sim._left_out(500)["ticker"] == set()
    assert sim.dropped("ticker", " btc/usd") == [300, 400]
    assert sim.dropped("ticker", "ETH/USD") == [] and sim.dropped("equity", "AAPL") == []
    sim.drop("ticker", ["ETH/USD"], 5)
    sim.drop("ticker", ["ETH/USD"], 0)  # cancels
    assert sim._left_out(600)["ticker"] == set()
    with pytest.raises(ValueError):
        sim.drop("ticker", ["ETH/USD"], -1)


def test_the_simulate_command_takes_key_limits_split_at_the_last_equals_sign() -> None:
    from bridge.cli.main import _parser

    args = _parser().parse_args(["simulate", "--api-key", "a=b==", "--key-limit", "a=b===7",
                                 "--key-limit", "k=0"])
    assert args.key_limits == [("a=b==", 7), ("k", 0)] and args.admin is False
    assert _parser().parse_args(["simulate", "--admin"]).admin is True
    # the contract's flags are unchanged
    args = _parser().parse_args(["simulate", "--host", "0.0.0.0", "--port", "1", "--api-key",
                                 "K", "--api-key", "K2", "--interval", "0.5",
                                 "--max-subscriptions", "9", "--tickers", "A/USD,B/USD",
                                 "--equities", "X,Y"])
    assert (args.host, args.port, args.api_keys, args.interval, args.max_subscriptions,
            args.tickers, args.equities) == ("0.0.0.0", 1, ["K", "K2"], 0.5, 9,
                                             "A/USD,B/USD", "X,Y")


@pytest.mark.parametrize("value", ["s3cret", "s3cret=", "s3cret=many", "=5", "s3cret=-1"])
def test_a_bad_key_limit_is_a_usage_error_that_does_not_echo_the_key(
    value: str, capsys: pytest.CaptureFixture[str],
) -> None:
    from bridge.cli.main import _parser

    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["simulate", "--key-limit", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--key-limit" in err and "s3cret" not in err

