"""The configuration file: YAML, ``${VAR}`` / ``${VAR:-default}`` from the environment,
validated with pydantic; every problem is reported with its path in the file.

A sink section mixes the keys every sink has (:class:`SinkCommon`: ``driver``,
``format``, ``buffer``, ``batch``, ``retry``, ``required``) with the driver's own
options, which the driver's ``options_model`` validates (unknown keys are errors).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.envelope import FORMATS, Format
from bridge.sinks import DriverLoadError, Drivers, Sink, SinkOptions, UnknownDriverError

PLACEHOLDERS = ("kind", "symbol", "base", "quote")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` per problem."""

    def __init__(self, problems: Iterable[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{body}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backoff(_Model):
    initial_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)


class ShardConfig(_Model):
    """This process subscribes only to the symbols of shard ``index`` of ``count``."""

    index: int = Field(ge=0)
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardConfig:
        if self.index >= self.count:
            msg = f"index {self.index} must be smaller than count {self.count}"
            raise ValueError(msg)
        return self


class SourceConfig(_Model):
    url: str = "https://pricing.aleno.ai"
    path: str = "/v1/socket"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    tickers: list[str] = Field(default_factory=list)
    equities: list[str] = Field(default_factory=list)
    #: reconnect when no update arrived for this long while subscribed
    stale_after_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: give up (exit non-zero) after this many refusals of the API key in a row
    max_auth_failures: int = Field(3, ge=1)
    #: give up after this many failed connection attempts in a row (0: never give up)
    max_connect_attempts: int = Field(0, ge=0)
    backoff: Backoff = Field(default_factory=Backoff)
    tls_verify: bool = True
    shard: ShardConfig | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            msg = "must be an http:// or https:// URL"
            raise ValueError(msg)
        return v.rstrip("/")

    @field_validator("tickers", "equities")
    @classmethod
    def _symbols(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for s in v:
            n = s.strip().upper()
            if not n:
                msg = "symbols must not be empty"
                raise ValueError(msg)
            if n not in out:
                out.append(n)
        return out

    @model_validator(mode="after")
    def _one_key(self) -> SourceConfig:
        if self.api_key is not None and self.api_key_file is not None:
            msg = "set api_key or api_key_file, not both"
            raise ValueError(msg)
        return self

    @property
    def endpoint(self) -> str:
        """The CloudEvents ``source`` attribute: URL and Socket.IO path."""
        return f"{self.url}{self.path}"


class BufferConfig(_Model):
    max_events: int = Field(10_000, ge=1)
    when_full: Literal["block", "drop_oldest", "drop_newest", "conflate"] = "drop_oldest"


class BatchConfig(_Model):
    max_events: int = Field(500, ge=1)
    linger_ms: float = Field(5.0, ge=0)


class RetryConfig(_Model):
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


class Match(_Model):
    kind: Literal["ticker", "equity", "*"] = "*"
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


class HttpConfig(_Model):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


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
    log: LogConfig = Field(default_factory=LogConfig)
    shutdown_timeout_s: float = Field(10.0, ge=0)


@dataclass(frozen=True)
class SinkSpec:
    """One configured sink: its common settings, driver class and validated options."""

    name: str
    common: SinkCommon
    driver: type[Sink[Any]]
    options: SinkOptions


@dataclass(frozen=True)
class Settings:
    """A configuration that passed every check, with its drivers resolved."""

    config: Config
    sinks: dict[str, SinkSpec]
    routes: list[RouteConfig]
    api_key: SecretStr | None

    def secrets(self) -> list[str]:
        """Every secret value of the configuration, for log redaction."""
        found: list[str] = []
        if self.api_key is not None:
            found.append(self.api_key.get_secret_value())
        for spec in self.sinks.values():
            found.extend(_secret_values(spec.options))
        return [s for s in found if s]


def _secret_values(model: BaseModel) -> Iterable[str]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            yield value.get_secret_value()
        elif isinstance(value, BaseModel):
            yield from _secret_values(value)


# ---------------------------------------------------------------------------
# Templates


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a valid topic/key template, or ``None``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"invalid template {template!r}: {exc}"
    for _, field_name, spec, conv in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            return f"unknown placeholder {{{field_name}}} in {template!r}; use {allowed}"
        if spec or conv:
            return f"placeholder {{{field_name}}} in {template!r} takes no format spec"
    return None


# ---------------------------------------------------------------------------
# Loading

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(tree: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``tree``.

    ``$$`` is a literal ``$``. An unset variable without default is a problem at its
    path; its value never appears in the message.
    """
    problems: list[str] = []

    def sub(text: str, where: str) -> str:
        def one(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                problems.append(f"{where or '<root>'}: environment variable {name} is not set")
                return ""
            return value

        return _VAR.sub(one, text)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):
            return sub(node, where)
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(tree, path), problems


def format_loc(loc: Iterable[int | str], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _errors(exc: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown option"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        else:
            msg = msg[:1].lower() + msg[1:]
        problems.append(f"{format_loc(err['loc'], prefix)}: {msg}")
    return problems


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
) -> Settings:
    """Read, interpolate and validate a configuration file.

    Raises :class:`ConfigError` listing every problem found, each with its path.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from None
    return parse_config(text, env=env, drivers=drivers, source=str(p))


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
    source: str = "configuration",
) -> Settings:
    """Like :func:`load_config`, from the text of a configuration file."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"], source) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        problem = "<root>: the file must hold a mapping (source:, sinks:, routes:)"
        raise ConfigError([problem], source)
    tree, problems = interpolate(tree, os.environ if env is None else env)
    config: Config | None = None
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_errors(exc))
    drivers = drivers or Drivers()
    if config is None:
        # report the sinks' driver problems too, not only the first layer's
        raw_sinks = tree.get("sinks")
        if isinstance(raw_sinks, dict):
            commons = {}
            for name, raw in raw_sinks.items():
                try:
                    commons[str(name)] = SinkCommon.model_validate(raw)
                except ValidationError:
                    continue  # already reported by the whole-file validation
            _resolve_sinks(commons, drivers, problems)
        raise ConfigError(problems, source)
    settings = _resolve(config, drivers, problems)
    if problems:
        raise ConfigError(problems, source)
    return settings


def _resolve(config: Config, drivers: Drivers, problems: list[str]) -> Settings:
    api_key = config.source.api_key
    if config.source.api_key_file is not None:
        try:
            api_key = SecretStr(config.source.api_key_file.read_text(encoding="utf-8").strip())
        except OSError as exc:
            problems.append(f"source.api_key_file: cannot read the file: {exc.strerror or exc}")

    specs = _resolve_sinks(config.sinks, drivers, problems)
    routes = config.routes or [RouteConfig(sinks=list(config.sinks))]
    for i, route in enumerate(routes):
        for j, sink in enumerate(route.sinks):
            if sink not in config.sinks:
                known = ", ".join(config.sinks)
                problems.append(f"routes[{i}].sinks[{j}]: no sink named {sink!r} (sinks: {known})")
            elif sink in specs:
                problems.extend(_topic_problems(i, route, specs[sink], config.source))
    return Settings(config=config, sinks=specs, routes=routes, api_key=api_key)


def _resolve_sinks(
    sinks: Mapping[str, SinkCommon], drivers: Drivers, problems: list[str]
) -> dict[str, SinkSpec]:
    """Load each sink's driver and validate the driver's own options."""
    specs: dict[str, SinkSpec] = {}
    for name, common in sinks.items():
        where = f"sinks.{name}"
        try:
            driver = drivers.get(common.driver)
        except (UnknownDriverError, DriverLoadError) as exc:
            problems.append(f"{where}.driver: {exc}")
            continue
        raw = dict(common.model_extra or {})
        if common.format not in driver.formats:
            problems.append(
                f"{where}.format: driver {common.driver!r} does not carry {common.format!r}; "
                f"use one of {', '.join(driver.formats)}"
            )
        try:
            options = driver.options_model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_errors(exc, where))
            continue
        problem = driver.check_format(options, common.format)
        if problem is not None:
            problems.append(f"{where}.format: {problem}")
            continue
        specs[name] = SinkSpec(name, common, driver, options)
    return specs


def _topic_problems(i: int, route: RouteConfig, spec: SinkSpec, source: SourceConfig) -> list[str]:
    """Render the topic template for every configured symbol the route matches (and
    for a neutral sample) with the driver's safe-token rule, and ask the driver
    whether the result can ever be published."""
    from bridge.routing import matches, placeholder_values

    samples: list[tuple[str, str]] = [("ticker", "BTC/USD"), ("equity", "AAPL")]
    samples += [("ticker", s) for s in source.tickers] + [("equity", s) for s in source.equities]
    seen: set[str] = set()
    for kind, symbol in samples:
        if not matches(route.match, kind, symbol):
            continue
        values = {k: spec.driver.safe_token(v) for k, v in placeholder_values(kind, symbol).items()}
        topic = route.topic.format(**values)
        problem = spec.driver.check_topic(topic)
        if problem and problem not in seen:
            seen.add(problem)
            return [
                f"routes[{i}].topic: {route.topic!r} gives {topic!r} for {symbol} on sink "
                f"{spec.name!r} ({spec.common.driver}): {problem}"
            ]
    return []


__all__ = [
    "FORMATS",
    "Config",
    "ConfigError",
    "RetryConfig",
    "RouteConfig",
    "Settings",
    "SinkCommon",
    "SinkSpec",
    "SourceConfig",
    "load_config",
    "parse_config",
]
