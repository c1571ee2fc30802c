"""One NATS connection, one option vocabulary: what the ``nats`` sink driver
(:mod:`aleno_bridge_plugins.nats`) and the NATS door of the control surface
(:mod:`bridge.control.nats`, ``control.nats``) share.

:class:`NatsConnectionOptions`
    the connection options and their checks: ``servers``, the credentials (``user`` +
    ``password``, ``token``, ``creds_file`` or ``nkeys_seed``, one of them), the TLS
    options of :class:`~bridge.sinks.kit.TlsHostnameOptions` (``tls_ca_file``,
    ``tls_cert_file`` + ``tls_key_file``, ``tls_verify``, ``tls_hostname``) and
    ``connect_timeout_s``. The driver's options and ``control.nats`` derive from it.
:func:`security_warnings`
    valid but insecure settings (a secret without TLS, TLS without verification).
:func:`connect_kwargs`
    the keyword arguments of nats-py's ``Client.connect`` for those options, with the
    connection's name, timeouts, reconnection settings and callbacks given by the
    caller (each user owns its reconnection policy).
:func:`plain_text_problem`, :func:`refused_credentials`, :func:`server_url`
    what both users check or say about a connection once it is made or refused.

Nothing here imports nats-py (the core runs without it): a client is typed ``Any``.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.sinks.kit import TlsHostnameOptions, server_urls, split_list

#: the URL schemes nats-py connects to
SCHEMES: Final = ("nats", "tls", "ws", "wss")
#: the nats-py callbacks :func:`connect_kwargs` accepts
CALLBACKS: Final = frozenset({
    "error_cb", "disconnected_cb", "closed_cb", "reconnected_cb", "discovered_server_cb",
})
#: the options that hold credentials, as a refused connect names them
CREDENTIAL_OPTIONS: Final = "user/password, token, creds_file or nkeys_seed"

Callback = Callable[..., Awaitable[None]]


class NatsConnectionOptions(TlsHostnameOptions):
    """The options of one NATS connection (see the module's docstring).

    Credentials never go in a server URL (refused); ``user`` and ``password`` go
    together; ``creds_file`` (a ``.creds`` file: user JWT + nkey seed) and
    ``nkeys_seed`` (a file holding an ``SU...`` seed) need the ``nkeys`` package;
    a client certificate is ``tls_cert_file`` and ``tls_key_file`` together.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: one URL or a list (a comma-separated string is split): ``nats://host:4222``,
    #: ``tls://host:4222``; credentials go in ``user``/``password``/``token``, not the URL
    servers: list[str] = Field(min_length=1)
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    #: a ``.creds`` file (user JWT + nkey seed); needs the ``nkeys`` package
    creds_file: Path | None = None
    #: a file holding an nkey seed (``SU...``); needs the ``nkeys`` package
    nkeys_seed: Path | None = None
    #: per-server bound on TCP connect, TLS handshake and the CONNECT exchange
    connect_timeout_s: float = Field(5.0, gt=0)

    _split_servers = field_validator("servers", mode="before")(split_list)

    @field_validator("servers")
    @classmethod
    def _server_urls(cls, v: list[str]) -> list[str]:
        return server_urls(v, SCHEMES, example="nats://host:4222")

    @model_validator(mode="after")
    def _one_credential(self) -> NatsConnectionOptions:
        if (self.user is None) != (self.password is None):
            msg = "user and password go together"
            raise ValueError(msg)
        methods = self.auth_methods
        if len(methods) > 1:
            msg = f"choose one authentication method, not {' and '.join(methods)}"
            raise ValueError(msg)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            msg = "tls_cert_file and tls_key_file go together (client certificate)"
            raise ValueError(msg)
        if self.creds_file is not None or self.nkeys_seed is not None:
            try:
                import nkeys  # noqa: F401
            except ImportError:
                msg = "creds_file and nkeys_seed need the nkeys package (pip install nkeys)"
                raise ValueError(msg) from None
        return self

    @property
    def auth_methods(self) -> list[str]:
        """The authentication methods that are set (valid options: at most one)."""
        chosen = {
            "user/password": self.user is not None,
            "token": self.token is not None,
            "creds_file": self.creds_file is not None,
            "nkeys_seed": self.nkeys_seed is not None,
        }
        return [name for name, on in chosen.items() if on]

    @property
    def uses_tls(self) -> bool:
        """TLS is asked for: a ``tls://``/``wss://`` server or any ``tls_*`` option."""
        return (
            any(s.startswith(("tls://", "wss://")) for s in self.servers)
            or self.tls_ca_file is not None
            or self.tls_cert_file is not None
            or not self.tls_verify
            or self.tls_hostname is not None
        )

    def connection_tls(self) -> ssl.SSLContext | None:
        """The SSL context of the connection, ``None`` without TLS (raises
        :class:`~bridge.sinks.kit.TlsFilesError` naming an unreadable file)."""
        return self.tls_context() if self.uses_tls else None


def security_warnings(opts: NatsConnectionOptions) -> list[str]:
    """A password or token without TLS; TLS without certificate verification. One
    ``option: message`` each, never a secret; the caller prefixes the path."""
    found: list[str] = []
    if not opts.uses_tls:
        secret = ("password" if opts.password is not None
                  else "token" if opts.token is not None else None)
        if secret is not None:
            found.append(
                f"{secret}: no TLS is configured (nats:// servers, no tls_* option), so "
                f"the {secret} crosses the network in clear text unless the server "
                "demands TLS; use tls:// servers"
            )
    elif not opts.tls_verify:
        found.append(
            "tls_verify: false: the server's certificate is not checked, so anyone on "
            "the network path can impersonate it and read the credentials"
        )
    return found


def connect_kwargs(
    opts: NatsConnectionOptions,
    *,
    name: str,
    tls: ssl.SSLContext | None,
    servers: Sequence[str] | None = None,
    connect_timeout_s: float | None = None,
    callbacks: Mapping[str, Callback] | None = None,
    **client: Any,
) -> dict[str, Any]:
    """The keyword arguments of nats-py's ``Client.connect`` for ``opts``.

    ``name`` is the connection's name (the server's monitoring shows it); ``tls`` the
    context of :meth:`NatsConnectionOptions.connection_tls` (``tls_hostname`` goes
    with it); ``servers`` overrides ``opts.servers`` (e.g. shuffled);
    ``connect_timeout_s`` overrides ``opts.connect_timeout_s`` (e.g. derived from a
    budget); ``callbacks`` are nats-py's ``*_cb`` (:data:`CALLBACKS`); ``client`` is
    passed as it is (``allow_reconnect``, ``max_reconnect_attempts``,
    ``ping_interval``, ...). The credentials come last, from ``opts`` only.
    """
    unknown = set(callbacks or ()) - CALLBACKS
    if unknown:
        msg = f"unknown nats-py callbacks: {', '.join(sorted(unknown))}"
        raise TypeError(msg)
    clash = set(client) & {"servers", "name", "connect_timeout", "tls", "tls_hostname",
                           "user", "password", "token", "user_credentials", "nkeys_seed",
                           *CALLBACKS}
    if clash:
        msg = f"set by connect_kwargs itself: {', '.join(sorted(clash))}"
        raise TypeError(msg)
    kwargs: dict[str, Any] = {
        "servers": list(opts.servers if servers is None else servers),
        "name": name,
        "connect_timeout": (opts.connect_timeout_s if connect_timeout_s is None
                            else connect_timeout_s),
        **client,
        **(callbacks or {}),
    }
    if tls is not None:
        kwargs["tls"] = tls
        if opts.tls_hostname:
            kwargs["tls_hostname"] = opts.tls_hostname
    if opts.user is not None and opts.password is not None:
        kwargs["user"] = opts.user
        kwargs["password"] = opts.password.get_secret_value()
    if opts.token is not None:
        kwargs["token"] = opts.token.get_secret_value()
    if opts.creds_file is not None:
        kwargs["user_credentials"] = str(opts.creds_file)
    if opts.nkeys_seed is not None:
        kwargs["nkeys_seed"] = str(opts.nkeys_seed)
    return kwargs


def server_url(nc: Any) -> str:
    """``scheme://host:port`` of the server ``nc`` is connected to (never credentials:
    the options refuse them in a URL), ``?`` when not connected."""
    url = getattr(nc, "connected_url", None)
    return f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else "?"


def plain_text_problem(nc: Any, tls: ssl.SSLContext | None) -> str | None:
    """Why a connection made with ``tls`` must not be used, or ``None``: nats-py
    upgrades to TLS only when the server's INFO requires it, so a server without TLS
    would get a plain-text connection although TLS was asked for."""
    if tls is None:
        return None
    info = getattr(nc, "_server_info", None)
    if isinstance(info, dict) and info.get("tls_required", False):
        return None
    return (f"TLS is configured but {server_url(nc)} does not require TLS, so the "
            "connection would be plain text (enable TLS on the server)")


def refused_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` (from nats-py) says the server refused the credentials."""
    return ("authorization violation" in str(exc).lower()
            or type(exc).__name__ == "AuthorizationError")


__all__ = [
    "CALLBACKS",
    "CREDENTIAL_OPTIONS",
    "SCHEMES",
    "Callback",
    "NatsConnectionOptions",
    "connect_kwargs",
    "plain_text_problem",
    "refused_credentials",
    "security_warnings",
    "server_url",
]
