"""Deprecated: the ``nats`` driver is the package :mod:`aleno_bridge_plugins.nats`
(options in ``aleno_bridge_plugins.nats.options``, I/O in ``aleno_bridge_plugins.nats.sink``).

This module keeps ``from aleno_bridge_plugins.nats_sink import ...`` working: it
re-exports the same objects (subclasses and overridden methods such as
``NatsSink._headers`` keep working) and the :mod:`bridge.sinks` names the old module
had imported; importing it emits a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import warnings

from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkConnectionError,
    SinkError,
    SinkOptions,
)

from .nats import (
    CLOSE_TIMEOUT_S,
    JS_MESSAGE_TOO_LARGE,
    JS_STREAM_NAME_IN_USE,
    JS_SUBJECTS_OVERLAP,
    NatsOptions,
    NatsSink,
    StreamOptions,
    log,
    stream_config,
)

warnings.warn(
    "aleno_bridge_plugins.nats_sink is deprecated; import from aleno_bridge_plugins.nats",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "JS_MESSAGE_TOO_LARGE",
    "JS_STREAM_NAME_IN_USE",
    "JS_SUBJECTS_OVERLAP",
    "Budget",
    "Message",
    "NatsOptions",
    "NatsSink",
    "Sink",
    "SinkConnectionError",
    "SinkError",
    "SinkOptions",
    "StreamOptions",
    "log",
    "stream_config",
]
