"""The source without a connection: credentials kept out of what it shows, the symbols it
asks for, how acknowledgements are counted and what they say per symbol, live changes
while not connected, the bounded rejected set and the pace of live requests; and the
upstream pool's keys and packing, capacity, unsupported-symbol memory, configured
symbols asked past a learned limit, limits learned from whole-request refusals (split
requests), their re-checks and joint placement across kinds (bridge/upstream/pool.py).

Against the simulator and a hostile server: tests/integration/upstream/test_source.py and
tests/integration/upstream/test_hostile_upstream.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

import bridge.upstream.client as source_module
import bridge.upstream.pool as upstream_module
from bridge.config import ConfigError, SourceConfig, parse_config
from bridge.config.settings import upstream_keys
from bridge.upstream.client import (
    AlenoSource,
    BoundedSet,
    RateLimit,
    SubscriptionResult,
    SubscriptionStatus,
    _results,
    normalize_symbols,
    sanitize_url,
)
from bridge.upstream.pool import REJECTED_TTL_S, UpstreamKey, UpstreamPool
from bridge.upstream.sharding import shard_symbols


class Keeper:
    """What the keeper of the symbol book (the subscriptions) is told by the pool."""

    def __init__(self, unplaced: list[tuple[str, list[str]]] | None = None,
                 rooms: list[bool] | None = None) -> None:
        self.unplaced = unplaced if unplaced is not None else []
        self.rooms = rooms if rooms is not None else []

    def lost(self, kind: str, symbols: list[str]) -> None:
        self.unplaced.append((kind, symbols))

    def room(self) -> None:
        self.rooms.append(True)


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


# -- bounded upstream pressure: the rejected set, the pace of live requests ------------------


def test_the_rejected_set_is_bounded_the_oldest_dropped_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounded = BoundedSet(3, ["a", "b"])
    bounded.update(["b", "c", "d"])
    assert list(bounded) == ["b", "c", "d"] and len(bounded) == 3
    assert bounded == {"b", "c", "d"} and {"b", "c", "d"} == bounded
    bounded.discard("c")
    assert "c" not in bounded and "d" in bounded
    with pytest.raises(ValueError, match="maxlen"):
        BoundedSet(0)
    # what the source keeps of the upstream's rejections
    monkeypatch.setattr(source_module, "MAX_REJECTED_SYMBOLS", 100)
    src = source()
    for i in range(10):
        junk = [f"JUNK{i}-{j}" for j in range(50)]
        ack = {"status": "error", "error": "None of the requested symbols is supported.",
               "subscriptionsAfterUpdate": [], "rejectedSubscriptions": junk}
        src._handle_ack("ticker", junk, ack, " (live)")
    assert len(src.stats.rejected_symbols) == 100
    assert "ticker:JUNK9-49" in src.stats.rejected_symbols
    assert "ticker:JUNK0-0" not in src.stats.rejected_symbols
    assert src.snapshot().rejected_symbols == 100


def test_the_rate_limit_lets_a_burst_through_then_spaces_requests() -> None:
    now = [0.0]
    bucket = RateLimit(5.0, clock=lambda: now[0])
    assert bucket.burst == 10
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    # callers over the rate are not refused: each waits its turn, in order
    assert [round(bucket.reserve(), 6) for _ in range(3)] == [0.2, 0.4, 0.6]
    now[0] = 0.6  # the three waited; the bucket is empty again
    assert bucket.reserve() == pytest.approx(0.2)
    now[0] = 100.0  # a long quiet time refills the burst, no more
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve() > 0
    assert RateLimit(0.1).burst == 1.0
    with pytest.raises(ValueError, match="rate"):
        RateLimit(0)


class AckingConnection:
    """Stands for an open connection: every request is acknowledged ``ok``."""

    def __init__(self, src: AlenoSource) -> None:
        self.src = src
        self.sent: list[tuple[str, list[str], float]] = []

    async def ack(self, sio: object, event: str, symbols: list[str]) -> dict[str, Any]:
        self.sent.append((event, symbols, time.monotonic()))
        subscribed = self.src.stats.subscribed.setdefault("ticker", [])
        if event.startswith("subscribe"):
            subscribed.extend(s for s in symbols if s not in subscribed)
        else:
            subscribed[:] = [s for s in subscribed if s not in symbols]
        return {"status": "ok", "subscriptionsAfterUpdate": list(subscribed)}


async def test_live_requests_are_paced_per_connection_and_callers_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = source(max_subscribe_requests_per_s=40)
    conn = AckingConnection(src)
    monkeypatch.setattr(src, "_ack", conn.ack)
    src._live = object()  # type: ignore[assignment]
    started = time.monotonic()
    answers = await asyncio.gather(*(src.subscribe("ticker", [f"S{i}/USD"])
                                     for i in range(100)))
    elapsed = time.monotonic() - started
    assert all(r.status == SubscriptionStatus.ACCEPTED for a in answers for r in a.values())
    assert src.stats.live_requests == len(conn.sent) == 100
    # 80 at once, then 40 a second: never more than rate * t + burst by any time t
    for i, (_, _, at) in enumerate(conn.sent):
        assert i + 1 <= 40 * (at - started) + 80 + 1
    assert elapsed >= (100 - 80) / 40 * 0.9 and src.rate_limit.waited_s > 0
    # unsubscribes are paced too; a symbol not subscribed costs no request
    await src.unsubscribe("ticker", ["S1/USD", "NOT-THERE"])
    assert src.stats.live_requests == 101


async def test_a_request_whose_connection_ended_while_it_waited_is_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = source(max_subscribe_requests_per_s=10)
    conn = AckingConnection(src)
    monkeypatch.setattr(src, "_ack", conn.ack)
    src._live = object()  # type: ignore[assignment]
    for _ in range(20):
        src.rate_limit.reserve()  # the burst is spent
    waiting = asyncio.create_task(src.subscribe("ticker", ["SOL/USD"]))
    await asyncio.sleep(0.01)
    src._live = None  # the connection dropped meanwhile
    assert (await waiting)["SOL/USD"].status == SubscriptionStatus.PENDING
    assert conn.sent == [] and "SOL/USD" in src.tickers  # issued on the next connect


# -- the pool: capacity, configured symbols asked past a learned limit, junk remembered ------


class FakeKey:
    """One key's upstream behind a pool connection: a universe, a limit, acks at once."""

    def __init__(self, src: AlenoSource, limit: int, universe: set[str]) -> None:
        self.src = src
        self.limit = limit
        self.universe = universe
        self.requests = 0
        src.subscribe = self.subscribe  # type: ignore[method-assign]
        src.unsubscribe = self.unsubscribe  # type: ignore[method-assign]

    async def subscribe(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        self.requests += 1
        have = self.src.stats.subscribed.setdefault(kind, [])
        out: dict[str, SubscriptionResult] = {}
        syms = normalize_symbols(symbols)
        new = [s for s in syms if s in self.universe and s not in have]
        total = sum(len(v) for v in self.src.stats.subscribed.values())
        for s in syms:
            if s not in self.universe:
                out[s] = SubscriptionResult(SubscriptionStatus.REJECTED, "unsupported symbol")
            elif s in have:
                out[s] = SubscriptionResult(SubscriptionStatus.ACCEPTED)
            elif total + len(new) > self.limit:
                out[s] = SubscriptionResult(SubscriptionStatus.LIMIT, LIMIT)
            else:
                out[s] = SubscriptionResult(SubscriptionStatus.ACCEPTED)
        if total + len(new) <= self.limit:
            have.extend(new)
            self.src._set_desired(kind, add=new)
        # as the source does: what was refused leaves the desired set
        self.src._set_desired(kind, remove=[s for s, r in out.items() if not r.held])
        return out

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        self.requests += 1
        syms = normalize_symbols(symbols)
        have = self.src.stats.subscribed.setdefault(kind, [])
        have[:] = [s for s in have if s not in syms]
        self.src._set_desired(kind, remove=syms)
        return dict.fromkeys(syms, SubscriptionResult(SubscriptionStatus.ACCEPTED))


UNIVERSE = {f"T{i}/USD" for i in range(20)}


def test_the_pool_knows_its_capacity_only_when_every_usable_limit_is_known() -> None:
    cfg = SourceConfig.model_validate({})
    pool = UpstreamPool(cfg, [UpstreamKey("a", None, 4), UpstreamKey("b", None, 3)],
                        lambda e, p: None)
    assert pool.capacity() == 7
    pool._connections[1].failed = "refused"
    assert pool.capacity() == 4
    unknown = UpstreamPool(cfg, [UpstreamKey("a", None, 4), UpstreamKey("b", None)],
                           lambda e, p: None)
    assert unknown.capacity() is None


async def test_the_pool_answers_a_symbol_rejected_lately_without_asking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None)],
                        lambda e, p: None)
    key = FakeKey(pool.sources[0], 10, UNIVERSE)
    now = [0.0]
    pool.clock = lambda: now[0]
    first = await pool.subscribe("ticker", ["nope/usd", "T1/USD"])
    assert first["NOPE/USD"].status == SubscriptionStatus.REJECTED and key.requests == 1
    again = await pool.subscribe("ticker", ["NOPE/USD"])
    assert again["NOPE/USD"].status == SubscriptionStatus.REJECTED
    assert "rejected it within the last 600s" in (again["NOPE/USD"].error or "")
    assert key.requests == 1  # no request
    assert (await pool.pin("ticker", ["NOPE/USD"]))["NOPE/USD"].status == \
        SubscriptionStatus.REJECTED and key.requests == 1
    now[0] = REJECTED_TTL_S + 1  # forgotten after a while: asked again
    await pool.subscribe("ticker", ["NOPE/USD"])
    assert key.requests == 2
    # bounded: the oldest are forgotten first
    monkeypatch.setattr(upstream_module, "MAX_REJECTED_CACHE", 5)
    for i in range(20):
        await pool.subscribe("ticker", [f"JUNK{i}"])
    assert pool.known_unsupported() == 5
    requests = key.requests
    await pool.subscribe("ticker", ["JUNK19", "JUNK0"])
    assert key.requests == requests + 1  # JUNK19 remembered, JUNK0 forgotten


async def test_configured_symbols_are_asked_past_a_learned_limit_leases_are_not() -> None:
    pool = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None)],
                        lambda e, p: None)
    key = FakeKey(pool.sources[0], 3, UNIVERSE)
    assert pool.capacity() is None
    await pool.subscribe("ticker", ["T1/USD", "T2/USD", "T3/USD"])
    refused = await pool.subscribe("ticker", ["T4/USD"])
    assert refused["T4/USD"].status == SubscriptionStatus.LIMIT
    assert pool.capacity() == 3  # learned
    key.limit = 4  # e.g. another process on the key released a slot
    requests = key.requests
    assert (await pool.subscribe("ticker", ["T4/USD"]))["T4/USD"].status == \
        SubscriptionStatus.LIMIT and key.requests == requests
    assert (await pool.pin("ticker", ["T4/USD"]))["T4/USD"].status == \
        SubscriptionStatus.ACCEPTED and key.requests == requests + 1
    assert pool.capacity() == 4  # the upstream took more: the learned limit follows
    # a configured limit holds for configured symbols too
    capped = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None, 1)],
                          lambda e, p: None)
    fake = FakeKey(capped.sources[0], 10, UNIVERSE)
    await capped.pin("ticker", ["T1/USD"])
    assert (await capped.pin("ticker", ["T2/USD"]))["T2/USD"].status == \
        SubscriptionStatus.LIMIT and fake.requests == 1


async def test_with_one_key_symbols_a_connect_was_refused_are_told_as_unplaced() -> None:
    cfg = SourceConfig.model_validate({"tickers": ["T1/USD", "T2/USD", "T3/USD"]})
    pool = UpstreamPool(cfg, [UpstreamKey("default", None)], lambda e, p: None)
    src = pool.sources[0]
    told: list[tuple[str, list[str]]] = []
    pool.symbols.keeper = Keeper(unplaced=told)
    src.stats.subscribed = {"ticker": ["T1/USD", "T2/USD"]}
    assert src.on_limit is not None
    src.on_limit("ticker", ["T3/USD"])  # what the (re)connect subscription reports
    await asyncio.wait_for(asyncio.gather(*pool._tasks), 5)
    assert told == [("ticker", ["T3/USD"])]
    assert pool.unplaced["ticker"] == frozenset({"T3/USD"})
    assert src.tickers == ["T1/USD", "T2/USD"]  # not re-issued on every reconnect
    assert pool.capacity() == 2 and pool.wanted is src.wanted
    pool.set_unplaced({"ticker": []})
    assert pool.unplaced["ticker"] == frozenset()


# -- limits learned from whole-request refusals, re-checked; placement across kinds -------

EQUITIES = {f"E{i}" for i in range(10)}


def keys_of(pool: UpstreamPool, *limits: int) -> list[FakeKey]:
    """Each connection of ``pool`` behind a :class:`FakeKey` of that limit, live."""
    out = []
    for src, limit in zip(pool.sources, limits, strict=True):
        src._live = object()  # type: ignore[assignment]
        out.append(FakeKey(src, limit, UNIVERSE | EQUITIES))
    return out


def held(src: AlenoSource) -> int:
    return sum(len(v) for v in src.stats.subscribed.values())


async def test_a_request_refused_whole_is_split_and_the_limit_learned_from_one_symbol() -> None:
    cfg = SourceConfig.model_validate({"tickers": ["T1/USD", "T2/USD"]})
    pool = UpstreamPool(cfg, [UpstreamKey("b", None)], lambda e, p: None)
    (key,) = keys_of(pool, 3)
    await pool.subscribe("ticker", ["T1/USD", "T2/USD"])
    requests = key.requests
    # the key holds 2 of 3: the request for 2 equities is refused whole, then split
    answer = await pool.subscribe("equity", ["E1", "E2"])
    assert answer["E1"].status == SubscriptionStatus.ACCEPTED
    assert answer["E2"].status == SubscriptionStatus.LIMIT
    assert key.requests == requests + 3  # [E1, E2] refused, [E1] taken, [E2] refused
    snap = pool.connection_snapshots()[0]
    assert snap.limit == 3 and snap.limit_learned and pool.capacity() == 3  # not 2
    # full: a lease is refused without a request
    assert (await pool.subscribe("equity", ["E3"]))["E3"].status == SubscriptionStatus.LIMIT
    assert key.requests == requests + 3


async def test_splitting_costs_a_bounded_number_of_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None)],
                        lambda e, p: None)
    (key,) = keys_of(pool, 7)
    wanted = sorted(UNIVERSE)  # 20 symbols, room for 7
    answer = await pool.subscribe("ticker", wanted)
    took = [s for s, r in answer.items() if r.status == SubscriptionStatus.ACCEPTED]
    assert len(took) == 7 and held(pool.sources[0]) == 7
    assert {r.status for s, r in answer.items() if s not in took} == {SubscriptionStatus.LIMIT}
    # the refused request, then at most two requests per halving
    assert key.requests <= 1 + 2 * math.ceil(math.log2(len(wanted)))
    assert pool.capacity() == 7
    # the split never goes deeper than its bound: what the key holds is then only a
    # lower bound of its limit, re-checked by the next request
    monkeypatch.setattr(upstream_module, "MAX_SPLIT_DEPTH", 1)
    other = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None)],
                         lambda e, p: None)
    (fake,) = keys_of(other, 2)
    await other.subscribe("ticker", ["T1/USD"])
    answer = await other.subscribe("ticker", [s for s in wanted if s != "T1/USD"][:8])
    assert {r.status for r in answer.values()} == {SubscriptionStatus.LIMIT}
    assert fake.requests == 1 + 2  # refused, then the first half of 4 refused: stop
    snap = other.connection_snapshots()[0]
    assert snap.limit == 1 and snap.limit_learned and other.capacity() is None


async def test_a_connect_refused_for_the_limit_places_what_fits_across_kinds() -> None:
    # the case: two keys of 4 (limits not configured), 5 tickers + 3 equities
    tickers = [f"T{i}/USD" for i in range(5)]
    equities = ["E0", "E1", "E2"]
    cfg = SourceConfig.model_validate({"tickers": tickers, "equities": equities})
    pool = UpstreamPool(cfg, [UpstreamKey("a", None), UpstreamKey("b", None)],
                        lambda e, p: None)
    a, b = pool.sources
    assert a.tickers == tickers and a.equities == equities  # unknown limits: a takes all
    key_a, key_b = keys_of(pool, 4, 4)
    # what a's (re)connect subscription met: the 5 tickers refused whole, the 3
    # equities taken; told once the connection is live
    a.stats.subscribed = {"ticker": [], "equity": list(equities)}
    assert a.on_limit is not None
    a.on_limit("ticker", list(tickers))
    await asyncio.wait_for(asyncio.gather(*pool._tasks), 5)
    # a room of 1 left on a took 1 ticker (split), the other 4 went to b
    assert held(a) == 4 and held(b) == 4
    assert set(a.stats.subscribed["equity"]) == set(equities)
    assert pool.wanted == {"ticker": frozenset(tickers), "equity": frozenset(equities)}
    assert pool.unplaced == {"ticker": frozenset(), "equity": frozenset()}
    snaps = {c.name: c for c in pool.connection_snapshots()}
    assert snaps["a"].limit == 4 and snaps["a"].limit_learned
    assert len(a.tickers) == 1 and len(b.tickers) == 4
    assert set(a.tickers) | set(b.tickers) == set(tickers)
    assert key_a.requests <= 1 + 2 * math.ceil(math.log2(5)) and key_b.requests == 1


async def test_a_ninth_symbol_is_unplaced_and_told() -> None:
    tickers = [f"T{i}/USD" for i in range(6)]
    cfg = SourceConfig.model_validate({"tickers": tickers, "equities": ["E0", "E1", "E2"]})
    pool = UpstreamPool(cfg, [UpstreamKey("a", None), UpstreamKey("b", None)],
                        lambda e, p: None)
    told: list[tuple[str, list[str]]] = []
    pool.symbols.keeper = Keeper(unplaced=told)
    a, b = pool.sources
    keys_of(pool, 4, 4)
    a.stats.subscribed = {"ticker": [], "equity": ["E0", "E1", "E2"]}
    assert a.on_limit is not None
    a.on_limit("ticker", list(tickers))
    await asyncio.wait_for(asyncio.gather(*pool._tasks), 5)
    assert held(a) == 4 and held(b) == 4
    assert len(told) == 1 and told[0][0] == "ticker" and len(told[0][1]) == 1
    assert pool.unplaced == {"ticker": frozenset(told[0][1]), "equity": frozenset()}
    assert pool.capacity() == 8
    assert pool.source_of("ticker", told[0][1][0]) is None


async def test_configured_limits_pack_jointly_across_kinds() -> None:
    cfg = SourceConfig.model_validate({"tickers": [f"T{i}/USD" for i in range(5)],
                                       "equities": ["E0", "E1", "E2"]})
    pool = UpstreamPool(cfg, [UpstreamKey("a", None, 4), UpstreamKey("b", None, 4)],
                        lambda e, p: None)
    a, b = pool.sources
    assert a.desired_count() == b.desired_count() == 4
    assert b.equities == ["E0", "E1", "E2"]
    assert pool.unplaced == {"ticker": frozenset(), "equity": frozenset()}


async def test_a_learned_limit_is_rechecked_after_an_unsubscribe_a_reconnect_and_in_time(
) -> None:
    pool = UpstreamPool(SourceConfig.model_validate({}), [UpstreamKey("a", None)],
                        lambda e, p: None)
    (key,) = keys_of(pool, 3)
    now = [0.0]
    pool.clock = lambda: now[0]
    src = pool.sources[0]
    told: list[bool] = []
    pool.symbols.keeper = Keeper(rooms=told)
    await pool.subscribe("ticker", ["T1/USD", "T2/USD", "T3/USD"])
    assert (await pool.subscribe("ticker", ["T4/USD"]))["T4/USD"].status == \
        SubscriptionStatus.LIMIT
    assert pool.capacity() == 3
    key.limit = 6  # another process on the key left: the learned limit is stale
    requests = key.requests
    assert (await pool.subscribe("ticker", ["T4/USD"]))["T4/USD"].status == \
        SubscriptionStatus.LIMIT and key.requests == requests  # not re-checked yet

    # an unsubscribe frees room: the next request may go past the learned limit
    await pool.unsubscribe("ticker", ["T1/USD"])
    assert pool.capacity() is None  # being re-checked
    answer = await pool.subscribe("ticker", ["T4/USD", "T5/USD", "T6/USD", "T7/USD"])
    assert [r.status for r in answer.values()] == [SubscriptionStatus.ACCEPTED] * 4
    assert held(src) == 6 and pool.capacity() == 6

    # on reconnect
    key.limit = 7
    src.stats.connects += 1
    assert pool.capacity() is None
    src_link = src.on_link
    assert src_link is not None
    src_link(True, "")  # data flows on the new connection: the subscriptions are told
    assert told == [True]
    assert (await pool.subscribe("ticker", ["T8/USD", "T9/USD"]))["T8/USD"].status == \
        SubscriptionStatus.ACCEPTED
    assert pool.capacity() == 7  # T9/USD refused alone: exact again

    # and after RECHECK_S
    key.limit = 8
    assert pool.capacity() == 7
    now[0] += upstream_module.RECHECK_S
    assert pool.capacity() is None
    assert (await pool.subscribe("ticker", ["T9/USD"]))["T9/USD"].status == \
        SubscriptionStatus.ACCEPTED and pool.capacity() == 8
