"""``aleno-bridge tap``: its own options, its filters, and where each event goes."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest

from bridge.app import Bridge
from bridge.cli.tap import DiscardSink, Tap, TapOptions
from bridge.config import ConfigError, Settings, parse_config
from bridge.core.envelope import Event
from bridge.core.state import Destination
from bridge.sinks import Drivers
from bridge.testing import MemorySink, sample_events, wait_until

DRIVERS = Drivers(injected={"memory": MemorySink})
CONFIG = """
sinks: {a: {driver: memory, batch: {linger_ms: 0}}, b: {driver: memory, batch: {linger_ms: 0}}}
routes:
  - {name: crypto, match: {kind: ticker}, sinks: [a, b], topic: "t.{base}"}
  - {match: {kind: equity}, sinks: [b], topic: "e.{symbol}"}
"""


def settings() -> Settings:
    return parse_config(CONFIG, env={}, drivers=DRIVERS)


def event() -> Event:
    return sample_events(symbols=1, updates=1)[0]


def test_filters_must_name_a_route_and_a_sink_of_the_configuration() -> None:
    s = settings()
    TapOptions(route="crypto", sink="b").check(s)
    TapOptions(route="route1").check(s)
    with pytest.raises(ConfigError) as err:
        TapOptions(route="nope", sink="c").check(s)
    assert list(err.value.problems) == [
        "--route: no route named 'nope' (routes: crypto, route1)",
        "--sink: no sink named 'c' (sinks: a, b)",
    ]


def test_a_tap_prints_what_passes_its_filters_until_its_limit() -> None:
    out = io.StringIO()
    done: list[bool] = []
    where = [Destination("crypto", "a", "t.T0", "T0/USD"),
             Destination("crypto", "b", "t.T0", "T0/USD")]
    lookups: list[tuple[str, str]] = []

    def destinations(kind: str, symbol: str) -> list[Destination]:
        lookups.append((kind, symbol))
        return where if len(lookups) > 1 else where[:1]

    tap = Tap(TapOptions(sink="b", limit=2), destinations, out,
              on_done=lambda: done.append(True))
    tap(event())  # not to sink b: not shown
    tap(event())
    assert not done
    tap(event())
    tap(event())  # after the limit: ignored
    lines = [orjson.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 2 and done == [True]
    assert lookups[0] == ("ticker", "T0/USD")
    assert lines[0]["to"] == [{"route": "crypto", "sink": "b", "topic": "t.T0",
                               "key": "T0/USD"}]
    assert lines[0]["envelope"]["subject"] == "T0/USD"


def test_without_filters_every_event_is_shown() -> None:
    out = io.StringIO()
    Tap(TapOptions(), lambda kind, symbol: [], out)(event())
    assert orjson.loads(out.getvalue())["to"] == []


async def test_a_tap_sees_events_with_their_destinations_and_publishes_nothing() -> None:
    s = settings()
    out = io.StringIO()
    discard = {n: DiscardSink(n, DiscardSink.options_model()) for n in s.sinks}
    bridge = Bridge.from_settings(s, sinks=discard, http=False)
    assert bridge.source is not None  # built, never started here
    bridge.add_tap(Tap(TapOptions(), bridge.destinations, out))
    await bridge.start()
    try:
        bridge.ingest(sample_events(symbols=1, updates=1))
        await wait_until(lambda: out.getvalue(), 5, "the tap saw the event")
        assert orjson.loads(out.getvalue())["to"] == [
            {"route": "crypto", "sink": "a", "topic": "t.T0", "key": "T0/USD"},
            {"route": "crypto", "sink": "b", "topic": "t.T0", "key": "T0/USD"},
        ]
        assert bridge.destinations("equity", "AAPL") == (
            Destination("route1", "b", "e.AAPL", "AAPL"),)
    finally:
        await bridge.shutdown()


def test_a_bridge_without_http_leaves_the_settings_alone() -> None:
    s = settings()
    assert s.config.http.enabled
    bridge = Bridge.from_settings(s, sinks={"a": MemorySink("a"), "b": MemorySink("b")},
                                  http=False)
    assert not bridge.serves_http and s.config.http.enabled
    assert Bridge.from_settings(s).serves_http


async def test_the_tap_stops_the_bridge_at_its_limit() -> None:
    s = settings()
    stop = asyncio.Event()
    out = io.StringIO()
    bridge = Bridge(s, sinks={"a": MemorySink("a"), "b": MemorySink("b")}, with_source=False,
                    http=False)
    bridge.add_tap(Tap(TapOptions(route="crypto", limit=1), bridge.destinations, out,
                       on_done=stop.set))
    task = asyncio.create_task(bridge.run(stop))
    await wait_until(lambda: bridge.alive(), 5, "running")
    bridge.ingest(sample_events(symbols=2, updates=1))
    await asyncio.wait_for(task, 10)
    assert len(out.getvalue().splitlines()) == 1
