"""The ``http`` and ``control`` sections of the configuration schema: the listeners, the
bearer tokens and their scopes, and the NATS door. Part of :mod:`bridge.config.schema`,
which re-exports every name here.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from bridge.config.schema_base import _Model
from bridge.config.schema_source import BackoffConfig
from bridge.sinks.natsconn import NatsConnectionOptions


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


#: ``control.nats`` keys kept as deprecated aliases: ``old -> new``
NATS_DEPRECATED_KEYS: Final = {"username": "user", "credentials_file": "creds_file"}


class ControlNatsConfig(NatsConnectionOptions, _Model):
    """The NATS door of the control surface: one "micro" service (``$SRV`` discovery)
    whose endpoints live under ``subject_prefix`` (see :mod:`bridge.control.core` and
    docs/consuming-prices.md).

    The door has its own connection, independent of any NATS sink: it reconnects on
    its own (nats-py's reconnection, forever) and a bus that is down at start-up is
    retried in the background with :attr:`backoff`; the bridge runs meanwhile.
    The connection options are the ``nats`` driver's
    (:class:`~bridge.sinks.natsconn.NatsConnectionOptions`): ``servers``, credentials
    ``user``/``password``, ``token``, ``creds_file`` or ``nkeys_seed`` (one of them,
    never logged), ``tls_ca_file``, ``tls_cert_file``/``tls_key_file``,
    ``tls_verify``, ``tls_hostname``, ``connect_timeout_s``. The older keys
    ``username`` and ``credentials_file`` still work as deprecated aliases of ``user``
    and ``creds_file`` (:attr:`deprecated_keys`; both spellings at once is an error).
    """

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)

    #: the endpoints' subjects: ``<subject_prefix>.snapshot`` (every shard answers)
    #: and ``<subject_prefix>.snapshot.<shard index>`` (one shard, for the next pages)
    subject_prefix: str = "aleno.bridge"
    #: the micro service's name (``$SRV.PING.<name>``); the connection is named
    #: ``<name>-control``
    name: str = "aleno-bridge"
    #: the delays between attempts while the first connection cannot be made
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    #: the largest snapshot reply (bytes); ``null``: the server's ``max_payload``
    #: (1 MiB by default). Never more than ``max_payload``, whatever is set here.
    snapshot_page_bytes: int | None = Field(None, ge=4096)

    _deprecated: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _aliases(cls, data: Any, handler: ModelWrapValidatorHandler[ControlNatsConfig],
                 ) -> ControlNatsConfig:
        """``username`` / ``credentials_file``: the deprecated names of ``user`` /
        ``creds_file``, accepted and remembered (never both names at once)."""
        used: list[str] = []
        if isinstance(data, dict):
            data = dict(data)
            for old, new in NATS_DEPRECATED_KEYS.items():
                if old not in data:
                    continue
                if new in data:
                    msg = (f"{old} and {new} are both set: {old} is the deprecated name "
                           f"of {new}; keep {new} only")
                    raise ValueError(msg)
                data[new] = data.pop(old)
                used.append(old)
        model = handler(data)
        if used:
            model._deprecated = tuple(used)
        return model

    @property
    def deprecated_keys(self) -> dict[str, str]:
        """The deprecated keys the configuration used: ``old -> new``."""
        return {old: NATS_DEPRECATED_KEYS[old] for old in self._deprecated}

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


__all__ = [
    "ANONYMOUS",
    "MIN_TOKEN_LEN",
    "NATS_DEPRECATED_KEYS",
    "SCOPES",
    "AuthConfig",
    "ControlConfig",
    "ControlHttpConfig",
    "ControlNatsConfig",
    "HttpConfig",
    "Scope",
    "TokenConfig",
    "is_loopback_host",
    "token_problem",
]
