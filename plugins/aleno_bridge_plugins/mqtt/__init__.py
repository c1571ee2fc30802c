"""``mqtt``: publish every envelope to an MQTT 5 (or 3.1.1) broker with paho-mqtt 2.x.

Delivery guarantee: **at least once** (with the default ``qos: 1``).
:meth:`MqttSink.publish` returns only when the broker acknowledged every message of
the batch (PUBACK for QoS 1, PUBCOMP for QoS 2; QoS 0 completes when the bytes were
written to the socket, so QoS 0 is at most once). When the connection is lost, every
message still waiting for its acknowledgement fails at once with a retriable
:class:`~bridge.sinks.SinkConnectionError`; the runner reconnects and publishes the
whole batch again, so a subscriber may see a message twice, never zero times.
Deduplicate on the envelope ``id`` (``{kind}:{symbol}:{sentTimestampMs}``,
deterministic): in structured mode it is in the body, in binary mode it is the
``id`` user property.

Every connection uses a fresh paho client, so paho never re-sends the unacknowledged
messages of an old session on its own: duplicates come only from the runner's retry
of a whole batch, which is the one place they can be counted.

Topic rule: in a placeholder value, ``+``, ``#``, ``/`` and NUL become ``_``
(``BTC/USD`` -> ``BTC_USD``), so a symbol can never add a topic level or a wildcard;
write the levels in the template (``aleno/{kind}/{base}/{quote}``).
:meth:`MqttSink.check_topic` refuses, at start-up, a template that renders to an
empty topic, a topic with ``+``/``#`` or NUL, longer than 65535 bytes, or starting
with ``$`` (reserved for the broker, like ``$SYS``).

Formats (MQTT 5; the CloudEvents MQTT protocol binding):

``cloudevents-json``
    body = the envelope; Content Type property ``application/cloudevents+json``.
``cloudevents-binary``
    body = ``data``; Content Type ``application/json``; the context attributes
    (``specversion``, ``id``, ``source``, ``type``, ``subject``, ``time``) are user
    properties. MQTT 3.1.1 has no properties: a batch in this format on a
    ``protocol: "3.1.1"`` sink is a configuration error at start-up
    (:meth:`MqttSink.check_format`); should one reach the driver anyway it is refused
    with :class:`~bridge.sinks.SinkRejectedError`.
``raw``
    body = the upstream record; Content Type ``application/json``.

The route's ``key`` has no MQTT equivalent and is ignored.

Last values: with ``retain: true`` the broker keeps the last message of every topic
and hands it to each new subscriber at once. ``message_expiry_s`` (MQTT 5) sets the
Message Expiry Interval of every message, so the broker drops a retained price that
was not replaced within that time: a late subscriber gets a current price or none.

paho is driven from the asyncio event loop (paho's documented external-loop
integration: socket callbacks + ``loop_read``/``loop_write``/``loop_misc``), so no
network thread exists; only the blocking TCP/TLS connect runs in a worker thread.
While acknowledgements are awaited the socket is put in ``TCP_QUICKACK`` mode after each
read (Linux), so a broker with Nagle on never holds back its last PUBACKs for the
delayed-ACK timer (docs/drivers/mqtt.md, "Throughput").

The driver in three modules: :mod:`.options` (the options, no I/O), :mod:`.link` (one
paho-mqtt client and its connection, driven from the event loop) and :mod:`.sink`
(connecting, publishing, closing).
"""

from __future__ import annotations

from .link import MISC_INTERVAL_S, paho_log
from .options import MAX_TOPIC_BYTES, MqttOptions
from .sink import MqttSink, log

__all__ = ["MAX_TOPIC_BYTES", "MISC_INTERVAL_S", "MqttOptions", "MqttSink", "log", "paho_log"]
