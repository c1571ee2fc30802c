"""The bridge's upstream client against the real simulator, end to end."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Settings, parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers
from bridge.source import AuthError
from bridge.testing import MemorySink

pytestmark = pytest.mark.integration

KEY = "test-key"


def settings(sim: Simulator, key: str = KEY, extra_source: str = "",
             tickers: str = "[BTC/USD, ETH/USD]", equities: str = "[AAPL]") -> Settings:
    text = f"""
source:
  url: {sim.url}
  api_key: {key}
  tickers: {tickers}
  equities: {equities}
  stale_after_s: 2
  backoff: {{initial_s: 0.1, max_s: 0.5}}
  {extra_source}
sinks:
  mem: {{driver: memory, batch: {{linger_ms: 0}}}}
http: {{enabled: false}}
"""
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


async def test_prices_flow_end_to_end(simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(settings(simulator))
    await r.until(lambda: {m.event.symbol for m in r.sink.received} >= {"BTC/USD", "ETH/USD",
                                                                          "AAPL"}, 5)
    assert r.bridge.source.stats.acks == {"ok": 2}
    assert r.bridge.source.stats.subscribed == {"ticker": ["BTC/USD", "ETH/USD"],
                                                "equity": ["AAPL"]}
    ok, checks = r.bridge.readiness()
    assert ok, checks
    ev = r.sink.received[0].event
    assert ev.source == f"{simulator.url}/v1/socket"


async def test_header_only_auth_also_works(simulator: Simulator) -> None:
    # the simulator accepts either; the source sends both: prove the header path alone
    from bridge.source import AlenoSource

    got: list[Any] = []
    s = settings(simulator)
    src = AlenoSource(s.config.source, "other-key", lambda e, p: got.append(p))
    task = asyncio.create_task(src.run())
    deadline = time.monotonic() + 5
    while not got:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    src.stop()
    await asyncio.wait_for(task, 10)


async def test_rejected_symbols_are_named_once_across_reconnects(
    simulator: Simulator, run_bridge: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    r = run_bridge(settings(simulator, tickers="[BTC/USD, NOPE/USD]"))
    await r.until(lambda: r.bridge.source.stats.acks.get("partial", 0) >= 1)
    await simulator.kick()
    await r.until(lambda: r.bridge.source.stats.acks.get("partial", 0) >= 2)
    lines = [rec.getMessage() for rec in caplog.records if "NOPE/USD" in rec.getMessage()]
    assert len(lines) == 1, lines
    assert r.bridge.source.stats.rejected_symbols == {"ticker:NOPE/USD"}


async def test_limit_error_is_logged_and_counted(run_bridge: Any, caplog: Any) -> None:
    async with Simulator(port=0, api_keys=[KEY], max_subscriptions=2, interval=0.2) as sim:
        r = run_bridge(settings(sim, tickers="[BTC/USD, ETH/USD]", equities="[AAPL]"))
        await r.until(lambda: r.bridge.source.stats.acks.get("error", 0) >= 1)
        assert any("Subscription limit reached" in rec.getMessage() for rec in caplog.records)
        await r.until(lambda: any(m.event.symbol == "BTC/USD" for m in r.sink.received))
        r.stop.set()
        await asyncio.wait_for(r.task, 15)


async def test_simulator_restart_on_the_same_port_resumes_within_10s(run_bridge: Any) -> None:
    sim = Simulator(port=0, api_keys=[KEY], interval=0.2)
    await sim.start()
    port = sim.port
    r = run_bridge(settings(sim))
    try:
        await r.until(lambda: len(r.sink.received) > 3)
        await sim.stop()
        await asyncio.sleep(1.0)
        before = len(r.sink.received)
        sim = Simulator(port=port, api_keys=[KEY], interval=0.2)
        await sim.start()
        restarted = time.monotonic()
        await r.until(lambda: len(r.sink.received) > before + 3, 10)
        assert time.monotonic() - restarted < 10
        assert sim.subscriptions() == [({"BTC/USD", "ETH/USD"}, {"AAPL"})]
        assert r.bridge.source.stats.reconnects >= 1
    finally:
        await sim.stop()


async def test_server_side_disconnect_is_retried(simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(settings(simulator))
    await r.until(lambda: len(r.sink.received) > 0)
    await simulator.kick()
    n = len(r.sink.received)
    await r.until(lambda: len(r.sink.received) > n + 3, 10)
    assert r.bridge.source.stats.reconnects >= 1


async def test_watchdog_reconnects_a_silent_feed(simulator: Simulator, run_bridge: Any) -> None:
    r = run_bridge(settings(simulator))
    await r.until(lambda: len(r.sink.received) > 0)
    simulator.pause()
    await r.until(lambda: r.bridge.source.stats.watchdog_restarts >= 1, 8)
    assert not r.bridge.readiness()[0]
    simulator.resume()
    n = len(r.sink.received)
    await r.until(lambda: len(r.sink.received) > n, 8)
    await r.until(lambda: r.bridge.readiness()[0], 5)


async def test_malformed_records_are_counted_and_the_stream_goes_on(
    simulator: Simulator, run_bridge: Any
) -> None:
    r = run_bridge(settings(simulator))
    await r.until(lambda: len(r.sink.received) > 0)
    now = int(time.time() * 1000)
    await simulator.inject("new_token_states", [
        {"id": "BTC/USD", "aggregated": {"price": "NaN"}, "sentTimestampMs": now},
        {"aggregated": {"price": 1.0}, "sentTimestampMs": now},
        "garbage",
    ])
    await simulator.inject("new_equity_states", {"not": "an array"})
    await simulator.inject("new_equity_states", 17)
    await r.until(lambda: sum(r.bridge.normalizer.invalid.values()) >= 5)
    assert r.bridge.normalizer.invalid == {
        "ticker:non_numeric_price": 1, "ticker:missing_symbol": 1, "ticker:not_an_object": 1,
        "equity:missing_symbol": 1, "equity:not_an_array": 1,
    }
    n = len(r.sink.received)
    await r.until(lambda: len(r.sink.received) > n + 3)


async def test_bad_key_is_a_clear_error_after_bounded_attempts(
    simulator: Simulator, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    s = settings(simulator, key="wrong-secret-key", extra_source="max_auth_failures: 2")
    bridge = Bridge(s, sinks={"mem": MemorySink("mem")})
    started = time.monotonic()
    with pytest.raises(AuthError, match="refused the API key 2 time"):
        await asyncio.wait_for(bridge.run(asyncio.Event()), 15)
    assert time.monotonic() - started < 10
    assert all("wrong-secret-key" not in rec.getMessage() for rec in caplog.records)


async def test_the_api_key_never_reaches_the_logs(simulator: Simulator, run_bridge: Any,
                                                  caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("socketio", "engineio"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    r = run_bridge(settings(simulator))
    await r.until(lambda: len(r.sink.received) > 3)
    await simulator.kick()
    await r.until(lambda: r.bridge.source.stats.reconnects >= 1)
    text = "\n".join(f"{rec.name} {rec.getMessage()}" for rec in caplog.records)
    assert KEY not in text
    assert "upstream subscribed" in text


async def test_readiness_needs_a_price_on_the_current_connection(
    simulator: Simulator, run_bridge: Any
) -> None:
    r = run_bridge(settings(simulator))
    await r.until(lambda: r.bridge.readiness()[0])
    simulator.pause()
    await simulator.kick()
    # reconnected and subscribed, but no price yet on this connection: not ready
    await r.until(lambda: r.bridge.source.stats.reconnects >= 1
                  and r.bridge.source.stats.state == "subscribed")
    ok, checks = r.bridge.readiness()
    assert not ok and checks["upstream"]["seconds_since_update"] is None, checks
    simulator.resume()
    await r.until(lambda: r.bridge.readiness()[0], 5)
