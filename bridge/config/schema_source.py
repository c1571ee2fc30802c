"""The ``source`` section of the configuration schema: the upstream connection(s), the
symbols, leases, sharding and the status events' settings. Part of
:mod:`bridge.config.schema`, which re-exports every name here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from bridge.config.schema_base import _Model, key_problem


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


__all__ = [
    "ApiKeyConfig",
    "BackoffConfig",
    "LeaseConfig",
    "ShardConfig",
    "SourceConfig",
    "StatusDampingConfig",
]
