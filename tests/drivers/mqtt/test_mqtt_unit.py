"""The ``mqtt`` driver without a broker: options, the topic rule, configuration.

Moved from ``tests/drivers/mqtt/test_mqtt.py`` so that ``make unit`` runs them; the
driver against real brokers stays there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aleno_bridge_plugins.mqtt import MqttOptions, MqttSink
from pydantic import ValidationError

from bridge.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).parents[3]


def test_safe_token_and_check_topic() -> None:
    assert MqttSink.safe_token("BTC/USD") == "BTC_USD"
    assert MqttSink.safe_token("BRK.B") == "BRK.B"
    assert MqttSink.safe_token("a+b#c/d\x00e f") == "a_b_c_d_e f"
    assert MqttSink.check_topic("aleno/ticker/BTC/USD") is None
    assert MqttSink.check_topic("prices.ticker.BTC_USD") is None
    assert MqttSink.check_topic("x" * 65535) is None
    for bad, why in [("", "empty"), ("a/+/b", "wildcard"), ("a/#", "wildcard"),
                     ("a\x00b", "NUL"), ("é" * 40000, "65535"), ("$SYS/x", "$")]:
        problem = MqttSink.check_topic(bad)
        assert problem is not None and why in problem, (bad, problem)


def test_options_defaults_and_checks() -> None:
    o = MqttOptions.model_validate({"host": "broker"})
    assert (o.effective_port, o.qos, o.protocol, o.retain, o.clean_start) == (
        1883, 1, "5", False, True)
    assert (o.keepalive_s, o.max_inflight, o.tls_verify) == (15, 100, True)
    assert o.client_id.startswith("aleno-bridge-")
    assert MqttOptions.model_validate({"host": "broker"}).client_id != o.client_id
    assert MqttOptions.model_validate({"host": "b", "tls": True}).effective_port == 8883
    assert MqttOptions.model_validate({"host": "b", "tls": True, "port": 1}).effective_port == 1
    assert MqttOptions.model_validate({"host": "b", "protocol": 5}).protocol == "5"
    assert MqttOptions.model_validate({"host": "b", "protocol": "3.1.1"}).protocol == "3.1.1"
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "host"),
        ({"host": "b", "password": "p"}, "password needs a username"),
        ({"host": "b", "tls_ca_file": "/ca.pem"}, "set tls: true"),
        ({"host": "b", "tls": True, "tls_key_file": "/k.pem"}, "tls_key_file needs"),
        ({"host": "b", "protocol": "3.1.1", "session_expiry_s": 60}, "protocol 5"),
        ({"host": "b", "qos": 2, "clean_start": False}, "clean_start"),
        ({"host": "b", "qos": 3}, "qos"),
        ({"host": "b", "protocol": "4"}, "protocol"),
        ({"host": "b", "keepalive_s": 0}, "keepalive_s"),
        ({"host": "b", "no_such": 1}, "no_such"),
    ]
    for raw, why in bad:
        with pytest.raises(ValidationError) as info:
            MqttOptions.model_validate(raw)
        assert why in str(info.value), (raw, str(info.value))


def test_host_with_credentials_is_refused_without_quoting_them() -> None:
    for host in ("user:s3cret-pw@broker", "mqtt://broker", "broker:1883", "a b"):
        text = f"""
source: {{api_key: k, tickers: [BTC/USD]}}
sinks:
  bus: {{driver: mqtt, host: "{host}"}}
"""
        with pytest.raises(ConfigError) as info:
            parse_config(text, env={})
        assert "sinks.bus.host" in str(info.value), host
        assert "s3cret-pw" not in str(info.value)
    for host in ("broker.example", "10.0.0.1", "::1", "fe80::1"):
        MqttOptions.model_validate({"host": host})


def test_config_refuses_topics_that_can_never_be_published() -> None:
    def config(topic: str) -> str:
        return f"""
source: {{api_key: k, tickers: [BTC/USD]}}
sinks:
  bus: {{driver: mqtt, host: 127.0.0.1, username: bridge, password: hunter2-in-config}}
routes:
  - sinks: [bus]
    topic: "{topic}"
"""

    ok = parse_config(config("aleno/{kind}/{base}/{quote}"), env={})
    assert isinstance(ok.sinks["bus"].options, MqttOptions)
    for topic, why in [("aleno/{symbol}/#", "wildcard"), ("$SYS/{symbol}", "$"),
                       ("aleno/+/{symbol}", "wildcard")]:
        with pytest.raises(ConfigError) as info:
            parse_config(config(topic), env={})
        assert "routes[0].topic" in str(info.value) and why in str(info.value)
        assert "hunter2-in-config" not in str(info.value)


def test_example_config_is_valid() -> None:
    settings = load_config(ROOT / "config" / "mqtt.yaml", env={})
    mqtt = [s for s in settings.sinks.values() if s.driver is MqttSink]
    assert mqtt, "config/mqtt.yaml has no mqtt sink"
    assert isinstance(mqtt[0].options, MqttOptions)


def _expiry_config(extra: str) -> str:
    return f"""
source: {{api_key: k, tickers: [BTC/USD]}}
sinks:
  bus: {{driver: mqtt, host: 127.0.0.1, retain: true{extra}}}
routes:
  - sinks: [bus]
    topic: "aleno/{{kind}}/{{base}}/{{quote}}"
"""


def test_message_expiry_option() -> None:
    assert MqttOptions.model_validate({"host": "b"}).message_expiry_s is None
    assert MqttOptions.model_validate({"host": "b", "message_expiry_s": 30}).message_expiry_s == 30
    for bad in (0, -1, 2**32, 1.5, "soon"):
        with pytest.raises(ValidationError) as info:
            MqttOptions.model_validate({"host": "b", "message_expiry_s": bad})
        assert "message_expiry_s" in str(info.value), bad
    # MQTT 3.1.1 has no message expiry: a config error at the option's own path
    with pytest.raises(ConfigError) as err:
        parse_config(_expiry_config(', protocol: "3.1.1", message_expiry_s: 30'), env={})
    assert "sinks.bus.message_expiry_s: needs protocol 5" in str(err.value)
    ok = parse_config(_expiry_config(", message_expiry_s: 30"), env={})
    assert ok.sinks["bus"].options.message_expiry_s == 30  # type: ignore[attr-defined]


def test_message_expiry_is_a_publish_property_of_every_message() -> None:
    from bridge.sinks import Message
    from bridge.testing.sample import messages, sample_events

    (ev,) = sample_events(1, 1)
    structured = messages([ev], "t")[0]
    enc = ev.encoded("cloudevents-binary")
    binary = Message("t", None, enc.body, enc.content_type, ev, enc.attributes)
    with_expiry = MqttSink("bus", MqttOptions.model_validate({"host": "b",
                                                             "message_expiry_s": 90}))
    without = MqttSink("bus", MqttOptions.model_validate({"host": "b"}))
    for m in (structured, binary):
        props = with_expiry._properties(m)
        assert props is not None and props.MessageExpiryInterval == 90
        assert props.ContentType == m.content_type
        plain = without._properties(m)
        assert plain is not None and not hasattr(plain, "MessageExpiryInterval")
    # the hot path: messages without user properties share one pre-packed object
    first = with_expiry._properties(structured)
    assert first is with_expiry._properties(structured)
    assert first is not None and b"\x02\x00\x00\x00\x5a" in first.pack()  # id 2, 90 s
    v311 = MqttSink("bus", MqttOptions.model_validate({"host": "b", "protocol": "3.1.1"}))
    assert v311._properties(structured) is None
