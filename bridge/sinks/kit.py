"""The driver kit: what every sink driver needs besides its bus mapping.

The built-in drivers (``kafka``, ``nats``, ``mqtt``) are written with it, and so can a
third-party plugin. Nothing here does I/O at import or knows a bus library.

Options
    :class:`TlsOptions` (``tls_ca_file``, ``tls_cert_file``, ``tls_key_file``,
    ``tls_verify``), :class:`TlsHostnameOptions` (adds ``tls_hostname``, the name the
    server certificate is checked against) and :class:`PasswordOptions` (``username``,
    ``password``) are mixins for a driver's options model::

        class MyOptions(TlsOptions, PasswordOptions):
            servers: list[str]

    :func:`tls_context` builds the :class:`ssl.SSLContext`; :func:`split_list`,
    :func:`host_ports` and :func:`server_urls` validate server lists;
    :func:`secret_values` and :func:`mask_secrets` keep secrets out of error texts.
CloudEvents
    :func:`ce_headers` maps a message to the headers of a protocol binding (``ce_``
    for Kafka, ``ce-`` for NATS and HTTP); :func:`user_properties` to MQTT 5 user
    properties.
Refusals
    :class:`Refusals` collects the messages of a batch the bus refused for good and
    raises one :class:`~bridge.sinks.SinkRejectedError` with the exact count and
    which ones, after the others were delivered.
Topics
    :func:`topic_problem` holds the checks every bus shares (empty, too long, control
    characters, forbidden characters).
Timeouts
    :func:`derived_timeout` and :func:`timeout_problem` keep a driver's own waits within
    the worker's :class:`~bridge.sinks.Budget`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, model_validator

from bridge.sinks import Message, SinkOptions, SinkRejectedError

#: header prefix of CloudEvents attributes in the Kafka protocol binding
KAFKA_PREFIX: Final = "ce_"
#: header prefix of CloudEvents attributes in the NATS and HTTP protocol bindings
HEADER_PREFIX: Final = "ce-"
#: the share of the worker's budget a driver's default timeout takes at most
BUDGET_SHARE: Final = 0.8

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------
# Options


class TlsOptions(SinkOptions):
    """TLS settings: the CA bundle, a client certificate and key, verification.

    ``tls_key_file`` needs ``tls_cert_file`` (a certificate file may hold its key).
    ``tls_verify: false`` turns off certificate and host-name verification.
    """

    tls_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) to verify the server; default: the system store"
    )
    tls_cert_file: Path | None = Field(None, description="client certificate (PEM)")
    tls_key_file: Path | None = Field(None, description="client key (PEM)")
    tls_verify: bool = Field(
        True, description="verify the server's certificate and host name (false: insecure)"
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsOptions:
        if self.tls_key_file is not None and self.tls_cert_file is None:
            msg = "tls_key_file needs tls_cert_file"
            raise ValueError(msg)
        return self

    @property
    def tls_files(self) -> list[str]:
        """The names of the TLS file options that are set."""
        return [n for n in ("tls_ca_file", "tls_cert_file", "tls_key_file")
                if getattr(self, n) is not None]

    def tls_context(self) -> ssl.SSLContext:
        """The SSL context of these options (raises :class:`TlsFilesError`)."""
        return tls_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file,
                           verify=self.tls_verify)


class TlsHostnameOptions(TlsOptions):
    """:class:`TlsOptions` plus ``tls_hostname``: the name the server certificate is
    verified against (default: the host the driver connects to)."""

    tls_hostname: str | None = None


class PasswordOptions(SinkOptions):
    """``username`` and ``password`` (a :class:`~pydantic.SecretStr`, never printed)."""

    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _password_needs_username(self) -> PasswordOptions:
        if self.password is not None and self.username is None:
            msg = "password needs a username"
            raise ValueError(msg)
        return self


class TlsFilesError(ValueError):
    """A TLS file is missing or unreadable, or holds no valid certificate or key."""


def tls_context(
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
    *,
    verify: bool = True,
    check_hostname: bool = True,
    names: tuple[str, str, str] = ("tls_ca_file", "tls_cert_file", "tls_key_file"),
) -> ssl.SSLContext:
    """A client :class:`ssl.SSLContext` (the system CAs unless ``ca_file``).

    ``verify=False`` checks neither the certificate nor the host name;
    ``check_hostname=False`` checks the certificate only. Raises
    :class:`TlsFilesError` (``cannot load the TLS files: ...``) naming the file, never
    a bare :class:`OSError`; the driver turns it into its own error. ``names`` are the
    options that hold the three files, for the message.
    """
    for option, path in zip(names, (ca_file, cert_file, key_file), strict=True):
        if path is not None and not Path(path).is_file():
            msg = f"cannot load the TLS files: {option} {str(path)!r} is not a readable file"
            raise TlsFilesError(msg)
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        if cert_file is not None:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        msg = f"cannot load the TLS files: {type(exc).__name__}: {exc}"
        raise TlsFilesError(msg) from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif not check_hostname:
        ctx.check_hostname = False
    return ctx


def secret_values(options: BaseModel) -> list[str]:
    """Every non-empty :class:`~pydantic.SecretStr` value in ``options`` (nested too)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            if value.get_secret_value():
                found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(options)
    return found


def mask_secrets(text: str, options: BaseModel) -> str:
    """``text`` with every secret of ``options`` replaced by ``**********``."""
    for secret in secret_values(options):
        text = text.replace(secret, "**********")
    return text


def describe(exc: BaseException, options: BaseModel | None = None) -> str:
    """``Type: message`` of an exception (no type twice), secrets of ``options`` masked."""
    name, detail = type(exc).__name__, str(exc)
    text = detail if detail.startswith(name) else f"{name}: {detail}" if detail else name
    return text if options is None else mask_secrets(text, options)


# ---------------------------------------------------------------------------
# Server lists


def split_list(value: Any) -> Any:
    """A ``mode="before"`` validator step: ``"a:1, b:2"`` -> ``["a:1", "b:2"]``."""
    if isinstance(value, str):
        return [part for part in (p.strip() for p in value.split(",")) if part]
    return value


def host_ports(servers: Sequence[str], what: str = "server") -> list[str]:
    """``servers`` stripped, each checked to be ``host:port`` (port 1-65535).

    Raises :class:`ValueError` for an empty list (``give at least one {what} as
    host:port``) or the first entry that is not ``host:port``.
    """
    if not servers:
        msg = f"give at least one {what} as host:port"
        raise ValueError(msg)
    for server in servers:
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            msg = f"{server!r} is not host:port"
            raise ValueError(msg)
    return [s.strip() for s in servers]


def server_urls(
    urls: Sequence[str], schemes: Sequence[str], *, field: str = "servers",
    example: str | None = None,
) -> list[str]:
    """``urls`` as full URLs (a bare ``host:port`` gets the first scheme).

    Raises :class:`ValueError` naming the entry (``servers[1] ...``) for a URL that
    does not parse, has another scheme or no host, or holds credentials (they belong
    in secret options, not in a URL that is printed).
    """
    default = schemes[0]
    example = example or f"{default}://host:port"
    out = []
    for i, url in enumerate(urls):
        full = url if "://" in url else f"{default}://{url}"
        try:
            parts = urlsplit(full)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            msg = f"{field}[{i}] is not a valid URL"
            raise ValueError(msg) from None
        if parts.scheme not in schemes or not parts.hostname:
            msg = f"{field}[{i}] must look like {example} (schemes: {', '.join(schemes)})"
            raise ValueError(msg)
        if parts.username or parts.password:
            msg = (f"{field}[{i}] holds credentials; put them in the credential options "
                   "so that they stay secret")
            raise ValueError(msg)
        out.append(full)
    return out


# ---------------------------------------------------------------------------
# CloudEvents protocol bindings


def ce_headers(message: Message, prefix: str = HEADER_PREFIX, *,
               always_id: bool = False) -> dict[str, str]:
    """``content-type`` plus one ``<prefix><attribute>`` header per CloudEvents
    attribute of ``message`` (binary mode). ``always_id`` adds ``<prefix>id`` in the
    other formats too, as a dedup key that needs no parsing of the body."""
    out = {"content-type": message.content_type}
    if message.attributes:
        for name, value in message.attributes.items():
            out[f"{prefix}{name}"] = value
    elif always_id:
        out[f"{prefix}id"] = message.id
    return out


def user_properties(message: Message) -> list[tuple[str, str]]:
    """The MQTT 5 user properties of ``message``: its CloudEvents attributes, unprefixed
    (CloudEvents MQTT binding; the content type goes in the Content Type property)."""
    return list(message.attributes.items())


# ---------------------------------------------------------------------------
# Partial refusals


class Refusals:
    """The messages of one batch the bus refused for good, and why.

    Deliver what can be delivered, :meth:`add` each refused message (or its index),
    then :meth:`raise_if_any`: it raises one :class:`~bridge.sinks.SinkRejectedError`
    whose ``rejected`` is the exact count and whose ``refused`` names them, so the
    core counts the others as published and dead-letters exactly these.
    """

    def __init__(self, sink: str, batch: Sequence[Message], *, shown: int = 3) -> None:
        self.sink = sink
        self.batch = batch
        self.shown = shown
        self._index = {id(m): i for i, m in enumerate(batch)}
        self.indices: list[int] = []
        self.reasons: list[str] = []
        self.cause: BaseException | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def add(self, message: Message | int, why: str, cause: BaseException | None = None) -> None:
        """Record that ``message`` (or the message at that index) was refused."""
        index = message if isinstance(message, int) else self._index.get(id(message))
        if index is None:
            msg = "the refused message is not part of this batch"
            raise ValueError(msg)
        if index in self.indices:
            return
        self.indices.append(index)
        self.reasons.append(f"{self.batch[index].id}: {why}")
        if self.cause is None:
            self.cause = cause

    def error(self, reason: str = "rejected") -> SinkRejectedError | None:
        """The error to raise, or ``None`` when nothing was refused."""
        if not self.indices:
            return None
        n = len(self.indices)
        more = f" (+{n - self.shown} more)" if n > self.shown else ""
        shown = "; ".join(self.reasons[: self.shown]) + more
        msg = (f"{n} of {len(self.batch)} message(s) refused for good "
               f"(the others were delivered): {shown}")
        return SinkRejectedError(self.sink, msg, rejected=n, refused=sorted(self.indices),
                                 reason=reason)

    def raise_if_any(self, reason: str = "rejected") -> None:
        """Raise :meth:`error` (chained to the first cause) if anything was refused."""
        err = self.error(reason)
        if err is not None:
            raise err from self.cause


# ---------------------------------------------------------------------------
# Topics


def topic_problem(
    topic: str,
    *,
    noun: str = "topic",
    bus: str = "the bus",
    max_chars: int | None = None,
    max_bytes: int | None = None,
    control_chars: bool = False,
    forbidden: re.Pattern[str] | None = None,
    allowed: str | None = None,
) -> str | None:
    """The shared checks of a topic name; ``None`` when it passes them.

    Empty; longer than ``max_chars`` characters or ``max_bytes`` UTF-8 bytes; holding
    control characters (when ``control_chars`` is false, the default: they are
    refused); holding a character that ``forbidden`` matches (``allowed`` describes
    what is allowed in the message). A driver calls it first, then adds its own rules.
    """
    if not topic:
        return f"the {noun} is empty"
    if max_chars is not None and len(topic) > max_chars:
        return f"the {noun} has {len(topic)} characters; {bus} allows {max_chars}"
    if max_bytes is not None and len(topic.encode("utf-8")) > max_bytes:
        return f"the {noun} is longer than {max_bytes} bytes"
    if not control_chars and _CONTROL.search(topic):
        return f"the {noun} contains a control character"
    if forbidden is not None:
        bad = sorted(set(forbidden.findall(topic)))
        if bad:
            found = " ".join(repr(c) for c in bad)
            what = f"{bus} {noun}s allow only {allowed}" if allowed else f"{bus} forbids"
            return f"{what} (found {found})"
    return None


# ---------------------------------------------------------------------------
# Timeouts


def derived_timeout(options: BaseModel, field: str, budget_s: float, *,
                    scale: float = 1.0, reserve_s: float = 0.0) -> float:
    """The seconds a driver waits for what option ``field`` bounds.

    An option the user set is taken as it is (:func:`timeout_problem` refused it at
    start-up if it does not fit). A default is capped so that, with ``reserve_s``
    of the driver's own extra waits, it takes at most :data:`BUDGET_SHARE` of the
    worker's ``budget_s``: the driver's own error comes first. ``scale`` converts the
    option's unit to seconds (``0.001`` for milliseconds).
    """
    value = float(getattr(options, field)) * scale
    if field in options.model_fields_set:
        return value
    room = budget_s * BUDGET_SHARE - reserve_s
    if room <= 0:  # the reserve alone exceeds the budget: do the best possible
        room = budget_s * BUDGET_SHARE / 2
    return min(value, room)


def timeout_problem(options: BaseModel, field: str, budget_s: float, budget_name: str, *,
                    scale: float = 1.0, reserve_s: float = 0.0, factor: float = 1.0,
                    ) -> str | None:
    """``field: ...`` when the option the user set, times ``factor`` plus
    ``reserve_s``, leaves no time within the worker's ``budget_s``
    (``retry.<budget_name>``); ``None`` when it fits or was not set."""
    if field not in options.model_fields_set:
        return None
    raw = getattr(options, field)
    needed = float(raw) * scale * factor + reserve_s
    if needed < budget_s:
        return None
    extra = f" (with the driver's other waits: {needed:g}s)" if needed != float(raw) * scale else ""
    return (f"{field}: {raw:g}{extra} does not fit in retry.{budget_name} ({budget_s:g}s): "
            f"the worker would cancel the call before the driver can say why; lower "
            f"{field} or raise retry.{budget_name}")


def budget_problems(*problems: str | None) -> list[str]:
    """The given problems without the ``None`` ones (for :meth:`Sink.check_budget`)."""
    return [p for p in problems if p is not None]


def pattern(chars: Iterable[str]) -> re.Pattern[str]:
    """A pattern matching any one of ``chars`` (for :func:`topic_problem`)."""
    return re.compile("[" + "".join(re.escape(c) for c in chars) + "]")


__all__ = [
    "BUDGET_SHARE",
    "HEADER_PREFIX",
    "KAFKA_PREFIX",
    "PasswordOptions",
    "Refusals",
    "TlsFilesError",
    "TlsHostnameOptions",
    "TlsOptions",
    "budget_problems",
    "ce_headers",
    "derived_timeout",
    "describe",
    "host_ports",
    "mask_secrets",
    "pattern",
    "secret_values",
    "server_urls",
    "split_list",
    "timeout_problem",
    "tls_context",
    "topic_problem",
    "user_properties",
]
