"""Resolving settings: a validated Config (from a file or built in code) to drivers,
checked cross-references and warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from bridge.config import parse_config
from bridge.config.schema import Config, ConfigError, RouteConfig, SinkCommon, SourceConfig
from bridge.config.settings import (
    BASELINE_BYTES,
    BYTES_PER_BUFFERED_EVENT,
    BYTES_PER_INTAKE_EVENT,
    resolve_settings,
    resolve_tree,
)
from bridge.sinks import Drivers, Sink
from bridge.testing import MemorySink


def drivers() -> Drivers:
    return Drivers(injected={"memory": MemorySink})


def test_a_config_built_in_code_resolves_like_its_file() -> None:
    config = Config(
        source=SourceConfig(api_key=SecretStr("k"), tickers=["btc/usd"]),
        sinks={"mem": SinkCommon(driver="memory", latency_ms=2.0)},
    )
    built = resolve_settings(config, drivers())
    parsed = parse_config(
        "source: {api_key: k, tickers: [btc/usd]}\n"
        "sinks: {mem: {driver: memory, latency_ms: 2.0}}\n",
        env={}, drivers=drivers())
    assert built.sinks["mem"].driver is MemorySink
    assert built.sinks["mem"].options == parsed.sinks["mem"].options
    assert built.routes == parsed.routes == [RouteConfig(sinks=["mem"])]
    assert built.config == parsed.config
    assert built.api_key is not None and built.api_key.get_secret_value() == "k"
    assert built.warnings == []


def test_resolve_settings_raises_the_messages_of_parse_config() -> None:
    config = Config(
        sinks={"mem": SinkCommon(driver="memory", colour="red"),
               "gone": SinkCommon(driver="nope", dead_letter="gone")},
        routes=[RouteConfig(sinks=["mem", "missing"])],
    )
    with pytest.raises(ConfigError) as exc_info:
        resolve_settings(config, drivers(), source="demo")
    err = exc_info.value
    assert err.source == "demo"
    assert "sinks.mem.colour: unknown option" in err.problems
    assert any(p.startswith("sinks.gone.driver: ") for p in err.problems)
    assert "sinks.gone.dead_letter: a sink cannot be its own dead-letter sink" in err.problems
    assert any(p.startswith("routes[0].sinks[1]: no sink named 'missing'")
               for p in err.problems)


class _DotlessSink(MemorySink):
    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        return "a dot is not allowed" if "." in topic else None


def test_a_topic_the_driver_refuses_names_the_symbol_and_sink() -> None:
    config = Config(
        source=SourceConfig(equities=["BRK.B"]),
        sinks={"bus": SinkCommon(driver="dotless")},
        routes=[RouteConfig(match={"kind": "equity"}, sinks=["bus"], topic="{symbol}")],
    )
    with pytest.raises(ConfigError) as exc_info:
        resolve_settings(config, Drivers(injected={"dotless": _DotlessSink}))
    assert exc_info.value.problems == [
        "routes[0].topic: '{symbol}' gives 'BRK.B' for BRK.B on sink 'bus' (dotless): "
        "a dot is not allowed"
    ]


def test_resolve_tree_reports_reading_problems_first() -> None:
    with pytest.raises(ConfigError) as exc_info:
        resolve_tree({"sinks": {"m": {"driver": "memory"}}, "extra": 1},
                     ["x: read problem"], drivers())
    assert exc_info.value.problems == ["x: read problem", "extra: unknown option"]


def test_an_unreadable_api_key_file_is_a_problem(tmp_path: Path) -> None:
    config = Config(source=SourceConfig(api_key_file=tmp_path / "absent"),
                    sinks={"m": SinkCommon(driver="memory")})
    with pytest.raises(ConfigError, match=r"source\.api_key_file: cannot read the file"):
        resolve_settings(config, drivers())


def test_secrets_and_memory_estimate() -> None:
    config = Config(
        source=SourceConfig(api_key=SecretStr("the-key")),
        sinks={"a": SinkCommon(driver="memory", buffer={"max_events": 10}),
               "b": SinkCommon(driver="memory", buffer={"max_events": 20})},
        intake_max_events=5,
    )
    s = resolve_settings(config, drivers())
    assert s.secrets() == ["the-key"]
    assert s.memory_estimate() == (BASELINE_BYTES + 30 * BYTES_PER_BUFFERED_EVENT
                                   + 5 * BYTES_PER_INTAKE_EVENT)


def test_the_driver_registry_defaults_to_the_installed_drivers() -> None:
    s = resolve_settings(Config(sinks={"out": SinkCommon(driver="console")}))
    assert issubclass(s.sinks["out"].driver, Sink)
