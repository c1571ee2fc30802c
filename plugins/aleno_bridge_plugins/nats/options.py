"""Options of the ``nats`` driver and of the JetStream stream it may create: validation
only, no I/O (the guarantees and the formats are described in
:mod:`aleno_bridge_plugins.nats`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridge.sinks.natsconn import NatsConnectionOptions

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_STREAM_NAME = re.compile(r"^[^.*>\s/\\\x00-\x1f]+$")


class StreamOptions(BaseModel):
    """A JetStream stream the sink creates at connect if it does not exist.

    Creating it again with the same settings is a no-op; a stream of that name with
    other settings is left alone and makes ``connect`` fail with a clear error.

    ``max_msgs_per_subject: 1`` with ``allow_direct: true`` makes the stream the
    bus-native last value of every subject: a consumer that starts late asks
    ``js.get_last_msg(stream, subject)`` (or the direct-get form) and gets the
    current price at once (docs/drivers/nats.md, "Last value per subject").
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=_STREAM_NAME.pattern)
    subjects: list[str] = Field(min_length=1)
    #: drop messages older than this (``None``: keep until other limits apply)
    max_age_s: float | None = Field(None, gt=0)
    #: the window in which a repeated ``Nats-Msg-Id`` is recognized as a duplicate
    duplicate_window_s: float = Field(120.0, gt=0)
    storage: Literal["file", "memory"] = "file"
    #: keep at most this many messages per subject (1: only the last price of each
    #: symbol, the stream is then a last-value table); ``None``: no per-subject limit
    max_msgs_per_subject: int | None = Field(None, ge=1)
    #: let any server with the stream answer "last message of subject X" directly
    #: (``js.get_last_msg(stream, subject, direct=True)``, the KV ``get``)
    allow_direct: bool = False

    @model_validator(mode="after")
    def _window_fits_age(self) -> StreamOptions:
        if self.max_age_s is not None and self.duplicate_window_s > self.max_age_s:
            msg = "duplicate_window_s cannot be larger than max_age_s"
            raise ValueError(msg)
        return self


class NatsOptions(NatsConnectionOptions):
    """Options of the ``nats`` driver (see docs/drivers/nats.md). The connection
    options (``servers``, ``user``/``password``, ``token``, ``creds_file``,
    ``nkeys_seed``, the ``tls_*`` options, ``connect_timeout_s``) and their checks are
    :class:`~bridge.sinks.natsconn.NatsConnectionOptions`, shared with the NATS door of
    the control surface (``control.nats``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: the connection name the server shows in its monitoring
    name: str = "aleno-bridge"
    #: publish with a JetStream publish ack per message instead of core publish + flush
    jetstream: bool = False
    stream: StreamOptions | None = None
    ping_interval_s: float = Field(5.0, gt=0)
    max_outstanding_pings: int = Field(3, ge=1)
    #: bound on the flush (core) or on all publish acks (JetStream) of one batch
    flush_timeout_s: float = Field(10.0, gt=0)
    #: JetStream publishes awaiting their ack at once
    max_inflight: int = Field(1000, ge=1)
    #: header carrying the route's key (NATS has no message key); ``null``: not sent
    key_header: str | None = "aleno-key"

    @field_validator("key_header")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        if v is not None and not _HEADER_NAME.match(v):
            msg = "must be a valid header name (letters, digits, - _ .)"
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NatsOptions:
        if self.stream is not None and not self.jetstream:
            msg = "stream is only used with jetstream: true"
            raise ValueError(msg)
        return self
