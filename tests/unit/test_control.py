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
from bridge.control import (
    Control,
    QueryError,
    SnapshotQuery,
    parse_query,
    query_from_json,
    query_from_params,
)
from bridge.envelope import Event
from bridge.http import make_app
from bridge.market import LastValues
from bridge.normalize import Normalizer
from bridge.sinks import Drivers
from bridge.testing import MemorySink
from bridge.testing.sample import T0_MS, equity_record, ticker_record

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
    return Control(Host(values, settings(extra)))


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
    assert [i for p in pages for i in p["items"]] == full
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
    c = control(filled(evs))
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
