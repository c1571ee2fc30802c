"""Wire records -> events: validation, reasons, and nothing from the wire escapes."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.pipeline.normalize import Normalizer
from bridge.testing.sample import equity_record, ticker_record

T = 1_732_480_000_000


def norm() -> Normalizer:
    return Normalizer(clock=lambda: T + 12)


def test_ticker_record_becomes_event_with_design_fields() -> None:
    n = norm()
    [ev] = n.tickers([ticker_record(" btc/usd ", 87107.08, T)])
    assert ev.kind == "ticker" and ev.symbol == "BTC/USD"
    assert (ev.base, ev.quote) == ("BTC", "USD")
    assert ev.data["price"] == 87107.08
    assert ev.data["sentTimestampMs"] == T and ev.data["receivedTimestampMs"] == T + 12
    assert set(ev.data) == {"kind", "symbol", "base", "quote", "price", "sentTimestampMs",
                            "receivedTimestampMs", "aggregated", "cex", "dex"}
    assert ev.data["dex"]["usdTvl"] == 9_876_543.0
    assert ev.time == "2024-11-24T20:26:40.000Z"
    assert ev.id == f"ticker:BTC/USD:{T}"


def test_equity_record_becomes_event() -> None:
    [ev] = norm().equities([equity_record("aapl", 229.87, T + 5)])
    assert ev.data == {"kind": "equity", "symbol": "AAPL", "price": 229.87,
                       "sentTimestampMs": T + 5, "receivedTimestampMs": T + 12}
    assert ev.time == "2024-11-24T20:26:40.005Z"


def test_integers_are_prices_too_and_missing_venues_are_null() -> None:
    rec: dict[str, Any] = {"id": "ETH/USD", "aggregated": {"price": 3000}, "sentTimestampMs": T}
    [ev] = norm().tickers([rec])
    assert ev.price == 3000.0 and ev.data["cex"] is None and ev.data["dex"] is None


BAD_TICKERS = [
    ("not_an_object", 42),
    ("missing_symbol", {"aggregated": {"price": 1.0}, "sentTimestampMs": T}),
    ("bad_symbol", {"id": "BTCUSD", "aggregated": {"price": 1.0}, "sentTimestampMs": T}),
    ("bad_symbol", {"id": 7, "aggregated": {"price": 1.0}, "sentTimestampMs": T}),
    ("missing_price", {"id": "BTC/USD", "sentTimestampMs": T}),
    ("missing_price", {"id": "BTC/USD", "aggregated": {}, "sentTimestampMs": T}),
    ("non_numeric_price", {"id": "BTC/USD", "aggregated": {"price": "1.0"}, "sentTimestampMs": T}),
    ("non_numeric_price", {"id": "BTC/USD", "aggregated": {"price": True}, "sentTimestampMs": T}),
    ("non_finite_price", {"id": "BTC/USD", "aggregated": {"price": math.inf},
                          "sentTimestampMs": T}),
    ("non_finite_price", {"id": "BTC/USD", "aggregated": {"price": math.nan},
                          "sentTimestampMs": T}),
    ("non_positive_price", {"id": "BTC/USD", "aggregated": {"price": -1.0},
                            "sentTimestampMs": T}),
    ("missing_timestamp", {"id": "BTC/USD", "aggregated": {"price": 1.0}}),
    ("bad_timestamp", {"id": "BTC/USD", "aggregated": {"price": 1.0}, "sentTimestampMs": "x"}),
    ("bad_timestamp", {"id": "BTC/USD", "aggregated": {"price": 1.0}, "sentTimestampMs": 12}),
    ("bad_field_type", {"id": "BTC/USD", "aggregated": {"price": 1.0}, "cex": [1],
                        "sentTimestampMs": T}),
    ("bad_field_type", {"id": "BTC/USD", "aggregated": {"price": 1.0},
                        "dex": {"price": "cheap"}, "sentTimestampMs": T}),
]


def test_each_invalid_record_is_dropped_and_counted_by_reason() -> None:
    n = norm()
    good = ticker_record("BTC/USD", 1.0, T)
    payload = [rec for _, rec in BAD_TICKERS] + [good]
    events = n.tickers(payload)
    assert [e.symbol for e in events] == ["BTC/USD"]
    expected: dict[str, int] = {}
    for reason, _ in BAD_TICKERS:
        expected[f"ticker:{reason}"] = expected.get(f"ticker:{reason}", 0) + 1
    assert n.invalid == expected
    assert n.received["ticker"] == len(payload)


def test_a_payload_that_is_not_an_array_is_counted() -> None:
    n = norm()
    assert n.equities("garbage") == []
    assert n.invalid == {"equity:not_an_array": 1}


def test_invalid_reason_is_logged_once_with_a_sample(caplog: Any) -> None:
    n = norm()
    for _ in range(5):
        n.tickers([{"id": "BTC/USD", "aggregated": {"price": "x"}, "sentTimestampMs": T}])
    lines = [r for r in caplog.records if "non_numeric_price" in r.getMessage()]
    assert len(lines) == 1 and "BTC/USD" in lines[0].getMessage()
    assert n.invalid["ticker:non_numeric_price"] == 5


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
fields = st.sampled_from(["id", "symbol", "price", "aggregated", "cex", "dex",
                          "sentTimestampMs", "h24UsdVolume", "usdTvl"])
near_records = st.dictionaries(fields, json_values | st.dictionaries(fields, json_values),
                               max_size=6)


@settings(max_examples=400, deadline=None)
@given(payload=json_values | st.lists(near_records | json_values, max_size=8))
def test_arbitrary_json_never_raises_and_every_record_is_accounted(payload: Any) -> None:
    n = norm()
    for handler, kind in ((n.tickers, "ticker"), (n.equities, "equity")):
        before = sum(v for k, v in n.invalid.items() if k.startswith(kind))
        events = handler(payload)
        invalid = sum(v for k, v in n.invalid.items() if k.startswith(kind)) - before
        records = len(payload) if isinstance(payload, list) else 1
        assert len(events) + invalid == records
        for ev in events:
            assert math.isfinite(ev.price) and ev.price > 0
            # every event envelope encodes, and round-trips
            env = orjson.loads(ev.encoded("cloudevents-json").body)
            assert env["id"] == ev.id and env["data"]["symbol"] == ev.symbol
            orjson.loads(ev.encoded("raw").body)


def test_records_of_unsubscribed_symbols_are_dropped_and_not_cached() -> None:
    n = norm()
    allowed = frozenset({"BTC/USD"})
    payload = [ticker_record("BTC/USD", 1.0, T)] + [
        ticker_record(f"X{i}/USD", 1.0, T) for i in range(100)]
    for _ in range(2):  # the second pass goes through the symbol cache
        events = n.tickers(payload, allowed)
        assert [e.symbol for e in events] == ["BTC/USD"]
    assert n.invalid == {"ticker:unsubscribed": 200}
    assert len(n._symbols) == 1
    eq = n.equities([equity_record("AAPL", 1.0, T), equity_record("EVIL", 1.0, T)],
                    frozenset({"AAPL"}))
    assert [e.symbol for e in eq] == ["AAPL"]
    assert n.invalid["equity:unsubscribed"] == 1
    # without a set, every symbol is accepted (tools without a source)
    assert len(norm().tickers(payload)) == 101


def test_a_deeply_nested_record_is_counted_with_a_bounded_sample(caplog: Any) -> None:
    n = norm()
    deep: Any = 1.0
    for _ in range(5000):
        deep = [deep]
    events = n.tickers([{"id": "BTC/USD", "aggregated": deep, "sentTimestampMs": T},
                        ticker_record("BTC/USD", 1.0, T)])
    assert len(events) == 1
    assert n.invalid == {"ticker:bad_field_type": 1}
    [line] = [r.getMessage() for r in caplog.records if "bad_field_type" in r.getMessage()]
    assert len(line) < 600


def test_credentials_in_the_source_url_never_reach_the_envelope() -> None:
    n = Normalizer(source="https://alice:hunter2pw@pricing.example/v1/socket")
    assert n.source == "https://pricing.example/v1/socket"
    [ev] = n.tickers([ticker_record("BTC/USD", 1.0, T)])
    env = orjson.loads(ev.encoded("cloudevents-json").body)
    assert env["source"] == "https://pricing.example/v1/socket"


def _timed(skew_s: float = 60.0, age_s: float = 3600.0) -> Normalizer:
    return Normalizer(clock=lambda: T, max_clock_skew_s=skew_s, max_record_age_s=age_s)


def test_send_times_out_of_the_clock_bounds_are_dropped_by_reason(caplog: Any) -> None:
    """A record stamped ten years ahead, or in 2000, is dropped and counted; records
    within the skew and the age bound pass."""
    n = _timed()
    ten_years = 10 * 365 * 86_400_000
    ok = [ticker_record("A/USD", 1.0, T + 59_000), ticker_record("B/USD", 1.0, T - 3_599_000),
          ticker_record("C/USD", 1.0, T)]
    bad = [ticker_record("D/USD", 1.0, T + ten_years), ticker_record("E/USD", 1.0, T + 61_000),
           ticker_record("F/USD", 1.0, 946_684_800_000), ticker_record("G/USD", 1.0, T - 3_601_000)]
    for _ in range(3):
        assert [e.symbol for e in n.tickers(ok + bad)] == ["A/USD", "B/USD", "C/USD"]
    assert n.invalid == {"ticker:clock_skew": 6, "ticker:too_old": 6}
    eq = n.equities([equity_record("AAPL", 1.0, T + ten_years), equity_record("MSFT", 2.0, T)])
    assert [e.symbol for e in eq] == ["MSFT"] and n.invalid["equity:clock_skew"] == 1
    # logged once per (kind, reason), with a sample and what to check
    skew = [r.getMessage() for r in caplog.records if "(clock_skew" in r.getMessage()]
    old = [r.getMessage() for r in caplog.records if "(too_old" in r.getMessage()]
    assert len(skew) == 2 and len(old) == 1
    assert "ahead of this host's clock" in skew[0] and "max_clock_skew_s (60s)" in skew[0]
    assert "D/USD" in skew[0] and "time sync" in skew[0]
    assert "max_record_age_s (3600s)" in old[0] and "F/USD" in old[0]


def test_the_bounds_are_taken_from_each_batch_receive_time() -> None:
    n = Normalizer(max_clock_skew_s=1.0, max_record_age_s=2.0)
    records = [ticker_record("A/USD", 1.0, T)]
    assert len(n.validate("ticker", records, T + 1_500)) == 1
    assert n.validate("ticker", records, T - 1_001) == []
    assert n.validate("ticker", records, T + 2_001) == []
    assert n.invalid == {"ticker:clock_skew": 1, "ticker:too_old": 1}
    assert n.timely(T, T + 2_000) and n.timely(T, T - 1_000)
    assert not n.timely(T, T + 2_001) and not n.timely(T, T - 1_001)


def test_without_bounds_only_the_plausible_years_are_checked() -> None:
    """Tools that replay recorded feeds build a normalizer without bounds."""
    n = Normalizer(clock=lambda: T + 10 * 365 * 86_400_000)
    assert len(n.tickers([ticker_record("A/USD", 1.0, T)])) == 1
    assert n.timely(T, T + 10 * 365 * 86_400_000)
    assert n.tickers([ticker_record("A/USD", 1.0, 7_258_118_400_001)]) == []
    assert n.invalid == {"ticker:bad_timestamp": 1}
