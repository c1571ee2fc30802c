"""The market state tells consumers only what is true, end to end against the real
simulator (issue 19):

- a symbol deliberately unsubscribed (its lease ended, a reload removed it, it moved to
  another API key's connection) leaves the snapshot, and when it is subscribed again
  its first updates are no ``gap`` and it never was ``stale``;
- a record stamped ten years ahead (or in the year 2000) is dropped, counted, and
  changes nothing else: the snapshot, the status events, a ``min_interval_s`` route and
  the lag histogram carry on as if it never came;
- a symbol that flaps is damped to ``source.status_damping`` and ends in its true state.

Every wait is derived from the configured intervals (the simulator's cadence, the stale
period, the lease grace, the damping window); timeouts only bound a wait for something
that must happen.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from bridge.config import Settings, parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers, Message
from bridge.testing import MemorySink
from bridge.testing.sample import ticker_record
from tests.support.bridges import Running

pytestmark = pytest.mark.integration

TICKERS = ["BTC/USD", "ETH/USD"]
#: the symbol leased, removed, moved or flapped
SOL = "SOL/USD"
#: how often the subscriptions end leases and collect symbols out of grace
#: (``Subscriptions.run``'s period)
LEASE_LOOP_S = 0.5


def _periods(sim: Simulator) -> tuple[float, float]:
    """(stale period, lease grace) for the simulator's cadence: a symbol is stale after
    five missed updates, a released one is unsubscribed two updates later."""
    return 5 * sim.interval, 2 * sim.interval


def _settings(sim: Simulator, tickers: list[str], *, source: str = "", routes: str = "",
              keys: str = "  api_key: test-key", reconnect_s: float = 0.1,
              stale_s: float | None = None, sink: str = "") -> Settings:
    stale, grace_s = _periods(sim)
    stale_s = stale if stale_s is None else stale_s
    text = f"""
source:
  url: {sim.url}
{keys}
  tickers: [{", ".join(tickers)}]
  equities: [AAPL]
  symbol_stale_after_s: {stale_s}
  update_interval_s: {sim.interval}
  backoff: {{initial_s: {reconnect_s}, max_s: {3 * reconnect_s}}}
  max_subscribe_requests_per_s: 100
  leases: {{enabled: true, grace_s: {grace_s}, default_ttl_s: 30, max_ttl_s: 60}}
{source}
sinks:
  mem: {{driver: memory, batch: {{linger_ms: 0}}{sink}}}
routes:
  - {{sinks: [mem], topic: "prices.{{kind}}.{{symbol}}"}}
  - {{match: {{kind: status}}, sinks: [mem], topic: "status.{{symbol}}"}}
{routes}
http: {{enabled: false}}
shutdown_timeout_s: 3
"""
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


def _status(sink: MemorySink, symbol: str | None = None) -> list[dict[str, Any]]:
    out = []
    for m in list(sink.received):
        if m.event.kind == "status" and (symbol is None or m.event.symbol == symbol):
            out.append(orjson.loads(m.body))
    return out


def _prices(sink: MemorySink, symbol: str, topic: str = "prices.") -> list[Message]:
    return [m for m in list(sink.received) if m.event.kind != "status"
            and m.event.symbol == symbol and m.topic.startswith(topic)]


def _snapshot(r: Running) -> dict[str, dict[str, Any]]:
    """symbol -> item of the control surface's snapshot (what ``/v1/snapshot`` answers)."""
    assert r.bridge.control is not None
    body = orjson.loads(r.bridge.control.snapshot("ticker").body)
    return {item["event"]["subject"]: item for item in body["items"]}


async def _quiet_and_true(r: Running, sim: Simulator, symbol: str, since: int,
                          stale_s: float | None = None) -> None:
    """``symbol`` flows again: five updates after message ``since``, then a whole stale
    period more (what the stale watch would say, it has said); no status event about
    it, no status at all but those of the connection."""
    if stale_s is None:
        stale_s, _ = _periods(sim)
    await r.until(lambda: len(_prices(r.sink, symbol)) >= since + 5, 20 * stale_s)
    await asyncio.sleep(stale_s + sim.interval)
    assert _status(r.sink, symbol) == []
    assert [e["data"]["status"] for e in _status(r.sink)
            if e["subject"] != "upstream"] == []
    assert r.bridge.market.stale == 0


async def test_a_lease_released_and_taken_again_is_no_gap_and_leaves_the_snapshot(
        simulator: Simulator, run_bridge: Any) -> None:
    stale_s, grace_s = _periods(simulator)
    r = run_bridge(_settings(simulator, TICKERS))
    await r.until(lambda: all(len(_prices(r.sink, s)) >= 2 for s in TICKERS), 10)
    subs = r.bridge.subscriptions
    assert subs is not None
    first = await subs.lease("ticker", [SOL], ttl_s=30, holder="t")
    assert first.lease_id is not None
    await r.until(lambda: len(_prices(r.sink, SOL)) >= 3 and SOL in _snapshot(r), 10)
    await subs.release(first.lease_id)
    # unsubscribed once the grace is over: gone from the cache and the snapshot at once
    await r.until(lambda: SOL not in r.source.wanted["ticker"], grace_s + 4 * LEASE_LOOP_S + 5)
    assert SOL not in _snapshot(r) and r.bridge.last_values.get("ticker", SOL) is None
    assert set(_snapshot(r)) == set(TICKERS)
    # deliberately unsubscribed for three stale periods: not stale, not in the snapshot
    await asyncio.sleep(3 * stale_s)
    assert _status(r.sink, SOL) == [] and SOL not in _snapshot(r)
    seen = len(_prices(r.sink, SOL))
    second = await subs.lease("ticker", [SOL], ttl_s=30, holder="t")
    assert second.lease_id is not None
    await _quiet_and_true(r, simulator, SOL, seen)
    assert SOL in _snapshot(r) and _snapshot(r)[SOL]["ageMs"] < 1000 * stale_s


async def test_a_symbol_removed_by_a_reload_and_added_again_is_no_gap(
        simulator: Simulator, run_bridge: Any) -> None:
    # a stale period longer than the dispatcher is held back below
    stale_s = 10 * simulator.interval
    sink = ", buffer: {max_events: 20}"
    with_sol = _settings(simulator, [*TICKERS, SOL], stale_s=stale_s, sink=sink)
    without = _settings(simulator, TICKERS, stale_s=stale_s, sink=sink)
    r = run_bridge(with_sol)
    await r.until(lambda: all(len(_prices(r.sink, s)) >= 3 for s in (*TICKERS, SOL)), 10)
    removed = await r.bridge.reload(without)
    assert removed.result == "applied", removed
    assert SOL not in _snapshot(r) and SOL not in r.source.wanted["ticker"]
    await asyncio.sleep(2 * stale_s)
    assert _status(r.sink, SOL) == [] and SOL not in _snapshot(r)
    added = await r.bridge.reload(with_sol)
    assert added.result == "applied", added
    await _quiet_and_true(r, simulator, SOL, len(_prices(r.sink, SOL)), stale_s)
    assert SOL in _snapshot(r)
    # again while the dispatcher is behind (its sink is full): updates of SOL received
    # before it was removed are routed after it came back. They are no new start of SOL
    r.sink.hold()
    await r.until(lambda: len(r.bridge._intake) >= 3, 10)
    assert (await r.bridge.reload(without)).result == "applied"
    await asyncio.sleep(3 * simulator.interval)  # three updates SOL does not get
    assert (await r.bridge.reload(with_sol)).result == "applied"
    r.sink.release()
    await _quiet_and_true(r, simulator, SOL, len(_prices(r.sink, SOL)), stale_s)


async def test_a_symbol_moved_to_another_keys_connection_is_no_gap(run_bridge: Any) -> None:
    """Key a's limit shrinks while it reconnects: its (re)connect subscription is
    refused for the limit and its symbols move to key b's connection. The moved symbols
    start afresh there (the outage itself is told by ``down`` / ``up``)."""
    limits = {"key-a": 3, "key-b": 3}
    async with Simulator(port=0, api_keys=list(limits), limits=limits, interval=0.2,
                         seed=7) as sim:
        tickers = ["BTC/USD", "ETH/USD", SOL, "XRP/USD"]
        keys = ("  api_keys:\n    - {name: a, key: key-a, limit: 3}\n"
                "    - {name: b, key: key-b}")
        # key a reconnects after five updates: the moved symbols miss some for sure
        r = run_bridge(_settings(sim, tickers, keys=keys, reconnect_s=5 * sim.interval))
        pool = r.bridge.source
        assert pool is not None
        await r.until(lambda: all(len(_prices(r.sink, s)) >= 3 for s in tickers), 10)
        on_a = [s for s in tickers if sim.subscriptions_by_key().get("key-a", {}).get(
            "ticker", set()).__contains__(s)]
        assert len(on_a) == 3, sim.subscriptions_by_key()
        sim._limits["key-a"] = 1  # the key's plan shrank (or another process took room)
        counts = {s: len(_prices(r.sink, s)) for s in tickers}
        await sim.kick("key-a")
        b_before = sim.subscriptions_by_key().get("key-b", {}).get("ticker", set())

        def moved() -> set[str]:
            now_b = sim.subscriptions_by_key().get("key-b", {}).get("ticker", set())
            return (now_b - b_before) & set(on_a)

        await r.until(lambda: len(moved()) >= 1, 20)
        stale_s, _ = _periods(sim)
        for s in moved():
            await r.until(lambda s=s: len(_prices(r.sink, s)) >= counts[s] + 5, 20 * stale_s)
        await asyncio.sleep(stale_s + sim.interval)
        for s in moved():
            assert [e["data"]["status"] for e in _status(r.sink, s)] == [], s


async def test_a_record_ten_years_ahead_is_dropped_and_changes_nothing(
        simulator: Simulator, run_bridge: Any) -> None:
    gate_s = 3 * simulator.interval
    routes = (f'  - {{match: {{symbols: ["BTC/USD"]}}, sinks: [mem], topic: "gated.{{symbol}}", '
              f"min_interval_s: {gate_s}}}")
    r = run_bridge(_settings(simulator, TICKERS, routes=routes))
    await r.until(lambda: len(_prices(r.sink, "BTC/USD")) >= 3, 10)
    now_ms = time.time_ns() // 1_000_000
    ten_years_ms = 10 * 365 * 86_400_000
    await simulator.inject("new_token_states",
                           [ticker_record("BTC/USD", 1.0, now_ms + ten_years_ms)])
    await simulator.inject("new_token_states", [ticker_record("BTC/USD", 2.0, 946_684_801_000)])
    invalid = r.bridge.normalizer.invalid
    await r.until(lambda: invalid.get("ticker:clock_skew") == 1
                  and invalid.get("ticker:too_old") == 1, 10)
    prices, gated = len(_prices(r.sink, "BTC/USD")), len(_prices(r.sink, "BTC/USD", "gated."))
    # the good updates go on, and the gated route still lets one through per gate_s
    await r.until(lambda: len(_prices(r.sink, "BTC/USD")) >= prices + 10, 20)
    assert len(_prices(r.sink, "BTC/USD", "gated.")) >= gated + 2
    latest = orjson.loads(_prices(r.sink, "BTC/USD")[-1].body)["data"]
    assert latest["price"] not in (1.0, 2.0)
    cached = _snapshot(r)["BTC/USD"]["event"]["data"]
    assert abs(cached["sentTimestampMs"] - latest["sentTimestampMs"]) <= 1000 * gate_s
    assert cached["sentTimestampMs"] < time.time_ns() // 1_000_000 + 1000
    # nothing to say about BTC: no stale, no gap
    assert _status(r.sink) == []
    # the lag histogram saw only the good updates (all within its 30 s bucket)
    reg = r.bridge.registry
    lag = {k: reg.get_sample_value(f"aleno_bridge_upstream_lag_seconds_{k}",
                                   {"kind": "ticker", **({"le": "30.0"} if k == "bucket" else {})})
           for k in ("count", "bucket", "sum")}
    assert lag["count"] and lag["bucket"] == lag["count"], lag
    assert lag["sum"] is not None and lag["sum"] < 30 * lag["count"]
    for reason in ("clock_skew", "too_old"):
        assert reg.get_sample_value("aleno_bridge_events_invalid_total",
                                    {"kind": "ticker", "reason": reason}) == 1


def _hold_down_over(told: list[tuple[float, str]], budget: int, window_s: float,
                    since: float) -> float:
    """When the damping lets the symbol emit again (monotonic s, ``since`` at the
    earliest): the oldest of its last ``budget`` events leaves the window (the bridge
    stamped it before the tap saw it, so this is no earlier than the bridge's own time)."""
    recent = [t for t, _ in told][-budget:]
    return max(since, recent[0] + window_s) if len(recent) == budget else since


async def test_a_flapping_symbol_is_damped_and_ends_fresh(
        simulator: Simulator, run_bridge: Any) -> None:
    """SOL pauses and resumes every 2 stale periods: undamped, each cycle is a
    ``stale``, a ``gap`` and a ``fresh``. Damped to 2 per window, and once the flapping
    stopped (SOL flows), the last state its status events told is ``fresh``."""
    stale_s, _ = _periods(simulator)
    window_s = 6 * stale_s
    budget = 2
    source = f"  status_damping: {{max_events: {budget}, window_s: {window_s}}}"
    r = run_bridge(_settings(simulator, [*TICKERS, SOL], source=source))
    told: list[tuple[float, str]] = []  # (when the dispatcher routed it, status) of SOL

    def tap(ev: Any) -> None:
        if ev.kind == "status" and ev.symbol == SOL:
            told.append((time.monotonic(), ev.data["status"]))

    r.bridge.add_tap(tap)
    await r.until(lambda: len(_prices(r.sink, SOL)) >= 3, 10)
    cycles = 3
    for _ in range(cycles):
        simulator.pause_symbols("ticker", [SOL])
        await asyncio.sleep(2 * stale_s)
        simulator.resume_symbols("ticker", [SOL])
        await asyncio.sleep(2 * stale_s)
    # undamped there would be about 3 per cycle; here at most `budget` per window
    times = [t for t, _ in told]
    assert len(times) < 3 * cycles
    slack = 2 * simulator.interval  # routing delay of the events in between
    for i in range(len(times) - budget):
        assert times[i + budget] - times[i] >= window_s - slack, told
    suppressed = r.bridge.snapshot().market
    assert suppressed is not None and sum(suppressed.status_suppressed.values()) > 0
    # SOL flows now: once the hold-down is over (the oldest of its last `budget` events
    # left the window) and a stale period more (the stale watch's turn), consumers were
    # told it is fresh
    stopped = time.monotonic()
    while True:
        wait = _hold_down_over(told, budget, window_s, stopped) + stale_s - time.monotonic()
        if wait <= 0:
            break
        await asyncio.sleep(wait)  # and again if an event was told meanwhile
    states = [s for _, s in told if s in ("stale", "fresh")]
    assert states and states[-1] == "fresh", told
    assert r.bridge.market.stale == 0
    reg = r.bridge.registry
    total = sum(reg.get_sample_value("aleno_bridge_status_events_suppressed_total",
                                     {"status": s}) or 0 for s in ("stale", "fresh", "gap"))
    assert total == sum(suppressed.status_suppressed.values()) or total > 0
