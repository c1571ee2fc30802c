"""The ``kafka`` driver's I/O: one aiokafka producer per connection, publishing with one
``BatchBuilder`` per partition, bounded closing. The guarantees, the formats and the
timeouts are described in :mod:`aleno_bridge_plugins.kafka`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final

from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkConnectionError,
    SinkError,
    SinkOptions,
    SinkRejectedError,
)
from bridge.sinks.kit import (
    KAFKA_PREFIX,
    Refusals,
    TlsFilesError,
    budget_problems,
    ce_headers,
    derived_timeout,
    describe,
    timeout_problem,
    tls_context,
)

from .options import KafkaOptions
from .options import check_topic as _check_topic
from .options import safe_token as _safe_token

try:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import (
        CorruptRecordException,
        InvalidTopicError,
        KafkaConnectionError,
        KafkaError,
        KafkaTimeoutError,
        MessageSizeTooLargeError,
        PolicyViolationError,
        RecordListTooLargeError,
        RecordTooLargeError,
        UnsupportedForMessageFormatError,
        UnsupportedVersionError,
        for_code,
    )
    from aiokafka.partitioner import DefaultPartitioner
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
except ImportError as exc:  # pragma: no cover - depends on the installation
    msg = (
        f"the kafka sink needs aiokafka ({exc}); install it with "
        "`pip install 'aleno-bridge[kafka]'`"
    )
    raise ImportError(msg) from exc

log = logging.getLogger("aleno_bridge.sinks.kafka")

#: how long ``close()`` lets aiokafka flush and stop before tearing it down; the whole
#: ``close()`` takes at most 4 s (the core gives it 5)
CLOSE_TIMEOUT_S: Final = 2.5
#: Kafka error code of CreateTopics for a topic that exists already
TOPIC_ALREADY_EXISTS: Final = 36

#: errors of one record that resending can never fix: the batch is rejected
_REJECTED: Final[tuple[type[BaseException], ...]] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidTopicError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
    PolicyViolationError,
    UnsupportedVersionError,
)


class KafkaSink(Sink[KafkaOptions]):
    """Publishes batches with one :class:`aiokafka.AIOKafkaProducer` per connection."""

    options_model = KafkaOptions
    #: aiokafka errors that escaped classification are worth a reconnect: a record
    #: that can never be accepted is turned into :class:`SinkRejectedError` first
    retriable_errors: ClassVar[tuple[type[BaseException], ...]] = (
        *Sink.retriable_errors,
        KafkaError,
    )
    quiet_loggers = ("aiokafka",)

    def __init__(self, name: str, options: KafkaOptions) -> None:
        super().__init__(name, options)
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        #: topics created (or found) by this sink, for ``create_topics: true``
        self._created: set[str] = set()
        #: aiokafka's default partitioner: murmur2 of the key, as ``send()`` does
        self._partitioner = DefaultPartitioner()
        #: the topics this sink creates are compacted: every record needs a key
        self._compacted = "compact" in options.topic_configs.get("cleanup.policy", "").split(",")

    @property
    def _timeout_s(self) -> float:
        """``request_timeout_ms`` in seconds (a default one fits in the budget)."""
        budget, reserve = self.budget, self.options.linger_ms / 1000.0 + 1.0
        return min(
            derived_timeout(self.options, "request_timeout_ms", budget.publish_s,
                            scale=0.001, reserve_s=reserve),
            derived_timeout(self.options, "request_timeout_ms", budget.connect_s, scale=0.001),
        )

    def _batch_bytes(self) -> int:
        """aiokafka's ``max_batch_size``: ``max_batch_bytes``; left at its default, no
        larger than ``max_request_bytes``."""
        opts = self.options
        if "max_batch_bytes" in opts.model_fields_set:
            return opts.max_batch_bytes
        return min(opts.max_batch_bytes, opts.max_request_bytes)

    @property
    def _publish_timeout_s(self) -> float:
        return self._timeout_s + self.options.linger_ms / 1000.0 + 1.0

    @classmethod
    def check_budget(cls, options: SinkOptions, budget: Budget) -> list[str]:
        """``request_timeout_ms`` (plus ``linger_ms`` and a second) within the budget."""
        if not isinstance(options, KafkaOptions):
            return []
        reserve = options.linger_ms / 1000.0 + 1.0
        return budget_problems(
            timeout_problem(options, "request_timeout_ms", budget.publish_s,
                            "publish_timeout_s", scale=0.001, reserve_s=reserve),
            timeout_problem(options, "request_timeout_ms", budget.connect_s,
                            "connect_timeout_s", scale=0.001),
        )

    @classmethod
    def security_warnings(cls, options: SinkOptions) -> list[str]:
        """SASL without TLS; TLS without host-name verification."""
        if not isinstance(options, KafkaOptions):
            return []
        found: list[str] = []
        if options.security_protocol == "SASL_PLAINTEXT":
            what = ("the SASL password itself" if options.sasl_mechanism == "PLAIN"
                    else "the SASL exchange")
            found.append(
                f"security_protocol: SASL_PLAINTEXT sends {what} and every record "
                "unencrypted; use SASL_SSL"
            )
        if options.security_protocol in ("SSL", "SASL_SSL") and not options.ssl_check_hostname:
            found.append(
                "ssl_check_hostname: false: the broker's certificate is not matched to its "
                "host name, so anyone on the network path can impersonate the broker"
            )
        return found

    # -- topic rule ---------------------------------------------------------------

    @classmethod
    def safe_token(cls, value: str) -> str:
        """Replace every character Kafka forbids in a topic name with ``_``."""
        return _safe_token(value)

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        """Why Kafka can never accept ``topic``, or ``None``."""
        return _check_topic(topic)

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self) -> None:
        """Start a producer (and create the configured topics); raise
        :class:`SinkConnectionError` when no broker answers in ``request_timeout_ms``."""
        await self.close()
        opts = self.options
        try:
            common = self._client_kwargs()
        except TlsFilesError as exc:
            raise SinkConnectionError(self.name, str(exc)) from exc
        try:
            producer = self._producer = AIOKafkaProducer(
                **common,
                acks=-1 if opts.acks == "all" else opts.acks,
                enable_idempotence=opts.enable_idempotence,
                compression_type=None if opts.compression == "none" else opts.compression,
                linger_ms=opts.linger_ms,
                max_batch_size=self._batch_bytes(),
                max_request_size=opts.max_request_bytes,
            )
            await asyncio.wait_for(producer.start(), self._timeout_s)
            if opts.create_topics:
                self._admin = AIOKafkaAdminClient(**common)
                await asyncio.wait_for(self._admin.start(), self._timeout_s)
                if isinstance(opts.create_topics, list):
                    await self._create_topics(opts.create_topics)
        except asyncio.CancelledError:
            await self.close()
            raise
        except SinkError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise self._connect_error(exc) from exc

    async def close(self) -> None:
        """Stop the producer and the admin client; bounded, idempotent, never raises."""
        producer, self._producer = self._producer, None
        admin, self._admin = self._admin, None
        self._created.clear()
        if producer is not None:
            await _stop_producer(producer, self.name)
        if admin is not None:
            try:
                await asyncio.wait_for(admin.close(), 0.5)
            except Exception as exc:
                log.debug("sink %s: admin client close failed: %s", self.name, exc)

    # -- publishing ---------------------------------------------------------------

    async def publish(self, batch: Sequence[Message]) -> None:
        """Send every record, then wait for every delivery report (bounded)."""
        producer = self._producer
        if producer is None:
            raise SinkConnectionError(self.name, "not connected")
        try:
            # asyncio.timeout, not wait_for: no extra task, so no extra turns of the
            # event loop per batch (wait_for wraps the coroutine in a task on 3.11)
            async with asyncio.timeout(self._publish_timeout_s):
                await self._publish(producer, batch)
        except TimeoutError:
            msg = (
                f"no delivery report for a batch of {len(batch)} within "
                f"{self._publish_timeout_s:g}s from {self._servers()}"
            )
            raise SinkConnectionError(self.name, msg) from None

    async def _publish(self, producer: AIOKafkaProducer, batch: Sequence[Message]) -> None:
        if self.options.create_topics is True:
            new = sorted({m.topic for m in batch} - self._created)
            if new:
                await self._create_topics(new)
        refused = Refusals(self.name, batch)
        # one BatchBuilder per partition and one delivery future per produce batch
        # (aiokafka's send_batch), not one send() coroutine, partitioner call and
        # future per record: the same records, partitions and produce requests
        partitions: dict[str, tuple[list[int], list[int]]] = {}
        limit = self.options.max_request_bytes
        open_: dict[tuple[str, int], tuple[Any, list[Message]]] = {}
        full: list[tuple[str, int, Any, list[Message]]] = []
        for m in batch:
            topic = m.topic
            parts = partitions.get(topic)
            if parts is None:
                try:
                    await producer.client._wait_on_metadata(topic)
                except KafkaError as exc:
                    raise self._publish_error(exc, topic) from exc
                cluster = producer.client.cluster
                parts = partitions[topic] = (
                    sorted(cluster.partitions_for_topic(topic) or ()),
                    sorted(cluster.available_partitions_for_topic(topic) or ()),
                )
            if m.key is None:
                if self._compacted:
                    # Kafka refuses it too, but as INVALID_RECORD (87), which aiokafka
                    # does not know: resending would fail forever
                    refused.add(m, "a compacted topic needs a record key; give the route "
                               "a key (default {symbol})")
                    continue
                key = None
            else:
                key = m.key.encode()
            hdrs = headers(m)
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, m.body, hdrs)
            if size > limit:
                too_large = MessageSizeTooLargeError(
                    f"the record is {size} bytes serialized, more than "
                    f"max_request_bytes ({limit})")
                refused.add(m, self._describe(too_large), too_large)
                continue
            tp = (topic, self._partitioner(key, parts[0], parts[1]))
            entry = open_.get(tp)
            if entry is None:
                entry = open_[tp] = (producer.create_batch(), [])
            if entry[0].append(timestamp=None, key=key, value=m.body, headers=hdrs) is None:
                full.append((*tp, *entry))
                entry = open_[tp] = (producer.create_batch(), [])
                entry[0].append(timestamp=None, key=key, value=m.body, headers=hdrs)
            entry[1].append(m)
        full.extend((*tp, *entry) for tp, entry in open_.items())
        sent: list[tuple[list[Message], asyncio.Future[Any]]] = []
        for topic, partition, builder, msgs in full:
            try:
                fut = await producer.send_batch(builder, topic, partition=partition)
            except _REJECTED as exc:
                for m in msgs:
                    refused.add(m, self._describe(exc), exc)
                continue
            except KafkaError as exc:
                raise self._publish_error(exc, topic) from exc
            fut.add_done_callback(_retrieve)
            sent.append((msgs, fut))
        results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        retry: list[BaseException] = []
        failed = 0
        for (msgs, _), result in zip(sent, results, strict=True):
            if isinstance(result, _REJECTED):
                for m in msgs:
                    refused.add(m, self._describe(result), result)
            elif isinstance(result, BaseException):
                retry.append(result)
                failed += len(msgs)
        if retry:
            first = retry[0]
            err = self._publish_error(first, None, f"{failed} of {len(batch)} records failed")
            raise err from first
        refused.raise_if_any()

    async def _create_topics(self, topics: Iterable[str]) -> None:
        """Create ``topics`` with the configured topic configs; one that exists already
        is fine and keeps the configs it has (the sink never alters a topic)."""
        admin = self._admin
        if admin is None:
            raise SinkConnectionError(self.name, "not connected")
        opts = self.options
        configs = opts.topic_configs
        new = [NewTopic(t, opts.partitions, opts.replication_factor,
                        topic_configs=configs) for t in topics]
        if not new:
            return
        try:
            response = await asyncio.wait_for(admin.create_topics(new), self._timeout_s)
        except TimeoutError:
            msg = f"no answer to CreateTopics within {self._timeout_s:g}s"
            raise SinkConnectionError(self.name, msg) from None
        except KafkaError as exc:
            msg = f"cannot create topics: {self._describe(exc)}"
            raise SinkConnectionError(self.name, msg) from exc
        for topic, code, message in _topic_errors(response):
            if code in (0, TOPIC_ALREADY_EXISTS):
                self._created.add(topic)
                continue
            error = for_code(code)
            detail = f"{error.__name__}" + (f": {message}" if message else "")
            shape = f"partitions {opts.partitions}, replication_factor {opts.replication_factor}"
            if configs:
                shape += ", " + ", ".join(f"{k}={v}" for k, v in sorted(configs.items()))
            msg = f"cannot create topic {topic!r} ({shape}): {detail}"
            if error.retriable:
                raise SinkConnectionError(self.name, msg)
            raise SinkRejectedError(self.name, msg)

    # -- helpers ------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        opts = self.options
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(opts.bootstrap_servers),
            "client_id": opts.client_id,
            "request_timeout_ms": int(self._timeout_s * 1000),
            "security_protocol": opts.security_protocol,
        }
        if opts.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = tls_context(
                opts.ssl_cafile, opts.ssl_certfile, opts.ssl_keyfile,
                check_hostname=opts.ssl_check_hostname,
                names=("ssl_cafile", "ssl_certfile", "ssl_keyfile"),
            )
        if opts.sasl_mechanism is not None and opts.sasl_password is not None:
            kwargs["sasl_mechanism"] = opts.sasl_mechanism
            kwargs["sasl_plain_username"] = opts.sasl_username
            kwargs["sasl_plain_password"] = opts.sasl_password.get_secret_value()
        return kwargs

    def _servers(self) -> str:
        return ",".join(self.options.bootstrap_servers)

    def _describe(self, exc: BaseException) -> str:
        """``Type: message`` of an exception, with the SASL password masked."""
        return describe(exc, self.options)

    def _connect_error(self, exc: BaseException) -> SinkConnectionError:
        opts = self.options
        where = f"{self._servers()} ({opts.security_protocol})"
        if isinstance(exc, TimeoutError | KafkaTimeoutError):
            why = f"no answer within {self._timeout_s:g}s"
        else:
            why = self._describe(exc)
        hint = ""
        if opts.sasl_mechanism is not None and not isinstance(
            exc, KafkaConnectionError | TimeoutError | OSError
        ):
            # aiokafka reports a refused SCRAM login as a bare KeyError('v')
            hint = (
                f"; check sasl_username {opts.sasl_username!r}, the password and that "
                f"the broker offers {opts.sasl_mechanism}"
            )
        elif opts.enable_idempotence and isinstance(exc, KafkaError) and not isinstance(
            exc, KafkaConnectionError
        ):
            hint = (
                "; the broker may not implement the idempotent producer "
                "(InitProducerId): set enable_idempotence: false"
            )
        return SinkConnectionError(self.name, f"cannot connect to {where}: {why}{hint}")

    def _publish_error(
        self, exc: BaseException, topic: str | None, prefix: str = ""
    ) -> SinkError:
        why = self._describe(exc)
        if isinstance(exc, KafkaTimeoutError) and topic is not None:
            why += (
                f" (no metadata for topic {topic!r}: is the broker up, and does the topic "
                "exist or may the broker create it? see create_topics)"
            )
        text = f"{prefix}: {why}" if prefix else why
        return SinkConnectionError(self.name, f"publishing to {self._servers()}: {text}")


def headers(message: Message) -> list[tuple[str, bytes]]:
    """The Kafka headers of ``message`` (CloudEvents Kafka protocol binding)."""
    if not message.attributes:
        # structured and raw formats (the common case): content type and ce_id only,
        # without building the intermediate dict of :func:`ce_headers`
        return [("content-type", _ascii(message.content_type)),
                (_CE_ID, message.event.id.encode())]
    return [(k, v.encode()) for k, v in ce_headers(message, KAFKA_PREFIX, always_id=True).items()]


_CE_ID: Final = f"{KAFKA_PREFIX}id"


@functools.lru_cache(maxsize=16)
def _ascii(content_type: str) -> bytes:
    """A content type as header bytes (a handful of distinct values: cached)."""
    return content_type.encode()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a delivery future's exception as seen (a failed batch is resent whole)."""
    if not fut.cancelled():
        fut.exception()


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    out = []
    for entry in getattr(response, "topic_errors", ()):
        topic, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((str(topic), int(code), message))
    return out


async def _stop_producer(producer: AIOKafkaProducer, name: str) -> None:
    """``producer.stop()`` bounded by :data:`CLOSE_TIMEOUT_S`, then torn down.

    aiokafka's ``stop()`` first waits until every pending record is delivered; with
    the broker gone that never happens, and cancelling ``stop()`` leaves its sender
    task running (and retrying) forever. So on timeout the pending records are failed,
    the sender task cancelled and the connections closed without waiting.
    """
    try:
        await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S)
        return
    except Exception as exc:
        log.debug("sink %s: producer stop failed (%s); tearing it down", name, exc)
    closed = KafkaConnectionError("producer closed by the kafka sink")
    with contextlib.suppress(Exception):
        producer._message_accumulator.fail_all(closed)
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.client.close(), 0.5)
