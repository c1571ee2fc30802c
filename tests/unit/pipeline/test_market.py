"""The last value cache and the status events (bridge.pipeline.market), on real events."""

from __future__ import annotations

import time

import orjson

from bridge.core.envelope import Event
from bridge.pipeline.market import GAP_FACTOR, Damping, LastValues, MarketState, StatusEvent
from bridge.testing.sample import T0_MS, sample_events


def _state(stale_after_s: float = 10.0, interval_s: float = 1.0,
           wanted: dict[str, frozenset[str]] | None = None) -> tuple[MarketState, list[Event]]:
    emitted: list[Event] = []
    st = MarketState(emitted.extend, stale_after_s=stale_after_s,
                     update_interval_s=interval_s,
                     wanted=(lambda: wanted) if wanted is not None else None)
    return st, emitted


def _by_round(events: list[Event], symbols: int) -> list[list[Event]]:
    return [events[i:i + symbols] for i in range(0, len(events), symbols)]


def test_the_cache_keeps_the_newest_event_per_symbol_and_ignores_older_ones() -> None:
    st, _ = _state()
    rounds = _by_round(sample_events(symbols=3, updates=3), 3)
    for r in rounds:
        assert st.observe("ticker", r) is None
    assert len(st.values) == 3
    newest = rounds[2][1]
    lv = st.values.get("ticker", "t1/usd")
    assert lv is not None and (lv.envelope()["id"], lv.price) == (newest.id, newest.price)
    # the cache holds the very bytes the sinks publish
    assert lv.body is newest.encoded("cloudevents-json").body
    assert lv.envelope()["data"] == newest.data
    # a late duplicate of an older record does not replace the newer value
    assert st.observe("ticker", rounds[0]) is None
    assert st.values.get("ticker", "T1/USD").envelope()["id"] == newest.id  # type: ignore[union-attr]


def test_cache_entries_are_left_alone_by_the_cycle_collector() -> None:
    """An entry holds only atomic values, so the collector untracks it: 10,000 symbols
    updated every second never fill the old generation (full-collection pauses)."""
    import gc

    st, _ = _state()
    st.observe("ticker", sample_events(symbols=50, updates=1))
    gc.collect()
    entries = list(st.values.by_kind("ticker").values())
    assert len(entries) == 50
    assert not any(gc.is_tracked(e) for e in entries)


def test_select_filters_by_kind_and_globs_sorted() -> None:
    values = LastValues()
    for ev in sample_events(symbols=12, updates=1) + sample_events(symbols=2, kind="equity"):
        values.put(ev)
    assert values.select("ticker", ["T1*"]) == ["T1/USD", "T10/USD", "T11/USD"]
    assert values.select("ticker", ["t2/usd", "EQ1", "nope"]) == ["T2/USD"]
    assert values.select("equity", ["t2/usd", "EQ1", "nope"]) == ["EQ1"]
    assert len(values.select("ticker")) == 12
    assert len(values.select("equity")) == 2
    assert values.select("ticker", ["EQ?"]) == []
    everything = values.select("ticker")
    assert values.forget("ticker", ["T1/USD", "T1/USD", "X"]) == 1
    assert len(values) == 13
    # the sorted list is made again once the key set changed
    assert "T1/USD" in everything and "T1/USD" not in values.select("ticker")
    values.put(sample_events(symbols=1, updates=1)[0])
    assert "T0/USD" in values.select("ticker", ["T0/USD"])


def test_a_jump_beyond_the_cadence_is_one_gap_naming_the_missing_interval() -> None:
    st, _ = _state(interval_s=1.0)
    evs = sample_events(symbols=2, updates=6)
    rounds = _by_round(evs, 2)
    st.observe("ticker", rounds[0])
    st.observe("ticker", rounds[1])
    # rounds 2, 3 and 4 never arrive: round 5 resumes
    out = st.observe("ticker", rounds[5])
    assert out is not None and [e.data["status"] for e in out] == ["gap", "gap"]
    gap = out[0]
    assert gap.kind == "status" and gap.symbol == "T0/USD"
    assert gap.data["lastSeenMs"] == T0_MS + 1000
    assert gap.data["resumedMs"] == T0_MS + 5000
    assert gap.data["missingFromMs"] == T0_MS + 2000
    assert gap.data["missingToMs"] == T0_MS + 4000
    assert gap.data["missedUpdates"] == 3
    assert gap.id == f"status:gap:ticker:T0/USD:{T0_MS + 5000}"
    assert st.snapshot().status_events["gap"] == 2
    # one interval of jitter is not a gap
    late = sample_events(symbols=1, updates=1, start_ms=T0_MS + 5000 + int(GAP_FACTOR * 1000))
    assert st.observe("ticker", late) is None


def test_stale_once_while_up_then_fresh_on_the_next_update() -> None:
    st, emitted = _state(stale_after_s=5.0)
    rounds = _by_round(sample_events(symbols=2, updates=3), 2)
    st.observe("ticker", rounds[0])
    t_quiet = st.values.get("ticker", "T0/USD").received_monotonic  # type: ignore[union-attr]
    st._up_since = t_quiet - 100  # the link has been up for long
    # T1 keeps updating (received later), T0 goes silent
    st.observe("ticker", [rounds[1][1]], now=t_quiet + 4.9)
    assert st.scan_stale(now=t_quiet + 4.9) == []
    stale = st.scan_stale(now=t_quiet + 5.1)
    assert [(e.data["status"], e.symbol) for e in stale] == [("stale", "T0/USD")]
    assert stale[0].data["lastPrice"] == rounds[0][0].price
    assert emitted == stale and st.stale == 1
    assert st.snapshot().stale == 1
    assert st.scan_stale(now=t_quiet + 9.0) == []  # exactly one stale event
    fresh = st.observe("ticker", [rounds[1][0]])
    assert fresh is not None and [e.data["status"] for e in fresh] == ["fresh"]
    assert fresh[0].data["price"] == rounds[1][0].price
    assert st.stale == 0


def test_forgetting_a_stale_symbol_no_longer_counts_it_stale() -> None:
    st, _ = _state(stale_after_s=1.0)
    st.observe("ticker", sample_events(symbols=2, updates=1))
    st._up_since -= 100
    now = st.values.get("ticker", "T0/USD").received_monotonic + 2  # type: ignore[union-attr]
    assert len(st.scan_stale(now=now)) == 2 and st.stale == 2
    assert st.values.forget("ticker", ["T0/USD"]) == 1
    assert st.stale == 1


def test_no_stale_while_the_link_is_down_and_a_full_period_after_it_comes_up() -> None:
    st, emitted = _state(stale_after_s=1.0)
    st.observe("ticker", sample_events(symbols=3, updates=1))
    st.link(True, "")  # the first connection: nothing to report
    assert emitted == []
    st.link(False, "connection lost (close code 1006)")
    now = st.values.get("ticker", "T0/USD").received_monotonic + 30  # type: ignore[union-attr]
    assert st.scan_stale(now=now) == []
    st.link(True, "")
    assert [e.data["status"] for e in emitted] == ["down", "up"]
    down, up = emitted
    assert down.data["reason"] == "connection lost (close code 1006)"
    assert up.data["reason"] == down.data["reason"] and up.data["outageMs"] >= 0
    assert down.id == f"status:down:upstream:{T0_MS}" and up.id == f"status:up:upstream:{T0_MS}"
    assert down.symbol == "upstream" and "symbol" not in down.data
    assert st.scan_stale() == []  # the stale clock restarted with the link


def test_a_connection_that_gave_up_no_longer_holds_the_stale_watch_off() -> None:
    """With several keys, one connection down holds every symbol's stale watch off
    (its ``down`` says it all). A connection that gave up for good never comes up:
    once retired (its symbols moved to the others), the watch runs again, a whole
    period later, without an ``up`` for a connection that is gone."""
    st, emitted = _state(stale_after_s=1.0)
    st.observe("ticker", sample_events(symbols=2, updates=1))
    st.link(True, "", "a")
    st.link(True, "", "b")
    st.link(False, "refused", "b")
    later = st.values.get("ticker", "T0/USD").received_monotonic + 30  # type: ignore[union-attr]
    assert st.scan_stale(now=later) == [] and not st.link_up
    st.retire("b")
    assert st.link_up
    assert st.scan_stale(now=time.monotonic()) == []  # a whole period first
    stale = st.scan_stale(now=time.monotonic() + 2)
    assert {e.data["status"] for e in stale} == {"stale"} and len(stale) == 2
    assert [e.data["status"] for e in emitted if e.symbol == "upstream"] == ["down"]
    st.retire("b")  # twice: nothing more
    st.retire("never-down")


def test_status_events_are_cloudevents_of_their_own_type() -> None:
    ev = StatusEvent("stale", "BTC/USD", T0_MS, {"feed": "ticker", "symbol": "BTC/USD"},
                     "http://127.0.0.1:1/v1/socket")
    body = orjson.loads(ev.encoded("cloudevents-json").body)
    assert body["type"] == "ai.aleno.status.v1" and body["subject"] == "BTC/USD"
    assert body["data"] == {"kind": "status", "status": "stale", "feed": "ticker",
                            "symbol": "BTC/USD"}
    assert body["id"] == f"status:stale:ticker:BTC/USD:{T0_MS}"
    assert ev.header.type == "ai.aleno.status.v1" and ev.header.base == "BTC"
    binary = ev.encoded("cloudevents-binary")
    assert binary.attributes["type"] == "ai.aleno.status.v1"


def test_the_stale_watch_skips_symbols_no_longer_subscribed() -> None:
    st, _ = _state(stale_after_s=1.0, wanted={"ticker": frozenset({"T1/USD"}),
                                              "equity": frozenset()})
    st.observe("ticker", sample_events(symbols=2, updates=1))
    st._up_since -= 100
    now = st.values.get("ticker", "T0/USD").received_monotonic + 2  # type: ignore[union-attr]
    assert [e.symbol for e in st.scan_stale(now=now)] == ["T1/USD"]


def test_status_events_follow_only_routes_that_ask_for_them() -> None:
    from bridge.config.schema import RouteConfig
    from bridge.pipeline.routing import Router
    from bridge.testing import MemorySink

    class _Worker:
        def __init__(self, name: str) -> None:
            self.name, self.format, self.got = name, "cloudevents-json", []

        def safe_token(self, v: str) -> str:
            return MemorySink.safe_token(v)

        def offer(self, message: object) -> None:
            self.got.append(message)

    prices, status = _Worker("prices"), _Worker("status")
    router = Router([RouteConfig(sinks=["prices"]),
                     RouteConfig(match={"kind": "status", "symbols": ["BTC/*", "upstream"]},
                                 sinks=["status"], topic="status.{symbol}")],
                    {"prices": prices, "status": status})
    stale = StatusEvent("stale", "BTC/USD", T0_MS, {"feed": "ticker"}, "src")
    other = StatusEvent("stale", "ETH/USD", T0_MS, {"feed": "ticker"}, "src")
    down = StatusEvent("down", "upstream", T0_MS, {}, "src")
    for ev in (stale, other, down, *sample_events(symbols=1, updates=1)):
        router.dispatch(ev)
    assert [m.topic for m in status.got] == ["status.BTC/USD", "status.upstream"]
    assert [m.event.kind for m in prices.got] == ["ticker"]
    assert router.unrouted == 0  # a status event no route asked for is not "unrouted"


def test_several_keys_each_connection_has_its_own_down_and_up() -> None:
    st, emitted = _state(stale_after_s=1.0)
    st.observe("ticker", sample_events(symbols=2, updates=1))
    st.link(True, "", "a")
    st.link(True, "", "b")
    st.link(False, "connection lost", "a")
    st.link(False, "no update for 10s", "b")
    st.link(False, "again", "a")  # already down: nothing new
    st.link(True, "", "a")
    assert not st.link_up  # b is still down: no symbol is declared stale
    now = st.values.get("ticker", "T0/USD").received_monotonic + 30  # type: ignore[union-attr]
    assert st.scan_stale(now=now) == []
    st.link(True, "", "b")
    assert st.link_up
    got = [(e.data["status"], e.data["connection"], e.data["reason"]) for e in emitted]
    assert got == [("down", "a", "connection lost"), ("down", "b", "no update for 10s"),
                   ("up", "a", "connection lost"), ("up", "b", "no update for 10s")]
    assert emitted[0].id == f"status:down:upstream:a:{T0_MS}"
    assert len({e.id for e in emitted}) == 4


# -- deliberate unsubscribes ------------------------------------------------------------


def _one(symbol: str, sent_ms: int, received_ms: int | None = None,
         kind: str = "ticker") -> Event:
    """One event of ``symbol`` sent at ``sent_ms`` (received 5 ms later by default)."""
    from bridge.pipeline.normalize import Normalizer
    from bridge.testing.sample import equity_record, ticker_record

    recv = sent_ms + 5 if received_ms is None else received_ms
    norm = Normalizer(clock=lambda: recv)
    if kind == "ticker":
        (ev,) = norm.tickers([ticker_record(symbol, 100.0 + (sent_ms % 997) / 100, sent_ms)])
    else:
        (ev,) = norm.equities([equity_record(symbol, 50.0 + (sent_ms % 997) / 100, sent_ms)])
    return ev


def test_a_symbol_unsubscribed_and_subscribed_again_starts_afresh() -> None:
    """A lease that ended (or a reload that removed the symbol) and a new lease later:
    the time it was deliberately unsubscribed is no gap, and it never was stale."""
    wanted = {"ticker": frozenset({"BTC/USD", "ETH/USD"}), "equity": frozenset()}
    st, emitted = _state(stale_after_s=1.0, interval_s=1.0, wanted=wanted)
    st._clock = lambda: T0_MS + 2_500  # when it is forgotten (the events' clock)
    base = time.monotonic()
    st._up_since = base - 100
    for i in range(3):
        st.observe("ticker", [_one("BTC/USD", T0_MS + i * 1000),
                              _one("ETH/USD", T0_MS + i * 1000)], now=base + i)
    # BTC's last lease ends: the source replaces its set (a new frozenset object)
    wanted["ticker"] = frozenset({"ETH/USD"})
    st.sync_wanted()
    assert st.values.get("ticker", "BTC/USD") is None
    assert st.values.select("ticker") == ["ETH/USD"]
    # 30 s unsubscribed: no stale for it (ETH keeps flowing)
    for i in range(3, 33):
        st.observe("ticker", [_one("ETH/USD", T0_MS + i * 1000)], now=base + i)
        assert st.scan_stale(now=base + i + 0.5) == []
    # leased again: its first record is a start, not a gap
    wanted["ticker"] = frozenset({"BTC/USD", "ETH/USD"})
    st.sync_wanted()
    assert st.observe("ticker", [_one("BTC/USD", T0_MS + 33_000)], now=base + 33) is None
    assert st.observe("ticker", [_one("BTC/USD", T0_MS + 34_000)], now=base + 34) is None
    assert emitted == [] and st.counts == dict.fromkeys(st.counts, 0)
    assert st.values.get("ticker", "BTC/USD").sent_ms == T0_MS + 34_000  # type: ignore[union-attr]


def test_the_data_path_sees_a_changed_set_without_being_told() -> None:
    """Without the sources' listener, the dispatcher's next chunk still notices that a
    symbol left: one identity test per chunk while nothing changes."""
    wanted = {"ticker": frozenset({"BTC/USD"}), "equity": frozenset()}
    st, _ = _state(interval_s=1.0, wanted=wanted)
    st.observe("ticker", [_one("BTC/USD", T0_MS)])
    wanted["ticker"] = frozenset()
    st.observe("ticker", [_one("ETH/USD", T0_MS + 1000)])  # not subscribed: ingested
    assert st.values.get("ticker", "BTC/USD") is None


def test_a_move_to_another_connection_within_one_step_is_no_gap() -> None:
    """A pool moves a symbol from one key's connection to another: removed from one set
    and added to the other within one step. The listener (sync_wanted, called by every
    change) sees both; the symbol's clock starts again with the new connection."""
    wanted = {"ticker": frozenset({"BTC/USD"}), "equity": frozenset()}
    st, emitted = _state(stale_after_s=1.0, interval_s=1.0, wanted=wanted)
    base = time.monotonic()
    st._up_since = base - 100
    st.observe("ticker", [_one("BTC/USD", T0_MS)], now=base)
    st.scan_stale(now=base + 5)  # silent while its connection reconnected: stale
    assert st.stale == 1 and [e.data["status"] for e in emitted] == ["stale"]
    wanted["ticker"] = frozenset()  # forgotten by connection a ...
    st.sync_wanted()
    wanted["ticker"] = frozenset({"BTC/USD"})  # ... subscribed on connection b
    st.sync_wanted()
    assert st.stale == 0 and len(st.values) == 0
    assert st.observe("ticker", [_one("BTC/USD", T0_MS + 9000)], now=base + 9) is None
    assert st.scan_stale(now=base + 9.5) == []
    assert [e.data["status"] for e in emitted] == ["stale"]  # no fresh, no gap


def test_records_received_before_the_unsubscribe_are_not_cached_after_it() -> None:
    """An intake backlog may route a record received before its symbol was unsubscribed
    after it was subscribed again: it is not the new subscription's first value."""
    clock = [T0_MS + 10_000]
    st, _ = _state(interval_s=1.0)
    st._clock = lambda: clock[0]
    st.observe("ticker", [_one("BTC/USD", T0_MS)])
    assert st.forget("ticker", ["BTC/USD"]) == 1
    old = _one("BTC/USD", T0_MS + 1000, received_ms=T0_MS + 9_000)
    assert st.observe("ticker", [old]) is None
    assert st.values.get("ticker", "BTC/USD") is None
    new = _one("BTC/USD", T0_MS + 20_000, received_ms=T0_MS + 20_005)
    assert st.observe("ticker", [new]) is None
    assert st.values.get("ticker", "BTC/USD").sent_ms == T0_MS + 20_000  # type: ignore[union-attr]
    # the mark is gone with it: the next record is an ordinary update
    later = _one("BTC/USD", T0_MS + 21_000)
    st.observe("ticker", [later])
    assert st.values.get("ticker", "BTC/USD").sent_ms == T0_MS + 21_000  # type: ignore[union-attr]
    assert st._gone_at == {}


# -- damping ----------------------------------------------------------------------------


def _damped(max_events: int, window_s: float, stale_after_s: float = 1.5,
            interval_s: float = 100.0) -> tuple[MarketState, list[Event], float]:
    emitted: list[Event] = []
    st = MarketState(emitted.extend, stale_after_s=stale_after_s,
                     update_interval_s=interval_s, damping=Damping(max_events, window_s))
    base = time.monotonic()
    st._up_since = base - 100
    return st, emitted, base


def _statuses(events: list[Event] | None) -> list[str]:
    return [e.data["status"] for e in events or []]


def test_a_flapping_symbol_emits_at_most_the_budget_and_ends_stale_when_it_is() -> None:
    st, emitted, t = _damped(max_events=2, window_s=10.0)
    sent = T0_MS

    def update(at: float) -> list[str]:
        nonlocal sent
        sent += 1000
        return _statuses(st.observe("ticker", [_one("BTC/USD", sent)], now=t + at))

    update(0)
    assert _statuses(st.scan_stale(now=t + 2)) == ["stale"]  # 1 of 2
    assert update(3) == ["fresh"]  # 2 of 2: the budget is spent until t + 12
    assert st.scan_stale(now=t + 5) == []  # stale again, suppressed
    assert update(6) == []  # fresh again, suppressed
    assert st.scan_stale(now=t + 8) == []  # stale again, suppressed: and it stays silent
    assert st.stale == 1  # the gauge says the truth
    assert st.damping.suppressed == {"stale": 2, "fresh": 1, "gap": 0}
    assert st.scan_stale(now=t + 11.9) == []  # still held down
    # the budget allows again: consumers were last told "fresh", it is stale: say so
    (late,) = st.scan_stale(now=t + 12.1)
    assert late.data["status"] == "stale" and late.data["damped"] is True
    assert late.data["suppressed"] == {"stale": 2, "fresh": 1}
    assert _statuses(emitted) == ["stale", "stale"]
    assert st.scan_stale(now=t + 30) == []  # settled: nothing more
    assert st.counts["stale"] == 2 and st.counts["fresh"] == 1
    assert st.snapshot().status_suppressed == {"stale": 2, "fresh": 1, "gap": 0}


def test_consumers_never_stay_on_stale_for_a_symbol_that_flows_again() -> None:
    st, emitted, t = _damped(max_events=1, window_s=10.0)
    st.observe("ticker", [_one("BTC/USD", T0_MS)], now=t)
    assert _statuses(st.scan_stale(now=t + 2)) == ["stale"]  # the whole budget
    for i in range(3, 12):  # flows again from t + 3: "fresh" is held back
        assert st.observe("ticker", [_one("BTC/USD", T0_MS + i * 1000)], now=t + i) is None
        assert st.scan_stale(now=t + i + 0.5) == []
    (fresh,) = st.scan_stale(now=t + 12.1)
    assert fresh.data["status"] == "fresh" and fresh.data["damped"] is True
    assert fresh.data["sentTimestampMs"] == T0_MS + 11_000
    assert fresh.data["price"] == st.values.get("ticker", "BTC/USD").price  # type: ignore[union-attr]
    assert fresh.id == f"status:fresh:ticker:BTC/USD:{T0_MS + 11_000}"
    assert _statuses(emitted) == ["stale", "fresh"]
    assert st.scan_stale(now=t + 12.4) == [] and st.stale == 0


def test_gaps_of_a_flapping_symbol_are_damped_and_reported_with_the_next_event() -> None:
    st, _, t = _damped(max_events=3, window_s=60.0, stale_after_s=100.0, interval_s=1.0)
    out: list[str] = []
    sent = T0_MS
    for cycle in range(15):  # 2 s on, 2 s off for a minute: a gap every 4 s
        for _ in range(2):
            sent += 1000
            out += _statuses(st.observe("ticker", [_one("BTC/USD", sent)],
                                        now=t + cycle * 4))
        sent += 2000  # two updates missed
    assert out == ["gap", "gap", "gap"]  # 14 gaps, 3 emitted
    assert st.damping.suppressed["gap"] == 11
    # a minute after the first (t + 4), the budget allows again: the next gap carries
    # the count of those held back
    sent += 3000
    assert st.observe("ticker", [_one("BTC/USD", sent)], now=t + 63.9) is None
    sent += 3000
    (gap,) = st.observe("ticker", [_one("BTC/USD", sent)], now=t + 64.1)  # type: ignore[misc]
    assert gap.data["status"] == "gap" and gap.data["suppressed"] == {"gap": 12}
    assert st.counts["gap"] == 4


def test_status_events_of_each_symbol_are_damped_on_their_own() -> None:
    st, _, t = _damped(max_events=1, window_s=60.0, interval_s=1.0)
    got = st.observe("ticker", [_one("A/USD", T0_MS), _one("B/USD", T0_MS)], now=t)
    got = st.observe("ticker", [_one("A/USD", T0_MS + 5000), _one("B/USD", T0_MS + 5000)],
                     now=t + 5)
    assert [(e.symbol, e.data["status"]) for e in got or []] == [("A/USD", "gap"),
                                                                  ("B/USD", "gap")]


def test_a_symbol_unsubscribed_while_held_down_owes_nothing() -> None:
    wanted = {"ticker": frozenset({"BTC/USD"}), "equity": frozenset()}
    emitted: list[Event] = []
    st = MarketState(emitted.extend, stale_after_s=1.5, update_interval_s=100.0,
                     wanted=lambda: wanted, damping=Damping(1, 10.0))
    t = time.monotonic()
    st._up_since = t - 100
    st.observe("ticker", [_one("BTC/USD", T0_MS)], now=t)
    st.scan_stale(now=t + 2)
    st.observe("ticker", [_one("BTC/USD", T0_MS + 3000)], now=t + 3)  # fresh: held back
    assert st.damping.pending() == [("ticker", "BTC/USD")]
    wanted["ticker"] = frozenset()
    assert st.scan_stale(now=t + 30) == []
    assert st.damping.pending() == [] and len(st.damping) == 0
    assert _statuses(emitted) == ["stale"]


def test_damping_records_are_dropped_once_their_window_passed() -> None:
    st, _, t = _damped(max_events=2, window_s=10.0, stale_after_s=100.0, interval_s=1.0)
    evs = [_one(f"S{i}/USD", T0_MS) for i in range(100)]
    st.observe("ticker", evs, now=t)
    st.observe("ticker", [_one(f"S{i}/USD", T0_MS + 5000) for i in range(100)], now=t + 5)
    assert len(st.damping) == 100  # a gap each
    st.scan_stale(now=t + 14)
    assert len(st.damping) == 100
    st.scan_stale(now=t + 15.1)
    assert len(st.damping) == 0
