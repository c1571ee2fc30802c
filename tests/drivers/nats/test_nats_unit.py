"""The ``nats`` driver without a server: the subject rule, options, configuration.

Moved from ``tests/drivers/nats/test_nats.py`` so that ``make unit`` runs them; the
driver against a real server stays there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aleno_bridge_plugins.nats import NatsOptions, NatsSink
from pydantic import ValidationError

from bridge.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[3]


def make_sink(name: str = "nats-test", **options: Any) -> NatsSink:
    return NatsSink(name, NatsOptions.model_validate(options))


@pytest.mark.parametrize(("value", "safe"), [
    ("BTC/USD", "BTC/USD"),
    ("BRK.B", "BRK_B"),
    ("A B\tC", "A_B_C"),
    ("X*>Y", "X__Y"),
    ("bad\x00\x1f\x7f", "bad___"),
    ("", ""),
])
def test_safe_token(value: str, safe: str) -> None:
    assert NatsSink.safe_token(value) == safe
    assert NatsSink.check_topic(f"prices.{NatsSink.safe_token(value) or 'x'}") is None


@pytest.mark.parametrize(("topic", "problem"), [
    ("prices.ticker.BTC/USD", None),
    ("", "empty"),
    (".prices", "empty token"),
    ("prices.", "empty token"),
    ("prices..x", "empty token"),
    ("prices.a b", "whitespace"),
    ("prices.*", "wildcard"),
    ("prices.>", "wildcard"),
    ("prices.a*b", "wildcard"),
])
def test_check_topic(topic: str, problem: str | None) -> None:
    found = NatsSink.check_topic(topic)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_template_that_can_never_be_valid_is_a_config_error() -> None:
    text = """
source: {api_key: k, equities: [AAPL]}
sinks: {bus: {driver: nats, servers: "nats://127.0.0.1:4222"}}
routes: [{sinks: [bus], topic: "prices.{kind}.{quote}"}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert "empty token" in str(info.value)
    assert "routes[0].topic" in str(info.value)


def test_options() -> None:
    opts = NatsOptions.model_validate({"servers": "nats://a:4222, tls://b:4222"})
    assert opts.servers == ["nats://a:4222", "tls://b:4222"]
    assert opts.tls_verify is True and opts.jetstream is False and opts.name == "aleno-bridge"
    assert NatsOptions.model_validate({"servers": "127.0.0.1:4222"}).servers == [
        "nats://127.0.0.1:4222"
    ]
    bad: Iterable[dict[str, Any]] = [
        {},
        {"servers": []},
        {"servers": "http://a:4222"},
        {"servers": "nats://a:4222", "user": "u"},
        {"servers": "nats://a:4222", "user": "u", "password": "p", "token": "t"},
        {"servers": "nats://a:4222", "stream": {"name": "S", "subjects": ["a.>"]}},
        {"servers": "nats://a:4222", "jetstream": True,
         "stream": {"name": "S", "subjects": ["a.>"], "max_age_s": 10}},
        {"servers": "nats://a:4222", "tls_cert_file": "c.pem"},
        {"servers": "nats://a:4222", "key_header": "bad header"},
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            NatsOptions.model_validate(raw)


def test_credentials_in_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValidationError) as info:
        NatsOptions.model_validate({"servers": "nats://alice:hunter2-secret@host:4222"})
    errors = info.value.errors(include_input=False, include_url=False)
    assert "credentials" in str(errors)
    assert "hunter2-secret" not in str(errors)


def test_secrets_never_in_repr() -> None:
    sink = make_sink(servers="nats://a:4222", user="alice", password="pw-Secret-1")
    token_sink = make_sink(servers="nats://a:4222", token="tok-Secret-2")
    text = repr(sink) + str(sink.options) + repr(token_sink) + str(token_sink.options)
    assert "pw-Secret-1" not in text and "tok-Secret-2" not in text
    assert "alice" in text


def test_example_config_validates() -> None:
    settings = load_config(ROOT / "config" / "nats.yaml", env={})
    drivers = {spec.driver for spec in settings.sinks.values()}
    assert NatsSink in drivers


def test_creds_need_the_nkeys_package(tmp_path: Path) -> None:
    """nats-py imports ``nkeys`` only when it connects; the options say it up front."""
    try:
        import nkeys  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("nkeys is installed")
    for option in ("creds_file", "nkeys_seed"):
        with pytest.raises(ValidationError) as info:
            NatsOptions.model_validate({"servers": "nats://a:4222", option: str(tmp_path / "x")})
        assert "pip install nkeys" in str(info.value)


def test_stream_last_value_options_reach_the_stream_config() -> None:
    from aleno_bridge_plugins.nats import StreamOptions, stream_config

    plain = StreamOptions.model_validate({"name": "PRICES", "subjects": ["prices.>"]})
    assert (plain.max_msgs_per_subject, plain.allow_direct) == (None, False)
    # unset: the server's defaults, so a stream made before these options is unchanged
    assert stream_config(plain).max_msgs_per_subject == -1
    assert "allow_direct" not in stream_config(plain).as_dict()
    last = StreamOptions.model_validate({"name": "PRICES", "subjects": ["prices.>"],
                                         "max_msgs_per_subject": 1, "allow_direct": True})
    config = stream_config(last).as_dict()
    assert config["max_msgs_per_subject"] == 1 and config["allow_direct"] is True
    assert config["name"] == "PRICES" and config["subjects"] == ["prices.>"]
    for bad in ({"max_msgs_per_subject": 0}, {"max_msgs_per_subject": -1},
                {"allow_direct": "sometimes"}):
        with pytest.raises(ValidationError):
            StreamOptions.model_validate({"name": "S", "subjects": ["a.>"], **bad})


def test_stream_last_value_options_in_a_config_file() -> None:
    text = """
source: {api_key: k, tickers: [BTC/USD]}
sinks:
  bus:
    driver: nats
    servers: nats://127.0.0.1:4222
    jetstream: true
    stream: {name: PRICES, subjects: ["prices.>"], max_msgs_per_subject: 1,
             allow_direct: true}
routes: [{sinks: [bus], topic: "prices.{kind}.{symbol}"}]
"""
    opts = parse_config(text, env={}).sinks["bus"].options
    assert isinstance(opts, NatsOptions) and opts.stream is not None
    assert opts.stream.max_msgs_per_subject == 1 and opts.stream.allow_direct
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("max_msgs_per_subject: 1", "max_msgs_per_subject: 0"),
                     env={})
    assert "sinks.bus.stream.max_msgs_per_subject" in str(info.value)


@pytest.mark.parametrize(("old", "new", "name"), [
    ("aleno_bridge_plugins.nats_sink", "aleno_bridge_plugins.nats", "NatsSink"),
    ("aleno_bridge_plugins.kafka_sink", "aleno_bridge_plugins.kafka", "KafkaSink"),
    ("aleno_bridge_plugins.mqtt_sink", "aleno_bridge_plugins.mqtt", "MqttSink"),
])
def test_the_old_driver_modules_still_work_and_say_where_the_new_ones_are(
    old: str, new: str, name: str,
) -> None:
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
