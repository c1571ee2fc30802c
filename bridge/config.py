"""The configuration file: YAML, ``${VAR}`` / ``${VAR:-default}`` from the environment,
validated with pydantic; every problem is reported with its path in the file.

This module is the public entry: :func:`load_config` and :func:`parse_config` turn a
file or its text into :class:`Settings`, :func:`resolve_settings` does the same for a
:class:`Config` built in code, and every name of the configuration is importable from
here. The work is split by concern:

- ``bridge.schema``: the pydantic models, one per section (unknown keys are errors);
- ``bridge.loading``: file I/O with its bounds, the guarded YAML loader, interpolation,
  validation errors as paths in the file;
- ``bridge.settings``: driver resolution, cross-reference checks, warnings of valid but
  insecure settings, the memory estimate;
- ``bridge.templates``: the topic/key template rules, shared with the router.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bridge.envelope import FORMATS
from bridge.loading import (
    MAX_ALIAS_NODES,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_KEY_FILE_BYTES,
    format_loc,
    interpolate,
    read_config_file,
    read_tree,
)
from bridge.schema import (
    BackoffConfig,
    BatchConfig,
    BufferConfig,
    Config,
    ConfigError,
    ControlConfig,
    ControlNatsConfig,
    HttpConfig,
    LogConfig,
    Match,
    RetryConfig,
    RouteConfig,
    ShardConfig,
    SinkCommon,
    SourceConfig,
    key_problem,
)
from bridge.settings import (
    BASELINE_BYTES,
    BYTES_PER_BUFFERED_EVENT,
    BYTES_PER_INTAKE_EVENT,
    Settings,
    SinkSpec,
    resolve_settings,
    resolve_tree,
)
from bridge.sinks import Drivers
from bridge.templates import PLACEHOLDERS, template_problem


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
) -> Settings:
    """Read, interpolate and validate a configuration file.

    Raises :class:`ConfigError` listing every problem found, each with its path. The
    file is read with a bound (:data:`MAX_CONFIG_BYTES`) and must be UTF-8.
    """
    text = read_config_file(path)
    return parse_config(text, env=env, drivers=drivers, source=str(Path(path)))


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
    source: str = "configuration",
) -> Settings:
    """Like :func:`load_config`, from the text of a configuration file."""
    tree, problems = read_tree(text, env, source)
    return resolve_tree(tree, problems, drivers, source)


__all__ = [
    "BASELINE_BYTES",
    "BYTES_PER_BUFFERED_EVENT",
    "BYTES_PER_INTAKE_EVENT",
    "FORMATS",
    "MAX_ALIAS_NODES",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_KEY_FILE_BYTES",
    "PLACEHOLDERS",
    "BackoffConfig",
    "BatchConfig",
    "BufferConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ControlNatsConfig",
    "HttpConfig",
    "LogConfig",
    "Match",
    "RetryConfig",
    "RouteConfig",
    "Settings",
    "ShardConfig",
    "SinkCommon",
    "SinkSpec",
    "SourceConfig",
    "format_loc",
    "interpolate",
    "key_problem",
    "load_config",
    "parse_config",
    "resolve_settings",
    "template_problem",
]
