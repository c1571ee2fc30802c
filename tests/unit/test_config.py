"""Configuration: interpolation, validation with paths, drivers, templates, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, interpolate, load_config, parse_config
from bridge.sinks import Drivers
from bridge.testing import MemorySink

GOOD = """
source:
  api_key: ${KEY}
  tickers: [btc/usd, ETH/USD, " btc/usd "]
  equities: [AAPL]
sinks:
  mem: {driver: memory}
routes:
  - match: {kind: ticker, symbols: ["BTC/*"]}
    sinks: [mem]
    topic: "prices.{kind}.{base}-{quote}"
"""


def drivers() -> Drivers:
    return Drivers(injected={"memory": MemorySink})


def test_good_config_is_accepted_and_symbols_normalized() -> None:
    s = parse_config(GOOD, env={"KEY": "s3cret-key"}, drivers=drivers())
    assert s.config.source.tickers == ["BTC/USD", "ETH/USD"]
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(s.config) and "s3cret-key" not in str(s.config)
    assert s.secrets() == ["s3cret-key"]


def test_env_defaults_and_dollar_escape() -> None:
    tree, problems = interpolate({"a": "${X:-dflt}", "b": ["$${LITERAL}", "${Y}"]}, {"Y": "y"})
    assert tree == {"a": "dflt", "b": ["${LITERAL}", "y"]}
    assert problems == []


def test_missing_env_var_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD, env={}, drivers=drivers())
    assert "source.api_key: environment variable KEY is not set" in err.value.problems


def test_every_problem_is_reported_with_its_path() -> None:
    text = """
source: {url: "ftp://nope", stale_after_s: -1, bogus: 1}
sinks:
  bus: {driver: memory, latency_ms: "slow", nope: 2, buffer: {when_full: explode}}
  other: {driver: warp}
routes:
  - {sinks: [bus, ghost], topic: "x.{sym}"}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, env={}, drivers=drivers())
    problems = "\n".join(err.value.problems)
    for expected in (
        "source.url: must be an http:// or https:// URL",
        "source.stale_after_s:",
        "source.bogus: unknown option",
        "sinks.bus.buffer.when_full:",
        "routes[0].topic: unknown placeholder {sym}",
    ):
        assert expected in problems, problems


def test_driver_options_and_unknown_drivers_are_reported_with_paths() -> None:
    text = """
sinks:
  bus: {driver: memory, latency_ms: "slow", nope: 2}
  other: {driver: warp}
routes:
  - {sinks: [bus, ghost]}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, env={}, drivers=drivers())
    problems = "\n".join(err.value.problems)
    assert "sinks.bus.latency_ms:" in problems
    assert "sinks.bus.nope: unknown option" in problems
    assert "sinks.other.driver: unknown sink driver 'warp'; available drivers: memory" in problems
    assert "routes[0].sinks[1]: no sink named 'ghost'" in problems


def test_missing_required_driver_option_says_field_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("sinks:\n  f: {driver: jsonl}\n", env={})
    assert "sinks.f.path: field required" in err.value.problems


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sinks:\n  a: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert err.value.problems[0].startswith("line ")


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_api_key_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("from-file-key\n")
    s = parse_config(f"source: {{api_key_file: {f}}}\nsinks: {{m: {{driver: memory}}}}\n",
                     env={}, drivers=drivers())
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-file-key"


def test_no_routes_means_everything_to_every_sink() -> None:
    s = parse_config("sinks: {a: {driver: memory}, b: {driver: memory}}", env={},
                     drivers=drivers())
    assert len(s.routes) == 1 and s.routes[0].sinks == ["a", "b"]


def test_shard_index_must_be_below_count() -> None:
    with pytest.raises(ConfigError, match="smaller than count"):
        parse_config("source: {shard: {index: 3, count: 3}}\nsinks: {a: {driver: memory}}",
                     env={}, drivers=drivers())


def test_example_configs_validate() -> None:
    configs = sorted(Path(__file__).parents[2].joinpath("config").glob("*.yaml"))
    assert configs, "config/ holds example configurations"
    for path in configs:
        if "kafka" in path.name or "nats" in path.name or "mqtt" in path.name \
                or "fanout" in path.name:
            continue  # checked with their drivers in tests/integration
        load_config(path, env={})


def test_a_format_the_driver_options_cannot_carry_is_a_startup_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("sinks: {m: {driver: mqtt, host: h, protocol: '3.1.1', "
                     "format: cloudevents-binary}}", env={})
    assert err.value.problems == [
        "sinks.m.format: cloudevents-binary needs MQTT 5 user properties; use protocol: '5' "
        "or format: cloudevents-json"]
