"""The control surface's core: query parsing, globs, paging, ages, the spliced reply,
and the HTTP door's answers (``/v1/snapshot``)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from bridge.config import Settings, parse_config
from bridge.config.schema import LeaseConfig
from bridge.control.core import (
    Control,
    ControlError,
    LeaseRequest,
    QueryError,
    RenewRequest,
    SnapshotQuery,
    lease_from_json,
    parse_lease,
    parse_query,
    query_from_json,
    query_from_params,
    release_from_json,
    renew_from_json,
)
from bridge.control.http import make_app
from bridge.core.envelope import Event
from bridge.pipeline.market import LastValues
from bridge.pipeline.normalize import Normalizer
from bridge.sinks import Drivers
from bridge.testing import MemorySink
from bridge.testing.sample import T0_MS, equity_record, ticker_record
from bridge.upstream.client import SubscriptionResult, SubscriptionStatus
from bridge.upstream.sharding import shard_of
from bridge.upstream.subscriptions import Subscriptions

LIMIT_ERROR = "Subscription limit reached. Contact us to increase limits."
TICKERS = ["BTC/USD", "ETH/USD", "BTCB/USD", "SOL/USD", "DOGE/USD"]
EQUITIES = ["AAPL", "MSFT", "AMZN"]


def settings(extra: str = "") -> Settings:
    text = "sinks: {mem: {driver: memory}}\n" + extra
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


@dataclass
class Host:
    """What :class:`Control` reads: a real cache and real settings."""

    last_values: LastValues
    settings: Settings


def events(tickers: list[str] = TICKERS, equities: list[str] = EQUITIES,
           sent_ms: int = T0_MS) -> list[Event]:
    norm = Normalizer(clock=lambda: sent_ms + 7)
    out = norm.tickers([ticker_record(s, 100.0 + i, sent_ms) for i, s in enumerate(tickers)])
    out += norm.equities([equity_record(s, 50.0 + i, sent_ms) for i, s in enumerate(equities)])
    return out


def filled(evs: list[Event], received: float | None = None) -> LastValues:
    values = LastValues()
    for ev in evs:
        values.put(ev, received)
    return values


def control(values: LastValues, extra: str = "") -> Control:
    return Control.of(Host(values, settings(extra)))


def decode(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(body)
    return doc


# -- the query ---------------------------------------------------------------------


def test_parse_query_defaults_and_normalization() -> None:
    assert parse_query() == SnapshotQuery("*", None, None, None)
    q = parse_query("Ticker", ["btc/*, eth/usd", "BTC/*"], "ticker:btc/usd", "10")
    assert q == SnapshotQuery("ticker", ("BTC/*", "ETH/USD"), ("ticker", "BTC/USD"), 10)
    assert parse_query(symbols="aapl").symbols == ("AAPL",)


@pytest.mark.parametrize(("args", "parameter"), [
    ({"kind": "status"}, "kind"),
    ({"kind": "tickers"}, "kind"),
    ({"symbols": ["BTC/*,"]}, "symbols"),
    ({"symbols": [" "]}, "symbols"),
    ({"symbols": ["X" * 200]}, "symbols"),
    ({"symbols": [",".join(f"S{i}" for i in range(300))]}, "symbols"),
    ({"after": "BTC/USD"}, "after"),
    ({"after": "status:X"}, "after"),
    ({"limit": "0"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "ten"}, "limit"),
])
def test_parse_query_refuses_naming_the_parameter(args: dict[str, Any], parameter: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_query(**args)
    assert info.value.parameter == parameter
    assert decode(info.value.body())["parameter"] == parameter


def test_query_from_params_comma_separated_and_repeated() -> None:
    q = query_from_params(MultiDict([("symbols", "BTC/*,eth/usd"), ("symbols", "AAPL"),
                                     ("kind", "*")]))
    assert q.symbols == ("BTC/*", "ETH/USD", "AAPL")
    assert q.kind == "*"
    with pytest.raises(QueryError) as info:
        query_from_params(MultiDict([("symbol", "BTC/USD")]))
    assert info.value.parameter == "symbol"
    with pytest.raises(QueryError) as info:
        query_from_params(MultiDict([("kind", "ticker"), ("kind", "equity")]))
    assert info.value.parameter == "kind"


def test_query_from_json() -> None:
    assert query_from_json(b"") == SnapshotQuery()
    assert query_from_json(b"  \n") == SnapshotQuery()
    q = query_from_json(b'{"kind": "equity", "symbols": ["a*"], "limit": 2}')
    assert q == SnapshotQuery("equity", ("A*",), None, 2)
    assert query_from_json(b'{"symbols": "BTC/*,ETH/*"}').symbols == ("BTC/*", "ETH/*")
    for body, parameter in [(b"[1]", "body"), (b"{", "body"), (b'{"kinds": "x"}', "kinds"),
                            (b'{"limit": true}', "limit"), (b'{"limit": "3"}', "limit"),
                            (b'{"symbols": 3}', "symbols"), (b'{"symbols": [3]}', "symbols"),
                            (b'{"after": 3}', "after")]:
        with pytest.raises(QueryError) as info:
            query_from_json(body)
        assert info.value.parameter == parameter, body


# -- the reply ---------------------------------------------------------------------


def test_full_snapshot_is_json_and_splices_the_cached_envelopes() -> None:
    evs = events()
    c = control(filled(evs))
    reply = c.snapshot()
    doc = decode(reply.body)
    assert doc["shard"] is None
    assert doc["next"] is None
    assert doc["count"] == reply.count == len(evs)
    by_key = {(ev.kind, ev.symbol): ev for ev in evs}
    keys = [(item["event"]["data"]["kind"], item["event"]["subject"]) for item in doc["items"]]
    # tickers, then equities, each by symbol
    assert keys == sorted(by_key, key=lambda k: (k[0] != "ticker", k[1]))
    for item in doc["items"]:
        ev = by_key[(item["event"]["data"]["kind"], item["event"]["subject"])]
        assert item["event"] == orjson.loads(ev.encoded("cloudevents-json").body)
        assert isinstance(item["ageMs"], int)
        assert item["ageMs"] >= 0
    # the cached bytes appear verbatim: nothing was re-encoded
    for ev in evs:
        assert ev.encoded("cloudevents-json").body in reply.body


def test_the_latest_value_wins() -> None:
    values = filled(events(["BTC/USD"], []))
    newer = events(["BTC/USD"], [], sent_ms=T0_MS + 1000)
    values.put(newer[0])
    doc = decode(control(values).snapshot().body)
    assert [i["event"]["id"] for i in doc["items"]] == [newer[0].id]


def test_kind_and_globs_select() -> None:
    c = control(filled(events()))

    def subjects(**kw: Any) -> list[str]:
        q = parse_query(**kw)
        return [i["event"]["subject"] for i in decode(c.answer(q).body)["items"]]

    assert subjects(kind="ticker", symbols=["BTC/*"]) == ["BTC/USD"]
    assert subjects(kind="ticker", symbols=["BTC*"]) == ["BTC/USD", "BTCB/USD"]
    assert subjects(symbols=["btc/usd,aapl"]) == ["BTC/USD", "AAPL"]
    assert subjects(kind="equity") == ["AAPL", "AMZN", "MSFT"]
    assert subjects(kind="equity", symbols=["BTC/*"]) == []
    assert subjects(symbols=["?APL", "[EM]*"]) == ["ETH/USD", "AAPL", "MSFT"]
    assert subjects(symbols=["NOPE/*"]) == []
    empty = decode(c.answer(parse_query(symbols=["NOPE"])).body)
    assert empty == {"shard": None, "count": 0, "items": [], "next": None}


def test_age_is_how_long_ago_the_value_arrived() -> None:
    values = filled(events(), received=time.monotonic() - 1.5)
    doc = decode(control(values).snapshot().body)
    ages = [item["ageMs"] for item in doc["items"]]
    assert all(1500 <= a < 3000 for a in ages), ages


def test_shard_is_named_in_the_reply() -> None:
    c = control(filled(events()), "source: {shard: {index: 1, count: 3}}\n")
    assert decode(c.snapshot().body)["shard"] == {"index": 1, "count": 3}


def _pages(c: Control, max_bytes: int | None = None, limit: int | None = None,
           **kw: Any) -> list[bytes]:
    out = []
    after = None
    while True:
        reply = c.snapshot(after=after, max_bytes=max_bytes, limit=limit, **kw)
        out.append(reply.body)
        if reply.next is None:
            return out
        assert reply.count > 0
        after = reply.next


def test_limit_and_after_page_through_everything() -> None:
    evs = events()
    c = control(filled(evs))
    full = decode(c.snapshot().body)["items"]
    pages = [decode(b) for b in _pages(c, limit=3)]
    assert [p["count"] for p in pages] == [3, 3, 2]
    # the same envelopes in the same order (ageMs is read from the clock at each call:
    # a millisecond may pass between two calls)
    paged = [i for p in pages for i in p["items"]]
    assert [i["event"] for i in paged] == [i["event"] for i in full]
    assert all(0 <= i["ageMs"] < 5_000 for i in paged)
    assert pages[0]["next"] == "ticker:DOGE/USD"
    assert pages[1]["next"] == "equity:AAPL"
    # a cursor past the end is an empty last page; one between symbols resumes there
    assert decode(c.snapshot(after="equity:ZZZ").body)["items"] == []
    resumed = decode(c.snapshot(after="ticker:BTC/UZZ").body)["items"]
    assert [i["event"]["subject"] for i in resumed][:2] == ["BTCB/USD", "DOGE/USD"]
    after_tickers = decode(c.snapshot(after="ticker:ZZZ").body)["items"]
    assert [i["event"]["subject"] for i in after_tickers] == ["AAPL", "AMZN", "MSFT"]
    # a symbol that vanished between two pages does not break the cursor
    assert decode(c.snapshot(after=("equity", "AAPM")).body)["items"][0]["event"]["subject"] \
        == "AMZN"
    assert decode(c.snapshot("equity", after="ticker:SOL/USD").body)["count"] == 3


def test_max_bytes_pages_fit_and_add_up_exactly() -> None:
    evs = events([f"SYM{i:03d}/USD" for i in range(40)], [f"EQ{i:02d}" for i in range(10)])
    # received 5 s ago: every ageMs has 4 digits for seconds, so the size of a reply
    # does not change between two calls a millisecond apart
    c = control(filled(evs, time.monotonic() - 5.0))
    full_body = c.snapshot().body
    full = decode(full_body)["items"]
    # exactly the size of the whole reply: one page; one byte less: two pages
    assert len(_pages(c, max_bytes=len(full_body))) == 1
    assert len(_pages(c, max_bytes=len(full_body) - 1)) == 2
    for max_bytes in (1200, 2000, 3333, 5000, 8192, len(full_body) // 2):
        pages = _pages(c, max_bytes=max_bytes)
        assert all(len(p) <= max_bytes for p in pages), max_bytes
        items = [i for p in pages for i in decode(p)["items"]]
        for got, want in zip(items, full, strict=True):
            assert got["event"] == want["event"]
        # each page is as full as it can be: the next item would not have fitted
        for page, nxt in itertools.pairwise(pages):
            first = orjson.dumps(decode(nxt)["items"][0])
            assert len(page) + len(first) + 1 > max_bytes - 40
    # a page too small for one item still makes progress with one item
    tiny = _pages(c, max_bytes=100)
    assert [decode(p)["count"] for p in tiny] == [1] * len(full)


def test_snapshot_of_10000_symbols_takes_milliseconds() -> None:
    values = filled(events([f"SYM{i:04d}/USD" for i in range(10_000)], []))
    c = control(values)
    c.snapshot()
    best = min(_timed(c.snapshot) for _ in range(5))
    doc = decode(c.snapshot().body)
    assert doc["count"] == 10_000
    assert best < 0.1, best  # generous on a loaded CI machine; the bench measures it


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the HTTP door -------------------------------------------------------------------


class Observed:
    """A bridge's HTTP face with a control surface (or none)."""

    def __init__(self, ctl: Control | None) -> None:
        self.control = ctl
        self.http_config = settings().config.http
        from prometheus_client import CollectorRegistry
        self.registry = CollectorRegistry()

    def alive(self) -> bool:
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return True, {}


async def test_http_snapshot_answers_queries_and_refuses_bad_ones() -> None:
    c = control(filled(events()))
    async with TestClient(TestServer(make_app(Observed(c)))) as client:
        resp = await client.get("/v1/snapshot")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = decode(await resp.read())
        assert doc["count"] == len(events())
        assert [i["event"] for i in doc["items"]] == \
            [i["event"] for i in decode(c.snapshot().body)["items"]]
        resp = await client.get("/v1/snapshot?kind=ticker&symbols=BTC/*,eth/usd")
        assert [i["event"]["subject"] for i in decode(await resp.read())["items"]] == \
            ["BTC/USD", "ETH/USD"]
        resp = await client.get("/v1/snapshot?symbols=AAPL&symbols=SOL/*")
        assert [i["event"]["subject"] for i in decode(await resp.read())["items"]] == \
            ["SOL/USD", "AAPL"]
        resp = await client.get("/v1/snapshot?limit=2")
        page = decode(await resp.read())
        assert page["count"] == 2
        assert page["next"] == "ticker:BTCB/USD"
        resp = await client.get("/v1/snapshot", params={"after": page["next"], "limit": "100"})
        assert decode(await resp.read())["count"] == len(events()) - 2
        for query, parameter in [("kind=status", "kind"), ("symbols=", "symbols"),
                                 ("symbols=a,,b", "symbols"), ("limit=x", "limit"),
                                 ("after=nope", "after"), ("symbol=BTC/USD", "symbol")]:
            resp = await client.get(f"/v1/snapshot?{query}")
            assert resp.status == 400, query
            body = decode(await resp.read())
            assert body["parameter"] == parameter, query
            assert parameter in body["error"]


async def test_http_snapshot_is_404_without_a_control_surface() -> None:
    async with TestClient(TestServer(make_app(Observed(None)))) as client:
        resp = await client.get("/v1/snapshot")
        assert resp.status == 404
        assert "control" in decode(await resp.read())["error"]
        assert (await client.get("/healthz")).status == 200


# -- leases: the requests ------------------------------------------------------------


def test_parse_lease_normalizes_and_defaults() -> None:
    req = parse_lease("Ticker", [" btc/usd", "ETH/USD", "BTC/USD"])
    assert req == LeaseRequest("ticker", ("BTC/USD", "ETH/USD"), None, "")
    req = lease_from_json(b'{"kind": "equity", "symbols": ["aapl"], "ttl_s": 5,'
                          b' "holder": "svc-a"}')
    assert req == LeaseRequest("equity", ("AAPL",), 5.0, "svc-a")
    assert renew_from_json(b"", "0.ab.cd") == RenewRequest("0.ab.cd", None)
    assert renew_from_json(b'{"ttl_s": 2.5}', "0.ab.cd") == RenewRequest("0.ab.cd", 2.5)
    assert renew_from_json(b'{"lease": "x", "ttl_s": 1}') == RenewRequest("x", 1.0)
    assert release_from_json(b'{"lease": " 0.ab.cd "}') == "0.ab.cd"
    for ttl in (float("inf"), float("nan")):
        with pytest.raises(QueryError, match="ttl_s"):
            parse_lease("ticker", ["A"], ttl)


@pytest.mark.parametrize(("body", "parameter"), [
    (b"", "body"),
    (b"[]", "body"),
    (b"{nope", "body"),
    (b'{"symbols": ["BTC/USD"]}', "kind"),
    (b'{"kind": "*", "symbols": ["BTC/USD"]}', "kind"),
    (b'{"kind": "status", "symbols": ["BTC/USD"]}', "kind"),
    (b'{"kind": "ticker"}', "symbols"),
    (b'{"kind": "ticker", "symbols": "BTC/USD"}', "symbols"),
    (b'{"kind": "ticker", "symbols": []}', "symbols"),
    (b'{"kind": "ticker", "symbols": [" "]}', "symbols"),
    (b'{"kind": "ticker", "symbols": [1]}', "symbols"),
    (b'{"kind": "ticker", "symbols": ["BTC/*"]}', "symbols"),
    (b'{"kind": "ticker", "symbols": ["' + b"X" * 65 + b'"]}', "symbols"),
    (orjson.dumps({"kind": "ticker", "symbols": [f"S{i}" for i in range(257)]}), "symbols"),
    (b'{"kind": "ticker", "symbols": ["A"], "ttl_s": 0}', "ttl_s"),
    (b'{"kind": "ticker", "symbols": ["A"], "ttl_s": -1}', "ttl_s"),
    (b'{"kind": "ticker", "symbols": ["A"], "ttl_s": "60"}', "ttl_s"),
    (b'{"kind": "ticker", "symbols": ["A"], "ttl_s": true}', "ttl_s"),
    (b'{"kind": "ticker", "symbols": ["A"], "holder": 7}', "holder"),
    (b'{"kind": "ticker", "symbols": ["A"], "holder": "' + b"h" * 65 + b'"}', "holder"),
    (b'{"kind": "ticker", "symbols": ["A"], "ttl": 60}', "ttl"),
])
def test_lease_request_errors_name_the_parameter(body: bytes, parameter: str) -> None:
    with pytest.raises(QueryError) as info:
        lease_from_json(body)
    assert info.value.parameter == parameter
    assert info.value.status == 400
    assert decode(info.value.body())["parameter"] == parameter


@pytest.mark.parametrize(("call", "parameter"), [
    (lambda: renew_from_json(b"{}"), "lease"),
    (lambda: renew_from_json(b'{"lease": 5}'), "lease"),
    (lambda: renew_from_json(b'{"lease": "a", "ttl_s": 0}'), "ttl_s"),
    (lambda: renew_from_json(b'{"lease": "a"}', "0.a.b"), "lease"),  # not in the HTTP body
    (lambda: renew_from_json(b"", "x" * 200), "lease"),
    (lambda: release_from_json(b'{"lease": "a", "ttl_s": 1}'), "ttl_s"),
    (lambda: release_from_json(b""), "body"),
])
def test_renew_and_release_errors_name_the_parameter(call: Any, parameter: str) -> None:
    with pytest.raises(QueryError) as info:
        call()
    assert info.value.parameter == parameter


# -- leases: the core ----------------------------------------------------------------


class BookUpstream:
    """An upstream of a fixed universe and a limit (the protocol the pool answers)."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.subs: dict[str, set[str]] = {"ticker": set(), "equity": set()}

    async def subscribe(self, kind: str, symbols: Any) -> dict[str, SubscriptionResult]:
        out: dict[str, SubscriptionResult] = {}
        for s in symbols:
            if s.startswith("NOPE"):
                out[s] = SubscriptionResult(SubscriptionStatus.REJECTED, "unsupported")
            elif sum(map(len, self.subs.values())) >= self.limit:
                out[s] = SubscriptionResult(SubscriptionStatus.LIMIT, LIMIT_ERROR)
            else:
                self.subs[kind].add(s)
                out[s] = SubscriptionResult(SubscriptionStatus.ACCEPTED)
        return out

    async def unsubscribe(self, kind: str, symbols: Any) -> dict[str, SubscriptionResult]:
        self.subs[kind].difference_update(symbols)
        return dict.fromkeys(symbols, SubscriptionResult(SubscriptionStatus.ACCEPTED))

    def subscribed(self) -> dict[str, frozenset[str]]:
        return {k: frozenset(v) for k, v in self.subs.items()}


@dataclass
class LeaseHost:
    last_values: LastValues
    settings: Settings
    subscriptions: Subscriptions | None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lease_control(values: LastValues | None = None, extra: str = "", limit: int = 3,
                  enabled: bool = True, clock: Clock | None = None,
                  ) -> tuple[Control, Subscriptions, BookUpstream]:
    upstream = BookUpstream(limit)
    subs = Subscriptions(upstream, LeaseConfig(enabled=enabled, max_ttl_s=100,
                                               default_ttl_s=30, grace_s=0),
                         clock=clock or Clock())
    ctl = Control.of(LeaseHost(values or LastValues(), settings(extra), subs))
    return ctl, subs, upstream


async def test_lease_reply_carries_statuses_and_cached_events() -> None:
    values = filled(events(), received=time.monotonic() - 0.25)
    ctl, subs, upstream = lease_control(values)
    answer = await ctl.lease("ticker", ["btc/usd", "NOPE/USD", "ETH/USD", "ZZZ/USD",
                                        "QQQ/USD"], ttl_s=500, holder="svc-a")
    doc = decode(answer.body)
    assert list(doc) == ["lease", "kind", "holder", "owner", "ttlS", "expiresInS", "symbols",
                         "shard"]
    assert doc["lease"] == answer.lease
    index, instance, internal = doc["lease"].split(".")
    assert (index, instance) == ("0", ctl.instance)
    assert subs.lease_ids() == [internal]
    assert doc["kind"] == "ticker" and doc["holder"] == "svc-a" and doc["shard"] is None
    assert doc["ttlS"] == 100.0 and doc["expiresInS"] == 100.0  # cut to max_ttl_s
    assert list(doc["symbols"]) == ["BTC/USD", "NOPE/USD", "ETH/USD", "ZZZ/USD", "QQQ/USD"]
    btc = doc["symbols"]["BTC/USD"]
    assert btc["status"] == "accepted" and btc["error"] is None
    # the cached envelope, byte for byte what a sink receives
    cached = values.get("ticker", "BTC/USD")
    assert cached is not None
    assert orjson.dumps(btc["event"]) == orjson.dumps(
        orjson.loads(cached.body))
    assert 200 <= btc["ageMs"] < 5000
    assert doc["symbols"]["NOPE/USD"] == {"status": "rejected", "error": "unsupported",
                                          "event": None, "ageMs": None}
    assert doc["symbols"]["ZZZ/USD"] == {"status": "accepted", "error": None,
                                         "event": None, "ageMs": None}
    assert doc["symbols"]["QQQ/USD"] == {"status": "limit", "error": LIMIT_ERROR,
                                         "event": None, "ageMs": None}
    assert upstream.subs["ticker"] == {"BTC/USD", "ETH/USD", "ZZZ/USD"}


async def test_a_lease_refused_for_every_symbol_has_no_id() -> None:
    ctl, subs, _ = lease_control(limit=0)
    answer = await ctl.lease("ticker", ["BTC/USD"])
    doc = decode(answer.body)
    assert answer.lease is None and doc["lease"] is None and doc["expiresInS"] is None
    assert doc["ttlS"] == 30.0
    assert doc["symbols"]["BTC/USD"]["status"] == "limit"
    assert subs.lease_ids() == []


async def test_renew_and_release_through_the_core() -> None:
    clock = Clock()
    ctl, subs, upstream = lease_control(clock=clock)
    lease = (await ctl.lease("equity", ["AAPL"], ttl_s=10)).lease
    assert lease is not None
    clock.now += 8
    doc = decode((await ctl.renew(lease, 20)).body)
    assert doc["lease"] == lease and doc["ttlS"] == 20.0 and doc["expiresInS"] == 20.0
    assert doc["symbols"] == {"AAPL": {"status": "accepted", "error": None, "event": None,
                                       "ageMs": None}}
    clock.now += 15  # past the first TTL, within the renewed one
    await ctl.release(lease)
    assert upstream.subs["equity"] == set()  # grace_s: 0
    for call in (ctl.renew(lease), ctl.release(lease)):
        with pytest.raises(ControlError) as info:
            await call
        assert info.value.status == 404 and info.value.parameter == "lease"
        assert lease in str(info.value)
    # a lease of another process, or of another shard, is not this one's
    other = f"0.{'0' * 8}.{lease.split('.')[2]}"
    assert not ctl.granted_here(other) and ctl.granted_here(lease)
    with pytest.raises(ControlError) as info:
        await ctl.renew(other)
    assert info.value.status == 404 and "another bridge process" in str(info.value)


async def test_leases_off_is_409_naming_the_option() -> None:
    for ctl in (lease_control(enabled=False)[0], control(LastValues())):
        for call in (ctl.lease("ticker", ["BTC/USD"]), ctl.renew("0.a.b"), ctl.release("0.a.b")):
            with pytest.raises(ControlError) as info:
                await call
            assert info.value.status == 409
            assert "source.leases.enabled" in str(info.value)


async def test_a_shard_leases_its_own_symbols_and_names_the_owner_of_the_others() -> None:
    symbols = [f"S{i}/USD" for i in range(12)]
    ctl, _, upstream = lease_control(extra="source: {shard: {index: 1, count: 3}}", limit=99)
    mine = {s for s in symbols if shard_of("ticker", s, 3) == 1}
    assert mine and len(mine) < len(symbols)
    answer = await ctl.lease("ticker", symbols)
    doc = decode(answer.body)
    assert answer.owned == len(mine) and answer.lease is not None
    assert answer.lease.startswith("1.")
    assert doc["shard"] == {"index": 1, "count": 3}
    for s in symbols:
        entry = doc["symbols"][s]
        if s in mine:
            assert entry["status"] == "accepted"
        else:
            assert entry == {"status": "error", "error":
                             f"owned by shard {shard_of('ticker', s, 3)} of 3",
                             "event": None, "ageMs": None}
    assert upstream.subs["ticker"] == mine
    # the broadcast door's form: other shards' symbols left out
    others = [s for s in symbols if s not in mine]
    answer = await ctl.lease("ticker", others, foreign="omit")
    assert answer.owned == 0 and answer.lease is None
    assert decode(answer.body)["symbols"] == {}
    # a lease id of shard 2 is answered with where it lives
    with pytest.raises(ControlError) as info:
        await ctl.release(f"2.{ctl.instance}.abc")
    assert info.value.status == 404 and "shard 2 of 3" in str(info.value)


# -- leases: the HTTP door -----------------------------------------------------------


async def test_http_lease_renew_release() -> None:
    values = filled(events())
    ctl, _, upstream = lease_control(values)
    async with TestClient(TestServer(make_app(Observed(ctl)))) as client:
        resp = await client.post("/v1/subscriptions", json={
            "kind": "ticker", "symbols": ["BTC/USD", "NEW/USD"], "ttl_s": 60,
            "holder": "svc-a"})
        assert resp.status == 200 and resp.content_type == "application/json"
        doc = decode(await resp.read())
        lease = doc["lease"]
        assert doc["symbols"]["BTC/USD"]["event"]["data"]["symbol"] == "BTC/USD"
        assert doc["symbols"]["NEW/USD"]["status"] == "accepted"
        resp = await client.post(f"/v1/subscriptions/{lease}/renew", json={"ttl_s": 5})
        assert resp.status == 200 and decode(await resp.read())["ttlS"] == 5.0
        resp = await client.post(f"/v1/subscriptions/{lease}/renew")  # no body: default
        assert resp.status == 200 and decode(await resp.read())["ttlS"] == 30.0
        resp = await client.delete(f"/v1/subscriptions/{lease}")
        assert resp.status == 204 and await resp.read() == b""
        assert upstream.subs["ticker"] == set()
        assert (await client.delete(f"/v1/subscriptions/{lease}")).status == 404
        resp = await client.post(f"/v1/subscriptions/{lease}/renew")
        assert resp.status == 404 and decode(await resp.read())["parameter"] == "lease"
        # all refused: still 200, the statuses are the answer
        resp = await client.post("/v1/subscriptions", json={"kind": "ticker",
                                                            "symbols": ["NOPE/USD"]})
        assert resp.status == 200 and decode(await resp.read())["lease"] is None
        for body, parameter in [({"kind": "ticker"}, "symbols"),
                                ({"kind": "ticker", "symbols": ["A"], "ttl_s": -1}, "ttl_s")]:
            resp = await client.post("/v1/subscriptions", json=body)
            assert resp.status == 400 and decode(await resp.read())["parameter"] == parameter
        resp = await client.post("/v1/subscriptions", data=b"x" * 70_000,
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 413
        resp = await client.post("/v1/subscriptions", data=b'{"kind": "ticker"}')
        assert resp.status == 415  # not declared as JSON


async def test_http_leases_off_and_no_control_surface() -> None:
    async with TestClient(TestServer(make_app(Observed(control(LastValues()))))) as client:
        resp = await client.post("/v1/subscriptions", json={"kind": "ticker",
                                                            "symbols": ["BTC/USD"]})
        assert resp.status == 409
        assert "source.leases.enabled" in decode(await resp.read())["error"]
    async with TestClient(TestServer(make_app(Observed(None)))) as client:
        assert (await client.delete("/v1/subscriptions/0.a.b")).status == 404
