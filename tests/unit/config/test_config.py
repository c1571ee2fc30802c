"""Configuration: interpolation, validation with paths, drivers, templates, secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

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
    configs = sorted(Path(__file__).parents[3].joinpath("config").glob("*.yaml"))
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


# ---------------------------------------------------------------------------
# Issue 8: hardening of the loader and of the checks (each test failed before the fix)

ONE_SINK = "sinks: {m: {driver: memory}}\n"


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, env=env or {}, drivers=drivers())
    return err.value.problems


def test_duplicate_sink_key_is_an_error_with_path_and_line() -> None:
    problems = problems_of("sinks:\n  bus: {driver: memory}\n  bus: {driver: memory}\n")
    assert problems == [
        "sinks.bus: duplicate key at line 3 (first at line 2); the second would silently "
        "replace the first"]


def test_duplicate_top_level_section_is_an_error() -> None:
    text = "source: {tickers: [BTC/USD]}\nsinks: {m: {driver: memory}}\nsource: {}\n"
    assert any(p.startswith("source: duplicate key at line 3 (first at line 1)")
               for p in problems_of(text))


def test_duplicate_keys_are_reported_along_with_the_other_problems() -> None:
    text = "source: {stale_after_s: -1, stale_after_s: -2}\nsinks: {m: {driver: warp}}\n"
    problems = "\n".join(problems_of(text))
    assert "source.stale_after_s: duplicate key at line 1" in problems
    assert "sinks.m.driver: unknown sink driver 'warp'" in problems


def test_merge_keys_are_not_duplicates() -> None:
    text = """
base: &base {driver: memory, latency_ms: 1}
sinks:
  m: {<<: *base, latency_ms: 2}
"""
    # `base` itself is an unknown top-level key; the merge is not a duplicate
    assert problems_of(text) == ["base: unknown option"]


def test_duplicate_route_names_are_an_error() -> None:
    text = ONE_SINK + "routes:\n  - {name: a, sinks: [m]}\n  - {name: a, sinks: [m]}\n"
    assert problems_of(text) == ["routes[1].name: duplicate route name 'a' (also routes[0])"]


def test_a_sink_listed_twice_in_a_route_is_an_error() -> None:
    text = ONE_SINK + "routes:\n  - {sinks: [m, m]}\n"
    assert problems_of(text) == [
        "routes[0].sinks[1]: sink 'm' is listed twice (every event would be published twice)"]


def test_a_missing_sink_is_reported_when_another_section_fails_too() -> None:
    text = "source: {stale_after_s: -1}\n" + ONE_SINK + "routes:\n  - {sinks: [m, ghost, m]}\n"
    problems = "\n".join(problems_of(text))
    assert "source.stale_after_s:" in problems
    assert "routes[0].sinks[1]: no sink named 'ghost' (sinks: m)" in problems
    assert "routes[0].sinks[2]: sink 'm' is listed twice" in problems


def test_a_recursive_alias_is_a_config_error() -> None:
    problems = problems_of("x: &a [1, *a]\n" + ONE_SINK)
    assert problems == ["x[1]: recursive YAML alias (a node that contains itself)"]


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    problems = problems_of("\n".join(lines) + "\n" + ONE_SINK)
    assert len(problems) == 1 and "YAML aliases expand to more than" in problems[0]


def test_a_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"sinks: {m: {driver: memory}}\n# caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, env={}, drivers=drivers())
    assert err.value.problems == [
        "<file>: not UTF-8 text (invalid byte 0xe9 at line 2, column 6)"]


def test_an_oversized_config_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"# " + b"x" * (4 * 1024 * 1024) + b"\n" + ONE_SINK.encode())
    with pytest.raises(ConfigError) as err:
        load_config(p, env={}, drivers=drivers())
    assert err.value.problems == ["<file>: larger than 4 MiB; is this the right file?"]


def _key_file_problems(tmp_path: Path, content: bytes | None, name: str = "key") -> list[str]:
    f = tmp_path / name
    if content is not None:
        f.write_bytes(content)
    return problems_of(f"source: {{api_key_file: {f}}}\n" + ONE_SINK)


def test_a_binary_api_key_file_is_a_config_error(tmp_path: Path) -> None:
    assert _key_file_problems(tmp_path, b"\xff\xfe\x00\x01") == [
        "source.api_key_file: not UTF-8 text"]


def test_an_empty_api_key_file_is_an_error(tmp_path: Path) -> None:
    assert _key_file_problems(tmp_path, b"\n") == ["source.api_key_file: the file is empty"]


def test_an_endless_api_key_file_is_read_with_a_bound() -> None:
    assert problems_of("source: {api_key_file: /dev/zero}\n" + ONE_SINK) == [
        "source.api_key_file: larger than 4 KiB; the file must hold the key on one line"]


def test_an_api_key_with_an_inner_newline_is_refused_without_printing_it(
        tmp_path: Path) -> None:
    problems = _key_file_problems(tmp_path, b"top-secret\nsecond-line\n")
    assert problems == ["source.api_key_file: the key must be one line without whitespace or "
                        "control characters (found one at character 11)"]
    assert "top-secret" not in "".join(problems)


def test_an_api_key_file_keeps_its_key_and_strips_one_newline(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_bytes(b"k3y\r\n")
    s = parse_config(f"source: {{api_key_file: {f}}}\n" + ONE_SINK, env={}, drivers=drivers())
    assert s.api_key is not None and s.api_key.get_secret_value() == "k3y"


def test_an_inline_api_key_with_a_newline_is_refused() -> None:
    problems = problems_of("source: {api_key: \"${K}\"}\n" + ONE_SINK, env={"K": "ab\ncd"})
    assert problems == ["source.api_key: the key must be one line without whitespace or "
                        "control characters (found one at character 3)"]


def test_an_inline_api_key_loses_one_trailing_newline_like_the_file() -> None:
    s = parse_config("source: {api_key: \"${K}\"}\n" + ONE_SINK, env={"K": "k3y\n"},
                     drivers=drivers())
    assert s.api_key is not None and s.api_key.get_secret_value() == "k3y"


def test_an_unterminated_variable_is_an_error_at_its_path() -> None:
    problems = problems_of("source: {api_key: \"${KEY\"}\n" + ONE_SINK, env={"KEY": "v"})
    assert problems == ["source.api_key: unterminated or malformed ${...} reference "
                        "(use ${VAR} or ${VAR:-default}; $$ is a literal $)"]


@pytest.mark.parametrize("path", [
    "shutdown_timeout_s", "source.stale_after_s", "source.backoff.max_s",
    "sinks.m.retry.publish_timeout_s", "sinks.m.latency_ms", "routes[0].min_interval_s",
])
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_non_finite_floats_are_refused_everywhere(path: str, value: str) -> None:
    tree: dict[str, Any] = {"sinks": {"m": {"driver": "memory"}}, "routes": [{"sinks": ["m"]}]}
    node: Any = tree
    parts = path.replace("[0]", ".0").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[parts[-1]] = value
    text = yaml.safe_dump(tree).replace(f"'{value}'", value)
    problems = problems_of(text)
    # a plugin's own constraint (latency_ms >= 0) may refuse .nan first, in its words
    plugin_nan = value == ".nan" and path == "sinks.m.latency_ms"
    assert any(p.startswith(f"{path}:") and ("finite" in p or plugin_nan)
               for p in problems), problems


@pytest.mark.parametrize("url", ["http://h:99999", "http://h:abc", "http://h:0",
                                 "http://[::1", "https://[nope]:443"])
def test_an_invalid_port_or_ipv6_url_is_refused(url: str) -> None:
    problems = problems_of(f"source: {{url: '{url}'}}\n" + ONE_SINK)
    assert len(problems) == 1 and problems[0].startswith("source.url: "), problems


def test_an_ipv6_url_with_a_port_is_accepted() -> None:
    s = parse_config("source: {url: 'http://[::1]:8765'}\n" + ONE_SINK, env={},
                     drivers=drivers())
    assert s.config.source.url == "http://[::1]:8765"


@pytest.mark.parametrize("url", ["http://user:hunter2@example.com", "https://hunter2@h:443"])
def test_credentials_in_the_source_url_are_refused_without_echoing_them(url: str) -> None:
    problems = problems_of(f"source: {{url: '{url}'}}\n" + ONE_SINK)
    assert problems == ["source.url: must not carry credentials; put the API key in "
                        "source.api_key or api_key_file"]
