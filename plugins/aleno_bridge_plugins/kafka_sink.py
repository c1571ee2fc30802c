"""Deprecated: the ``kafka`` driver is the package :mod:`aleno_bridge_plugins.kafka`
(options in ``aleno_bridge_plugins.kafka.options``, I/O in ``aleno_bridge_plugins.kafka.sink``).

This module keeps ``from aleno_bridge_plugins.kafka_sink import ...`` working: it
re-exports the same objects (subclasses and overridden methods keep working) and the
:mod:`bridge.sinks` names the old module had imported; importing it emits a
:class:`DeprecationWarning`.
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
    SinkRejectedError,
)

from .kafka import (
    CLOSE_TIMEOUT_S,
    DEFAULT_BATCH_BYTES,
    MAX_TOPIC_LENGTH,
    TOPIC_ALREADY_EXISTS,
    KafkaOptions,
    KafkaSink,
    headers,
    log,
)

warnings.warn(
    "aleno_bridge_plugins.kafka_sink is deprecated; import from aleno_bridge_plugins.kafka",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_BATCH_BYTES",
    "MAX_TOPIC_LENGTH",
    "TOPIC_ALREADY_EXISTS",
    "Budget",
    "KafkaOptions",
    "KafkaSink",
    "Message",
    "Sink",
    "SinkConnectionError",
    "SinkError",
    "SinkOptions",
    "SinkRejectedError",
    "headers",
    "log",
]
