"""The bridge's upstream client against the real simulator, end to end."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Settings, parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers
from bridge.testing import MemorySink
from bridge.upstream.client import (
    LIMIT_MARK,
    AlenoSource,
    AuthError,
    SubscriptionResult,
    SubscriptionStatus,
)

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
    from bridge.upstream.client import AlenoSource

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


# -- a live symbol set on one connection ----------------------------------------------------


def _stamps(got: list[tuple[str, Any]]) -> dict[str, list[int]]:
    """symbol -> the sentTimestampMs of every record received for it, in order."""
    out: dict[str, list[int]] = {}
    for event, payload in got:
        for rec in payload:
            sym = rec.get("id") if event == "new_token_states" else rec.get("symbol")
            out.setdefault(sym, []).append(rec["sentTimestampMs"])
    return out


async def test_100_symbols_added_live_cause_no_reconnect_and_no_missed_update() -> None:
    interval = 0.25
    async with Simulator(port=0, api_keys=[KEY], interval=interval, seed=1) as sim:
        got: list[tuple[str, Any]] = []
        s = settings(sim)
        src = AlenoSource(s.config.source, KEY, lambda e, p: got.append((e, p)))
        task = asyncio.create_task(src.run())
        try:
            deadline = time.monotonic() + 5
            while not (src.flowing and len(got) >= 4):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.02)
            connects = sim.connects[KEY]
            new_tickers = [t for t in sim.tickers if t not in src.tickers][:50]
            new_equities = [e for e in sim.equities if e not in src.equities][:50]
            await asyncio.sleep(interval * 2)
            before_ack = len(got)
            results = {**await src.subscribe("ticker", new_tickers),
                       **await src.subscribe("equity", [e.lower() for e in new_equities])}
            assert len(results) == 100
            assert {r.status for r in results.values()} == {SubscriptionStatus.ACCEPTED}
            assert "BTC/USD" in src.wanted["ticker"] and new_equities[0] in src.wanted["equity"]
            tickers, equities = sim.subscriptions()[0]
            assert tickers == {"BTC/USD", "ETH/USD", *new_tickers}
            assert equities == {"AAPL", *new_equities}
            # the new symbols flow on the same connection
            deadline = time.monotonic() + 2.5
            while not set(new_tickers + new_equities) <= set(_stamps(got[before_ack:])):
                assert time.monotonic() < deadline, "new symbols did not arrive within 2.5s"
                await asyncio.sleep(0.05)
            await asyncio.sleep(interval * 4)
            assert sim.connects[KEY] == connects and src.stats.connects == 1
            assert src.stats.reconnects == 0
            # the symbols that stayed missed no update: no hole in their sent times
            for sym, stamps in _stamps(got).items():
                if sym in ("BTC/USD", "ETH/USD", "AAPL"):
                    holes = [b - a for a, b in itertools.pairwise(stamps)]
                    assert max(holes) < 1.8 * interval * 1000, (sym, holes)
            # and unsubscribing them live stops them on the same connection
            gone = await src.unsubscribe("ticker", new_tickers[:25])
            assert {r.status for r in gone.values()} == {SubscriptionStatus.ACCEPTED}
            assert not set(new_tickers[:25]) & src.wanted["ticker"]
            after = len(got)
            assert sim.subscriptions()[0][0] == {"BTC/USD", "ETH/USD", *new_tickers[25:]}
            await asyncio.sleep(interval * 3)
            assert not set(new_tickers[:25]) & set(_stamps(got[after:]))
            assert sim.connects[KEY] == connects
        finally:
            src.stop()
            await asyncio.wait_for(task, 10)


async def test_a_change_while_disconnected_is_pending_and_applied_on_connect() -> None:
    sim = Simulator(port=0, api_keys=[KEY], interval=0.2)
    await sim.start()
    port = sim.port
    got: list[tuple[str, Any]] = []
    src = AlenoSource(settings(sim).config.source, KEY, lambda e, p: got.append((e, p)))
    task = asyncio.create_task(src.run())
    try:
        deadline = time.monotonic() + 5
        while not src.flowing:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await sim.stop()
        deadline = time.monotonic() + 5
        while src.live:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        added = await src.subscribe("ticker", ["SOL/USD"])
        removed = await src.unsubscribe("ticker", ["ETH/USD"])
        assert added == {"SOL/USD": SubscriptionResult(SubscriptionStatus.PENDING)}
        assert removed == {"ETH/USD": SubscriptionResult(SubscriptionStatus.PENDING)}
        assert src.tickers == ["BTC/USD", "SOL/USD"]
        sim = Simulator(port=port, api_keys=[KEY], interval=0.2)
        await sim.start()
        deadline = time.monotonic() + 10
        while sim.subscriptions() != [({"BTC/USD", "SOL/USD"}, {"AAPL"})]:
            assert time.monotonic() < deadline, sim.subscriptions()
            await asyncio.sleep(0.05)
    finally:
        src.stop()
        await asyncio.wait_for(task, 10)
        await sim.stop()


async def test_a_live_request_over_the_limit_changes_nothing_that_was_subscribed() -> None:
    async with Simulator(port=0, api_keys=[KEY], limits={KEY: 5}, interval=0.2) as sim:
        got: list[tuple[str, Any]] = []
        src = AlenoSource(settings(sim).config.source, KEY, lambda e, p: got.append((e, p)))
        task = asyncio.create_task(src.run())
        try:
            deadline = time.monotonic() + 5
            while not src.live:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            res = await src.subscribe("ticker", ["SOL/USD", "XRP/USD", "ADA/USD", "NOPE/USD"])
            assert {s: r.status for s, r in res.items()} == {
                "SOL/USD": SubscriptionStatus.LIMIT, "XRP/USD": SubscriptionStatus.LIMIT,
                "ADA/USD": SubscriptionStatus.LIMIT, "NOPE/USD": SubscriptionStatus.REJECTED}
            assert LIMIT_MARK in (res["SOL/USD"].error or "")
            assert src.tickers == ["BTC/USD", "ETH/USD"]
            assert "SOL/USD" not in src.wanted["ticker"]
            assert sim.subscriptions() == [({"BTC/USD", "ETH/USD"}, {"AAPL"})]
            fits = await src.subscribe("ticker", ["SOL/USD", "BTC/USD", "XRP/USD"])
            assert {r.status for r in fits.values()} == {SubscriptionStatus.ACCEPTED}
            n = len(got)
            deadline = time.monotonic() + 3
            while "XRP/USD" not in _stamps(got[n:]) or "BTC/USD" not in _stamps(got[n:]):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert src.stats.connects == 1
        finally:
            src.stop()
            await asyncio.wait_for(task, 10)
