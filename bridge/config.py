"""The configuration file: YAML, ``${VAR}`` / ``${VAR:-default}`` from the environment,
validated with pydantic; every problem is reported with its path in the file.

A sink section mixes the keys every sink has (:class:`SinkCommon`: ``driver``,
``format``, ``buffer``, ``batch``, ``retry``, ``required``) with the driver's own
options, which the driver's ``options_model`` validates (unknown keys are errors).

The loader refuses what YAML would otherwise accept silently or expand without bound:
duplicate mapping keys (the later one would replace the earlier), recursive aliases,
aliases that expand to more than :data:`MAX_ALIAS_NODES` nodes ("billion laughs"), a
file larger than :data:`MAX_CONFIG_BYTES` or not UTF-8, and non-finite floats
(``.inf``, ``.nan``) in any option. A configuration that is valid but insecure (an API
key over plain ``http://``, certificate checks turned off, passwords to a bus without
TLS) loads with :attr:`Settings.warnings`.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import string
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

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

#: a configuration file larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: an ``api_key_file`` larger than this is refused (it holds one key on one line)
MAX_KEY_FILE_BYTES = 4096
#: YAML aliases may add at most this many nodes to the document as written
MAX_ALIAS_NODES = 100_000
#: mappings and sequences nested deeper than this are refused
MAX_DEPTH = 100


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` per problem."""

    def __init__(self, problems: Iterable[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{body}")


class _Model(BaseModel):
    # ``.inf`` / ``.nan`` are never a meaningful timeout, interval or size
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
        # messages never quote the URL: it could hold a password
        if not re.match(r"^https?://[^\s/]+", v):
            msg = "must be an http:// or https:// URL"
            raise ValueError(msg)
        try:
            parts = urlsplit(v)
        except ValueError:
            msg = "is not a valid URL (an IPv6 address goes in brackets: http://[::1]:8765)"
            raise ValueError(msg) from None
        if parts.username is not None or parts.password is not None:
            msg = "must not carry credentials; put the API key in source.api_key or api_key_file"
            raise ValueError(msg)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 0 < port < 65536:
            msg = "the port must be a number from 1 to 65535"
            raise ValueError(msg)
        if not parts.hostname:
            msg = "has no host name"
            raise ValueError(msg)
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _one_line_key(cls, v: SecretStr | None) -> SecretStr | None:
        # the rule of api_key_file: one trailing newline (a secret mounted as an
        # environment variable often has one) is dropped, any other whitespace refused
        if v is None:
            return None
        key = v.get_secret_value().removesuffix("\n").removesuffix("\r")
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(problem)
        return SecretStr(key)

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
    #: the sink that receives the events this sink's bus refuses for good (too large,
    #: invalid topic, not authorized), with ``deadletter*`` extension attributes
    dead_letter: str | None = None


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
    #: connections beyond this are closed at once (protects the sinks' file descriptors)
    max_connections: int = Field(64, ge=1, le=10_000)
    #: a connection that has not sent a complete request for this long is closed
    idle_timeout_s: float = Field(10.0, gt=0, le=3600)


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
    #: events received but not yet routed, at most (a ``block`` sink that is behind
    #: makes them wait); the ones that do not fit are dropped and counted
    intake_max_events: int = Field(10_000, ge=1)


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
    #: valid but insecure settings, one ``path: message`` each (never a secret value);
    #: ``validate`` prints them, ``run`` logs them at WARNING
    warnings: list[str] = field(default_factory=list)

    def secrets(self) -> list[str]:
        """Every secret value of the configuration, for log redaction."""
        found: list[str] = []
        if self.api_key is not None:
            found.append(self.api_key.get_secret_value())
        for spec in self.sinks.values():
            found.extend(_secret_values(spec.options))
        return [s for s in found if s]

    def memory_estimate(self) -> int:
        """Bytes the process may need when every sink's buffer and the intake are full.

        The sizing rule of docs/reliability.md: a baseline for the interpreter, the
        drivers and the caches, plus every buffered event at its measured cost (the
        encoded body and a small header; tests/unit/test_memory.py holds it under
        1.5 KB) and every intake event as a whole validated event.
        """
        buffered = sum(spec.common.buffer.max_events for spec in self.sinks.values())
        return (BASELINE_BYTES + buffered * BYTES_PER_BUFFERED_EVENT
                + self.config.intake_max_events * BYTES_PER_INTAKE_EVENT)


#: resident memory of a running bridge with its drivers loaded and nothing buffered
BASELINE_BYTES: Final = 80 * 2**20
#: measured: about 950 bytes for a ticker in cloudevents-json (tests/unit/test_memory.py)
BYTES_PER_BUFFERED_EVENT: Final = 1024
#: measured: about 1.8 KB for a validated ticker event waiting for the router
BYTES_PER_INTAKE_EVENT: Final = 2048


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

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def interpolate(tree: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``tree``.

    ``$$`` is a literal ``$``. An unset variable without default is a problem at its
    path; its value never appears in the message. A ``${`` that starts no valid
    reference (``${VAR`` unterminated, ``${1X}``) is a problem too, never kept literally.
    """
    problems: list[str] = []

    def sub(text: str, where: str) -> str:
        malformed = False

        def one(m: re.Match[str]) -> str:
            nonlocal malformed
            if m.group(0) == "$$":
                return "$"
            if m.group(1) is None:
                if not malformed:
                    malformed = True
                    problems.append(
                        f"{where or '<root>'}: unterminated or malformed ${{...}} reference "
                        "(use ${VAR} or ${VAR:-default}; $$ is a literal $)"
                    )
                return m.group(0)
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

    Raises :class:`ConfigError` listing every problem found, each with its path. The
    file is read with a bound (:data:`MAX_CONFIG_BYTES`) and must be UTF-8.
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from None
    if len(data) > MAX_CONFIG_BYTES:
        mib = MAX_CONFIG_BYTES // (1024 * 1024)
        raise ConfigError([f"<file>: larger than {mib} MiB; is this the right file?"], str(p))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        problem = (f"<file>: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at line "
                   f"{line}, column {column})")
        raise ConfigError([problem], str(p)) from None
    return parse_config(text, env=env, drivers=drivers, source=str(p))


def parse_config(
    text: str,
    env: Mapping[str, str] | None = None,
    drivers: Drivers | None = None,
    source: str = "configuration",
) -> Settings:
    """Like :func:`load_config`, from the text of a configuration file."""
    tree, problems = _load_yaml(text, source)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        problem = "<root>: the file must hold a mapping (source:, sinks:, routes:)"
        raise ConfigError([*problems, problem], source)
    tree, env_problems = interpolate(tree, os.environ if env is None else env)
    problems.extend(env_problems)
    config: Config | None = None
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_errors(exc))
    drivers = drivers or Drivers()
    if config is None:
        # report the sinks' driver problems too, not only the first layer's
        raw_sinks = tree.get("sinks")
        specs: dict[str, SinkSpec] = {}
        if isinstance(raw_sinks, dict):
            commons = {}
            for name, raw in raw_sinks.items():
                try:
                    commons[str(name)] = SinkCommon.model_validate(raw)
                except ValidationError:
                    continue  # already reported by the whole-file validation
            specs = _resolve_sinks(commons, drivers, problems)
        # and the routes' references to sinks (a missing or repeated sink, a duplicate name)
        raw_routes = tree.get("routes")
        if isinstance(raw_routes, list):
            sink_names = [str(n) for n in raw_sinks] if isinstance(raw_sinks, dict) else []
            try:
                src = SourceConfig.model_validate(tree.get("source") or {})
            except ValidationError:
                src = SourceConfig()
            problems.extend(_route_problems(raw_routes, sink_names, specs, src))
        raise ConfigError(problems, source)
    settings = _resolve(config, drivers, problems)
    if problems:
        raise ConfigError(problems, source)
    return settings


def _resolve(config: Config, drivers: Drivers, problems: list[str]) -> Settings:
    api_key = config.source.api_key
    if config.source.api_key_file is not None:
        api_key = _read_key_file(config.source.api_key_file, problems)

    specs = _resolve_sinks(config.sinks, drivers, problems)
    problems.extend(_dead_letter_problems(config.sinks, specs))
    routes = config.routes or [RouteConfig(sinks=list(config.sinks))]
    problems.extend(_route_problems(routes, list(config.sinks), specs, config.source))
    warnings = _security_warnings(config, api_key, specs)
    return Settings(config=config, sinks=specs, routes=routes, api_key=api_key,
                    warnings=warnings)


def _route_problems(
    routes: Sequence[Any],
    sink_names: Collection[str],
    specs: Mapping[str, SinkSpec],
    source: SourceConfig,
) -> list[str]:
    """The routes' names and sink references: a missing sink, a sink listed twice in one
    route (every event would be published twice), two routes with one name (their
    metrics would merge), and each topic against its sinks' drivers.

    ``routes`` holds :class:`RouteConfig` objects, or the raw route mappings when the
    file failed validation (their own problems are reported already).
    """
    problems: list[str] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(routes):
        route: RouteConfig | None
        name: str | None
        sinks: list[Any]
        if isinstance(raw, RouteConfig):
            route, name, sinks = raw, raw.name, list(raw.sinks)
        elif isinstance(raw, dict):
            try:
                route = RouteConfig.model_validate(raw)
            except ValidationError:
                route = None
            raw_name, raw_sinks = raw.get("name"), raw.get("sinks")
            name = raw_name if isinstance(raw_name, str) else None
            sinks = raw_sinks if isinstance(raw_sinks, list) else []
        else:
            continue
        effective = name or f"route{i}"
        if effective in names:
            if name is None:
                problems.append(f"routes[{i}]: its default name {effective!r} is the name of "
                                f"routes[{names[effective]}]; give one of them another name")
            else:
                problems.append(f"routes[{i}].name: duplicate route name {effective!r} "
                                f"(also routes[{names[effective]}])")
        else:
            names[effective] = i
        listed: set[str] = set()
        for j, sink in enumerate(sinks):
            if not isinstance(sink, str):
                continue
            if sink not in sink_names:
                known = ", ".join(sink_names)
                problems.append(f"routes[{i}].sinks[{j}]: no sink named {sink!r} (sinks: {known})")
            elif sink in listed:
                problems.append(f"routes[{i}].sinks[{j}]: sink {sink!r} is listed twice "
                                "(every event would be published twice)")
            else:
                listed.add(sink)
                if route is not None and sink in specs:
                    problems.extend(_topic_problems(i, route, specs[sink], source))
    return problems


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
        # whatever the driver's model allows, no option is meaningful as .inf or .nan
        non_finite = list(_non_finite(options, where))
        if non_finite:
            problems.extend(f"{loc}: input should be a finite number" for loc in non_finite)
            continue
        problem = driver.check_format(options, common.format)
        if problem is not None:
            problems.append(f"{where}.format: {problem}")
            continue
        specs[name] = SinkSpec(name, common, driver, options)
    return specs


def _dead_letter_problems(
    sinks: Mapping[str, SinkCommon], specs: Mapping[str, SinkSpec]
) -> list[str]:
    """``sinks.<name>.dead_letter`` must name another sink that can carry what it gets:
    the refused message in its own format, extension attributes as attributes unless
    the body is a structured envelope; and following dead letters never loops."""
    problems: list[str] = []
    for name, common in sinks.items():
        target = common.dead_letter
        if target is None:
            continue
        where = f"sinks.{name}.dead_letter"
        if target == name:
            problems.append(f"{where}: a sink cannot be its own dead-letter sink")
            continue
        if target not in sinks:
            known = ", ".join(n for n in sinks if n != name) or "none"
            problems.append(f"{where}: no sink named {target!r} (sinks: {known})")
            continue
        seen = [name]
        nxt: str | None = target
        while nxt is not None and nxt in sinks and nxt not in seen:
            seen.append(nxt)
            nxt = sinks[nxt].dead_letter
        if nxt == name:
            chain = " -> ".join([*seen, name])
            problems.append(f"{where}: dead letters would go round in a loop ({chain})")
            continue
        spec = specs.get(target)
        if spec is None:
            continue  # its own problem is reported under its name
        fmt = common.format
        needs = fmt if fmt != "raw" else "cloudevents-binary"
        problem = None
        if fmt not in spec.driver.formats:
            problem = f"its driver {spec.common.driver!r} does not carry {fmt!r}"
        elif fmt != "cloudevents-json":
            problem = spec.driver.check_format(spec.options, needs)
        if problem is not None:
            problems.append(
                f"{where}: sink {target!r} cannot carry the {fmt!r} messages of sink "
                f"{name!r} with their dead-letter attributes: {problem}"
            )
    return problems


def _non_finite(value: Any, where: str) -> Iterable[str]:
    """The paths of the non-finite floats in a validated options model."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield where
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _non_finite(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}.{key}")


# ---------------------------------------------------------------------------
# The API key


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key, or ``None``: a key is one line without
    whitespace or control characters. The message never quotes the key."""
    for i, ch in enumerate(key, 1):
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            return ("the key must be one line without whitespace or control characters "
                    f"(found one at character {i})")
    return None


def _read_key_file(path: Path, problems: list[str]) -> SecretStr | None:
    """The key in ``path``: at most :data:`MAX_KEY_FILE_BYTES`, UTF-8, one line (one
    trailing newline is stripped), not empty. Problems go to ``problems``."""
    where = "source.api_key_file"
    try:
        mode = path.stat().st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            problems.append(f"{where}: not a regular file (a pipe or socket)")
            return None
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(f"{where}: cannot read the file: {exc.strerror or exc}")
        return None
    if len(data) > MAX_KEY_FILE_BYTES:
        kib = MAX_KEY_FILE_BYTES // 1024
        problems.append(f"{where}: larger than {kib} KiB; the file must hold the key on one line")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{where}: not UTF-8 text")
        return None
    key = text.removesuffix("\n").removesuffix("\r")
    if not key:
        problems.append(f"{where}: the file is empty")
        return None
    problem = key_problem(key)
    if problem is not None:
        problems.append(f"{where}: {problem}")
        return None
    return SecretStr(key)


# ---------------------------------------------------------------------------
# Insecure settings (warnings, not errors)


def _is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _security_warnings(
    config: Config, api_key: SecretStr | None, specs: Mapping[str, SinkSpec]
) -> list[str]:
    """Valid but insecure settings, one ``path: message`` each; never a secret value."""
    warnings: list[str] = []
    src = config.source
    parts = urlsplit(src.url)
    host = parts.hostname or ""
    if parts.scheme == "http" and api_key is not None and api_key.get_secret_value() \
            and not _is_loopback(host):
        warnings.append(f"source.url: the API key is sent unencrypted over http:// to {host}; "
                        "use https://")
    if not src.tls_verify:
        warnings.append("source.tls_verify: false: the upstream's certificate is not checked, "
                        "so anyone on the network path can impersonate it and read the API key")
    for name, spec in specs.items():
        try:
            found = list(spec.driver.security_warnings(spec.options))
        except Exception as exc:  # a plugin's bug must not hide the configuration's state
            found = [f"driver: {spec.common.driver}.security_warnings() failed: "
                     f"{type(exc).__name__}"]
        warnings.extend(f"sinks.{name}.{w}" for w in found)
    return warnings


# ---------------------------------------------------------------------------
# The YAML loader

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """The document cannot be constructed safely (recursive, too large, too deep)."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader whose document is checked before it is constructed: duplicate
    mapping keys (PyYAML keeps the last one silently), recursive aliases, alias
    expansion beyond :data:`MAX_ALIAS_NODES` nodes and nesting beyond :data:`MAX_DEPTH`."""

    def check(self, root: yaml.Node) -> list[str]:
        """The problems of the composed document; raises :class:`_Refused` (with the
        problems so far in its args) when it must not be constructed."""
        problems: list[str] = []
        seen: set[int] = set()
        active: set[int] = set()
        budget = MAX_ALIAS_NODES

        def refuse(problem: str) -> None:
            problems.append(problem)
            raise _Refused(problems)

        def walk(node: yaml.Node, where: str, depth: int, aliased: bool) -> None:
            nonlocal budget
            here = where or "<root>"
            ident = id(node)
            if ident in active:
                refuse(f"{here}: recursive YAML alias (a node that contains itself)")
            if ident in seen:
                aliased = True
            seen.add(ident)
            if aliased:
                budget -= 1
                if budget < 0:
                    refuse(f"{here}: YAML aliases expand to more than {MAX_ALIAS_NODES} "
                           "nodes; refusing to expand them")
            if depth > MAX_DEPTH:
                refuse(f"{here}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, yaml.MappingNode):
                active.add(ident)
                first: dict[tuple[str, str], int] = {}
                for key, value in node.value:
                    if key.tag == _MERGE_TAG:
                        walk(value, where, depth + 1, aliased)
                        continue
                    name = str(key.value) if isinstance(key, yaml.ScalarNode) else "<key>"
                    sub = f"{where}.{name}" if where else name
                    if isinstance(key, yaml.ScalarNode):
                        line = key.start_mark.line + 1
                        dup = (key.tag, key.value)
                        if dup not in first:
                            first[dup] = line
                        elif not aliased:
                            problems.append(
                                f"{sub}: duplicate key at line {line} (first at line "
                                f"{first[dup]}); the second would silently replace the first"
                            )
                    walk(value, sub, depth + 1, aliased)
                active.discard(ident)
            elif isinstance(node, yaml.SequenceNode):
                active.add(ident)
                for i, item in enumerate(node.value):
                    walk(item, f"{where}[{i}]", depth + 1, aliased)
                active.discard(ident)

        walk(root, "", 0, False)
        return problems


def _load_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """The YAML document of ``text`` and its non-fatal problems (duplicate keys);
    raises :class:`ConfigError` when it cannot be read at all."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        try:
            problems = loader.check(node)
        except _Refused as exc:
            raise ConfigError(exc.args[0], source) from None
        return loader.construct_document(node), problems
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"], source) from None
    except RecursionError:
        problem = f"<root>: not valid YAML: nested deeper than {MAX_DEPTH} levels"
        raise ConfigError([problem], source) from None
    finally:
        loader.dispose()


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
