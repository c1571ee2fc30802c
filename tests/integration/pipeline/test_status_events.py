"""Status events end to end: the real simulator pauses a symbol, drops updates and
drops the connection; the bridge says so on the bus (``ai.aleno.status.v1``)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from bridge.config import Settings, parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers, Message
from bridge.testing import MemorySink

pytestmark = pytest.mark.integration

STALE_S = 1.0
TICKERS = ["BTC/USD", "ETH/USD", "SOL/USD"]


def _settings(sim: Simulator) -> Settings:
    text = f"""
source:
  url: {sim.url}
  api_key: test-key
  tickers: [{", ".join(TICKERS)}]
  equities: [AAPL]
  symbol_stale_after_s: {STALE_S}
  update_interval_s: {sim.interval}
  backoff: {{initial_s: 0.1, max_s: 0.3}}
sinks:
  mem: {{driver: memory, batch: {{linger_ms: 0}}}}
routes:
  - {{sinks: [mem], topic: "prices.{{kind}}.{{symbol}}"}}
  - {{match: {{kind: status}}, sinks: [mem], topic: "status.{{symbol}}"}}
http: {{enabled: false}}
shutdown_timeout_s: 3
"""
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


def _status(sink: MemorySink, status: str | None = None,
            symbol: str | None = None) -> list[dict[str, Any]]:
    out = []
    for m in list(sink.received):
        if m.event.kind != "status":
            continue
        env = orjson.loads(m.body)
        data = env["data"]
        if (status is None or data["status"] == status) and \
                (symbol is None or env["subject"] == symbol):
            out.append(env)
    return out


def _prices(sink: MemorySink, symbol: str) -> list[Message]:
    return [m for m in list(sink.received) if m.event.kind != "status"
            and m.event.symbol == symbol]


async def test_a_paused_symbol_is_stale_once_then_fresh_and_no_other_symbol(
        simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(_settings(simulator))
    await r.until(lambda: all(len(_prices(r.sink, s)) >= 2 for s in TICKERS), 10)
    simulator.pause_symbols("ticker", ["BTC/USD"])
    paused_at = time.monotonic()
    await r.until(lambda: _status(r.sink, "stale"), STALE_S + 5)
    took = time.monotonic() - paused_at
    assert took <= STALE_S + 1.0, f"stale after {took:.2f}s"
    # the others keep flowing; wait another stale period to see nothing else comes
    seen = {s: len(_prices(r.sink, s)) for s in TICKERS}
    await r.until(lambda: all(len(_prices(r.sink, s)) > seen[s] + 3
                              for s in ("ETH/USD", "SOL/USD")), 5)
    stale = _status(r.sink, "stale")
    assert [e["subject"] for e in stale] == ["BTC/USD"]
    assert stale[0]["type"] == "ai.aleno.status.v1"
    assert stale[0]["data"]["lastPrice"] == orjson.loads(
        _prices(r.sink, "BTC/USD")[-1].body)["data"]["price"]
    simulator.resume_symbols("ticker", ["BTC/USD"])
    await r.until(lambda: _status(r.sink, "fresh"), 5)
    await r.until(lambda: len(_prices(r.sink, "BTC/USD")) > seen["BTC/USD"] + 2, 5)
    fresh = _status(r.sink, "fresh")
    assert [e["subject"] for e in fresh] == ["BTC/USD"]
    assert [e["subject"] for e in _status(r.sink, "stale")] == ["BTC/USD"]
    # the pause left a hole in BTC's send times: one gap names it, for BTC only
    assert {e["subject"] for e in _status(r.sink, "gap")} == {"BTC/USD"}
    assert r.bridge.snapshot().market is not None
    assert r.bridge.snapshot().market.stale == 0  # type: ignore[union-attr]


async def test_dropped_updates_give_a_gap_naming_the_missing_interval(
        simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(_settings(simulator))
    await r.until(lambda: len(_prices(r.sink, "ETH/USD")) >= 2, 10)
    simulator.drop("ticker", ["ETH/USD"], 3)
    await r.until(lambda: _status(r.sink, "gap", "ETH/USD"), 5)
    dropped = simulator.dropped("ticker", "ETH/USD")
    assert len(dropped) == 3
    (gap,) = _status(r.sink, "gap")
    data = gap["data"]
    step = simulator.interval * 1000
    assert data["lastSeenMs"] < dropped[0] and dropped[-1] < data["resumedMs"]
    assert abs(data["missingFromMs"] - dropped[0]) <= step / 2
    assert abs(data["missingToMs"] - dropped[-1]) <= step / 2
    assert data["missedUpdates"] == 3
    assert gap["id"] == f"status:gap:ticker:ETH/USD:{data['resumedMs']}"
    assert not _status(r.sink, "stale")


async def test_killing_the_upstream_gives_down_then_up(
        simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(_settings(simulator))
    await r.until(lambda: len(_prices(r.sink, "AAPL")) >= 2, 10)
    await simulator.kick()
    await r.until(lambda: _status(r.sink, "up"), 10)
    events = [e for e in _status(r.sink) if e["data"]["status"] in ("down", "up")]
    assert [e["data"]["status"] for e in events] == ["down", "up"]
    down, up = events
    assert down["subject"] == "upstream" and down["data"]["reason"]
    assert up["data"]["reason"] == down["data"]["reason"]
    assert up["data"]["outageMs"] >= 0
    assert down["id"].startswith("status:down:upstream:")
    # the outage was shorter than a stale period: no symbol went stale
    assert not _status(r.sink, "stale")
