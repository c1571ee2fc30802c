"""The CloudEvents envelope: shape, determinism, formats, round trip."""

from __future__ import annotations

import orjson

from bridge.core.envelope import CLOUDEVENTS_JSON, iso_time
from bridge.pipeline.normalize import Normalizer
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


# -- issue 8: a message keeps a light header, not the event -----------------------------


def test_a_message_keeps_the_light_header_not_the_event() -> None:
    import warnings

    from bridge.core.envelope import EventHeader
    from bridge.sinks import Message
    from bridge.testing import sample_events

    ev = sample_events(symbols=1, updates=1)[0]
    enc = ev.encoded("cloudevents-json")
    m = Message("t", None, enc.body, enc.content_type, ev)  # a full Event is accepted
    h = m.event
    assert type(h) is EventHeader and h is ev.header  # shared by all the event's messages
    assert not hasattr(h, "_encoded") and not hasattr(h, "_header")
    assert (h.kind, h.symbol, h.base, h.quote, h.id) == ("ticker", ev.symbol, ev.base,
                                                         ev.quote, ev.id)
    assert (h.sent_ms, h.received_ms, h.time, h.price) == (ev.sent_ms, ev.received_ms,
                                                           ev.time, ev.price)
    assert h.type == "ai.aleno.ticker.v1" and h.source == ev.source
    assert h.attributes() == ev.attributes()
    # the heavy parts still answer, decoded from the body, with a DeprecationWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert h.data == ev.data
        assert h.envelope() == ev.envelope()
        assert h.prices == ev.prices
        assert h.raw["id"] == ev.raw["id"]
    assert len(caught) == 4 and all(w.category is DeprecationWarning for w in caught)


def test_a_header_of_a_raw_body_decodes_data_through_the_normalizer() -> None:
    import warnings

    from bridge.testing import sample_events

    for kind in ("ticker", "equity"):
        ev = sample_events(symbols=1, updates=1, kind=kind)[0]
        ev.encoded("raw")  # the first format encoded is the one the header keeps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert ev.header.data == ev.data
            assert ev.header.raw == ev.raw


def test_encoded_bodies_are_exact_size() -> None:
    import sys

    from bridge.testing import sample_events

    ev = sample_events(symbols=1, updates=1)[0]
    for fmt in ("cloudevents-json", "cloudevents-binary", "raw"):
        body = ev.encoded(fmt).body
        assert sys.getsizeof(body) < len(body) + 64  # not orjson's 4 KiB buffer


def test_dead_letter_extensions_go_into_the_envelope_or_the_attributes() -> None:
    import orjson

    from bridge.testing import messages, sample_events

    ext = {"deadletterreason": "too_large", "deadlettersink": "bus", "deadlettererror": "e"}
    ev = sample_events(symbols=1, updates=1)[0]
    structured = messages([ev], "t", "cloudevents-json")[0].with_extensions(ext)
    env = orjson.loads(structured.body)
    assert {k: env[k] for k in ext} == ext and env["id"] == ev.id and not structured.attributes
    binary = messages([ev], "t", "cloudevents-binary")[0]
    dl = binary.with_extensions(ext)
    assert dl.body == binary.body and dict(dl.attributes) == {**binary.attributes, **ext}
    assert "deadletterreason" not in binary.attributes  # the original is untouched
