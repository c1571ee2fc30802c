"""Issue 8: insecure-setting warnings, the ``Sink.security_warnings`` plugin hook, the
bounded YAML loader, one-line API keys and non-finite floats in any driver's options."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from aleno_bridge_plugins.kafka import KafkaSink
from aleno_bridge_plugins.mqtt import MqttSink
from aleno_bridge_plugins.nats import NatsSink

from bridge.config import (
    ConfigError,
    Settings,
    interpolate,
    key_problem,
    parse_config,
)
from bridge.sinks import Drivers, Message, Sink, SinkOptions
from bridge.testing import MemorySink

SECRET = "hunter2-do-not-print"


class FloatOptions(SinkOptions):
    """A third-party model with an unconstrained float (no allow_inf_nan setting)."""

    ratio: float = 1.0


class FloatSink(Sink[FloatOptions]):
    options_model = FloatOptions

    async def connect(self) -> None: ...
    async def publish(self, batch: Sequence[Message]) -> None: ...
    async def close(self) -> None: ...


class BuggySink(FloatSink):
    @classmethod
    def security_warnings(cls, options: SinkOptions) -> list[str]:
        raise RuntimeError(SECRET)


def drivers() -> Drivers:
    return Drivers(injected={"memory": MemorySink, "float": FloatSink, "buggy": BuggySink,
                             "kafka": KafkaSink, "nats": NatsSink, "mqtt": MqttSink})


def load(text: str, env: dict[str, str] | None = None) -> Settings:
    return parse_config(text, env=env or {}, drivers=drivers())


def warnings_of(sink: str) -> list[str]:
    return load(f"source: {{url: 'https://h'}}\nsinks: {{s: {sink}}}\n").warnings


# -- source --------------------------------------------------------------------


def test_a_clean_configuration_has_no_warnings() -> None:
    s = load("source: {api_key: k}\nsinks: {m: {driver: memory}}\n")
    assert s.warnings == []


@pytest.mark.parametrize(("url", "key", "warned"), [
    ("http://pricing.example.com", "k", True),
    ("http://10.0.0.5:8765", "k", True),
    ("http://127.0.0.1:8765", "k", False),
    ("http://localhost:8765", "k", False),
    ("http://[::1]:8765", "k", False),
    ("https://pricing.example.com", "k", False),
    ("http://pricing.example.com", None, False),
])
def test_an_api_key_over_plain_http_to_a_remote_host_is_a_warning(
        url: str, key: str | None, warned: bool) -> None:
    key_part = f", api_key: {key}" if key else ""
    s = load(f"source: {{url: '{url}'{key_part}}}\nsinks: {{m: {{driver: memory}}}}\n")
    expected = [w for w in s.warnings if w.startswith("source.url: the API key is sent "
                                                       "unencrypted over http://")]
    assert bool(expected) is warned, s.warnings


def test_source_tls_verify_off_is_a_warning() -> None:
    s = load("source: {tls_verify: false}\nsinks: {m: {driver: memory}}\n")
    assert len(s.warnings) == 1 and s.warnings[0].startswith("source.tls_verify: false:")


# -- drivers --------------------------------------------------------------------


def test_the_default_hook_warns_about_nothing() -> None:
    assert MemorySink.security_warnings(MemorySink.options_model()) == []


def test_kafka_sasl_without_tls_is_a_warning_without_the_password() -> None:
    found = warnings_of("{driver: kafka, bootstrap_servers: 'b:9092', security_protocol: "
                        "SASL_PLAINTEXT, sasl_mechanism: PLAIN, sasl_username: u, "
                        f"sasl_password: {SECRET}}}")
    assert found == ["sinks.s.security_protocol: SASL_PLAINTEXT sends the SASL password itself "
                     "and every record unencrypted; use SASL_SSL"]


def test_kafka_without_host_name_check_is_a_warning() -> None:
    found = warnings_of("{driver: kafka, bootstrap_servers: 'b:9092', security_protocol: SSL, "
                        "ssl_check_hostname: false}")
    assert len(found) == 1 and found[0].startswith("sinks.s.ssl_check_hostname: false:")
    assert warnings_of("{driver: kafka, bootstrap_servers: 'b:9092', "
                       "security_protocol: SASL_SSL, sasl_mechanism: PLAIN, sasl_username: u, "
                       f"sasl_password: {SECRET}}}") == []


@pytest.mark.parametrize(("auth", "option"), [
    (f"user: u, password: {SECRET}", "password"), (f"token: {SECRET}", "token")])
def test_nats_credentials_without_tls_are_a_warning(auth: str, option: str) -> None:
    found = warnings_of(f"{{driver: nats, servers: 'nats://h:4222', {auth}}}")
    assert len(found) == 1 and found[0].startswith(f"sinks.s.{option}: no TLS is configured")
    assert SECRET not in found[0]
    assert warnings_of(f"{{driver: nats, servers: 'tls://h:4222', {auth}}}") == []


def test_nats_tls_verify_off_is_a_warning() -> None:
    found = warnings_of("{driver: nats, servers: 'tls://h:4222', tls_verify: false}")
    assert len(found) == 1 and found[0].startswith("sinks.s.tls_verify: false:")


def test_mqtt_password_without_tls_and_tls_verify_off_are_warnings() -> None:
    assert warnings_of(f"{{driver: mqtt, host: h, username: u, password: {SECRET}}}") == [
        "sinks.s.password: sent in clear text (tls is false); set tls: true"]
    found = warnings_of("{driver: mqtt, host: h, tls: true, tls_verify: false}")
    assert len(found) == 1 and found[0].startswith("sinks.s.tls_verify: false:")
    assert warnings_of(f"{{driver: mqtt, host: h, tls: true, username: u, "
                       f"password: {SECRET}}}") == []


def test_a_failing_plugin_hook_is_a_warning_not_a_crash() -> None:
    found = warnings_of("{driver: buggy}")
    assert found == ["sinks.s.driver: buggy.security_warnings() failed: RuntimeError"]


def test_settings_built_without_warnings_still_work() -> None:
    s = load("sinks: {m: {driver: memory}}\n")
    again = Settings(config=s.config, sinks=s.sinks, routes=s.routes, api_key=None)
    assert again.warnings == []


# -- non-finite floats in drivers' options ----------------------------------------


def test_a_non_finite_float_in_a_third_party_model_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load("sinks: {f: {driver: float, ratio: .inf}}\n")
    assert err.value.problems == ["sinks.f.ratio: input should be a finite number"]


@pytest.mark.parametrize("sink", [
    "{driver: nats, servers: 'nats://h:4222', connect_timeout_s: .inf}",
    "{driver: nats, servers: 'nats://h:4222', jetstream: true, "
    "stream: {name: S, subjects: [a.>], max_age_s: .inf}}",
    "{driver: mqtt, host: h, ack_timeout_s: .inf}",
])
def test_builtin_drivers_refuse_non_finite_floats(sink: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(f"sinks: {{s: {sink}}}\n")
    assert len(err.value.problems) == 1 and "finite number" in err.value.problems[0]


# -- keys, interpolation, loader ---------------------------------------------------


@pytest.mark.parametrize(("key", "problem"), [
    ("abc", None), ("ab cd", 3), ("a\tb", 2), ("ab\u200b", 3), ("\x00", 1), (" k", 1)])
def test_key_problem(key: str, problem: int | None) -> None:
    found = key_problem(key)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.endswith(f"(found one at character {problem})")


def test_interpolate_reports_each_malformed_reference_once_per_string() -> None:
    tree, problems = interpolate({"a": "${A", "b": "x${1X}y${Z", "c": "$${A"}, {"A": "v"})
    assert tree["c"] == "${A"
    assert [p.split(":")[0] for p in problems] == ["a", "b"]


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load("x: " + "[" * 5000 + "]" * 5000 + "\nsinks: {m: {driver: memory}}\n")
    assert len(err.value.problems) == 1 and "nested deeper than" in err.value.problems[0]


def test_a_few_aliases_are_fine() -> None:
    s = load("sinks:\n  a: {driver: memory, retry: &r {initial_backoff_s: 1}}\n"
             "  b: {driver: memory, retry: *r}\n")
    assert s.sinks["b"].common.retry.initial_backoff_s == 1


def test_duplicate_keys_inside_an_alias_are_reported_once() -> None:
    text = "sinks:\n  a: &s {driver: memory, driver: memory}\n  b: *s\n"
    with pytest.raises(ConfigError) as err:
        load(text)
    assert err.value.problems == [
        "sinks.a.driver: duplicate key at line 2 (first at line 2); the second would "
        "silently replace the first"]
