"""The configuration file: YAML, ``${VAR}`` / ``${VAR:-default}`` from the environment,
validated with pydantic; every problem is reported with its path in the file.

This package is the public entry: :func:`load_config` and :func:`parse_config` turn a
file or its text into :class:`Settings`, :func:`resolve_settings` does the same for a
:class:`Config` built in code, and every name of the configuration is importable from
here. The work is split by concern:

- :mod:`bridge.config.schema`: the pydantic models, one per section (unknown keys are
  errors), and :class:`SinkSpec`; the only part the data path imports;
- :mod:`bridge.config.loading`: file I/O with its bounds, the guarded YAML loader,
  interpolation, validation errors as paths in the file;
- :mod:`bridge.config.settings`: driver resolution, cross-reference checks, warnings of
  valid but insecure settings, the memory estimate;
- :mod:`bridge.config.reload`: a new file applied to a running bridge;
- :mod:`bridge.core.templates`: the topic/key template rules, shared with the router.

The schema's names are imported here at once; those of the loader and the settings
when first used, so that ``import bridge.config.schema`` (what the router, the sink
workers and the upstream client do) loads neither YAML nor the driver discovery.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config.schema import (
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
    SinkSpec,
    SourceConfig,
    key_problem,
)
from bridge.core.envelope import FORMATS
from bridge.core.templates import PLACEHOLDERS, template_problem

if TYPE_CHECKING:
    from bridge.config.loading import (
        MAX_ALIAS_NODES,
        MAX_CONFIG_BYTES,
        MAX_DEPTH,
        MAX_KEY_FILE_BYTES,
        format_loc,
        interpolate,
    )
    from bridge.config.settings import (
        BASELINE_BYTES,
        BYTES_PER_BUFFERED_EVENT,
        BYTES_PER_INTAKE_EVENT,
        Settings,
        resolve_settings,
    )
    from bridge.sinks import Drivers

#: names served from a submodule when first asked for
_LAZY = {
    **dict.fromkeys(("MAX_ALIAS_NODES", "MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_KEY_FILE_BYTES",
                     "format_loc", "interpolate"), "bridge.config.loading"),
    **dict.fromkeys(("BASELINE_BYTES", "BYTES_PER_BUFFERED_EVENT", "BYTES_PER_INTAKE_EVENT",
                     "Settings", "resolve_settings", "resolve_tree"), "bridge.config.settings"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'bridge.config' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
) -> Settings:
    """Read, interpolate and validate a configuration file.

    Raises :class:`ConfigError` listing every problem found, each with its path. The
    file is read with a bound (:data:`MAX_CONFIG_BYTES`) and must be UTF-8.
    """
    from bridge.config.loading import read_config_file

    text = read_config_file(path)
    return parse_config(text, env=env, drivers=drivers, source=str(Path(path)))


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
    source: str = "configuration",
) -> Settings:
    """Like :func:`load_config`, from the text of a configuration file."""
    from bridge.config.loading import read_tree
    from bridge.config.settings import resolve_tree

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
