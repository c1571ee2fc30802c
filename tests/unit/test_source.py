"""The source without a connection: credentials kept out of what it shows, the symbols it
asks for, how acknowledgements are counted and what they say per symbol, live changes
while not connected; and the upstream pool's keys and packing (bridge/upstream.py).

Against the simulator and a hostile server: tests/integration/test_source.py and
tests/integration/test_hostile_upstream.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config import ConfigError, SourceConfig, parse_config
from bridge.sharding import shard_symbols
from bridge.source import AlenoSource, SubscriptionStatus, _results, sanitize_url
from bridge.upstream import UpstreamKey, UpstreamPool, upstream_keys


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


# -- live subscriptions: what an acknowledgement says per symbol ------------------------------

LIMIT = "Subscription limit reached. Contact us to increase limits."


def test_an_ack_answers_per_symbol() -> None:
    partial = {"status": "partial", "involvedSubscriptions": ["ETH/USD"],
               "subscriptionsAfterUpdate": ["BTC/USD", "ETH/USD"],
               "rejectedSubscriptions": ["nope/usd"]}
    got = _results(["ETH/USD", "NOPE/USD"], partial, subscribe=True)
    assert {s: r.status for s, r in got.items()} == {"ETH/USD": SubscriptionStatus.ACCEPTED,
                                                    "NOPE/USD": SubscriptionStatus.REJECTED}
    # refused for the limit: what was subscribed before is still accepted
    limit = {"status": "error", "error": LIMIT, "subscriptionsAfterUpdate": ["BTC/USD"]}
    got = _results(["BTC/USD", "SOL/USD"], limit, subscribe=True)
    assert got["BTC/USD"].status == SubscriptionStatus.ACCEPTED
    assert got["SOL/USD"].status == SubscriptionStatus.LIMIT and got["SOL/USD"].error == LIMIT
    other = {"status": "error", "error": "Too many symbols", "subscriptionsAfterUpdate": []}
    assert _results(["SOL/USD"], other, True)["SOL/USD"].error == "Too many symbols"
    assert _results(["SOL/USD"], "garbage", True)["SOL/USD"].status == SubscriptionStatus.ERROR
    assert _results(["SOL/USD"], {"status": "ok"}, True)["SOL/USD"].held
    gone = {"status": "ok", "subscriptionsAfterUpdate": ["BTC/USD"]}
    got = _results(["ETH/USD", "BTC/USD"], gone, subscribe=False)
    assert got["ETH/USD"].status == SubscriptionStatus.ACCEPTED
    assert got["BTC/USD"].status == SubscriptionStatus.ERROR


async def test_changes_while_not_connected_are_pending_and_change_the_desired_set() -> None:
    src = source()
    wanted = src.wanted
    added = await src.subscribe("ticker", [" sol/usd ", "BTC/USD"])
    assert {r.status for r in added.values()} == {SubscriptionStatus.PENDING}
    removed = await src.unsubscribe("ticker", ["ETH/USD"])
    assert removed["ETH/USD"].status == SubscriptionStatus.PENDING
    assert src.tickers == ["BTC/USD", "SOL/USD"]
    # the same dict, each kind's set replaced whole (readers in other tasks)
    assert src.wanted is wanted and wanted["ticker"] == frozenset({"BTC/USD", "SOL/USD"})
    with pytest.raises(ValueError, match="unknown kind"):
        await src.subscribe("bond", ["X"])


# -- several keys: configuration and packing ------------------------------------------------


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, env={})
    return err.value.problems


SINKS = "sinks: {c: {driver: console}}\n"


def test_api_keys_are_validated_with_their_paths(tmp_path: Path) -> None:
    found = problems(SINKS + """
source:
  api_key: k0
  api_keys:
    - {name: a, key: k1}
    - {name: a, key: k1}
    - {name: "bad name", key: k2}
    - {name: c}
    - {name: d, key: "two words", limit: 0}
""")
    text = "\n".join(found)
    assert "source.api_keys[2].name" in text
    assert "source.api_keys[3]: set key or key_file (exactly one)" in text
    assert "source.api_keys[4].key: the key must be one line" in text
    assert "source.api_keys[4].limit" in text
    assert "two words" not in text
    found = problems(SINKS + "source: {api_key: k0, api_keys: [{name: a, key: k1}]}")
    assert found == ["source: set api_key, api_key_file or api_keys, only one of them"]
    found = problems(SINKS + "source: {api_keys: [{name: a, key: k1}, {name: a, key: k1x}]}")
    assert found == ["source: api_keys[1].name: 'a' is also the name of api_keys[0]"]
    found = problems(SINKS + "source: {api_keys: [{name: a, key: sec1}, {name: b, key: sec1}]}")
    assert found == ["source: api_keys[1].key: the same key as api_keys[0] (one connection "
                     "per key)"]
    found = problems(SINKS + "source: {leases: {default_ttl_s: 500}}")
    assert found == ["source.leases: default_ttl_s (500) must not be longer than max_ttl_s "
                     "(300)"]


def test_key_files_are_read_and_their_problems_named(tmp_path: Path) -> None:
    (tmp_path / "b").write_text("key-from-file\n")
    (tmp_path / "empty").write_text("")
    s = parse_config(SINKS + f"""
source:
  api_keys:
    - {{name: a, key: inline-key, limit: 50}}
    - {{name: b, key_file: {tmp_path / 'b'}}}
""", env={})
    keys = upstream_keys(s.config.source)
    assert [(k.name, k.key.get_secret_value() if k.key else None, k.limit) for k in keys] == [
        ("a", "inline-key", 50), ("b", "key-from-file", None)]
    assert "inline-key" not in repr(keys) and "key-from-file" not in repr(keys)
    bad = SourceConfig.model_validate({"api_keys": [
        {"name": "a", "key": "inline-key"}, {"name": "b", "key_file": tmp_path / "b"},
        {"name": "c", "key_file": tmp_path / "empty"}]})
    found: list[str] = []
    upstream_keys(bad, problems=found)
    assert found == ["source.api_keys[2].key_file: the file is empty"]
    with pytest.raises(ConfigError):
        upstream_keys(bad)
    single = upstream_keys(source().config, "the-api-key")
    assert [(k.name, k.limit) for k in single] == [("default", None)]


def test_the_pool_packs_configured_symbols_within_the_limits() -> None:
    cfg = SourceConfig.model_validate({"tickers": [f"T{i}/USD" for i in range(7)],
                                       "equities": ["E1", "E2", "E3"]})
    pool = UpstreamPool(cfg, [UpstreamKey("a", None, 4), UpstreamKey("b", None, 3),
                              UpstreamKey("c", None, 2)], lambda e, p: None)
    a, b, c = pool.sources
    assert a.tickers == ["T0/USD", "T1/USD", "T2/USD", "T3/USD"] and a.equities == []
    assert b.tickers == ["T4/USD", "T5/USD", "T6/USD"] and b.equities == []
    assert c.equities == ["E1", "E2"]
    assert pool.unplaced == {"ticker": frozenset(), "equity": frozenset({"E3"})}
    assert pool.wanted == {"ticker": frozenset(cfg.tickers), "equity": frozenset({"E1", "E2"})}
    assert pool.source_of("equity", "e1") is c
    # one key: the pool is that source, its wanted set the same object
    one = UpstreamPool(cfg, [UpstreamKey("default", None)], lambda e, p: None)
    assert one.wanted is one.sources[0].wanted
    assert one.sources[0].tickers == cfg.tickers
