"""The configuration schema: defaults, strictness, and the names of its sections."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge import config
from bridge.config.schema import (
    BackoffConfig,
    Config,
    Match,
    RetryConfig,
    RouteConfig,
    SinkCommon,
    SourceConfig,
    key_problem,
)


def test_defaults_of_the_documented_contract() -> None:
    src = SourceConfig()
    assert src.endpoint == "https://pricing.aleno.ai/v1/socket"
    assert src.backoff == BackoffConfig(initial_s=0.5, max_s=30.0)
    assert Match().kind == "*" and Match().symbols == ["*"]
    route = RouteConfig(sinks=["bus"])
    assert (route.topic, route.key) == ("aleno.{kind}.{symbol}", "{symbol}")
    common = SinkCommon(driver="kafka")
    assert common.format == "cloudevents-json"
    assert common.buffer.when_full == "drop_oldest"


def test_backoff_and_retry_keep_their_file_keys() -> None:
    assert set(BackoffConfig.model_fields) == {"initial_s", "max_s"}
    assert {"initial_backoff_s", "max_backoff_s"} <= set(RetryConfig.model_fields)
    assert SourceConfig.model_validate({"backoff": {"initial_s": 1}}).backoff.initial_s == 1.0


def test_unknown_keys_and_non_finite_floats_are_refused() -> None:
    with pytest.raises(ValidationError):
        BackoffConfig.model_validate({"initial_backoff_s": 1})
    with pytest.raises(ValidationError):
        RetryConfig.model_validate({"publish_timeout_s": float("inf")})


def test_a_sink_keeps_the_driver_options_as_extras() -> None:
    common = SinkCommon.model_validate({"driver": "kafka", "bootstrap_servers": "h:9092"})
    assert common.model_extra == {"bootstrap_servers": "h:9092"}


def test_a_route_template_is_checked_when_the_route_is_built() -> None:
    with pytest.raises(ValidationError, match=r"unknown placeholder \{sym\}"):
        RouteConfig(sinks=["bus"], topic="p.{sym}")


def test_symbols_are_normalized_and_deduplicated() -> None:
    assert SourceConfig(tickers=[" btc/usd", "BTC/USD", "eth/usd"]).tickers == [
        "BTC/USD", "ETH/USD"]


def test_key_problem_never_quotes_the_key() -> None:
    assert key_problem("abc") is None
    problem = key_problem("ab\tsecret")
    assert problem is not None and "secret" not in problem


def test_config_needs_a_sink() -> None:
    with pytest.raises(ValidationError):
        Config.model_validate({})


def test_the_public_entry_re_exports_the_schema() -> None:
    assert config.SourceConfig is SourceConfig
    assert config.BackoffConfig is BackoffConfig
    assert not hasattr(config, "Backoff")


def test_source_compression_is_auto_or_off_and_reads_yaml_booleans() -> None:
    assert SourceConfig().compression == "auto"
    assert SourceConfig.model_validate({"compression": "off"}).compression == "off"
    # YAML 1.1 reads a bare off/on as a boolean
    assert SourceConfig.model_validate({"compression": False}).compression == "off"
    assert SourceConfig.model_validate({"compression": True}).compression == "auto"
    with pytest.raises(ValidationError):
        SourceConfig.model_validate({"compression": "gzip"})


def test_time_sanity_and_status_damping_defaults_and_bounds() -> None:
    src = SourceConfig()
    assert (src.max_clock_skew_s, src.max_record_age_s) == (60.0, 3600.0)
    assert (src.status_damping.max_events, src.status_damping.window_s) == (4, 60.0)
    custom = SourceConfig.model_validate({"max_clock_skew_s": 5, "max_record_age_s": 30,
                                          "status_damping": {"max_events": 10,
                                                             "window_s": 30}})
    assert custom.status_damping.max_events == 10 and custom.max_clock_skew_s == 5.0
    for bad in ({"max_clock_skew_s": 0}, {"max_record_age_s": -1},
                {"status_damping": {"max_events": 0}}, {"status_damping": {"window_s": 0}},
                {"status_damping": {"per_minute": 3}}):
        with pytest.raises(ValidationError):
            SourceConfig.model_validate(bad)
