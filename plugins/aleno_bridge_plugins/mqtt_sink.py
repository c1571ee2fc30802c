"""Deprecated: the ``mqtt`` driver is the package :mod:`aleno_bridge_plugins.mqtt`
(options in ``aleno_bridge_plugins.mqtt.options``, the paho-mqtt connection in
``aleno_bridge_plugins.mqtt.link``, the sink in ``aleno_bridge_plugins.mqtt.sink``).

This module keeps ``from aleno_bridge_plugins.mqtt_sink import ...`` working: it
re-exports the same objects (subclasses and overridden methods keep working) and the
:mod:`bridge.sinks` names the old module had imported; importing it emits a
:class:`DeprecationWarning`. ``from aleno_bridge_plugins.mqtt_sink import *`` gives
``MqttOptions`` and ``MqttSink``, as before.
"""

from __future__ import annotations

import warnings

# ``name as name``: re-exported, though not in ``__all__``
from bridge.sinks import Budget as Budget
from bridge.sinks import Message as Message
from bridge.sinks import Sink as Sink
from bridge.sinks import SinkConnectionError as SinkConnectionError
from bridge.sinks import SinkError as SinkError
from bridge.sinks import SinkOptions as SinkOptions
from bridge.sinks import SinkRejectedError as SinkRejectedError
from bridge.sinks import replace_chars as replace_chars

from .mqtt import MAX_TOPIC_BYTES as MAX_TOPIC_BYTES
from .mqtt import MISC_INTERVAL_S as MISC_INTERVAL_S
from .mqtt import MqttOptions, MqttSink
from .mqtt import log as log
from .mqtt import paho_log as paho_log

warnings.warn(
    "aleno_bridge_plugins.mqtt_sink is deprecated; import from aleno_bridge_plugins.mqtt",
    DeprecationWarning,
    stacklevel=2,
)

# the old module's ``__all__``: what ``import *`` gives
__all__ = ["MqttOptions", "MqttSink"]
