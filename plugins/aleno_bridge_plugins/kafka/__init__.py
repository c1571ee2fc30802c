"""``kafka``: CloudEvents onto Apache Kafka (or any Kafka-protocol broker) with aiokafka.

Delivery guarantee
------------------
At least once with the default ``acks: all``: :meth:`KafkaSink.publish` puts the
records of the batch into one aiokafka ``BatchBuilder`` per partition (partitioned by
aiokafka's default partitioner, as ``send()`` would), hands them to the producer
(``send_batch``), then waits for the broker's delivery report of each produce batch, and
returns only when all of them succeeded. Any failure raises, the core
retries the whole batch, so a record can reach the topic twice, never zero times
while the bridge runs. Every record carries the deterministic envelope id in the
header ``ce_id`` (in every format): that is the consumer's dedup key. ``acks: 1``
loses what the leader acknowledged but did not replicate before it crashed;
``acks: 0`` is at most once (no broker acknowledgement at all).

``enable_idempotence: true`` makes the broker drop the duplicates the producer's own
internal retries would create (not those of a batch the core resends after a
reconnect: a new producer has a new producer id). It needs a broker that implements
``InitProducerId``; the in-memory store of Tansu (the broker the tests start) does
not, hence the default ``False``. Turn it on for a real Kafka cluster.

Order: records with the same key (the route's ``key``, the symbol by default) go to
the same partition, and aiokafka keeps one produce request in flight per partition,
so the updates of one symbol are appended in the order the core gave them.

Topic names
-----------
Kafka allows ``[A-Za-z0-9._-]`` and at most 249 characters. :meth:`KafkaSink.safe_token`
replaces every other character of a placeholder value with ``_`` (``BTC/USD`` ->
``BTC_USD``, ``BRK.B`` stays); :meth:`KafkaSink.check_topic` refuses at start-up a
template whose rendered topic is empty, ``.``, ``..``, too long or holds a forbidden
literal character.

Formats (CloudEvents Kafka protocol binding)
--------------------------------------------
``cloudevents-json``
    structured mode: value = the envelope, header ``content-type:
    application/cloudevents+json``, plus ``ce_id`` (a receiver in structured mode reads
    the attributes from the body; the extra header lets brokers' tools and consumers
    dedup without parsing it. No ``ce_specversion`` header, so no SDK mistakes the
    record for binary mode).
``cloudevents-binary``
    binary mode: value = ``data``, header ``content-type: application/json`` and one
    ``ce_<attribute>`` header per context attribute (``ce_specversion``, ``ce_id``,
    ``ce_source``, ``ce_type``, ``ce_subject``, ``ce_time``), UTF-8.
``raw``
    value = the upstream record, header ``content-type: application/json`` and ``ce_id``.

The record key is the rendered route key (UTF-8), or none when the route has no key.

Last values: topics the sink creates (``create_topics``) get the ``topic_config`` given
(``compact: true`` is short for ``cleanup.policy: compact``). A compacted topic keeps
at least the last record of every key, and the key is the route's ``key`` (the symbol
by default): read from the beginning and folded by key, it is the table of current
prices (docs/drivers/kafka.md, "Last value per symbol").

Timeouts
--------
Nothing here waits without a bound: ``connect`` and every ``publish`` are bounded by
``request_timeout_ms`` (plus ``linger_ms`` and a second of grace), ``close`` by
:data:`CLOSE_TIMEOUT_S`; aiokafka's ``stop()`` waits for every pending record, which
never comes when the broker is gone, so after that bound the producer is torn down
without waiting. Left at its default, ``request_timeout_ms`` is lowered to fit in the
sink's ``retry.publish_timeout_s`` and ``retry.connect_timeout_s`` so the driver's own
error (naming the cause) comes first; set explicitly, a value that does not fit is a
configuration error.

The driver in two modules: :mod:`.options` (the options and the topic rule, no I/O) and
:mod:`.sink` (the producer: connecting, publishing, closing).
"""

from __future__ import annotations

from .options import DEFAULT_BATCH_BYTES, MAX_TOPIC_LENGTH, KafkaOptions
from .sink import CLOSE_TIMEOUT_S, TOPIC_ALREADY_EXISTS, KafkaSink, headers, log

__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_BATCH_BYTES",
    "MAX_TOPIC_LENGTH",
    "TOPIC_ALREADY_EXISTS",
    "KafkaOptions",
    "KafkaSink",
    "headers",
    "log",
]
