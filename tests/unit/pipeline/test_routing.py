"""Routing: globs, excludes, templates, safe-token rules, gates, cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bridge.config import ConfigError, RouteConfig, parse_config
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router, matches, placeholder_values
from bridge.sinks import Drivers, Message, Sink
from bridge.testing import MemorySink
from bridge.testing.sample import equity_record, ticker_record

T = 1_732_480_000_000


class Collector:
    def __init__(self, name: str, safe: Callable[[str], str] = lambda v: v) -> None:
        self.name = name
        self.format = "cloudevents-json"
        self.safe_token = safe
        self.got: list[Message] = []

    def offer(self, m: Message) -> Any:
        self.got.append(m)
        return None


def route(**kw: Any) -> RouteConfig:
    return RouteConfig.model_validate(kw)


def events(*symbols: str, t: int = T, price: float = 1.0) -> list[Any]:
    n = Normalizer(clock=lambda: t)
    out = []
    for s in symbols:
        if "/" in s:
            out += n.tickers([ticker_record(s, price, t)])
        else:
            out += n.equities([equity_record(s, price, t)])
    return out


def test_globs_kind_and_exclude() -> None:
    m = route(sinks=["a"], match={"kind": "ticker", "symbols": ["BTC/*", "eth/usd"],
                                  "exclude": ["*/EUR"]}).match
    assert matches(m, "ticker", "BTC/USD")
    assert matches(m, "ticker", "ETH/USD")
    assert not matches(m, "ticker", "BTC/EUR")
    assert not matches(m, "equity", "BTC/USD")
    assert not matches(m, "ticker", "SOL/USD")


def test_placeholders() -> None:
    assert placeholder_values("ticker", "BTC/USD") == {"kind": "ticker", "symbol": "BTC/USD",
                                                      "base": "BTC", "quote": "USD"}
    assert placeholder_values("equity", "AAPL")["quote"] == ""


def test_each_matching_route_delivers_to_each_of_its_sinks_with_rendered_topic() -> None:
    a, b = Collector("a", lambda v: v.replace("/", "_")), Collector("b")
    r = Router([
        route(sinks=["a", "b"], match={"kind": "ticker"}, topic="p.{kind}.{symbol}",
              key="{base}"),
        route(sinks=["b"], match={"symbols": ["AAPL"]}, topic="eq/{symbol}"),
    ], {"a": a, "b": b})
    for ev in events("BTC/USD", "AAPL", "TSLA"):
        r.dispatch(ev)
    assert [(m.topic, m.key) for m in a.got] == [("p.ticker.BTC_USD", "BTC")]
    assert [m.topic for m in b.got] == ["p.ticker.BTC/USD", "eq/AAPL"]
    assert r.unrouted == 1  # TSLA


def test_route_compilation_is_cached_per_kind_and_symbol() -> None:
    a = Collector("a")
    r = Router([route(sinks=["a"])], {"a": a})
    first = r.hits("ticker", "BTC/USD")
    assert r.hits("ticker", "BTC/USD") is first


def test_on_change_skips_equal_prices_per_symbol() -> None:
    a = Collector("a")
    r = Router([route(sinks=["a"], publish="on_change")], {"a": a})
    for t, p in ((T, 1.0), (T + 1000, 1.0), (T + 2000, 2.0), (T + 3000, 2.0), (T + 4000, 1.0)):
        for ev in events("AAPL", "MSFT", t=t, price=p):
            r.dispatch(ev)
    assert [(m.event.symbol, m.event.price) for m in a.got] == [
        ("AAPL", 1.0), ("MSFT", 1.0), ("AAPL", 2.0), ("MSFT", 2.0), ("AAPL", 1.0), ("MSFT", 1.0)]
    assert r.filtered == {("route0", "unchanged"): 4}


def test_a_forgotten_symbol_starts_afresh_in_its_gates() -> None:
    """A symbol unsubscribed (lease end, reload) and subscribed again is not
    "unchanged" from its price before: the router forgets its gates with it."""
    a = Collector("a")
    r = Router([route(sinks=["a"], publish="on_change", min_interval_s=0.5)], {"a": a})
    for ev in events("AAPL", "MSFT", t=T, price=1.0):
        r.dispatch(ev)
    r.forget("equity", ["AAPL"])
    for ev in events("AAPL", "MSFT", t=T + 1000, price=1.0):
        r.dispatch(ev)
    assert [(m.event.symbol, m.event.sent_ms - T) for m in a.got] == [
        ("AAPL", 0), ("MSFT", 0), ("AAPL", 1000)]
    assert r.filtered == {("route0", "unchanged"): 1}
    r.forget("equity", ["NEVER-SEEN"])  # nothing to forget: no error


def test_the_market_tells_the_router_what_it_forgets() -> None:
    from bridge.app import Bridge

    settings = parse_config("sinks: {mem: {driver: memory}}\nhttp: {enabled: false}\n",
                            env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, with_source=False, http=False)
    bridge.router.hits("ticker", "BTC/USD")
    assert ("ticker", "BTC/USD") in bridge.router._cache
    bridge.market.forget("ticker", ["BTC/USD"])
    assert ("ticker", "BTC/USD") not in bridge.router._cache


def test_min_interval_limits_each_symbol() -> None:
    a = Collector("a")
    r = Router([route(sinks=["a"], min_interval_s=2.5, name="slow")], {"a": a})
    for i in range(6):
        for ev in events("AAPL", t=T + i * 1000):
            r.dispatch(ev)
    assert [m.event.sent_ms - T for m in a.got] == [0, 3000]
    assert r.filtered == {("slow", "min_interval"): 4}


class StrictSink(MemorySink):
    @classmethod
    def safe_token(cls, value: str) -> str:
        return value.replace("/", "_").replace(".", "_")

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        if "#" in topic:
            return "'#' is a wildcard"
        return super().check_topic(topic)


def test_a_template_that_can_never_be_valid_is_a_startup_error() -> None:
    d = Drivers(injected={"strict": StrictSink})
    with pytest.raises(ConfigError) as err:
        parse_config("sinks: {s: {driver: strict}}\nroutes: [{sinks: [s], topic: 'a.#.{symbol}'}]",
                     env={}, drivers=d)
    assert "routes[0].topic:" in err.value.problems[0]
    assert "'#' is a wildcard" in err.value.problems[0]


def test_safe_token_rule_is_applied_to_configured_symbols_at_startup() -> None:
    d = Drivers(injected={"strict": StrictSink})
    s = parse_config("source: {equities: [BRK.B]}\nsinks: {s: {driver: strict}}\n"
                     "routes: [{sinks: [s], topic: 'eq.{symbol}'}]", env={}, drivers=d)
    st = StrictSink("s")
    w = Collector("s", st.safe_token)
    r = Router(s.routes, {"s": w})
    for ev in events("BRK.B"):
        r.dispatch(ev)
    assert w.got[0].topic == "eq.BRK_B"


def test_driver_must_implement_the_contract() -> None:
    class Half(Sink[Any]):  # type: ignore[type-var]
        async def connect(self) -> None: ...

    d = Drivers(injected={"half": Half})
    assert d.names() == []
    with pytest.raises(ImportError, match="does not implement"):
        d.get("half")
