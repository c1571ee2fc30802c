"""The source without a connection: credentials kept out of what it shows, the symbols it
asks for, and how acknowledgements are counted.

Against the simulator and a hostile server: tests/integration/test_source.py and
tests/integration/test_hostile_upstream.py.
"""

from __future__ import annotations

from typing import Any

from bridge.config import SourceConfig
from bridge.sharding import shard_symbols
from bridge.source import AlenoSource, sanitize_url


def source(**kw: Any) -> AlenoSource:
    cfg = SourceConfig.model_validate({"tickers": ["BTC/USD", "ETH/USD"], "equities": ["AAPL"],
                                       **kw})
    return AlenoSource(cfg, "the-api-key", lambda e, p: None)


def test_sanitize_url_strips_userinfo_anywhere_in_a_text() -> None:
    text = "cannot reach https://bob:s3cret@h.example:443/v1 (and wss://x@y/z)"
    assert sanitize_url(text) == "cannot reach https://h.example:443/v1 (and wss://y/z)"
    assert sanitize_url("https://pricing.aleno.ai") == "https://pricing.aleno.ai"


def test_url_and_repr_never_show_credentials_or_the_key() -> None:
    cfg = SourceConfig.model_validate({"url": "http://127.0.0.1:8765", "tickers": ["BTC/USD"]})
    # the configuration refuses credentials in the URL; a URL built in code can hold some
    src = AlenoSource(cfg.model_copy(update={"url": "http://bob:pw-S3cret@127.0.0.1:8765"}),
                      "the-api-key", lambda e, p: None)
    assert src.url == "http://127.0.0.1:8765"
    assert src.ws_url == "ws://127.0.0.1:8765/v1/socket/"
    assert src.endpoint == "http://127.0.0.1:8765/v1/socket"
    assert "pw-S3cret" not in repr(src) and "the-api-key" not in repr(src)


def test_it_asks_for_the_configured_symbols() -> None:
    src = source()
    assert src.wanted == {"ticker": frozenset({"BTC/USD", "ETH/USD"}),
                          "equity": frozenset({"AAPL"})}


def test_a_shard_asks_only_for_its_own_symbols() -> None:
    tickers = [f"T{i}/USD" for i in range(40)]
    parts = [source(tickers=tickers, shard={"index": i, "count": 3}).tickers for i in range(3)]
    assert sorted(s for part in parts for s in part) == sorted(tickers)
    assert parts[1] == shard_symbols("ticker", tickers, 1, 3)


def test_acks_are_counted_by_status_and_rejections_remembered() -> None:
    src = source()
    ok = {"status": "ok", "involvedSubscriptions": ["BTC/USD"],
          "subscriptionsAfterUpdate": ["BTC/USD"]}
    assert src._handle_ack("ticker", ["BTC/USD"], ok)
    partial = {"status": "partial", "involvedSubscriptions": ["ETH/USD"],
               "subscriptionsAfterUpdate": ["BTC/USD", "ETH/USD"],
               "rejectedSubscriptions": ["NOPE/USD"]}
    assert src._handle_ack("ticker", ["ETH/USD", "NOPE/USD"], partial)
    error = {"status": "error", "error": "Subscription limit reached. Contact us to increase "
             "limits.", "involvedSubscriptions": [], "subscriptionsAfterUpdate": []}
    assert not src._handle_ack("equity", ["AAPL"], error)
    assert not src._handle_ack("equity", ["AAPL"], "not a dict")
    assert not src._handle_ack("equity", ["AAPL"], {"status": "maybe"})
    assert src.stats.acks == {"ok": 1, "partial": 1, "error": 1, "invalid": 2}
    assert src.stats.subscribed == {"ticker": ["BTC/USD", "ETH/USD"], "equity": []}
    assert src.stats.rejected_symbols == {"ticker:NOPE/USD"}
