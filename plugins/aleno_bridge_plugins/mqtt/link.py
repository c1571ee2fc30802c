"""One MQTT connection: a paho-mqtt client driven from the asyncio event loop.

paho's documented external-loop integration: socket callbacks + ``loop_read``/
``loop_write``/``loop_misc``, so no network thread exists; only the blocking TCP/TLS
connect runs in a worker thread. While acknowledgements are awaited the socket is put
in ``TCP_QUICKACK`` mode after each read (Linux), so a broker with Nagle on never holds
back its last PUBACKs for the delayed-ACK timer (docs/drivers/mqtt.md, "Throughput").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.sinks import SinkConnectionError, SinkError, SinkRejectedError
from bridge.sinks.kit import TlsFilesError

from .options import MqttOptions

log = logging.getLogger("aleno_bridge.sinks.mqtt")
#: paho's own log (enabled on every client; it never prints the password)
paho_log = logging.getLogger("aleno_bridge.sinks.mqtt.paho")

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


def new_client(o: MqttOptions, connect_timeout_s: float) -> mqtt.Client:
    """A fresh paho client for one connection: paho never reconnects by itself nor
    re-sends an old session's messages."""
    v5 = o.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=o.client_id,
        clean_session=None if v5 else o.clean_start,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        reconnect_on_failure=False,
    )
    client.enable_logger(paho_log)
    client.connect_timeout = connect_timeout_s
    client.max_inflight_messages_set(o.max_inflight)
    if o.username is not None:
        pw = o.password.get_secret_value() if o.password is not None else None
        client.username_pw_set(o.username, pw)
    return client


class Link:
    """One connection: one paho client, its acknowledgement futures and socket hooks,
    driven from the asyncio event loop (paho's external-loop integration).

    A new link per connect means callbacks of an abandoned client can only touch
    their own, dead, state.
    """

    def __init__(self, name: str, options: MqttOptions, client: mqtt.Client,
                 loop: asyncio.AbstractEventLoop) -> None:
        #: the sink's name, for its errors and logs
        self.name = name
        self.options = options
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

    def error(self, message: str) -> SinkConnectionError:
        return SinkConnectionError(self.name, message)

    def ssl_context(self) -> ssl.SSLContext:
        try:
            return self.options.tls_context()
        except TlsFilesError as exc:
            raise SinkRejectedError(self.name, str(exc)) from None

    def blocking_connect(self) -> None:
        """Load the TLS files, TCP connect, TLS handshake, send CONNECT (runs in a
        worker thread: every step may block)."""
        o, client = self.options, self.client
        if o.tls:
            client.tls_set_context(self.ssl_context())
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

    async def open(self) -> None:
        """Connect in a worker thread, then hook the socket into the event loop and
        paho's callbacks into this link; the broker's CONNACK resolves :attr:`connack`."""
        loop = self.loop
        o = self.options
        fut = loop.run_in_executor(None, self.blocking_connect)

        def orphan(f: asyncio.Future[None]) -> None:
            # the thread finished after we gave up: do not leak its socket
            if self.closed:
                self.close_socket()

        fut.add_done_callback(orphan)
        try:
            await asyncio.shield(fut)
        except ssl.SSLCertVerificationError as exc:
            hint = "set tls_ca_file to the CA that signed the broker's certificate"
            msg = f"TLS verification of {o.address} failed: {exc.verify_message}; {hint}"
            raise SinkRejectedError(self.name, msg) from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            msg = f"cannot connect to {o.address}: {type(exc).__name__}: {exc}"
            raise self.error(msg) from None
        if self.closed:
            raise self.error("closed while connecting")
        client = self.client

        def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode,
                       props: Properties | None) -> None:
            if not self.connack.done():
                self.connack.set_result((reason, props))

        def on_disconnect(_c: mqtt.Client, _u: Any, flags: mqtt.DisconnectFlags,
                          reason: ReasonCode, _props: Properties | None) -> None:
            if flags.is_disconnect_packet_from_server:
                self.fail(self.error(f"the broker {o.address} disconnected us: {reason}"))
            else:
                self.fail(self.error(f"connection to {o.address} lost"))

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode,
                       _props: Properties | None) -> None:
            if mid in self.unacked:
                self.unacked.discard(mid)
                self.room.set()
            entry = self.pending.pop(mid, None)
            if entry is None:
                return
            fut, topic = entry
            if fut.done():
                return
            if reason.is_failure:
                fut.set_exception(self.nacked(reason, topic))
            else:
                fut.set_result(None)

        def on_socket_close(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            self.unwatch(sock)

        def on_register_write(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            if not self.writing:
                self.writing = True
                loop.add_writer(sock, self.on_writable)

        def on_unregister_write(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            if self.writing:
                self.writing = False
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
            raise self.error(f"connection to {o.address} closed while connecting")
        self.sock = sock
        loop.add_reader(sock, self.on_readable)
        if client.want_write():
            self.writing = True
            loop.add_writer(sock, self.on_writable)
        self.misc = loop.create_task(self.housekeeping(), name=f"mqtt-misc:{self.name}")

    def refused(self, reason: ReasonCode) -> SinkError:
        o = self.options
        msg = f"broker {o.address} refused the connection: {reason}"
        value = reason.value
        if value in _BUSY_REASONS:
            return self.error(msg)
        if value in _AUTH_REASONS:
            who = f"of user {o.username!r}" if o.username is not None else "(none given)"
            msg += f"; check username/password {who}"
        elif value == 0x84:
            msg += "; set protocol: '3.1.1' for a broker without MQTT 5"
        return SinkRejectedError(self.name, msg)

    def accept(self, props: Properties | None) -> None:
        """Apply the limits the broker announced in its CONNACK (MQTT 5); raise
        :class:`SinkRejectedError` when it cannot take the configured QoS or retain."""
        o = self.options
        window = o.max_inflight
        if props is not None:
            receive_max = getattr(props, "ReceiveMaximum", None)
            if receive_max:
                # paho ignores Receive Maximum: exceeding it gets us disconnected
                window = min(window, int(receive_max))
            max_packet = getattr(props, "MaximumPacketSize", None)
            if max_packet:
                self.max_packet = int(max_packet)
            max_qos = getattr(props, "MaximumQoS", None)
            problem = None
            if max_qos is not None and o.qos > int(max_qos):
                problem = f"supports QoS up to {max_qos}; set qos: {max_qos}"
            elif not getattr(props, "RetainAvailable", 1) and o.retain:
                problem = "does not support retained messages; set retain: false"
            if problem is not None:
                msg = f"broker {o.address} {problem}"
                raise SinkRejectedError(self.name, msg)
        self.window = window

    # -- event-loop integration -----------------------------------------------------

    def on_readable(self) -> None:
        client = self.client
        try:
            client.loop_read()
            if self.unacked and _QUICKACK is not None:
                # acknowledge the broker's segment now, not after the delayed-ACK timer:
                # a broker with Nagle on (Mosquitto's default) holds back its next
                # PUBACK/PUBREC/PUBCOMP until then, which stalled the end of every
                # batch by ~40 ms (see docs/drivers/mqtt.md, "Throughput")
                with contextlib.suppress(OSError, AttributeError):
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            # TLS may hold decrypted bytes the selector cannot see
            for _ in range(1000):
                sock = client.socket()
                pending = getattr(sock, "pending", None)
                if sock is None or pending is None or pending() <= 0:
                    break
                client.loop_read()
        except Exception as exc:  # a broken packet or callback: drop this connection
            self.broken(exc)

    def on_writable(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            self.broken(exc)

    async def housekeeping(self) -> None:
        """Keepalive pings and the detection of a broker that stopped answering."""
        while not self.closed and self.lost is None:
            await asyncio.sleep(MISC_INTERVAL_S)
            try:
                rc = self.client.loop_misc()
            except Exception as exc:
                self.broken(exc)
                return
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self.fail(self.error(f"connection to {self.options.address} closed"))
                return

    def broken(self, exc: BaseException) -> None:
        log.warning("sink %s: MQTT connection dropped after an error: %s: %s",
                    self.name, type(exc).__name__, exc, extra={"sink": self.name})
        self.fail(self.error(f"connection to {self.options.address} failed: {exc}"))
        self.close_socket()

    def nacked(self, reason: ReasonCode, topic: str) -> SinkError:
        msg = f"broker refused a message on topic {topic!r}: {reason}"
        if reason.value in _TRANSIENT_REASONS:
            return self.error(msg)
        return SinkRejectedError(self.name, msg)

    # -- closing ---------------------------------------------------------------------

    def drop(self) -> None:
        """Close this connection: DISCONNECT if connected (never waits on the network),
        release the socket, fail every waiter; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.fail(self.error("the sink was closed"))
        if self.misc is not None:
            self.misc.cancel()
        client = self.client
        if client.is_connected():
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()  # a non-blocking write of the 2-byte DISCONNECT
        self.close_socket()

    def close_socket(self) -> None:
        sock = self.client.socket()
        if self.sock is not None:
            self.unwatch(self.sock)
        if sock is not None:
            self.unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()
