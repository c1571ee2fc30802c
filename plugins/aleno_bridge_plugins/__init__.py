"""Sink drivers shipped with aleno-bridge.

Each is registered under the ``bridge.sinks`` entry-point group in ``pyproject.toml``
exactly like a third-party plugin; the core never imports this package, and this
package imports none of its drivers (each needs its own client library).

- :mod:`aleno_bridge_plugins.kafka`, :mod:`aleno_bridge_plugins.nats`,
  :mod:`aleno_bridge_plugins.mqtt`: one package per bus, the options (``options``,
  no I/O) apart from the client (``sink``; for MQTT also ``link``, the paho-mqtt
  connection);
- :mod:`aleno_bridge_plugins.console`, :mod:`aleno_bridge_plugins.jsonl`: the
  dependency-free sinks.

``aleno_bridge_plugins.kafka_sink``, ``.nats_sink`` and ``.mqtt_sink`` are deprecated
aliases of the driver packages, kept for existing imports.
"""
