"""Resolved settings: a validated :class:`~bridge.config.schema.Config` with its sink drivers
loaded, every cross-reference checked, and the warnings of valid but insecure settings.

What the schema alone cannot check is checked here: each sink's driver loads and
accepts the sink's options and format; every route names existing sinks, once each;
each topic template gives topics the driver can publish to; a dead-letter sink exists,
can carry what it receives and no chain of them loops; an ``api_key_file`` is readable.
A configuration that is valid but insecure (an API key over plain ``http://``,
certificate checks turned off, passwords to a bus without TLS), or that uses a
deprecated key, resolves with :attr:`Settings.warnings`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr, ValidationError

from bridge.config.loading import read_key_file, validation_problems
from bridge.config.schema import (
    DEFAULT_NAME,
    Config,
    ConfigError,
    ControlHttpConfig,
    RouteConfig,
    SinkCommon,
    SinkSpec,
    SourceConfig,
    UpstreamKey,
    is_loopback_host,
    spool_path_problems,
    token_problem,
)
from bridge.control.auth import Guard, Token, anonymous_scopes
from bridge.core.templates import NEUTRAL_SAMPLES, topic_problem
from bridge.sinks import (
    Budget,
    DriverLoadError,
    Drivers,
    UnknownDriverError,
    topic_rules,
)
from bridge.sinks.natsconn import security_warnings as nats_security_warnings
from bridge.sinks.spool_format import segment_size


def upstream_keys(config: SourceConfig, api_key: SecretStr | str | None = None,
                  problems: list[str] | None = None) -> list[UpstreamKey]:
    """The keys of ``config``: ``source.api_keys`` (each ``key_file`` read, problems
    named ``source.api_keys[i].key_file: ...``), else the one ``api_key`` (already
    resolved from ``api_key`` / ``api_key_file`` by the settings) as ``default``.

    Problems go to ``problems``; without a list, they raise :class:`ConfigError`.
    """
    own = problems if problems is not None else []
    keys: list[UpstreamKey] = []
    if config.api_keys is None:
        single = SecretStr(api_key) if isinstance(api_key, str) else api_key
        keys.append(UpstreamKey(DEFAULT_NAME, single))
    else:
        for i, entry in enumerate(config.api_keys):
            key = entry.key
            if entry.key_file is not None:
                found: list[str] = []
                key = read_key_file(entry.key_file, found)
                own.extend(p.replace("source.api_key_file", f"source.api_keys[{i}].key_file", 1)
                           for p in found)
            keys.append(UpstreamKey(entry.name, key, entry.limit))
    if problems is None and own:
        raise ConfigError(own)
    return keys


@dataclass(frozen=True)
class Settings:
    """A configuration that passed every check, with its drivers resolved."""

    config: Config
    sinks: dict[str, SinkSpec]
    routes: list[RouteConfig]
    api_key: SecretStr | None
    #: every API key with its name and limit (``source.api_keys``, or the one key of
    #: ``api_key`` / ``api_key_file`` named ``default``): one upstream connection each
    api_keys: tuple[UpstreamKey, ...] = ()
    #: valid but insecure or deprecated settings, one ``path: message`` each (never a
    #: secret value); ``validate`` prints them, ``run`` logs them at WARNING
    warnings: list[str] = field(default_factory=list)
    #: the control surface's bearer tokens (``control.auth.tokens``, files read)
    tokens: tuple[Token, ...] = ()
    #: which of :attr:`warnings` are deprecated keys (``path: deprecated, use path``)
    deprecated: tuple[str, ...] = ()

    @property
    def control_http(self) -> ControlHttpConfig | None:
        """The listener of ``/v1/`` (see :func:`control_listener`)."""
        return control_listener(self.config)[0]

    @property
    def v1_on_probes(self) -> bool:
        """Whether ``/v1/`` is (also) served on the ``http`` listener (deprecated)."""
        return control_listener(self.config)[1]

    def guard(self, door: str) -> Guard:
        """Who may call ``door`` (``http`` or ``nats``): the tokens, and the anonymous
        scopes given that door's reach (:func:`bridge.control.auth.anonymous_scopes`)."""
        control = self.config.control
        if door == "nats":
            loopback = control.nats_loopback
        else:
            listener = self.control_http
            loopback = (self.config.http.loopback if listener is None
                        else listener.loopback)
        anonymous = anonymous_scopes(control.auth, self.tokens, loopback)
        return Guard(self.tokens, anonymous, control.auth.default_max_symbols)

    def secrets(self) -> list[str]:
        """Every secret value of the configuration, for log redaction."""
        found: list[str] = []
        if self.api_key is not None:
            found.append(self.api_key.get_secret_value())
        for k in self.api_keys:
            if k.key is not None and k.key.get_secret_value() not in found:
                found.append(k.key.get_secret_value())
        for spec in self.sinks.values():
            found.extend(_secret_values(spec.options))
        if self.config.control.nats is not None:
            found.extend(_secret_values(self.config.control.nats))
        found.extend(t.token.get_secret_value() for t in self.tokens)
        return [s for s in found if s]

    def memory_estimate(self) -> int:
        """Bytes the process may need when every sink's buffer and the intake are full.

        The sizing rule of docs/reliability.md: a baseline for the interpreter, the
        drivers and the caches, plus every buffered event at its measured cost (the
        encoded body and a small header; tests/unit/pipeline/test_memory.py holds it under
        1.5 KB) and every intake event as a whole validated event.
        """
        buffered = sum(spec.common.buffer.max_events for spec in self.sinks.values())
        return (BASELINE_BYTES + buffered * BYTES_PER_BUFFERED_EVENT
                + self.config.intake_max_events * BYTES_PER_INTAKE_EVENT)

    def disk_estimate(self) -> dict[str, int]:
        """Bytes each sink's spool (``buffer.disk``) may take on disk at most: its
        ``max_bytes`` plus one segment (docs/reliability.md, "Disk spool")."""
        return {name: disk.max_bytes + segment_size(disk.max_bytes)
                for name, spec in self.sinks.items()
                if (disk := spec.common.buffer.disk) is not None}


#: resident memory of a running bridge with its drivers loaded and nothing buffered
BASELINE_BYTES: Final = 80 * 2**20
#: measured: about 950 bytes for a ticker in cloudevents-json (tests/unit/pipeline/test_memory.py)
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

def resolve_settings(
    config: Config, drivers: Drivers | None = None, source: str = "configuration"
) -> Settings:
    """The :class:`Settings` of a validated :class:`Config`, for example one built in code.

    Runs every check ``parse_config`` runs after the schema (drivers and their options,
    dead letters, routes and topics, the API key file) and raises :class:`ConfigError`
    with the same messages. ``drivers`` defaults to the installed ones.
    """
    problems: list[str] = []
    settings = _resolve(config, drivers or Drivers(), problems)
    if problems:
        raise ConfigError(problems, source)
    return settings


def resolve_tree(
    tree: Mapping[Any, Any],
    problems: list[str],
    drivers: Drivers | None = None,
    source: str = "configuration",
) -> Settings:
    """Validate and resolve an interpolated document; ``problems`` are those found while
    reading it. Raises :class:`ConfigError` with every problem, the earlier ones first.

    When the schema refuses the document, the sinks' driver problems and the routes'
    references are reported too, not only the schema's.
    """
    config: Config | None = None
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        problems.extend(validation_problems(exc))
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
            problems.extend(spool_path_problems(commons))
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
        api_key = read_key_file(config.source.api_key_file, problems)

    specs = _resolve_sinks(config.sinks, drivers, problems)
    problems.extend(_dead_letter_problems(config.sinks, specs))
    problems.extend(spool_path_problems(config.sinks))
    routes = config.routes or [RouteConfig(sinks=list(config.sinks))]
    problems.extend(_route_problems(routes, list(config.sinks), specs, config.source))
    keys = tuple(upstream_keys(config.source, api_key, problems))
    any_key = api_key if api_key is not None else next(
        (k.key for k in keys if k.key is not None), None)
    tokens = tuple(_tokens(config, problems))
    problems.extend(_control_problems(config, tokens))
    problems.extend(_stream_captures_control(config, specs))
    deprecated = _deprecated_keys(config)
    warnings = [*deprecated, *_security_warnings(config, any_key, specs)]
    return Settings(config=config, sinks=specs, routes=routes, api_key=api_key,
                    api_keys=keys, warnings=warnings, tokens=tokens,
                    deprecated=tuple(deprecated))


# ---------------------------------------------------------------------------
# The control surface: its listener and who may call it


def control_listener(config: Config) -> tuple[ControlHttpConfig | None, bool]:
    """Where ``/v1/`` is served: ``(listener, on_probes)``.

    ``control.http`` set: on that listener only (``enabled: false``: nowhere over
    HTTP). Unset: when the ``http`` listener is enabled and loopback-only, ``/v1/``
    stays there as before (deprecated; no listener of its own); when it is disabled,
    nowhere over HTTP, as before; else on a listener of the defaults
    (``127.0.0.1:9465``) and never on the probes' port.
    """
    own = config.control.http
    if own is not None:
        return (own if own.enabled else None), False
    if not config.http.enabled:
        return None, False
    if config.http.loopback:
        return None, True
    return ControlHttpConfig(), False


def _tokens(config: Config, problems: list[str]) -> list[Token]:
    found: list[Token] = []
    for i, entry in enumerate(config.control.auth.tokens):
        secret = entry.token
        where = f"control.auth.tokens[{i}].token_file"
        if entry.token_file is not None:
            read: list[str] = []
            secret = read_key_file(entry.token_file, read)
            problems.extend(p.replace("source.api_key_file", where, 1) for p in read)
            if secret is not None:
                problem = token_problem(secret.get_secret_value())
                if problem is not None:
                    problems.append(f"{where}: {problem}")
                    secret = None
        if secret is not None:
            found.append(Token(entry.name, secret, frozenset(entry.scopes), entry.max_symbols))
    values: dict[str, int] = {}
    for i, t in enumerate(found):
        value = t.token.get_secret_value()
        if value in values:
            problems.append(f"control.auth.tokens[{i}]: the same token as "
                            f"control.auth.tokens[{values[value]}] (never quoted)")
        values.setdefault(value, i)
    return found


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject ``pattern`` (``*`` one token, ``>`` the rest) covers
    ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _stream_captures_control(config: Config, specs: Mapping[str, SinkSpec]) -> list[str]:
    """A JetStream stream whose subjects cover the NATS control door's would answer
    every control request with its publish acknowledgement, before the bridge does."""
    door = config.control.nats
    if door is None:
        return []
    probe = f"{door.subject_prefix}.snapshot"
    problems: list[str] = []
    for name, spec in specs.items():
        stream = getattr(spec.options, "stream", None)
        if getattr(spec.options, "jetstream", False) is not True or stream is None:
            continue
        for i, pattern in enumerate(getattr(stream, "subjects", ())):
            if isinstance(pattern, str) and subject_matches(pattern, probe):
                problems.append(
                    f"sinks.{name}.stream.subjects[{i}]: {pattern!r} covers the control "
                    f"door's subjects ({door.subject_prefix}.>): the stream would answer "
                    "its requests; narrow the stream's subjects (e.g. aleno.ticker.>, "
                    "aleno.equity.>) or change control.nats.subject_prefix")
    return problems


def _control_problems(config: Config, tokens: Sequence[Token]) -> list[str]:
    """Secure by default: a door reachable from other hosts needs tokens, or an explicit
    ``control.auth.anonymous``."""
    problems: list[str] = []
    auth = config.control.auth
    if tokens or auth.tokens or auth.anonymous is not None:
        return problems
    listener, _ = control_listener(config)
    if listener is not None and not listener.loopback:
        problems.append(
            f"control.http.host: /v1 would be reachable from other hosts "
            f"({listener.host}) without a token; add control.auth.tokens, or say "
            "control.auth.anonymous: [snapshot] (or [snapshot, lease]) to admit "
            "anonymous clients explicitly, or bind it to 127.0.0.1")
    if config.control.nats is not None and not config.control.nats_loopback:
        problems.append(
            "control.nats.servers: the NATS door is on a shared bus without a token; add "
            "control.auth.tokens, or say control.auth.anonymous: [snapshot] (or "
            "[snapshot, lease]) to admit anonymous requests explicitly")
    return problems


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
            problems.extend(validation_problems(exc, where))
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
        budget = Budget(common.retry.publish_timeout_s, common.retry.connect_timeout_s)
        late = [f"{where}.{p}" for p in driver.check_budget(options, budget)]
        if late:
            problems.extend(late)
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

def _topic_problems(i: int, route: RouteConfig, spec: SinkSpec, source: SourceConfig) -> list[str]:
    """Render the topic template for every configured symbol the route matches (and
    for a neutral sample) with the driver's safe-token rule, and ask the driver
    whether the result can ever be published."""
    symbols = [*source.tickers, *source.equities]
    samples = [*NEUTRAL_SAMPLES, *(("ticker", s) for s in source.tickers),
               *(("equity", s) for s in source.equities)]
    if route.match.kind == "status":  # status events are about the same symbols
        samples += [("status", s) for s in symbols]
    rules = topic_rules(spec.driver, spec.options)
    found = topic_problem(route.topic, route.match, samples, rules.safe_token,
                          rules.check_topic)
    if found is None:
        return []
    symbol, topic, problem = found
    return [
        f"routes[{i}].topic: {route.topic!r} gives {topic!r} for {symbol} on sink "
        f"{spec.name!r} ({spec.common.driver}): {problem}"
    ]


# ---------------------------------------------------------------------------
# Insecure settings (warnings, not errors)


def _security_warnings(
    config: Config, api_key: SecretStr | None, specs: Mapping[str, SinkSpec]
) -> list[str]:
    """Valid but insecure settings, one ``path: message`` each; never a secret value."""
    warnings: list[str] = []
    src = config.source
    parts = urlsplit(src.url)
    host = parts.hostname or ""
    if parts.scheme == "http" and api_key is not None and api_key.get_secret_value() \
            and not is_loopback_host(host):
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
    if config.control.nats is not None:
        warnings.extend(f"control.nats.{w}" for w in nats_security_warnings(config.control.nats))
    return warnings


def _deprecated_keys(config: Config) -> list[str]:
    """The deprecated keys the configuration uses, each with the key to use instead."""
    door = config.control.nats
    if door is None:
        return []
    return [f"control.nats.{old}: deprecated, use control.nats.{new}"
            for old, new in door.deprecated_keys.items()]


__all__ = [
    "BASELINE_BYTES",
    "BYTES_PER_BUFFERED_EVENT",
    "BYTES_PER_INTAKE_EVENT",
    "Settings",
    "SinkSpec",
    "resolve_settings",
    "resolve_tree",
]
