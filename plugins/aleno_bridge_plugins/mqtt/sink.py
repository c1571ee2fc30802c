"""The ``mqtt`` driver: connecting, publishing in order with flow control, closing. The
guarantees, the topic rule and the formats are described in
:mod:`aleno_bridge_plugins.mqtt`; one connection is a :class:`~.link.Link`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkConnectionError,
    SinkError,
    SinkOptions,
    SinkRejectedError,
    replace_chars,
)
from bridge.sinks.kit import (
    budget_problems,
    derived_timeout,
    timeout_problem,
    topic_problem,
    user_properties,
)

from .link import Link, new_client, paho_log
from .options import MAX_TOPIC_BYTES, MqttOptions

log = logging.getLogger("aleno_bridge.sinks.mqtt")

_safe = replace_chars(r"[+#/\x00]", "_")


class _PackedOnce(Properties):
    """PUBLISH properties shared by every message without user properties: paho packs
    the properties of each message it sends (about a fifth of the sink's CPU), so
    these, never changed once built, are packed once."""

    _packed: bytes | None = None

    def pack(self) -> bytes:
        packed = self._packed
        if packed is None:
            packed = bytes(super().pack())  # type: ignore[no-untyped-call]
            # paho's __setattr__ accepts property names only
            object.__setattr__(self, "_packed", packed)
        return packed


class MqttSink(Sink[MqttOptions]):
    """Publishes batches to one MQTT broker; see :mod:`aleno_bridge_plugins.mqtt` for
    the guarantees."""

    options_model = MqttOptions
    # retriable: the core's default (connection loss, timeouts); the driver raises
    # SinkConnectionError for both
    quiet_loggers = (paho_log.name,)

    def __init__(self, name: str, options: MqttOptions) -> None:
        super().__init__(name, options)
        self._link: Link | None = None
        self._static_props: dict[str, Properties] = {}

    # -- topic rule -------------------------------------------------------------

    @classmethod
    def check_format(cls, options: SinkOptions, fmt: str) -> str | None:
        """MQTT 3.1.1 has no properties: binary mode has nowhere to put the attributes."""
        if fmt == "cloudevents-binary" and getattr(options, "protocol", "5") == "3.1.1":
            return ("cloudevents-binary needs MQTT 5 user properties; use protocol: '5' "
                    "or format: cloudevents-json")
        return None

    @classmethod
    def security_warnings(cls, options: SinkOptions) -> list[str]:
        """A password without TLS; TLS without certificate verification."""
        if not isinstance(options, MqttOptions):
            return []
        found: list[str] = []
        if options.password is not None and not options.tls:
            found.append("password: sent in clear text (tls is false); set tls: true")
        if options.tls and not options.tls_verify:
            found.append(
                "tls_verify: false: the broker's certificate is not checked, so anyone on "
                "the network path can impersonate it and read the password"
            )
        return found

    @classmethod
    def check_budget(cls, options: SinkOptions, budget: Budget) -> list[str]:
        """``connect_timeout_s`` and ``ack_timeout_s`` within the worker's budget."""
        if not isinstance(options, MqttOptions):
            return []
        return budget_problems(
            timeout_problem(options, "connect_timeout_s", budget.connect_s,
                            "connect_timeout_s"),
            timeout_problem(options, "ack_timeout_s", budget.publish_s, "publish_timeout_s"),
        )

    @property
    def _connect_timeout_s(self) -> float:
        return derived_timeout(self.options, "connect_timeout_s", self.budget.connect_s)

    @property
    def _ack_timeout_s(self) -> float:
        return derived_timeout(self.options, "ack_timeout_s", self.budget.publish_s)

    @classmethod
    def safe_token(cls, value: str) -> str:
        """``+``, ``#``, ``/`` and NUL become ``_``: a value never adds a level or a wildcard."""
        return _safe(value)

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        """Why ``topic`` can never be an MQTT topic name to publish to, or ``None``."""
        problem = topic_problem(topic, max_bytes=MAX_TOPIC_BYTES, control_chars=True)
        if problem is not None:
            return problem
        if "+" in topic or "#" in topic:
            return "MQTT wildcards + and # are not allowed in a topic name to publish to"
        if "\x00" in topic:
            return "the topic contains a NUL character"
        if topic.startswith("$"):
            return "topics starting with $ are reserved for the broker ($SYS...)"
        return None

    # -- connection ---------------------------------------------------------------

    def _error(self, message: str) -> SinkConnectionError:
        return SinkConnectionError(self.name, message)

    def _client(self) -> mqtt.Client:
        """A fresh paho client per connection (:func:`~.link.new_client`)."""
        return new_client(self.options, self._connect_timeout_s)

    async def connect(self) -> None:
        """Open a new connection and wait for the broker's CONNACK (bounded by
        ``connect_timeout_s``). Raises :class:`SinkConnectionError` when the broker
        cannot be reached and :class:`SinkRejectedError` when it refuses the client
        (credentials, TLS verification, QoS or retain not supported)."""
        await self.close()
        loop = asyncio.get_running_loop()
        client = self._client()
        o = self.options
        link = Link(self.name, o, client, loop)
        self._link = link
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await link.open()
                reason, props = await link.connack
        except TimeoutError:
            self._drop(link)
            msg = (f"not connected to {o.address} within {self._connect_timeout_s:g}s "
                   "(TCP connect, TLS handshake or CONNACK)")
            raise self._error(msg) from None
        except BaseException:
            self._drop(link)
            raise
        if reason.is_failure:
            self._drop(link)
            raise link.refused(reason)
        try:
            link.accept(props)
        except SinkError:
            self._drop(link)
            raise
        log.info("sink %s: connected to MQTT broker %s as %r (MQTT %s, qos %d)",
                 self.name, o.address, o.client_id, o.protocol, o.qos,
                 extra={"sink": self.name})

    # -- publishing -----------------------------------------------------------------

    def _properties(self, m: Message) -> Properties | None:
        if self.options.protocol != "5":
            return None
        if not m.attributes:
            props = self._static_props.get(m.content_type)
            if props is None:
                props = self._new_props(m.content_type, _PackedOnce)
                self._static_props[m.content_type] = props
            return props
        props = self._new_props(m.content_type)
        props.UserProperty = user_properties(m)
        return props

    def _new_props(self, content_type: str,
                   kind: type[Properties] = Properties) -> Properties:
        """The PUBLISH properties every message of this sink carries.

        The expiry interval is the same for every message, so it lives in the
        packed-once properties too: it costs nothing per message.
        """
        props = kind(PacketTypes.PUBLISH)
        props.ContentType = content_type
        props.PayloadFormatIndicator = 1  # the body is UTF-8 JSON
        expiry = self.options.message_expiry_s
        if expiry is not None:
            # a retained price is discarded by the broker once stale, so a late
            # subscriber gets the current price or nothing, never an old one
            props.MessageExpiryInterval = expiry
        return props

    def _check_size(self, link: Link, m: Message, props: Properties | None) -> None:
        if link.max_packet is None:
            return
        remaining = 2 + len(m.topic.encode("utf-8")) + len(m.body)
        remaining += 2 if self.options.qos else 0
        remaining += len(props.pack()) if props is not None else 0  # type: ignore[no-untyped-call]
        size = 1 + (1 if remaining < 128 else 2 if remaining < 16384
                    else 3 if remaining < 2097152 else 4) + remaining
        if size > link.max_packet:
            msg = (f"message {m.id!r} on topic {m.topic!r} is {size} bytes; the broker "
                   f"accepts at most {link.max_packet}")
            raise SinkRejectedError(self.name, msg)

    def _live(self) -> Link:
        link = self._link
        if link is None or link.closed:
            raise self._error("not connected")
        if link.lost is not None:
            raise link.lost
        return link

    async def publish(self, batch: Sequence[Message]) -> None:
        """Publish ``batch`` in order; return once the broker acknowledged every message.

        Raises :class:`SinkConnectionError` (retriable) when the connection is lost or
        the acks do not come within ``ack_timeout_s``, :class:`SinkRejectedError`
        when the broker refuses a message for good (too large, not authorized,
        binary format on MQTT 3.1.1).
        """
        link = self._live()
        if not batch:
            return
        o = self.options
        if o.protocol != "5" and batch[0].attributes:
            msg = ("format cloudevents-binary needs MQTT 5 user properties; set "
                   "protocol: '5' or format: cloudevents-json on this sink")
            raise SinkRejectedError(self.name, msg)
        waiters: list[asyncio.Future[None]] = []
        mids: list[int] = []
        try:
            async with asyncio.timeout(self._ack_timeout_s):
                for m in batch:
                    props = self._properties(m)
                    self._check_size(link, m, props)
                    if o.qos:
                        while len(link.unacked) >= link.window:
                            link.room.clear()
                            await link.room.wait()
                            self._live_or_raise(link)
                    self._live_or_raise(link)
                    info = self._send(link, m, props)
                    fut: asyncio.Future[None] = link.loop.create_future()
                    link.pending[info.mid] = (fut, m.topic)
                    if o.qos:
                        link.unacked.add(info.mid)
                    mids.append(info.mid)
                    waiters.append(fut)
                for fut in waiters:
                    await fut
        except TimeoutError:
            msg = (f"{sum(not f.done() for f in waiters)} of {len(batch)} message(s) not "
                   f"acknowledged by {o.address} within {self._ack_timeout_s:g}s")
            raise self._error(msg) from None
        finally:
            for mid in mids:
                link.pending.pop(mid, None)
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: no "never retrieved" warning

    def _live_or_raise(self, link: Link) -> None:
        if link.lost is not None:
            raise link.lost
        if link.closed:
            raise self._error("closed")

    def _send(self, link: Link, m: Message, props: Properties | None) -> mqtt.MQTTMessageInfo:
        o = self.options
        try:
            info = link.client.publish(m.topic, m.body, o.qos, o.retain, props)
        except ValueError as exc:
            msg = f"cannot publish message {m.id!r} on topic {m.topic!r}: {exc}"
            raise SinkRejectedError(self.name, msg) from None
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            msg = f"publish on {o.address} failed: {mqtt.error_string(info.rc)}"
            raise self._error(msg)
        return info

    # -- closing ---------------------------------------------------------------------

    async def close(self) -> None:
        """Send DISCONNECT if connected and release the socket; never waits on the
        network, never raises, safe to call twice or before :meth:`connect`."""
        link, self._link = self._link, None
        if link is not None:
            self._drop(link)

    def _drop(self, link: Link) -> None:
        link.drop()
        if self._link is link:
            self._link = None


__all__ = ["MqttOptions", "MqttSink"]
