"""MQTT brokers and an independent MQTT consumer for tests.

``mqtt_broker`` (session): the broker named by ``ALENO_BRIDGE_TEST_MQTT`` (host:port),
else the one listening on ``127.0.0.1:1883``, else a private broker on a free port:
Mosquitto when its binary is installed, else amqtt's broker (pip ``amqtt``).
``ALENO_BRIDGE_TEST_OWN_BROKERS=1`` skips the first two steps;
``ALENO_BRIDGE_TEST_MQTT_BROKER=amqtt`` (or ``mosquitto``) skips them too and chooses
the kind of private broker, so the amqtt path can be tested on a machine that has
Mosquitto.

``mqtt_brokers`` (function): a factory of PRIVATE brokers on free ports (password
file, TLS listener, persistence, extra Mosquitto lines) that a test may SIGKILL and
restart on the same port.

amqtt speaks MQTT 3.1.1 only: :attr:`MqttBroker.protocol` says which protocol the
driver should use against a broker, and tests needing MQTT 5 skip on amqtt.

The consumer, :class:`MqttConsumer`, is plain paho-mqtt with its own network thread
(``loop_start``): it shares nothing with the driver's asyncio integration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.testing.conformance import BusProbe, Received
from bridge.testing.wait import wait_until, wait_until_sync
from tests.support.proc import (
    Proc,
    free_port,
    own_brokers,
    port_open,
    venv_bin,
    wait_port,
    wait_stopped,
)
from tests.support.tls import TlsFiles

MQTT_ENV = "ALENO_BRIDGE_TEST_MQTT"
KIND_ENV = "ALENO_BRIDGE_TEST_MQTT_BROKER"
STANDARD_PORT = 1883
KINDS = ("mosquitto", "amqtt")


def mosquitto_bin() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():
        found = "/usr/sbin/mosquitto"
    return found


def broker_kind() -> str:
    """The kind of private broker to start: ``$ALENO_BRIDGE_TEST_MQTT_BROKER``, else
    Mosquitto when installed, else amqtt."""
    forced = os.environ.get(KIND_ENV, "").strip().lower()
    if forced:
        if forced not in KINDS:
            msg = f"{KIND_ENV}={forced!r}: use one of {', '.join(KINDS)}"
            raise ValueError(msg)
        if forced == "mosquitto" and mosquitto_bin() is None:
            pytest.skip(f"{KIND_ENV}=mosquitto but mosquitto is not installed")
        return forced
    return "mosquitto" if mosquitto_bin() is not None else "amqtt"


# ---------------------------------------------------------------------------
# Credentials and certificates


def mosquitto_hash(password: str, iterations: int = 101) -> str:
    """A Mosquitto 2 password hash (``$7$``: PBKDF2-SHA512), made without mosquitto_passwd."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def mosquitto_passwd_line(user: str, password: str, workdir: Path) -> str:
    """``user:hash`` from ``mosquitto_passwd -b`` when installed, else :func:`mosquitto_hash`."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return f"{user}:{mosquitto_hash(password)}"
    scratch = workdir / f".passwd-{uuid.uuid4().hex}"
    scratch.touch(mode=0o600)
    try:
        subprocess.run([tool, "-b", str(scratch), user, password], check=True, timeout=10,
                       capture_output=True)
        return scratch.read_text().strip()
    finally:
        scratch.unlink(missing_ok=True)


def amqtt_passwd_line(user: str, password: str) -> str:
    """``user:hash`` for amqtt's FileAuthPlugin (Argon2, through pwdlib)."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return f"{user}:{PasswordHash((Argon2Hasher(),)).hash(password)}"




# ---------------------------------------------------------------------------
# Brokers


@dataclass(frozen=True)
class MqttBroker:
    """Where a test's broker listens, and what it speaks."""

    host: str
    port: int
    kind: str  #: mosquitto | amqtt | external
    protocol: str  #: "5" or "3.1.1": what the driver should use against it

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    def options(self, **extra: Any) -> dict[str, Any]:
        """Driver options that reach this broker."""
        return {"host": self.host, "port": self.port, "protocol": self.protocol, **extra}


def detect_protocol(host: str, port: int, timeout: float = 5.0) -> str:
    """``"5"`` if the broker at host:port accepts an MQTT 5 CONNECT, else ``"3.1.1"``."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    result: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: result.append(reason)
    try:
        client.connect(host, port, 10)
        deadline = time.monotonic() + timeout
        while not result and time.monotonic() < deadline:
            if client.loop(0.05) != 0:
                break
    except OSError:
        return "3.1.1"
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop(0.05)
    if result and result[0].value != 0x84:  # anything but "unsupported protocol version"
        return "5"
    return "3.1.1"


class PrivateBroker:
    """A Mosquitto or amqtt broker of our own on a fixed port, killable and restartable.

    ``users`` (name -> password) enables a password file and refuses anonymous
    clients; ``tls`` makes the listener TLS-only; ``persistence`` (Mosquitto) keeps
    sessions and queued messages in ``workdir`` across :meth:`kill` + :meth:`start`
    (saved every second and on :meth:`save`); ``extra`` is extra mosquitto.conf text.
    """

    def __init__(
        self, workdir: Path, kind: str | None = None, port: int | None = None,
        users: dict[str, str] | None = None, tls: TlsFiles | None = None,
        persistence: bool = False, extra: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.kind = kind or broker_kind()
        self.port = port if port is not None else free_port()
        self.users = dict(users or {})
        self.tls = tls
        self.persistence = persistence
        self.starts = 0
        self.proc: Proc | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            self.config_path = self._mosquitto_config(extra)
        else:
            if persistence:
                pytest.skip("amqtt cannot keep a persistent session across a SIGKILL (its "
                            "SessionDBPlugin needs sqlalchemy and skips anonymous clients)")
            if extra:
                pytest.skip(f"needs Mosquitto ({'; '.join(extra)})")
            self.config_path = self._amqtt_config()

    @property
    def protocol(self) -> str:
        return "5" if self.kind == "mosquitto" else "3.1.1"

    @property
    def info(self) -> MqttBroker:
        return MqttBroker("127.0.0.1", self.port, self.kind, self.protocol)

    def options(self, **extra: Any) -> dict[str, Any]:
        return self.info.options(**extra)

    @property
    def db_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    def _mosquitto_config(self, extra: Sequence[str]) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"user {getpass.getuser()}",  # as root, do not drop to 'mosquitto'
            "log_dest stdout",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "max_queued_messages 100000",
        ]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("".join(
                mosquitto_passwd_line(u, p, self.workdir) + "\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      "autosave_interval 1"]
        lines += list(extra)
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _amqtt_config(self) -> Path:
        listener = [
            "listeners:", "  default:", "    type: tcp", f"    bind: 127.0.0.1:{self.port}",
        ]
        if self.tls is not None:
            listener += ["    ssl: true", f"    certfile: {self.tls.cert}",
                         f"    keyfile: {self.tls.key}"]
        plugins = ["plugins:"]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("".join(
                amqtt_passwd_line(u, p) + "\n" for u, p in self.users.items()))
            plugins += ["  amqtt.plugins.authentication.FileAuthPlugin:",
                        f"    password_file: {pw}"]
        else:
            plugins += ["  amqtt.plugins.authentication.AnonymousAuthPlugin:",
                        "    allow_anonymous: true"]
        path = self.workdir / "amqtt.yaml"
        path.write_text("\n".join([*listener, *plugins]) + "\n")
        return path

    def _argv(self) -> list[str]:
        if self.kind == "mosquitto":
            binary = mosquitto_bin()
            if binary is None:
                pytest.skip("mosquitto is not installed")
            return [binary, "-c", str(self.config_path)]
        binary = venv_bin("amqtt")
        if binary is None:
            pytest.skip("amqtt is not installed: pip install amqtt")
        return [binary, "-c", str(self.config_path)]

    def start(self, timeout: float = 20.0) -> PrivateBroker:
        if self.proc is not None and self.proc.alive():
            return self
        self.starts += 1
        log = self.workdir / f"{self.kind}.{self.starts}.log"
        self.proc = Proc(self._argv(), log).start()
        try:
            wait_port(self.port, timeout)
        except TimeoutError:
            output = self.proc.output()
            self.stop()
            msg = f"{self.kind} did not listen on {self.port}:\n{output[-2000:]}"
            raise RuntimeError(msg) from None
        return self

    def save(self, timeout: float = 5.0) -> None:
        """Make Mosquitto write its persistence file now (SIGUSR1) and wait for it."""
        before = self.db_path.stat().st_mtime_ns if self.db_path.exists() else 0
        assert self.proc is not None
        self.proc.signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.db_path.exists() and self.db_path.stat().st_mtime_ns != before:
                time.sleep(0.1)  # let the write finish
                return
            time.sleep(0.02)
        msg = f"mosquitto did not save {self.db_path} within {timeout}s"
        raise TimeoutError(msg)

    def pause(self, timeout: float = 10.0) -> None:
        """SIGSTOP: the broker keeps its sockets but answers nothing. Returns once it is
        stopped (the signal is only queued when ``kill()`` returns; see
        :func:`tests.support.proc.wait_stopped`)."""
        if self.proc is not None:
            self.proc.signal(signal.SIGSTOP)
            wait_stopped(self.proc.pid, timeout)

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is flushed, every connection drops)."""
        if self.proc is not None:
            self.proc.kill()

    def restart(self) -> PrivateBroker:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)
            self.proc.stop(5.0)

    def output(self) -> str:
        return self.proc.output() if self.proc is not None else ""


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttBroker]:
    """The session's MQTT broker (see the module docstring for where it comes from)."""
    forced = bool(os.environ.get(KIND_ENV))
    env = os.environ.get(MQTT_ENV, "").strip()
    if env and not own_brokers():
        host, _, port = env.rpartition(":")
        yield MqttBroker(host or "127.0.0.1", int(port), "external",
                         detect_protocol(host or "127.0.0.1", int(port)))
        return
    if not own_brokers() and not forced and port_open(STANDARD_PORT):
        yield MqttBroker("127.0.0.1", STANDARD_PORT, "external",
                         detect_protocol("127.0.0.1", STANDARD_PORT))
        return
    broker = PrivateBroker(tmp_path_factory.mktemp("mqtt-broker"))
    broker.start()
    try:
        yield broker.info
    finally:
        broker.stop()


@pytest.fixture
def mqtt_brokers(tmp_path: Path) -> Iterator[Callable[..., PrivateBroker]]:
    """A factory of private, started brokers (``PrivateBroker`` arguments), all stopped
    at the end of the test."""
    started: list[PrivateBroker] = []

    def make(**kwargs: Any) -> PrivateBroker:
        workdir = tmp_path / f"mqtt-{len(started)}"
        broker = PrivateBroker(workdir, **kwargs)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        broker.stop()


# ---------------------------------------------------------------------------
# The independent consumer


@dataclass(frozen=True)
class Got:
    """One message as the consumer saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]
    #: MQTT 5 Message Expiry Interval left when the broker forwarded it (``None``: none)
    message_expiry_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        h = dict(self.user_properties)
        if self.content_type is not None:
            h["content-type"] = self.content_type
        return h


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[Got] = field(default_factory=list)
    connects: int = 0
    connected: bool = False
    session_present: bool = False
    refused: ReasonCode | None = None
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    #: SUBSCRIBE packet ids sent after the last CONNACK without a session
    resubscribes: list[int] = field(default_factory=list)
    resubscribing: bool = False


class MqttConsumer:
    """A paho subscriber with its own network thread that reconnects by itself.

    With ``clean_start=False`` (and ``session_expiry_s`` on MQTT 5) the broker keeps
    its subscriptions and queues QoS 1 messages while it is away; otherwise it
    subscribes again after every reconnect.
    """

    def __init__(
        self, broker: MqttBroker, client_id: str | None = None, clean_start: bool = True,
        session_expiry_s: int | None = None, username: str | None = None,
        password: str | None = None, ca_file: Path | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:12]}"
        self.clean_start = clean_start
        self.topics: dict[str, int] = {}
        self.state = _State()
        v5 = broker.v5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else clean_start,
        )
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.session_expiry_s = session_expiry_s
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    # paho callbacks (network thread), VERSION2 signatures
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode,
                    _p: Any) -> None:
        with self.state.lock:
            if reason.is_failure:
                self.state.refused = reason
                return
            self.state.connects += 1
            self.state.connected = True
            self.state.session_present = bool(flags.session_present)
            self.state.resubscribing = not flags.session_present
            topics = dict(self.topics)
        if not flags.session_present:
            mids = [self._send_subscribe(topic, qos) for topic, qos in topics.items()]
            with self.state.lock:
                self.state.resubscribes = [m for m in mids if m is not None]
                self.state.resubscribing = False

    def _on_disconnect(self, *_a: Any) -> None:
        with self.state.lock:
            self.state.connected = False

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        content_type = getattr(props, "ContentType", None) if props is not None else None
        user = tuple(getattr(props, "UserProperty", []) or []) if props is not None else ()
        expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
        got = Got(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), content_type,
                  tuple((str(k), str(v)) for k, v in user),
                  None if expiry is None else int(expiry))
        with self.state.lock:
            self.state.messages.append(got)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode],
                      _p: Any) -> None:
        with self.state.lock:
            self.state.subacks[mid] = list(reasons)

    def _send_subscribe(self, topic: str, qos: int) -> int | None:
        if self.broker.v5:
            _rc, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=qos))
        else:
            _rc, mid = self.client.subscribe(topic, qos)
        return mid

    # -- API (test thread) ------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> MqttConsumer:
        props = None
        kwargs: dict[str, Any] = {}
        if self.broker.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if self.session_expiry_s is not None:
                props.SessionExpiryInterval = self.session_expiry_s
            kwargs = {"clean_start": self.clean_start, "properties": props}
        self.client.connect(self.broker.host, self.broker.port, 30, **kwargs)
        self.client.loop_start()
        wait_until_sync(lambda: self.state.connects > 0 or self.state.refused is not None,
                        timeout, "consumer CONNACK", interval=0.01)
        if self.state.refused is not None:
            msg = f"the broker refused the consumer: {self.state.refused}"
            raise ConnectionError(msg)
        return self

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK."""
        self.topics[topic] = qos
        mid = self._send_subscribe(topic, qos)
        if mid is None:
            msg = f"the consumer is not connected; cannot subscribe to {topic}"
            raise AssertionError(msg)
        await wait_until(lambda: mid in self.state.subacks, timeout, f"SUBACK for {topic}",
                         interval=0.01)
        reasons = self.state.subacks[mid]
        if any(r.is_failure for r in reasons):
            msg = f"subscription to {topic} refused: {reasons}"
            raise AssertionError(msg)

    async def resubscribed(self, after_connects: int, timeout: float = 20.0) -> None:
        """Wait until the consumer reconnected (more than ``after_connects`` CONNACKs) and
        holds its subscriptions again (restored session or new SUBACKs)."""
        state = self.state
        await wait_until(lambda: state.connects > after_connects, timeout, "consumer reconnect",
                         interval=0.01)
        if not state.session_present and self.topics:
            await wait_until(lambda: not state.resubscribing
                             and all(m in state.subacks for m in state.resubscribes),
                             timeout, "SUBACK after reconnect", interval=0.01)

    def messages(self) -> list[Got]:
        with self.state.lock:
            return list(self.state.messages)

    async def wait_count(self, count: int, timeout: float) -> list[Got]:
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(self.state.messages) >= count, timeout, "messages",
                             interval=0.01)
        return self.messages()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def kick_client(broker: MqttBroker, client_id: str, timeout: float = 10.0) -> None:
    """Connect with ``client_id`` so the broker drops the client using it (session
    take-over, MQTT 3.1.1 and 5), then leave."""
    kicker = MqttConsumer(broker, client_id=client_id)
    try:
        kicker.connect(timeout)
    finally:
        kicker.close()


class MqttProbe(BusProbe):
    """The conformance suite's consumer. ``drop_connections`` restarts ``broker`` when it
    is ours, else makes the shared broker drop ``sink_client_id`` by a session take-over."""

    def __init__(self, broker: MqttBroker, sink_client_id: str,
                 private: PrivateBroker | None = None) -> None:
        self.broker = broker
        self.sink_client_id = sink_client_id
        self.private = private
        self.consumer = MqttConsumer(broker).connect()

    async def subscribe(self, topic: str) -> None:
        await self.consumer.subscribe(topic, 1)

    async def received(self, count: int, timeout: float) -> list[Received]:
        got = await self.consumer.wait_count(count, timeout)
        return [Received(g.topic, g.payload, None, g.headers) for g in got]

    async def drop_connections(self) -> bool:
        if self.private is None:
            await asyncio.to_thread(kick_client, self.broker, self.sink_client_id)
            return True
        before = self.consumer.state.connects
        self.private.kill()
        await asyncio.to_thread(self.private.start)
        await self.consumer.resubscribed(before)
        return True

    # no stop_bus/start_bus: this consumer's session does not survive a broker restart,
    # so what the sink publishes before it resubscribes would be lost by the test, not by
    # the sink (test_mqtt.py's crash test covers the outage with a persistent session)

    async def close(self) -> None:
        self.consumer.close()
