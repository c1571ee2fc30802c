"""The CloudEvents envelope: shape, determinism, formats, round trip."""

from __future__ import annotations

import orjson

from bridge.envelope import CLOUDEVENTS_JSON, iso_time
from bridge.normalize import Normalizer
from bridge.testing.sample import equity_record, ticker_record

T = 1_732_480_000_000


def test_structured_envelope_matches_the_design() -> None:
    [ev] = Normalizer(source="https://x.test/v1/socket", clock=lambda: T + 12).tickers(
        [ticker_record("BTC/USD", 87107.08, T)]
    )
    enc = ev.encoded("cloudevents-json")
    env = orjson.loads(enc.body)
    assert enc.content_type == CLOUDEVENTS_JSON and enc.attributes == {}
    assert env["specversion"] == "1.0"
    assert env["type"] == "ai.aleno.ticker.v1"
    assert env["source"] == "https://x.test/v1/socket"
    assert env["subject"] == "BTC/USD"
    assert env["time"] == "2024-11-24T20:26:40.000Z"
    assert env["datacontenttype"] == "application/json"
    assert env["data"]["price"] == 87107.08
    assert env["data"]["aggregated"]["price"] == 87107.08


def test_id_is_deterministic_across_processes_and_receive_times() -> None:
    a = Normalizer(clock=lambda: T + 1).equities([equity_record("AAPL", 1.0, T)])[0]
    b = Normalizer(clock=lambda: T + 999).equities([equity_record("aapl ", 2.0, T)])[0]
    c = Normalizer(clock=lambda: T + 1).equities([equity_record("AAPL", 1.0, T + 1000)])[0]
    assert a.id == b.id
    assert a.id != c.id
    assert a.type == "ai.aleno.equity.v1"


def test_binary_mode_puts_attributes_aside_and_data_in_the_body() -> None:
    [ev] = Normalizer(clock=lambda: T).tickers([ticker_record("ETH/USD", 3000.5, T)])
    enc = ev.encoded("cloudevents-binary")
    assert orjson.loads(enc.body) == ev.data
    assert enc.attributes["id"] == ev.id and enc.attributes["subject"] == "ETH/USD"
    assert set(enc.attributes) == {"specversion", "id", "source", "type", "subject", "time"}


def test_raw_mode_is_the_record_as_received() -> None:
    rec = ticker_record("SOL/USD", 242.1, T)
    rec["extra"] = {"kept": True}
    [ev] = Normalizer(clock=lambda: T).tickers([rec])
    assert orjson.loads(ev.encoded("raw").body) == rec


def test_encoding_is_cached_per_format() -> None:
    [ev] = Normalizer(clock=lambda: T).tickers([ticker_record("SOL/USD", 242.1, T)])
    assert ev.encoded("cloudevents-json") is ev.encoded("cloudevents-json")


def test_iso_time_millisecond_precision() -> None:
    assert iso_time(0 + 946_684_800_123) == "2000-01-01T00:00:00.123Z"
