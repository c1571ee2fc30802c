"""The configuration file's schema: pydantic models, one per section.

Every model refuses unknown keys and non-finite floats (``.inf``, ``.nan`` are never a
meaningful timeout, interval or size). A sink section mixes the keys every sink has
(:class:`SinkCommon`) with the driver's own options, which are kept as extras here and
validated by the driver's ``options_model`` when the settings are resolved
(``bridge.config.settings``). Reading the file and ``${VAR}`` interpolation are in
``bridge.config.loading``; the template rules in ``bridge.core.templates``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# the sections are defined in sibling modules (by subject) and re-exported here: this
# module stays the one place every model is imported from
from bridge.config.schema_bars import BarsConfig, bar_route_problems
from bridge.config.schema_base import ConfigError, _Model, key_problem
from bridge.config.schema_control import (
    ANONYMOUS,
    NATS_DEPRECATED_KEYS,
    SCOPES,
    AuthConfig,
    ControlConfig,
    ControlHttpConfig,
    ControlNatsConfig,
    HttpConfig,
    Scope,
    TokenConfig,
    is_loopback_host,
    token_problem,
)
from bridge.config.schema_control import MIN_TOKEN_LEN as MIN_TOKEN_LEN
from bridge.config.schema_source import (
    ApiKeyConfig,
    BackoffConfig,
    LeaseConfig,
    ShardConfig,
    SourceConfig,
    StatusDampingConfig,
)
from bridge.core.envelope import Format
from bridge.core.templates import template_problem
from bridge.sinks import Sink, SinkOptions


class DiskConfig(_Model):
    """A sink's ``buffer.disk``: the spool that keeps every accepted event on disk until
    the bus confirmed it (:mod:`bridge.sinks.spool`). ``max_bytes`` takes a number or a
    size with a unit (``512MiB``, ``10GB``)."""

    #: the sink's own directory (created if missing); one spool per sink
    path: str = Field(min_length=1)
    max_bytes: ByteSize = Field(ByteSize(1 << 30), ge=1 << 20)
    #: the longest an accepted event waits before it is written and synced to disk
    fsync_interval_ms: float = Field(500.0, ge=0, le=60_000)


class BufferConfig(_Model):
    max_events: int = Field(10_000, ge=1)
    when_full: Literal["block", "drop_oldest", "drop_newest", "conflate"] = "drop_oldest"
    #: with ``disk``, the memory buffer is a cache in front of the spool and
    #: ``when_full`` applies at ``disk.max_bytes``
    disk: DiskConfig | None = None


def spool_path_problems(sinks: dict[str, SinkCommon]) -> list[str]:
    """Two sinks cannot share a spool directory (nor nest one in the other's)."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for name, common in sinks.items():
        disk = common.buffer.disk
        if disk is None:
            continue
        here = os.path.normpath(os.path.abspath(disk.path))
        for path, other in seen.items():
            if here == path or here.startswith(path + os.sep) or path.startswith(here + os.sep):
                problems.append(f"sinks.{name}.buffer.disk.path: {disk.path!r} is (inside) the "
                                f"spool of sink {other!r}; give each sink a directory of its own")
                break
        seen[here] = name
    return problems


class BatchConfig(_Model):
    max_events: int = Field(500, ge=1)
    linger_ms: float = Field(5.0, ge=0)


class RetryConfig(_Model):
    """A sink's ``retry``: publish retries with backoff (:class:`bridge.core.backoff.Backoff`)
    and the timeouts of one publish and one connection attempt."""

    initial_backoff_s: float = Field(0.2, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)
    publish_timeout_s: float = Field(15.0, gt=0)
    connect_timeout_s: float = Field(15.0, gt=0)


class SinkCommon(BaseModel):
    """The keys every sink has; the rest of the section belongs to the driver."""

    model_config = ConfigDict(extra="allow")

    driver: str
    format: Format = "cloudevents-json"
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    #: a required sink must be connected and publishing for ``/readyz`` to be 200
    required: bool = True
    #: the sink that receives the events this sink's bus refuses for good (too large,
    #: invalid topic, not authorized), with ``deadletter*`` extension attributes
    dead_letter: str | None = None


class Match(_Model):
    #: ``"*"`` matches prices (tickers and equities); status events and bars are routed
    #: only by routes that say ``kind: status`` / ``kind: bar``
    kind: Literal["ticker", "equity", "status", "bar", "*"] = "*"
    symbols: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)


class RouteConfig(_Model):
    name: str | None = None
    match: Match = Field(default_factory=Match)
    sinks: list[str] = Field(min_length=1)
    topic: str = "aleno.{kind}.{symbol}"
    key: str = "{symbol}"
    publish: Literal["all", "on_change"] = "all"
    min_interval_s: float = Field(0.0, ge=0)

    @field_validator("topic", "key")
    @classmethod
    def _template(cls, v: str) -> str:
        problem = template_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class ReloadConfig(_Model):
    """Hot reload: SIGHUP always reloads the configuration file; ``watch`` also
    reloads when the file (or the directory holding it: a Kubernetes ConfigMap swaps a
    symlink) changes, ``debounce_s`` after the last change."""

    watch: bool = True
    debounce_s: float = Field(1.0, ge=0, le=60)


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class Config(_Model):
    source: SourceConfig = Field(default_factory=SourceConfig)
    sinks: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")], SinkCommon] = Field(
        min_length=1
    )
    routes: list[RouteConfig] = Field(default_factory=list)
    http: HttpConfig = Field(default_factory=HttpConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    reload: ReloadConfig = Field(default_factory=ReloadConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    shutdown_timeout_s: float = Field(10.0, ge=0)
    #: events received but not yet routed, at most (a ``block`` sink that is behind
    #: makes them wait); the ones that do not fit are dropped and counted
    intake_max_events: int = Field(10_000, ge=1)
    #: OHLC bars built from the prices (none without this section)
    bars: BarsConfig | None = None

    @model_validator(mode="after")
    def _bar_routes(self) -> Config:
        problems = bar_route_problems(self.bars, self.routes, self.sinks)
        if problems:  # each at its own path (routes[i].sinks[j]), not at the root
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self


__all__ = [
    "ANONYMOUS",
    "NATS_DEPRECATED_KEYS",
    "SCOPES",
    "ApiKeyConfig",
    "AuthConfig",
    "BackoffConfig",
    "BarsConfig",
    "BatchConfig",
    "BufferConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ControlHttpConfig",
    "ControlNatsConfig",
    "DiskConfig",
    "HttpConfig",
    "LeaseConfig",
    "LogConfig",
    "Match",
    "ReloadConfig",
    "RetryConfig",
    "RouteConfig",
    "Scope",
    "ShardConfig",
    "SinkCommon",
    "SourceConfig",
    "StatusDampingConfig",
    "TokenConfig",
    "is_loopback_host",
    "key_problem",
    "spool_path_problems",
    "token_problem",
]


@dataclass(frozen=True)
class SinkSpec:
    """One configured sink: its common settings, driver class and validated options."""

    name: str
    common: SinkCommon
    driver: type[Sink[Any]]
    options: SinkOptions


#: the connection name of a single ``api_key`` / ``api_key_file``
DEFAULT_NAME: Final = "default"


@dataclass(frozen=True)
class UpstreamKey:
    """One API key of the pool: its connection's name, the key, its known limit."""

    name: str
    key: SecretStr | None = field(repr=False)
    limit: int | None = None
