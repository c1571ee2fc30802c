"""The bars' clock on a bridge's wiring: every final bar is cached, only the bars that
go somewhere (a route, a tap) are made events and emitted, and the bytes cached and
published are the event's own encoding (see ``tests/unit/pipeline/test_bars.py`` for
the builder's rules and a bridge that publishes bars)."""

from __future__ import annotations

import asyncio
import time

import orjson

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.core.envelope import Event
from bridge.pipeline.bars import BarEvent, final_body
from bridge.sinks import Drivers
from bridge.testing import MemorySink


def price(symbol: str, sent: int, value: float) -> Event:
    return Event("ticker", symbol, symbol.partition("/")[0], symbol.partition("/")[2],
                 sent, sent + 5, "", {"price": value}, None, (value,))


async def test_only_routed_final_bars_are_made_events_and_every_one_is_cached() -> None:
    settings = parse_config("""
sinks: {mem: {driver: memory}}
bars: {intervals: [100ms, 1h], grace_ms: 0}
routes:
  - {sinks: [mem], topic: "p.{symbol}"}
  - {match: {kind: bar, symbols: ["BTC/*"]}, sinks: [mem], topic: "b.{interval}.{symbol}"}
http: {enabled: false}
""", env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, sinks={"mem": MemorySink("mem")}, with_source=False)
    clock = bridge.dispatcher.bars
    assert clock is not None
    now = time.time_ns() // 1_000_000
    sent = now - now % 100 - 1_000  # a 100 ms bar that is final now
    clock.builder.add("ticker", [price("BTC/USD", sent + 1, 2.0),
                                 price("ETH/USD", sent + 2, 3.0)])
    router = bridge.router
    unrouted = router.unrouted
    emitted = clock.tick()
    # BTC's bar is selected by a route: an event; ETH's by none: only cached, counted
    assert [(e.symbol, e.interval) for e in emitted] == [("BTC/USD", "100ms")]
    assert router.unrouted == unrouted + 1
    for symbol in ("BTC/USD", "ETH/USD"):
        cached = bridge.last_values.get("bar", f"{symbol}@100ms")
        assert cached is not None
        assert cached.envelope()["data"]["symbol"] == symbol
        assert cached.sent_ms == sent - sent % 100
    # one encoding, shared by the cache and the sinks
    (bar,) = emitted
    body = bar.encoded("cloudevents-json").body
    cached = bridge.last_values.get("bar", "BTC/USD@100ms")
    assert cached is not None and cached.body is body
    # a tap sees every event: with one, the bars no route selects are made too
    bridge.add_tap(lambda _e: None)
    now = time.time_ns() // 1_000_000  # an update in the open 100 ms bar, made final
    clock.builder.add("ticker", [price("ETH/USD", now, 4.0)])
    await asyncio.sleep((100 - now % 100 + 5) / 1000)  # the bar's end (grace_ms 0)
    assert [e.symbol for e in clock.tick()] == ["ETH/USD"]


def test_the_body_made_without_the_event_is_the_events_own() -> None:
    start = 1_732_480_020_000
    for final_bar in ([start, start + 60_000, 1.5, 2.5, 0.5, 2.0, 7, start + 3, start + 59_000,
                       True, True, "BTC/USD", "ticker", "1m"],
                      [start, start + 1_000, 3.0, 3.0, 3.0, 3.0, 1, start, start, False,
                       False, "AAPL", "equity", "1s"]):
        event = BarEvent(final_bar, True, start + 61_000, "urn:test")
        expected = event.encoded("cloudevents-json").body
        assert final_body(final_bar, "urn:test") == expected
        assert orjson.loads(expected)["id"] == event.id
        header = event.header
        assert (header.base, header.quote) == (event.base, event.quote)
        assert (header.id, header.kind, header.symbol, header.price, header.time) == (
            event.id, "bar", event.symbol, event.price, event.time)
