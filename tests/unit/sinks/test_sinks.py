"""The plugin contract: messages, errors, the default hooks, driver checks and discovery
from injected drivers (the installed entry points:
tests/integration/sinks/test_plugin_discovery.py)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from bridge.core.envelope import CLOUDEVENTS_JSON, EventHeader
from bridge.sinks import (
    DriverLoadError,
    Drivers,
    Message,
    Sink,
    SinkConnectionError,
    SinkError,
    SinkOptions,
    SinkRejectedError,
    UnknownDriverError,
    check_driver,
    replace_chars,
)
from bridge.testing import MemoryOptions, MemorySink, messages, sample_events


class NoOptions(SinkOptions):
    pass


class Minimal(Sink[NoOptions]):
    options_model = NoOptions

    async def connect(self) -> None:
        pass

    async def publish(self, batch: Sequence[Message]) -> None:
        pass

    async def close(self) -> None:
        pass


def test_options_refuse_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        MemoryOptions.model_validate({"latency_ms": 1, "typo": True})


def test_a_message_keeps_only_the_event_header() -> None:
    event = sample_events(symbols=1, updates=1)[0]
    enc = event.encoded("cloudevents-json")
    m = Message("t", "BTC/USD", enc.body, enc.content_type, event)
    assert type(m.event) is EventHeader and m.event is event.header
    assert m.id == event.id and m.attributes == {}


def test_extensions_go_inside_a_structured_envelope_and_in_attributes_otherwise() -> None:
    event = sample_events(symbols=1, updates=1)[0]
    structured = messages([event], "t")[0]
    assert structured.content_type == CLOUDEVENTS_JSON
    tagged = structured.with_extensions({"deadletterreason": "too_large"})
    assert orjson.loads(tagged.body)["deadletterreason"] == "too_large"
    assert tagged.attributes == {} and structured.body != tagged.body
    binary = messages([event], "t", fmt="cloudevents-binary")[0]
    tagged = binary.with_extensions({"deadletterreason": "too_large"})
    assert tagged.body == binary.body
    assert tagged.attributes["deadletterreason"] == "too_large"
    assert tagged.attributes["id"] == event.id


def test_errors_say_whether_to_retry() -> None:
    sink = Minimal("s", NoOptions())
    assert sink.is_retriable(SinkConnectionError("s", "down"))
    assert sink.is_retriable(TimeoutError()) and sink.is_retriable(OSError())
    assert not sink.is_retriable(SinkRejectedError("s", "too large"))
    assert not sink.is_retriable(ValueError())
    assert str(SinkError("s", "boom")) == "sink 's': boom"


def test_a_rejection_counts_what_it_names() -> None:
    assert SinkRejectedError("s", "x").rejected is None
    assert SinkRejectedError("s", "x", refused=[0, 2]).rejected == 2
    assert SinkRejectedError("s", "x", 1, refused=[0, 2]).rejected == 1
    assert SinkRejectedError("s", "x").reason == "rejected"


def test_default_hooks() -> None:
    assert Minimal.safe_token("BTC/USD") == "BTC/USD"
    assert Minimal.check_topic("") == "the topic is empty"
    assert Minimal.check_topic("x") is None
    assert Minimal.check_format(NoOptions(), "raw") is None
    assert Minimal.security_warnings(NoOptions()) == []
    assert replace_chars(r"[/ ]", "_")("BTC/USD X") == "BTC_USD_X"


def test_repr_names_the_driver_and_its_options() -> None:
    assert repr(Minimal("s", NoOptions())) == "Minimal(name='s', options=NoOptions())"


def test_check_driver_names_what_is_wrong() -> None:
    assert check_driver(Minimal) is None
    assert "not a subclass" in (check_driver(object) or "")

    class Abstract(Sink[NoOptions]):
        options_model = NoOptions

    assert "does not implement: close, connect, publish" in (check_driver(Abstract) or "")

    class NoModel(Minimal):
        options_model = dict  # type: ignore[assignment]

    assert "options_model" in (check_driver(NoModel) or "")


def test_injected_drivers() -> None:
    drivers = Drivers({"memory": MemorySink, "minimal": Minimal, "broken": object})  # type: ignore[dict-item]
    assert drivers.names() == ["memory", "minimal"]
    assert drivers.get("memory") is MemorySink
    with pytest.raises(DriverLoadError, match="not a subclass"):
        drivers.get("broken")
    with pytest.raises(UnknownDriverError) as info:
        drivers.get("kafka")
    assert info.value.available == ["memory", "minimal"]
    assert "available drivers: memory, minimal" in str(info.value)
    infos = {i.name: i for i in drivers.infos()}
    assert infos["broken"].driver is None and infos["broken"].error
