"""The configuration file's schema: pydantic models, one per section.

Every model refuses unknown keys and non-finite floats (``.inf``, ``.nan`` are never a
meaningful timeout, interval or size). A sink section mixes the keys every sink has
(:class:`SinkCommon`) with the driver's own options, which are kept as extras here and
validated by the driver's ``options_model`` when the settings are resolved
(``bridge.config.settings``). Reading the file and ``${VAR}`` interpolation are in
``bridge.config.loading``; the template rules in ``bridge.core.templates``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from bridge.core.envelope import Format
from bridge.core.templates import template_problem
from bridge.sinks import Sink, SinkOptions
from bridge.sinks.kit import server_urls, split_list


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` per problem."""

    def __init__(self, problems: Iterable[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{body}")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key, or ``None``: a key is one line without
    whitespace or control characters. The message never quotes the key."""
    for i, ch in enumerate(key, 1):
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            return ("the key must be one line without whitespace or control characters "
                    f"(found one at character {i})")
    return None


class _Model(BaseModel):
    # ``.inf`` / ``.nan`` are never a meaningful timeout, interval or size
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BackoffConfig(_Model):
    """``source.backoff``: the delays between reconnects to the upstream.

    The runtime schedule is :class:`bridge.core.backoff.Backoff`. A sink's delays between
    publish retries are :class:`RetryConfig` (``initial_backoff_s``, ``max_backoff_s``):
    the key names differ because each is user contract in its own section.
    """

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


class ApiKeyConfig(_Model):
    """One of ``source.api_keys``: an API key of its own connection to the upstream.

    ``name`` labels the connection in metrics, logs and ``/readyz`` (never the key).
    ``limit``: the symbols (tickers and equities together) the upstream lets this key
    subscribe; when unset, it is learned from the upstream's limit error.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)
    key: SecretStr | None = None
    key_file: Path | None = None
    limit: int | None = Field(None, ge=1)

    @field_validator("key")
    @classmethod
    def _one_line_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        key = v.get_secret_value().removesuffix("\n").removesuffix("\r")
        problem = key_problem(key) if key else "the key must not be empty"
        if problem is not None:
            raise ValueError(problem)
        return SecretStr(key)

    @model_validator(mode="after")
    def _key_or_file(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_file is None):
            msg = "set key or key_file (exactly one)"
            raise ValueError(msg)
        return self


class LeaseConfig(_Model):
    """``source.leases``: symbols that consumers lease over the control surface.

    A leased symbol is subscribed upstream while a lease on it lives, and unsubscribed
    ``grace_s`` after its last lease ended unless the configuration pins it.
    """

    enabled: bool = False
    #: the longest lease granted (a longer ``ttl_s`` is cut to this)
    max_ttl_s: float = Field(300.0, gt=0)
    #: the TTL of a lease that asks for none
    default_ttl_s: float = Field(60.0, gt=0)
    grace_s: float = Field(10.0, ge=0)
    #: at most this many symbols held by the live leases of one owner (the token that
    #: made them, see ``control.auth``); unset: only the token's ``max_symbols``
    max_per_holder: int | None = Field(None, ge=1)
    #: at most this many live leases in this process, whoever holds them (429 beyond)
    max_leases: int = Field(1000, ge=1, le=1_000_000)
    #: at most this many distinct leased symbols in this process (429 beyond)
    max_symbols: int = Field(1000, ge=1, le=1_000_000)
    #: lease requests being served at once, at most (429 beyond): each may wait for
    #: the upstream's acknowledgement
    max_requests_in_flight: int = Field(32, ge=1, le=10_000)

    @model_validator(mode="after")
    def _default_within_max(self) -> LeaseConfig:
        if self.default_ttl_s > self.max_ttl_s:
            msg = (f"default_ttl_s ({self.default_ttl_s:g}) must not be longer than "
                   f"max_ttl_s ({self.max_ttl_s:g})")
            raise ValueError(msg)
        return self


class StatusDampingConfig(_Model):
    """``source.status_damping``: at most ``max_events`` ``stale`` / ``fresh`` / ``gap``
    status events per symbol in any ``window_s`` (a sliding window); more are
    suppressed and counted, and the symbol's state (stale or fresh) is emitted once its
    budget allows again if consumers were last told otherwise (see
    :class:`bridge.pipeline.market.Damping`)."""

    max_events: int = Field(4, ge=1, le=1000)
    window_s: float = Field(60.0, gt=0, le=86_400)


class SourceConfig(_Model):
    url: str = "https://pricing.aleno.ai"
    path: str = "/v1/socket"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    #: several keys, one connection each; symbols are packed across them within each
    #: key's limit (instead of api_key / api_key_file)
    api_keys: list[ApiKeyConfig] | None = Field(None, min_length=1)
    #: consumers' leases on symbols (off unless enabled)
    leases: LeaseConfig = Field(default_factory=LeaseConfig)
    tickers: list[str] = Field(default_factory=list)
    equities: list[str] = Field(default_factory=list)
    #: reconnect when no update arrived for this long while subscribed
    stale_after_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: give up (exit non-zero) after this many refusals of the API key in a row
    max_auth_failures: int = Field(3, ge=1)
    #: give up after this many failed connection attempts in a row (0: never give up)
    max_connect_attempts: int = Field(0, ge=0)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    tls_verify: bool = True
    shard: ShardConfig | None = None
    #: WebSocket permessage-deflate: ``auto`` offers it and the upstream decides,
    #: ``off`` never offers it (see docs/benchmarks.md, "Upstream compression")
    compression: Literal["auto", "off"] = "auto"
    #: a symbol with no update for this long while the connection is up gets a
    #: ``stale`` status event (and ``fresh`` on its next update)
    symbol_stale_after_s: float = Field(10.0, gt=0)
    #: the upstream's update cadence: a symbol whose ``sentTimestampMs`` jumps by more
    #: than :data:`bridge.pipeline.market.GAP_FACTOR` times this gets a ``gap`` status event
    update_interval_s: float = Field(1.0, gt=0)
    #: status events of one symbol, at most (see :class:`StatusDampingConfig`)
    status_damping: StatusDampingConfig = Field(default_factory=StatusDampingConfig)
    #: a record whose ``sentTimestampMs`` is further ahead of this host's clock than
    #: this is dropped (``events_invalid{reason="clock_skew"}``): one record stamped in
    #: the future would otherwise pin the last value, block ``min_interval_s`` routes
    #: and make a huge ``gap``
    max_clock_skew_s: float = Field(60.0, gt=0)
    #: a record sent longer ago than this (by this host's clock) is dropped
    #: (``events_invalid{reason="too_old"}``): a real-time feed never sends one
    max_record_age_s: float = Field(3600.0, gt=0)
    #: live ``subscribe_*`` / ``unsubscribe_*`` requests per second and API key, at
    #: most, however clients lease (the (re)connect subscription is not counted)
    max_subscribe_requests_per_s: float = Field(5.0, gt=0, le=1000)

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

    @field_validator("compression", mode="before")
    @classmethod
    def _yaml_switch(cls, v: object) -> object:
        # YAML 1.1 reads a bare ``off`` / ``on`` as a boolean
        if v is False:
            return "off"
        if v is True:
            return "auto"
        return v

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
        if self.api_keys is not None:
            if self.api_key is not None or self.api_key_file is not None:
                msg = "set api_key, api_key_file or api_keys, only one of them"
                raise ValueError(msg)
            names: dict[str, int] = {}
            keys: dict[str, int] = {}
            for i, k in enumerate(self.api_keys):
                if k.name in names:
                    msg = (f"api_keys[{i}].name: {k.name!r} is also the name of "
                           f"api_keys[{names[k.name]}]")
                    raise ValueError(msg)
                names[k.name] = i
                if k.key is not None:
                    value = k.key.get_secret_value()
                    if value in keys:
                        # never quote the key
                        msg = (f"api_keys[{i}].key: the same key as api_keys[{keys[value]}] "
                               "(one connection per key)")
                        raise ValueError(msg)
                    keys[value] = i
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
    #: ``"*"`` matches prices (tickers and equities); status events are routed only by
    #: routes that say ``kind: status``
    kind: Literal["ticker", "equity", "status", "*"] = "*"
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
    #: a client that has not taken the next part of its answer for this long is cut off
    send_timeout_s: float = Field(10.0, gt=0, le=3600)

    @property
    def loopback(self) -> bool:
        """Whether the listener is reachable from this host only."""
        return is_loopback_host(self.host)


class ControlHttpConfig(HttpConfig):
    """``control.http``: the listener of ``/v1/`` (snapshots, leases), apart from the
    probes' and Prometheus' listener (``http``)."""

    port: int = Field(9465, ge=0, le=65535)
    #: the ``Origin`` values a browser may call ``/v1`` from (a request that carries
    #: any other ``Origin`` header is refused, 403); empty: no browser at all
    allowed_origins: list[str] = Field(default_factory=list)
    #: full snapshots assembled at once, at most (503 with ``Retry-After`` beyond)
    max_concurrent_snapshots: int = Field(4, ge=1, le=1024)
    #: bytes of replies assembled or being sent, in total across every client, at most
    #: (503 with ``Retry-After`` beyond): what slow readers can pin
    max_reply_bytes: int = Field(64 * 2**20, ge=2**20, le=2**34)


SCOPES: Final = ("snapshot", "lease")
Scope = Literal["snapshot", "lease"]
#: the owner of what anonymous clients lease (no token may take this name)
ANONYMOUS: Final = "anonymous"


def _snapshot_only() -> list[Scope]:
    return ["snapshot"]


class TokenConfig(_Model):
    """One of ``control.auth.tokens``: a bearer token, its name and what it may do.

    ``name`` owns the leases made with the token (``holder`` in a reply) and labels it
    in logs and metrics; the token itself is a secret (never logged, never shown).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=64)
    token: SecretStr | None = None
    token_file: Path | None = None
    scopes: list[Scope] = Field(default_factory=_snapshot_only, min_length=1)
    #: symbols this token's live leases may hold at once (unset: ``default_max_symbols``)
    max_symbols: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _not_anonymous(cls, v: str) -> str:
        if v == ANONYMOUS:
            msg = f"{ANONYMOUS!r} is the owner of anonymous clients' leases; choose another name"
            raise ValueError(msg)
        return v

    @field_validator("token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        token = v.get_secret_value().removesuffix("\n").removesuffix("\r")
        problem = token_problem(token)
        if problem is not None:
            raise ValueError(problem)
        return SecretStr(token)

    @model_validator(mode="after")
    def _token_or_file(self) -> TokenConfig:
        if (self.token is None) == (self.token_file is None):
            msg = "set token or token_file (exactly one)"
            raise ValueError(msg)
        return self


#: the shortest token accepted (a token is a password: 128 bits of hex is 32 characters)
MIN_TOKEN_LEN: Final = 16


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or ``None``. Never quotes the token."""
    if len(token) < MIN_TOKEN_LEN:
        return (f"a token must be at least {MIN_TOKEN_LEN} characters (e.g. "
                "`openssl rand -hex 32`)")
    if len(token) > 4096:
        return "a token must be at most 4096 characters"
    if not all(33 <= ord(c) < 127 for c in token):
        return "a token must be printable ASCII without spaces"
    return None


class AuthConfig(_Model):
    """``control.auth``: who may call the control surface (both doors).

    Clients send ``Authorization: Bearer <token>`` (HTTP header, or the same header on
    a NATS request). ``anonymous`` lists the scopes of a request without a token; unset,
    anonymous clients get every scope on a loopback listener without tokens, and
    nothing anywhere else.
    """

    tokens: list[TokenConfig] = Field(default_factory=list)
    anonymous: list[Scope] | None = None
    #: the ``max_symbols`` of a token that sets none, and of anonymous clients
    default_max_symbols: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        names: dict[str, int] = {}
        values: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            if t.name in names:
                msg = f"tokens[{i}].name: {t.name!r} is also the name of tokens[{names[t.name]}]"
                raise ValueError(msg)
            names[t.name] = i
            if t.token is not None:
                value = t.token.get_secret_value()
                if value in values:
                    msg = f"tokens[{i}].token: the same token as tokens[{values[value]}]"
                    raise ValueError(msg)
                values[value] = i
        return self


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControlNatsConfig(_Model):
    """The NATS door of the control surface: one "micro" service (``$SRV`` discovery)
    whose endpoints live under ``subject_prefix`` (see :mod:`bridge.control.core` and
    docs/consuming-prices.md).

    The door has its own connection, independent of any NATS sink: it reconnects on
    its own (nats-py's reconnection, forever) and a bus that is down at start-up is
    retried in the background with :attr:`backoff`; the bridge runs meanwhile.
    Credentials: ``username``/``password``, ``token`` or ``credentials_file``, one of
    them; they are never logged.
    """

    servers: list[str] = Field(min_length=1)
    #: the endpoints' subjects: ``<subject_prefix>.snapshot`` (every shard answers)
    #: and ``<subject_prefix>.snapshot.<shard index>`` (one shard, for the next pages)
    subject_prefix: str = "aleno.bridge"
    #: the micro service's name (``$SRV.PING.<name>``)
    name: str = "aleno-bridge"
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    credentials_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_verify: bool = True
    connect_timeout_s: float = Field(5.0, gt=0)
    #: the delays between attempts while the first connection cannot be made
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    #: the largest snapshot reply (bytes); ``null``: the server's ``max_payload``
    #: (1 MiB by default). Never more than ``max_payload``, whatever is set here.
    snapshot_page_bytes: int | None = Field(None, ge=4096)

    _split = field_validator("servers", mode="before")(split_list)

    @field_validator("servers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        return server_urls(v, _NATS_SCHEMES, example="nats://host:4222")

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        tokens = v.split(".")
        if not all(_SUBJECT_TOKEN.match(t) for t in tokens):
            msg = ("must be dot-separated tokens of letters, digits, - and _ "
                   "(no empty token, no wildcard * or >, no whitespace)")
            raise ValueError(msg)
        return v

    @field_validator("name")
    @classmethod
    def _service_name(cls, v: str) -> str:
        # the micro protocol's rule for a service name (it is a subject token of $SRV)
        if not _SERVICE_NAME.match(v):
            msg = "must be letters, digits, - and _ only (it is a $SRV subject token)"
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _one_credential(self) -> ControlNatsConfig:
        if (self.username is None) != (self.password is None):
            msg = "username and password go together"
            raise ValueError(msg)
        chosen = [name for name, on in (
            ("username/password", self.username is not None),
            ("token", self.token is not None),
            ("credentials_file", self.credentials_file is not None),
        ) if on]
        if len(chosen) > 1:
            msg = f"choose one authentication method, not {' and '.join(chosen)}"
            raise ValueError(msg)
        return self

    @property
    def uses_tls(self) -> bool:
        """TLS is asked for: a ``tls://``/``wss://`` server, a CA file or no verification."""
        return (any(s.startswith(("tls://", "wss://")) for s in self.servers)
                or self.tls_ca_file is not None or not self.tls_verify)


_NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")
_SUBJECT_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_SERVICE_NAME: Final = re.compile(r"^[A-Za-z0-9_-]+$")


class ControlConfig(_Model):
    """What a client can ask the bridge: ``/v1/`` on its own listener (``http``) and,
    when ``nats`` is set, the same over NATS; ``auth`` says who may (both doors).

    ``http`` unset: the listener of the default ``127.0.0.1:9465``, except that a
    configuration whose ``http`` (probes) listener is loopback-only keeps ``/v1`` there
    as before (deprecated: set ``control.http``)."""

    http: ControlHttpConfig | None = None
    auth: AuthConfig = Field(default_factory=AuthConfig)
    nats: ControlNatsConfig | None = None

    @property
    def nats_loopback(self) -> bool:
        """Whether every NATS server of the door is on this machine."""
        if self.nats is None:
            return True
        return all(is_loopback_host(urlsplit(s).hostname or "") for s in self.nats.servers)


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


__all__ = [
    "ANONYMOUS",
    "SCOPES",
    "ApiKeyConfig",
    "AuthConfig",
    "BackoffConfig",
    "BatchConfig",
    "BufferConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ControlHttpConfig",
    "ControlNatsConfig",
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
