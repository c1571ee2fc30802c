"""The ``kafka`` driver without a broker: options, the topic rule, configuration.

Moved from ``tests/drivers/kafka/test_kafka.py`` so that ``make unit`` runs them; the
driver against a real broker stays there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiokafka import codec as kafka_codec
from aleno_bridge_plugins.kafka import KafkaOptions, KafkaSink
from pydantic import ValidationError

from bridge.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).parents[3]


def test_safe_token_and_check_topic() -> None:
    assert KafkaSink.safe_token("BTC/USD") == "BTC_USD"
    assert KafkaSink.safe_token("BRK.B") == "BRK.B"
    assert KafkaSink.safe_token("a b+c#d>é") == "a_b_c_d__"
    assert KafkaSink.check_topic("aleno.ticker.BTC_USD") is None
    assert KafkaSink.check_topic("x" * 249) is None
    for bad, why in [("", "empty"), (".", "'.'"), ("..", "'..'"), ("x" * 250, "249"),
                     ("prices/BTC_USD", "'/'"), ("a b", "' '")]:
        problem = KafkaSink.check_topic(bad)
        assert problem is not None and why in problem, (bad, problem)


def test_options_are_normalized_and_checked() -> None:
    o = KafkaOptions.model_validate({"bootstrap_servers": "a:9092, b:9093", "acks": "1"})
    assert o.bootstrap_servers == ["a:9092", "b:9093"]
    assert o.acks == 1
    assert KafkaOptions.model_validate({"bootstrap_servers": ["a:1"], "acks": -1}).acks == "all"
    assert KafkaOptions.model_validate({"bootstrap_servers": "a:1"}).acks == "all"
    bad: list[dict[str, Any]] = [
        {"bootstrap_servers": []},
        {"bootstrap_servers": "no-port"},
        {"bootstrap_servers": "a:1", "acks": 2},
        {"bootstrap_servers": "a:1", "security_protocol": "SASL_SSL"},
        {"bootstrap_servers": "a:1", "sasl_username": "u", "sasl_password": "p",
         "sasl_mechanism": "PLAIN"},
        {"bootstrap_servers": "a:1", "ssl_cafile": "/ca.pem"},
        {"bootstrap_servers": "a:1", "security_protocol": "SSL", "ssl_certfile": "/c.pem"},
        {"bootstrap_servers": "a:1", "enable_idempotence": True, "acks": 1},
        {"bootstrap_servers": "a:1", "create_topics": ["ok", "not/ok"]},
        {"bootstrap_servers": "a:1", "compression": "brotli"},
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            KafkaOptions.model_validate(raw)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_compression_codec_must_be_installed(codec: str) -> None:
    installed = getattr(kafka_codec, f"has_{codec}")()
    raw = {"bootstrap_servers": "a:1", "compression": codec}
    if installed:
        assert KafkaOptions.model_validate(raw).compression == codec
    else:
        with pytest.raises(ValidationError) as info:
            KafkaOptions.model_validate(raw)
        assert f"pip install 'aiokafka[{codec}]'" in str(info.value)


def test_config_errors_never_show_the_password() -> None:
    text = """
source: {api_key: k}
sinks:
  bus:
    driver: kafka
    bootstrap_servers: a:9092
    security_protocol: SASL_SSL
    sasl_username: bridge
    sasl_password: hunter2-in-config
    acks: nope
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert "sinks.bus.acks" in str(info.value)
    assert "hunter2-in-config" not in str(info.value)


def test_example_config_is_valid() -> None:
    settings = load_config(ROOT / "config" / "kafka.yaml", env={})
    kafka = [s for s in settings.sinks.values() if s.driver is KafkaSink]
    assert kafka, "config/kafka.yaml has no kafka sink"
    assert isinstance(kafka[0].options, KafkaOptions)


def test_batch_bytes_default_fits_one_core_batch_and_the_request_limit() -> None:
    # aiokafka blocks send() on a full partition batch until it is delivered: the
    # default holds a whole core batch, but never more than max_request_bytes
    sink = KafkaSink("k", KafkaOptions(bootstrap_servers=["b:9092"]))
    assert sink._batch_bytes() == 524_288
    small = KafkaSink("k", KafkaOptions(bootstrap_servers=["b:9092"],
                                        max_request_bytes=100_000))
    assert small._batch_bytes() == 100_000
    explicit = KafkaSink("k", KafkaOptions(bootstrap_servers=["b:9092"],
                                           max_batch_bytes=16_384))
    assert explicit._batch_bytes() == 16_384


def test_headers_fast_path_matches_the_binding() -> None:
    from aleno_bridge_plugins.kafka import headers

    from bridge.pipeline.normalize import Normalizer
    from bridge.sinks import Message
    from bridge.sinks.kit import KAFKA_PREFIX, ce_headers
    from bridge.testing.sample import ticker_record

    (ev,) = Normalizer().tickers([ticker_record("BTC/USD", 1.5, 1_700_000_000_000)])
    for fmt in ("cloudevents-json", "cloudevents-binary", "raw"):
        enc = ev.encoded(fmt)
        m = Message("t", "BTC/USD", enc.body, enc.content_type, ev,
                    enc.attributes)
        want = [(k, v.encode())
                for k, v in ce_headers(m, KAFKA_PREFIX, always_id=True).items()]
        assert headers(m) == want


def test_topic_config_and_compact_options() -> None:
    base = {"bootstrap_servers": "a:9092", "create_topics": True}
    o = KafkaOptions.model_validate(base)
    assert (o.topic_config, o.compact, o.topic_configs) == ({}, False, {})
    o = KafkaOptions.model_validate({**base, "compact": True})
    assert o.topic_configs == {"cleanup.policy": "compact"}
    # YAML numbers and booleans are taken as Kafka writes them
    o = KafkaOptions.model_validate({**base, "compact": True, "topic_config": {
        "min.compaction.lag.ms": 0, "min.cleanable.dirty.ratio": 0.1, "preallocate": True}})
    assert o.topic_configs == {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                               "min.cleanable.dirty.ratio": "0.1", "preallocate": "true"}
    both = KafkaOptions.model_validate(
        {**base, "compact": True, "topic_config": {"cleanup.policy": "compact,delete"}})
    assert both.topic_configs == {"cleanup.policy": "compact,delete"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({**base, "compact": True, "topic_config": {"cleanup.policy": "delete"}},
         "remove one of them"),
        ({"bootstrap_servers": "a:9092", "compact": True}, "set create_topics"),
        ({"bootstrap_servers": "a:9092", "topic_config": {"retention.ms": "1"}},
         "set create_topics"),
        ({**base, "topic_config": {" ": "x"}}, "not a Kafka config name"),
        ({**base, "topic_config": {"retention.ms": [1]}}, "topic_config"),
    ]
    for raw, why in bad:
        with pytest.raises(ValidationError) as info:
            KafkaOptions.model_validate(raw)
        assert why in str(info.value), (raw, str(info.value))

