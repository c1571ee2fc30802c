"""OHLC bars: the builder's rules one by one, the ``bars`` section, the routing of bars
(``match: {kind: bar}``, ``{interval}``, ``{feed}``), the last final bar in the cache and
``/v1/snapshot?kind=bar``, the reload rule, and a bridge that builds and publishes them
(``tests/unit/pipeline/test_bars_property.py`` holds the builder to a reference).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from bridge.app import Bridge
from bridge.config import ConfigError, Settings, parse_config
from bridge.config.reload import restart_needed
from bridge.config.schema_bars import interval_label, interval_ms
from bridge.control.core import Control
from bridge.control.requests import QueryError, parse_cursor, parse_query
from bridge.core import kinds, templates
from bridge.core.envelope import Event
from bridge.core.metrics import BAR_LATE_UPDATES, BARS, BARS_OPEN, TOTAL
from bridge.pipeline.bars import PRUNE_EVERY_MS, BarBuilder, BarEvent
from bridge.pipeline.lastvalues import LastValues, monotonic_ms
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.pipeline.status import StatusEvent
from bridge.sinks import Drivers, Message
from bridge.testing import MemorySink, wait_until
from bridge.testing.sample import ticker_record

T0 = 1_732_480_020_000  # a whole minute
HOLE = 1_900  # the hole threshold at the default cadence (1.9 x 1 s)


def ev(symbol: str, sent: int, price: float, feed: str = "ticker") -> Event:
    return Event(feed, symbol, symbol, "", sent, sent + 5, "", {"price": price}, None, (price,))


def builder(*intervals: tuple[str, int], grace: int = 0, since: int = T0 - 60_000,
            **kw: Any) -> BarBuilder:
    return BarBuilder(list(intervals) or [("1s", 1000)], grace_ms=grace,
                      hole_ms=lambda: HOLE, now_ms=since, **kw)


def finals(b: BarBuilder, now: int) -> dict[tuple[str, int], dict[str, Any]]:
    return {(e.data["symbol"], e.data["start"]): e.data for e in b.close(now)}


def test_a_bar_covers_its_aligned_interval_by_send_time() -> None:
    b = builder(("1m", 60_000), ("1s", 1000))
    # the first update: before it the bridge saw nothing (a gap, see below)
    b.add("ticker", [ev("BTC/USD", T0 - 900, 9.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 10, 10.0), ev("ETH/USD", T0 + 20, 1.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 400, 12.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 900, 8.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 999, 11.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 1000, 11.5)])  # the next second
    # a bar is final once the bridge's clock passed its end (+ grace), not before,
    # whatever was sent meanwhile
    before = {e.data["start"]: e.data for e in b.close(T0 + 999) if e.data["interval"] == "1s"}
    assert list(before) == [T0 - 1000] and before[T0 - 1000]["gap"]
    out = finals(b, T0 + 1000)
    bar = out[("BTC/USD", T0)]
    assert (bar["open"], bar["high"], bar["low"], bar["close"], bar["count"]) == (
        10.0, 12.0, 8.0, 11.0, 4)
    assert (bar["start"], bar["end"], bar["interval"], bar["feed"]) == (
        T0, T0 + 1000, "1s", "ticker")
    assert (bar["firstSentMs"], bar["lastSentMs"], bar["final"], bar["gap"]) == (
        T0 + 10, T0 + 999, True, False)
    assert out[("ETH/USD", T0)]["gap"] is True  # its first update: the start unseen
    # the minute bar is open until the minute ends
    assert ("BTC/USD", T0) not in {(d["symbol"], d["start"]) for d in
                                   (e.data for e in b.close(T0 + 59_999))
                                   if d["interval"] == "1m"}
    minute = {(d["symbol"], d["interval"]): d
              for d in (e.data for e in b.close(T0 + 60_000))}[("BTC/USD", "1m")]
    assert (minute["open"], minute["close"], minute["count"], minute["gap"]) == (
        10.0, 11.5, 5, True)  # ETH aside: BTC fell silent for the rest of the minute


def test_the_envelope_of_a_bar() -> None:
    b = builder(("1s", 1000))
    b.add("equity", [ev("AAPL", T0 - 300, 1.0, "equity")])
    b.add("equity", [ev("AAPL", T0 + 5, 2.0, "equity")])
    (first, bar) = b.close(T0 + 1500)
    assert isinstance(bar, BarEvent)
    env = orjson.loads(bar.encoded("cloudevents-json").body)
    assert env["type"] == "ai.aleno.bar.v1" and env["subject"] == "AAPL"
    assert env["id"] == f"bar:equity:AAPL:1s:{T0}"
    assert env["time"] == "2024-11-24T20:27:00.000Z"  # the bar's start
    assert env["data"]["kind"] == "bar" and env["data"]["feed"] == "equity"
    binary = bar.encoded("cloudevents-binary")
    assert binary.attributes["type"] == "ai.aleno.bar.v1"
    assert bar.header.type == "ai.aleno.bar.v1" and bar.header.kind == "bar"
    assert bar.key == "AAPL@1s" and first.id == f"bar:equity:AAPL:1s:{T0 - 1000}"


def test_updates_are_taken_in_send_order_and_late_ones_are_counted() -> None:
    b = builder(("1s", 1000), ("1m", 60_000), grace=200)
    b.add("ticker", [ev("BTC/USD", T0 + 100, 1.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 100, 5.0)])  # the same update again
    b.add("ticker", [ev("BTC/USD", T0 + 50, 5.0)])  # older than the newest taken
    assert b.ignored == {"duplicate": 1, "out_of_order": 1}
    assert finals(b, T0 + 1199) == {}  # within the grace: open
    (bar,) = finals(b, T0 + 1200).values()
    assert (bar["count"], bar["high"]) == (1, 1.0)
    # newer than anything taken, but its second is final: late for 1s, taken for 1m
    b.add("ticker", [ev("BTC/USD", T0 + 700, 3.0)])
    assert b.counts()["late"] == {"1s": 1, "1m": 0}
    minute = finals(b, T0 + 60_200)[("BTC/USD", T0)]
    assert (minute["count"], minute["high"], minute["close"]) == (2, 3.0, 3.0)
    assert b.counts()["final"] == {"1s": 1, "1m": 1}


def test_no_update_no_bar_and_a_hole_marks_the_bars_it_touches() -> None:
    b = builder(("1s", 1000))
    for t in range(0, 3000, 500):  # every half second: no hole
        b.add("ticker", [ev("BTC/USD", T0 + t, 1.0 + t)])
    b.add("ticker", [ev("BTC/USD", T0 + 2600, 2.0)])  # 100 ms later: fine
    b.add("ticker", [ev("BTC/USD", T0 + 6700, 3.0)])  # 4.1 s later: a hole
    out = finals(b, T0 + 8000)
    assert sorted(s - T0 for _, s in out) == [0, 1000, 2000, 6000]  # no bar for 3, 4, 5
    # the two around the hole; the first is whole: its first update is its first ms
    assert [out[("BTC/USD", T0 + s)]["gap"] for s in (0, 1000, 2000, 6000)] == [
        False, False, True, True]


def test_an_upstream_outage_is_a_hole_however_short() -> None:
    b = builder(("1s", 1000))
    b.add("ticker", [ev("BTC/USD", T0 - 500, 1.0), ev("ETH/USD", T0 - 500, 1.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 100, 1.0), ev("ETH/USD", T0 + 100, 1.0)])
    b.statuses([StatusEvent("stale", "ETH/USD", T0, {"feed": "ticker"}, "s")])  # no hole
    b.add("ticker", [ev("BTC/USD", T0 + 400, 1.0)])
    b.statuses([StatusEvent("down", "upstream", T0, {"reason": "x"}, "s")])
    b.add("ticker", [ev("BTC/USD", T0 + 500, 1.0), ev("ETH/USD", T0 + 1500, 1.0)])
    out = finals(b, T0 + 5000)
    assert out[("BTC/USD", T0)]["gap"] is True  # 400 -> 500 straddles the outage
    assert out[("ETH/USD", T0)]["gap"] is True and out[("ETH/USD", T0 + 1000)]["gap"]
    assert out[("BTC/USD", T0)]["count"] == 3


def test_a_hole_marks_a_bar_only_if_it_misses_one_of_its_milliseconds() -> None:
    b = builder(("1s", 1000))
    down = StatusEvent("down", "upstream", T0, {"reason": "x"}, "s")
    b.add("ticker", [ev("BTC/USD", T0 - 1000, 1.0), ev("ETH/USD", T0 - 1000, 1.0)])
    b.add("ticker", [ev("BTC/USD", T0 - 500, 1.0), ev("ETH/USD", T0 - 500, 1.0)])
    b.add("ticker", [ev("BTC/USD", T0 - 1, 1.0), ev("ETH/USD", T0 + 10, 1.0)])
    b.statuses([down])  # BTC: its second's last ms was seen; ETH: 1 ms after, 2 ms after
    b.add("ticker", [ev("BTC/USD", T0 + 1500, 1.0), ev("ETH/USD", T0 + 11, 1.0)])
    b.statuses([down])
    b.add("ticker", [ev("ETH/USD", T0 + 13, 1.0)])
    out = finals(b, T0 + 5000)
    assert out[("BTC/USD", T0 - 1000)]["gap"] is False  # T0 - 1 .. T0 + 1500: none of it
    assert out[("BTC/USD", T0 + 1000)]["gap"] is True
    assert out[("ETH/USD", T0)]["gap"] is True  # 11 -> 13 across an outage: 12 missed


def test_partial_bars_have_ids_of_their_own() -> None:
    b = builder(("1s", 1000), partial=True)
    (p1,) = b.add("ticker", [ev("BTC/USD", T0 + 1, 1.0)]) or []
    (p2,) = b.add("ticker", [ev("BTC/USD", T0 + 2, 2.0)]) or []
    assert p1.data["final"] is False and (p1.data["count"], p2.data["count"]) == (1, 2)
    assert p2.id == f"bar:ticker:BTC/USD:1s:{T0}:partial:2" != p1.id
    (final,) = b.close(T0 + 1000)
    assert final.id == f"bar:ticker:BTC/USD:1s:{T0}" and final.data["close"] == 2.0


def test_a_symbol_silent_for_long_is_forgotten_and_starts_afresh() -> None:
    b = builder(("1s", 1000))
    b.add("ticker", [ev("BTC/USD", T0, 1.0)])
    b.close(T0 + PRUNE_EVERY_MS + 5_000)
    assert b.symbols()["ticker"] == 0
    b.add("ticker", [ev("BTC/USD", T0, 1.0)])  # that update again: its second is final
    assert b.counts()["late"] == {"1s": 1}
    t = T0 + PRUNE_EVERY_MS + 5_100
    b.add("ticker", [ev("BTC/USD", t, 2.0)])
    assert finals(b, t + 1000)[("BTC/USD", t - t % 1000)]["gap"] is True


def test_only_the_configured_kinds_and_symbols_make_bars() -> None:
    b = builder(("1s", 1000), kinds=["ticker"], symbols=["btc/*"])
    b.add("ticker", [ev("BTC/USD", T0, 1.0), ev("ETH/USD", T0, 1.0)])
    assert b.add("equity", [ev("AAPL", T0, 1.0, "equity")]) is None
    assert [e.symbol for e in b.close(T0 + 1000)] == ["BTC/USD"]


# -- the bars section -----------------------------------------------------------------


def config(text: str) -> Settings:
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(text)
    return info.value.problems


def test_intervals_are_a_number_and_a_unit_in_their_canonical_spelling() -> None:
    assert [interval_ms(t) for t in ("500ms", "1s", "90s", "5m", "1h", "1d")] == [
        500, 1000, 90_000, 300_000, 3_600_000, 86_400_000]
    assert [interval_label(ms) for ms in (500, 1000, 60_000, 90_000, 7_200_000)] == [
        "500ms", "1s", "1m", "90s", "2h"]
    s = config("sinks: {m: {driver: memory}}\nbars: {}\n")
    assert s.config.bars is not None and s.config.bars.intervals == ["1s", "1m", "5m", "1h"]
    assert (s.config.bars.grace_ms, s.config.bars.partial) == (500, False)
    s = config("sinks: {m: {driver: memory}}\nbars: {intervals: [1h, 60s, 1500ms]}\n")
    assert s.config.bars is not None and s.config.bars.intervals == ["1500ms", "1m", "1h"]
    assert problems("sinks: {m: {driver: memory}}\nbars: {intervals: [1m, 60s]}\n") == [
        "bars.intervals: 1m is listed twice (intervals are compared in their canonical "
        "spelling: 60s is 1m)"]
    found = problems("sinks: {m: {driver: memory}}\n"
                     "bars: {intervals: [5x, 10ms, 2d], grace_ms: -1, kinds: [status]}\n")
    assert [p.split(":")[0] for p in found] == [
        "bars.intervals[0]", "bars.intervals[1]", "bars.intervals[2]", "bars.grace_ms",
        "bars.kinds[0]"]


def test_what_routes_ask_of_bars_is_checked_at_its_path() -> None:
    found = problems("""
sinks:
  m: {driver: memory}
  c: {driver: memory, buffer: {when_full: conflate}}
routes:
  - {match: {kind: bar}, sinks: [m, c], topic: "bars.{interval}.{symbol}"}
  - {sinks: [m], topic: "p.{interval}"}
  - {match: {kind: status}, sinks: [m], topic: "s.{feed}", key: "{interval}"}
""")
    assert [p.split(":")[0] for p in found] == [
        "routes[0].match.kind", "routes[0].sinks[1]", "routes[1].topic", "routes[2].topic",
        "routes[2].key"]
    assert "conflate" in found[1] and "final bar" in found[1]
    assert "only bar events have it, not prices" in found[2]


def test_a_change_of_bars_needs_a_restart() -> None:
    base = "sinks: {m: {driver: memory}}\nhttp: {enabled: false}\n"
    old, new = config(base + "bars: {}\n"), config(base + "bars: {grace_ms: 900}\n")
    assert restart_needed(old, new) == ["bars"]
    assert restart_needed(old, config(base)) == ["bars"]
    assert restart_needed(old, config(base + "bars: {}\n")) == []


def test_the_templates_spell_the_kinds_as_kinds_does() -> None:
    assert templates.PRICE_KINDS == kinds.PRICE_KINDS and templates.BAR_KIND == kinds.BAR_KIND


# -- routing, the cache, the snapshot -------------------------------------------------


class Collector:
    name = "c"
    format = "cloudevents-json"

    def __init__(self) -> None:
        self.got: list[Message] = []

    @staticmethod
    def safe_token(v: str) -> str:
        return v.replace("/", "-")

    def offer(self, m: Message) -> None:
        self.got.append(m)


def test_bars_are_routed_only_by_bar_routes_with_their_interval_and_feed() -> None:
    s = config("""
sinks: {c: {driver: memory}}
bars: {intervals: [1s, 1m]}
routes:
  - {sinks: [c], topic: "prices.{feed}.{symbol}"}
  - {match: {kind: bar, symbols: ["BTC/*"]}, sinks: [c], topic: "bars.{feed}.{interval}.{symbol}",
     key: "{symbol}@{interval}", min_interval_s: 30}
""")
    sink = Collector()
    router = Router(s.routes, {"c": sink})
    b = builder(("1s", 1000), ("1m", 60_000))
    events = [ev("BTC/USD", T0 + 1, 1.0), ev("ETH/USD", T0 + 1, 1.0)]
    b.add("ticker", events)
    for e in [*events, *b.close(T0 + 60_000)]:
        router.dispatch(e)
    assert [(m.topic, m.key) for m in sink.got] == [
        ("prices.ticker.BTC-USD", "BTC/USD"), ("prices.ticker.ETH-USD", "ETH/USD"),
        ("bars.ticker.1s.BTC-USD", "BTC/USD@1s"), ("bars.ticker.1m.BTC-USD", "BTC/USD@1m")]
    assert router.unrouted == 2  # ETH's bars: no route selects them
    # a gate is kept per interval: the 1m bar starting with the 1s bar that passed is not
    # held back by it, the next 1s bar is
    sink.got.clear()
    b.add("ticker", [ev("BTC/USD", T0 + 60_001, 2.0), ev("BTC/USD", T0 + 61_001, 2.0)])
    for e in [*b.close(T0 + 62_000), *b.close(T0 + 120_000)]:
        router.dispatch(e)
    assert [m.topic for m in sink.got] == ["bars.ticker.1s.BTC-USD", "bars.ticker.1m.BTC-USD"]
    assert router.filtered == {("route1", "min_interval"): 1}


def test_the_last_final_bar_of_each_interval_is_cached_and_served() -> None:
    values = LastValues()
    norm = Normalizer(clock=lambda: T0)
    (price,) = norm.tickers([ticker_record("BTC/USD", 5.0, T0)])
    values.put(price)
    b = builder(("1s", 1000), ("1m", 60_000))
    b.add("ticker", [ev("BTC/USD", T0 + 1, 1.0), ev("ETH/USD", T0 + 2, 2.0)])
    b.add("ticker", [ev("BTC/USD", T0 + 1001, 3.0)])
    for e in [*b.close(T0 + 1000), *b.close(T0 + 60_000)]:
        values.put_bar(e.key, e, monotonic_ms())
    later = b.close(T0 + 2000)  # nothing newer for BTC's second: the cache keeps 1001's
    assert later == [] and len(values) == 1  # bars are not prices
    assert values.symbols("bar") == ["BTC/USD@1m", "BTC/USD@1s", "ETH/USD@1m", "ETH/USD@1s"]
    assert values.select("bar", ["btc/*"]) == ["BTC/USD@1m", "BTC/USD@1s"]
    assert values.select("bar", ["*@1m"]) == ["BTC/USD@1m", "ETH/USD@1m"]
    control = Control(values, lambda: config("sinks: {m: {driver: memory}}"))
    reply = orjson.loads(control.answer(parse_query("bar", ["BTC/USD"], limit=1)).body)
    assert reply["next"] == "bar:BTC/USD@1m"
    (item,) = reply["items"]
    assert item["event"]["data"]["interval"] == "1m" and item["event"]["data"]["count"] == 2
    rest = orjson.loads(control.answer(parse_query("bar", ["BTC/USD"],
                                                   after=reply["next"])).body)
    assert [i["event"]["id"] for i in rest["items"]] == [f"bar:ticker:BTC/USD:1s:{T0 + 1000}"]
    everything = orjson.loads(control.snapshot().body)  # "*" is prices only
    assert [i["event"]["subject"] for i in everything["items"]] == ["BTC/USD"]
    assert parse_cursor("bar:btc/usd@1M") == ("bar", "BTC/USD@1m")
    with pytest.raises(QueryError, match="ticker, equity, \\* or bar"):
        parse_query("bars")
    values.forget("ticker", ["BTC/USD"])
    assert values.symbols("bar") == ["ETH/USD@1m", "ETH/USD@1s"]


# -- a bridge that builds bars --------------------------------------------------------


async def test_a_bridge_publishes_final_bars_caches_them_and_counts_them() -> None:
    s = config("""
sinks: {mem: {driver: memory, batch: {linger_ms: 0}}}
bars: {intervals: [100ms, 1h], grace_ms: 0}
routes:
  - {match: {kind: bar}, sinks: [mem], topic: "bars.{interval}.{symbol}"}
http: {enabled: false}
""")
    sink = MemorySink("mem")
    bridge = Bridge(s, sinks={"mem": sink}, with_source=False)
    await bridge.start()
    try:
        norm = Normalizer()
        now = time.time_ns() // 1_000_000
        if now % 3_600_000 > 3_590_000:  # the hour's bar must stay open until the end
            await asyncio.sleep((3_600_000 - now % 3_600_000) / 1000)
            now = time.time_ns() // 1_000_000
        sent = now - now % 100 + 20
        for i in range(3):
            bridge.ingest(norm.tickers([ticker_record("BTC/USD", 10.0 + i, sent + i)]))
        await wait_until(lambda: any(m.topic == "bars.100ms.BTC/USD" for m in sink.received),
                         5, "the 100 ms bar published")
        bar = orjson.loads(next(m.body for m in sink.received
                                if m.topic == "bars.100ms.BTC/USD"))
        assert (bar["data"]["open"], bar["data"]["close"], bar["data"]["count"]) == (
            10.0, 12.0, 3)
        assert bridge.last_values.get("bar", "BTC/USD@100ms") is not None
        text = _exposition(bridge)
        assert f'{BARS}{TOTAL}{{gap="true",interval="100ms"}} 1.0' in text
        assert f'{BAR_LATE_UPDATES}{TOTAL}{{interval="1h"}} 0.0' in text
        assert f"{BARS_OPEN} 1.0" in text  # the hour's bar
        assert not any(m.event.kind == "bar" and "partial" in m.event.id
                       for m in sink.received)
    finally:
        await bridge.shutdown()
    # the hour's bar was not final at the shutdown: not published
    assert [m.topic for m in sink.received] == ["bars.100ms.BTC/USD"]


def _exposition(bridge: Bridge) -> str:
    from prometheus_client import generate_latest

    return generate_latest(bridge.registry).decode()
