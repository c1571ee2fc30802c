"""Reading a configuration: bounded files, the guarded YAML loader, interpolation and
validation errors as paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from bridge.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    format_loc,
    load_yaml,
    read_config_file,
    read_key_file,
    read_tree,
    validation_problems,
)
from bridge.config.schema import ConfigError


def test_format_loc() -> None:
    assert format_loc(()) == "<root>"
    assert format_loc(("routes", 0, "match")) == "routes[0].match"
    assert format_loc(("bootstrap_servers",), "sinks.bus") == "sinks.bus.bootstrap_servers"
    assert format_loc((2,), "") == "[2]"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int


def test_validation_problems_use_the_words_validate_prints() -> None:
    with pytest.raises(ValidationError) as exc_info:
        _Options.model_validate({"colour": "red"})
    assert validation_problems(exc_info.value, "sinks.x") == [
        "sinks.x.port: field required",
        "sinks.x.colour: unknown option",
    ]
    with pytest.raises(ValidationError) as exc_info:
        _Options.model_validate({"port": "many"})
    assert validation_problems(exc_info.value) == [
        "port: input should be a valid integer, unable to parse string as an integer"
    ]


def test_read_tree_interpolates_and_keeps_earlier_problems() -> None:
    tree, problems = read_tree("a: ${A}\nb: ${B:-dflt}\na: again\n", env={"A": "x"})
    assert tree == {"a": "again", "b": "dflt"}
    assert problems == [
        "a: duplicate key at line 3 (first at line 1); the second would silently replace "
        "the first"
    ]


def test_read_tree_of_an_empty_document_is_an_empty_mapping() -> None:
    assert read_tree("", env={}) == ({}, [])


def test_read_tree_refuses_a_document_that_is_no_mapping() -> None:
    with pytest.raises(ConfigError) as exc_info:
        read_tree("- a\n- b\n", env={}, source="x.yaml")
    assert exc_info.value.source == "x.yaml"
    assert exc_info.value.problems == [
        "<root>: the file must hold a mapping (source:, sinks:, routes:)"]


def test_load_yaml_refuses_deep_nesting() -> None:
    text = "[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2)
    with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_yaml(text, "deep")


def test_read_config_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("sinks: {}\n", encoding="utf-8")
    assert read_config_file(f) == "sinks: {}\n"
    f.write_bytes(b"x" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError) as exc_info:
        read_config_file(f)
    assert exc_info.value.source == str(f)
    assert exc_info.value.problems == ["<file>: larger than 4 MiB; is this the right file?"]


def test_read_key_file(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("k-1\n", encoding="utf-8")
    problems: list[str] = []
    key = read_key_file(f, problems)
    assert key is not None and key.get_secret_value() == "k-1"
    assert problems == []
    f.write_text("a b\n", encoding="utf-8")
    assert read_key_file(f, problems) is None
    assert problems == ["source.api_key_file: the key must be one line without whitespace or "
                        "control characters (found one at character 2)"]
