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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
from collections.abc import Sequence
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

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
    PasswordOptions,
    TlsFilesError,
    TlsOptions,
    budget_problems,
    derived_timeout,
    timeout_problem,
    topic_problem,
    user_properties,
)

log = logging.getLogger("aleno_bridge.sinks.mqtt")
#: paho's own log (enabled on every client; it never prints the password)
paho_log = logging.getLogger("aleno_bridge.sinks.mqtt.paho")

MAX_TOPIC_BYTES: Final = 65535
#: how often keepalive pings and timeouts are checked (``loop_misc``)
MISC_INTERVAL_S: Final = 1.0
#: PUBACK/PUBCOMP reason codes after which a retry can succeed
_TRANSIENT_REASONS: Final = frozenset({0x80, 0x83, 0x91, 0x97})
#: CONNACK reason codes that mean the broker is there but busy
#: (paho reports MQTT 3.1.1 CONNACK codes as their MQTT 5 equivalents)
_BUSY_REASONS: Final = frozenset({0x88, 0x89, 0x9F})  # unavailable, busy, rate exceeded
_AUTH_REASONS: Final = frozenset({0x86, 0x87, 0x8C})  # bad credentials, not authorized

#: Linux only: ``None`` elsewhere
_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)

_safe = replace_chars(r"[+#/\x00]", "_")


def _default_client_id() -> str:
    return f"aleno-bridge-{secrets.token_hex(4)}"


class MqttOptions(TlsOptions, PasswordOptions):
    """Options of an ``mqtt`` sink (everything under ``sinks.<name>`` but the common keys);
    ``username``/``password`` and the ``tls_*`` files come from the driver kit."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    host: str = Field(min_length=1, description="broker host name or IP address")
    port: int | None = Field(
        None, ge=1, le=65535, description="broker port (default 1883, or 8883 with tls)"
    )
    client_id: str = Field(
        default_factory=_default_client_id, min_length=1, max_length=65535,
        description="MQTT client identifier; unique per bridge (a broker disconnects the "
        "older of two clients with the same id); default aleno-bridge-<random>",
    )
    tls: bool = Field(False, description="connect with TLS")
    protocol: Literal["5", "3.1.1"] = "5"
    qos: Literal[0, 1, 2] = 1
    retain: bool = Field(
        False, description="retain the last message of every topic for new subscribers"
    )
    message_expiry_s: int | None = Field(
        None, ge=1, le=4_294_967_295,
        description="MQTT 5 message expiry interval: the broker discards a message (a "
        "retained price too) this many seconds after it was published",
    )
    session_expiry_s: int | None = Field(
        None, ge=0, le=4_294_967_295, description="MQTT 5 session expiry interval"
    )
    clean_start: bool = True
    keepalive_s: int = Field(15, ge=1, le=65535)
    max_inflight: int = Field(
        100, ge=1, le=65535, description="QoS 1/2 messages waiting for their ack at once"
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    ack_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for the acks of one batch (the sink's own "
        "bound; retry.publish_timeout_s usually fires first)",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as an int
        return str(v) if isinstance(v, int | float) else v

    @field_validator("host")
    @classmethod
    def _plain_host(cls, v: str) -> str:
        # the host goes into logs and /readyz: a "user:pw@host" would show the password.
        # The message never quotes the value.
        if "@" in v or "/" in v or any(c.isspace() for c in v) or v.count(":") == 1:
            msg = ("must be a host name or IP address only (no user:password@, no scheme, "
                   "no :port); put credentials in username/password and the port in port")
            raise ValueError(msg)
        return v

    @field_validator("message_expiry_s")
    @classmethod
    def _expiry_needs_v5(cls, v: int | None, info: ValidationInfo) -> int | None:
        # a field validator, not the model one: the error is reported at this option's
        # path (``sinks.<name>.message_expiry_s``); ``protocol`` is declared earlier,
        # so it has been validated already
        if v is not None and info.data.get("protocol") == "3.1.1":
            msg = ("needs protocol 5 (MQTT 3.1.1 has no message expiry); use protocol: '5' "
                   "or remove message_expiry_s")
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MqttOptions:
        if self.tls_files and not self.tls:
            msg = f"{', '.join(self.tls_files)} given but tls is false; set tls: true"
            raise ValueError(msg)
        if self.protocol == "3.1.1" and self.session_expiry_s is not None:
            msg = "session_expiry_s needs protocol 5 (MQTT 3.1.1 has no session expiry)"
            raise ValueError(msg)
        if self.qos == 2 and not self.clean_start:
            # a fresh client per connection restarts packet ids at 1: a resumed session
            # still holding an unfinished QoS 2 flow with the same id would make the
            # broker drop the new message as a duplicate
            msg = "qos 2 needs clean_start: true (the sink does not resume QoS 2 flows)"
            raise ValueError(msg)
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls else 1883

    @property
    def address(self) -> str:
        return f"{self.host}:{self.effective_port}"


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


class _Link:
    """One connection: one paho client, its acknowledgement futures and socket hooks.

    A new link per connect means callbacks of an abandoned client can only touch
    their own, dead, state.
    """

    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.connack: asyncio.Future[tuple[ReasonCode, Properties | None]] = loop.create_future()
        #: mid -> (future, topic) of messages waiting for PUBACK/PUBCOMP (or the write)
        self.pending: dict[int, tuple[asyncio.Future[None], str]] = {}
        #: mids of QoS>0 messages the broker has not acknowledged yet (flow control)
        self.unacked: set[int] = set()
        self.room = asyncio.Event()
        self.window = 1
        self.max_packet: int | None = None
        self.lost: SinkError | None = None
        self.closed = False
        self.sock: Any = None
        self.writing = False
        self.misc: asyncio.Task[None] | None = None

    def fail(self, error: SinkError) -> None:
        """Mark the link dead and fail every waiter with ``error``."""
        if self.lost is None:
            self.lost = error
        if not self.connack.done():
            self.connack.set_exception(error)
            self.connack.exception()  # nobody may be waiting any more: mark it retrieved
        for fut, _topic in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.room.set()

    def unwatch(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)
        self.writing = False
        if sock is self.sock:
            self.sock = None


class MqttSink(Sink[MqttOptions]):
    """Publishes batches to one MQTT broker; see the module docstring for guarantees."""

    options_model = MqttOptions
    # retriable: the core's default (connection loss, timeouts); the driver raises
    # SinkConnectionError for both
    quiet_loggers = (paho_log.name,)

    def __init__(self, name: str, options: MqttOptions) -> None:
        super().__init__(name, options)
        self._link: _Link | None = None
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

    def _ssl_context(self) -> ssl.SSLContext:
        try:
            return self.options.tls_context()
        except TlsFilesError as exc:
            raise SinkRejectedError(self.name, str(exc)) from None

    def _client(self) -> mqtt.Client:
        o = self.options
        v5 = o.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            clean_session=None if v5 else o.clean_start,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.enable_logger(paho_log)
        client.connect_timeout = self._connect_timeout_s
        client.max_inflight_messages_set(o.max_inflight)
        if o.username is not None:
            pw = o.password.get_secret_value() if o.password is not None else None
            client.username_pw_set(o.username, pw)
        return client

    def _blocking_connect(self, client: mqtt.Client) -> None:
        """Load the TLS files, TCP connect, TLS handshake, send CONNECT (runs in a
        worker thread: every step may block)."""
        o = self.options
        if o.tls:
            client.tls_set_context(self._ssl_context())
            # when verifying, the SSL context checks the host name itself
            client.tls_insecure_set(not o.tls_verify)
        if o.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if o.session_expiry_s is not None:
                props.SessionExpiryInterval = o.session_expiry_s
            client.connect(o.host, o.effective_port, o.keepalive_s,
                           clean_start=o.clean_start, properties=props)
        else:
            client.connect(o.host, o.effective_port, o.keepalive_s)

    async def connect(self) -> None:
        """Open a new connection and wait for the broker's CONNACK (bounded by
        ``connect_timeout_s``). Raises :class:`SinkConnectionError` when the broker
        cannot be reached and :class:`SinkRejectedError` when it refuses the client
        (credentials, TLS verification, QoS or retain not supported)."""
        await self.close()
        loop = asyncio.get_running_loop()
        client = self._client()
        link = _Link(client, loop)
        self._link = link
        o = self.options
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._open(link)
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
            raise self._refused(reason)
        self._accept(link, props)

    async def _open(self, link: _Link) -> None:
        loop = link.loop
        o = self.options
        fut = loop.run_in_executor(None, self._blocking_connect, link.client)

        def orphan(f: asyncio.Future[None]) -> None:
            # the thread finished after we gave up: do not leak its socket
            if link.closed:
                self._close_socket(link)

        fut.add_done_callback(orphan)
        try:
            await asyncio.shield(fut)
        except ssl.SSLCertVerificationError as exc:
            hint = "set tls_ca_file to the CA that signed the broker's certificate"
            msg = f"TLS verification of {o.address} failed: {exc.verify_message}; {hint}"
            raise SinkRejectedError(self.name, msg) from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            msg = f"cannot connect to {o.address}: {type(exc).__name__}: {exc}"
            raise self._error(msg) from None
        if link.closed:
            raise self._error("closed while connecting")
        client = link.client

        def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode,
                       props: Properties | None) -> None:
            if not link.connack.done():
                link.connack.set_result((reason, props))

        def on_disconnect(_c: mqtt.Client, _u: Any, flags: mqtt.DisconnectFlags,
                          reason: ReasonCode, _props: Properties | None) -> None:
            if flags.is_disconnect_packet_from_server:
                link.fail(self._error(f"the broker {o.address} disconnected us: {reason}"))
            else:
                link.fail(self._error(f"connection to {o.address} lost"))

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode,
                       _props: Properties | None) -> None:
            if mid in link.unacked:
                link.unacked.discard(mid)
                link.room.set()
            entry = link.pending.pop(mid, None)
            if entry is None:
                return
            fut, topic = entry
            if fut.done():
                return
            if reason.is_failure:
                fut.set_exception(self._nacked(reason, topic))
            else:
                fut.set_result(None)

        def on_socket_close(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            link.unwatch(sock)

        def on_register_write(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            if not link.writing:
                link.writing = True
                loop.add_writer(sock, self._on_writable, link)

        def on_unregister_write(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            if link.writing:
                link.writing = False
                with contextlib.suppress(Exception):
                    loop.remove_writer(sock)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_socket_close = on_socket_close
        client.on_socket_register_write = on_register_write
        client.on_socket_unregister_write = on_unregister_write
        sock = client.socket()
        if sock is None:
            raise self._error(f"connection to {o.address} closed while connecting")
        link.sock = sock
        loop.add_reader(sock, self._on_readable, link)
        if client.want_write():
            link.writing = True
            loop.add_writer(sock, self._on_writable, link)
        link.misc = loop.create_task(self._misc(link), name=f"mqtt-misc:{self.name}")

    def _refused(self, reason: ReasonCode) -> SinkError:
        o = self.options
        msg = f"broker {o.address} refused the connection: {reason}"
        value = reason.value
        if value in _BUSY_REASONS:
            return self._error(msg)
        if value in _AUTH_REASONS:
            who = f"of user {o.username!r}" if o.username is not None else "(none given)"
            msg += f"; check username/password {who}"
        elif value == 0x84:
            msg += "; set protocol: '3.1.1' for a broker without MQTT 5"
        return SinkRejectedError(self.name, msg)

    def _accept(self, link: _Link, props: Properties | None) -> None:
        """Apply the limits the broker announced in its CONNACK (MQTT 5)."""
        o = self.options
        window = o.max_inflight
        if props is not None:
            receive_max = getattr(props, "ReceiveMaximum", None)
            if receive_max:
                # paho ignores Receive Maximum: exceeding it gets us disconnected
                window = min(window, int(receive_max))
            max_packet = getattr(props, "MaximumPacketSize", None)
            if max_packet:
                link.max_packet = int(max_packet)
            max_qos = getattr(props, "MaximumQoS", None)
            problem = None
            if max_qos is not None and o.qos > int(max_qos):
                problem = f"supports QoS up to {max_qos}; set qos: {max_qos}"
            elif not getattr(props, "RetainAvailable", 1) and o.retain:
                problem = "does not support retained messages; set retain: false"
            if problem is not None:
                self._drop(link)
                msg = f"broker {o.address} {problem}"
                raise SinkRejectedError(self.name, msg)
        link.window = window
        log.info("sink %s: connected to MQTT broker %s as %r (MQTT %s, qos %d)",
                 self.name, o.address, o.client_id, o.protocol, o.qos,
                 extra={"sink": self.name})

    # -- event-loop integration -----------------------------------------------------

    def _on_readable(self, link: _Link) -> None:
        client = link.client
        try:
            client.loop_read()
            if link.unacked and _QUICKACK is not None:
                # acknowledge the broker's segment now, not after the delayed-ACK timer:
                # a broker with Nagle on (Mosquitto's default) holds back its next
                # PUBACK/PUBREC/PUBCOMP until then, which stalled the end of every
                # batch by ~40 ms (see docs/drivers/mqtt.md, "Throughput")
                with contextlib.suppress(OSError, AttributeError):
                    link.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            # TLS may hold decrypted bytes the selector cannot see
            for _ in range(1000):
                sock = client.socket()
                pending = getattr(sock, "pending", None)
                if sock is None or pending is None or pending() <= 0:
                    break
                client.loop_read()
        except Exception as exc:  # a broken packet or callback: drop this connection
            self._broken(link, exc)

    def _on_writable(self, link: _Link) -> None:
        try:
            link.client.loop_write()
        except Exception as exc:
            self._broken(link, exc)

    async def _misc(self, link: _Link) -> None:
        """Keepalive pings and the detection of a broker that stopped answering."""
        while not link.closed and link.lost is None:
            await asyncio.sleep(MISC_INTERVAL_S)
            try:
                rc = link.client.loop_misc()
            except Exception as exc:
                self._broken(link, exc)
                return
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                link.fail(self._error(f"connection to {self.options.address} closed"))
                return

    def _broken(self, link: _Link, exc: BaseException) -> None:
        log.warning("sink %s: MQTT connection dropped after an error: %s: %s",
                    self.name, type(exc).__name__, exc, extra={"sink": self.name})
        link.fail(self._error(f"connection to {self.options.address} failed: {exc}"))
        self._close_socket(link)

    # -- publishing -----------------------------------------------------------------

    def _nacked(self, reason: ReasonCode, topic: str) -> SinkError:
        msg = f"broker refused a message on topic {topic!r}: {reason}"
        if reason.value in _TRANSIENT_REASONS:
            return self._error(msg)
        return SinkRejectedError(self.name, msg)

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

    def _check_size(self, link: _Link, m: Message, props: Properties | None) -> None:
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

    def _live(self) -> _Link:
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

    def _live_or_raise(self, link: _Link) -> None:
        if link.lost is not None:
            raise link.lost
        if link.closed:
            raise self._error("closed")

    def _send(self, link: _Link, m: Message, props: Properties | None) -> mqtt.MQTTMessageInfo:
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

    def _drop(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        link.fail(self._error("the sink was closed"))
        if link.misc is not None:
            link.misc.cancel()
        client = link.client
        if client.is_connected():
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()  # a non-blocking write of the 2-byte DISCONNECT
        self._close_socket(link)
        if self._link is link:
            self._link = None

    def _close_socket(self, link: _Link) -> None:
        sock = link.client.socket()
        if link.sock is not None:
            link.unwatch(link.sock)
        if sock is not None:
            link.unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()


__all__ = ["MqttOptions", "MqttSink"]
