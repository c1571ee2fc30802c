"""Bus-native last values, end to end: a consumer that connects AFTER the bridge ran
gets the last price of every symbol at once, equal to the latest upstream record.

Each test runs a real bridge (``Bridge.from_settings``) against the real simulator and a
real broker until every subscribed symbol was published at least twice, then stops it.
Stopping pins the latest upstream records down: a tap (called with every event before it
is routed) remembers the last event per (kind, symbol), and the bridge must have routed
and delivered everything (no event lost at shutdown). Only then the late consumer
connects, with the bus's own last-value call:

- MQTT: ``retain: true`` -> a new subscriber receives one retained message per topic;
  ``message_expiry_s`` -> after the expiry it receives none;
- NATS JetStream: a stream with ``max_msgs_per_subject: 1`` and ``allow_direct`` ->
  ``js.get_last_msg`` (plain and direct) and the KV view (``js.key_value``);
- Kafka: ``compact: true`` -> a fresh consumer group reads from the beginning and folds
  by key (the route's default key, the symbol).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aleno_bridge_plugins.mqtt import MqttSink
from aleno_bridge_plugins.nats import NatsOptions, NatsSink
from nats.aio.client import Client as Nats

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.core.envelope import Event
from bridge.simulator import Simulator
from bridge.sinks import SinkError
from bridge.testing.wait import wait_until
from tests.support.bridges import config_text
from tests.support.mqtt import MqttBroker, MqttConsumer

pytestmark = pytest.mark.integration

TICKERS = ["BTC/USD", "ETH/USD"]
#: BRK.B: a symbol whose character each bus must make safe in its topic or subject
EQUITIES = ["AAPL", "BRK.B"]
SYMBOLS = [("ticker", s) for s in TICKERS] + [("equity", s) for s in EQUITIES]


@dataclass(frozen=True)
class Latest:
    """The latest upstream record of one symbol, as the bridge received it."""

    id: str
    price: float


async def run_until_each_twice(simulator: Simulator, sinks: str, routes: str) -> dict[
        tuple[str, str], Latest]:
    """Run a bridge with these sinks and routes until every symbol of :data:`SYMBOLS`
    was seen twice, stop it, check it delivered everything; the last record of each."""
    text = config_text(simulator.url, sinks, routes,
                       tickers=f"[{', '.join(TICKERS)}]", equities=f"[{', '.join(EQUITIES)}]")
    bridge = Bridge.from_settings(parse_config(text, env={}), http=False)
    seen: dict[tuple[str, str], int] = {}
    latest: dict[tuple[str, str], Latest] = {}

    def tap(ev: Event) -> None:
        key = (ev.kind, ev.symbol)
        seen[key] = seen.get(key, 0) + 1
        latest[key] = Latest(ev.id, float(ev.price))

    bridge.add_tap(tap)
    stop = asyncio.Event()
    run = asyncio.create_task(bridge.run(stop))
    try:
        await wait_until(lambda: run.done() or all(seen.get(k, 0) >= 2 for k in SYMBOLS),
                         30, "every symbol published twice")
    finally:
        stop.set()
        lost = await asyncio.wait_for(run, 30)
    assert set(seen) == set(SYMBOLS)
    # stopping routed and delivered everything the tap saw: the tap's last record per
    # symbol is the last one on the bus
    assert all(n == 0 for n in lost.values()), lost
    assert bridge.pipeline_dropped == {}
    for w in bridge.workers.values():
        assert w.stats.dropped == {}, (w.name, w.stats.dropped)
        assert w.stats.published >= 2 * len(SYMBOLS)
    return latest


def _envelope(body: bytes) -> tuple[str, float]:
    """(id, data.price) of a structured-mode CloudEvent."""
    env = orjson.loads(body)
    return str(env["id"]), float(env["data"]["price"])


# ---------------------------------------------------------------------------
# MQTT: retained messages, message expiry


def _mqtt_sink_yaml(name: str, broker: MqttBroker, **extra: Any) -> str:
    lines = [f"  {name}:", "    driver: mqtt", f"    host: {broker.host}",
             f"    port: {broker.port}", f'    protocol: "{broker.protocol}"',
             "    retain: true", "    batch: {max_events: 50, linger_ms: 5}"]
    lines += [f"    {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def _mqtt_route(sink: str, prefix: str) -> str:
    return f'  - {{match: {{kind: "*"}}, sinks: [{sink}], topic: "{prefix}/{{kind}}/{{symbol}}"}}'


def _mqtt_topic(prefix: str, kind: str, symbol: str) -> str:
    return f"{prefix}/{kind}/{MqttSink.safe_token(symbol)}"


async def _retained(broker: MqttBroker, prefix: str, settle_s: float = 0.5,
                    wait_s: float = 5.0) -> list[Any]:
    """What a brand-new subscriber to ``prefix/#`` receives at once (retain-handling
    default: the broker sends the retained messages right after the SUBACK)."""
    late = MqttConsumer(broker).connect()
    try:
        await late.subscribe(f"{prefix}/#", 1)
        await late.wait_count(len(SYMBOLS), wait_s)
        await asyncio.sleep(settle_s)  # anything beyond one per topic would show now
        return late.messages()
    finally:
        late.close()


def _clear_retained(broker: MqttBroker, prefix: str) -> None:
    """Delete the retained messages a test left on a shared broker."""
    client = MqttConsumer(broker).connect()
    try:
        for kind, symbol in SYMBOLS:
            client.client.publish(_mqtt_topic(prefix, kind, symbol), b"", qos=1,
                                  retain=True).wait_for_publish(5)
    finally:
        client.close()


async def test_mqtt_late_subscriber_gets_the_last_price_of_every_symbol(
    simulator: Simulator, mqtt_broker: MqttBroker,
) -> None:
    prefix = f"lv-{uuid.uuid4().hex[:8]}"
    # with MQTT 5, a long expiry rides along: it must not hide a fresh retained price
    extra = {"message_expiry_s": 60} if mqtt_broker.v5 else {}
    try:
        latest = await run_until_each_twice(
            simulator, _mqtt_sink_yaml("bus", mqtt_broker, **extra), _mqtt_route("bus", prefix))
        started = time.monotonic()
        got = await _retained(mqtt_broker, prefix, settle_s=0.3)
    finally:
        _clear_retained(mqtt_broker, prefix)
    assert time.monotonic() - started < 5
    want = {_mqtt_topic(prefix, k, s): latest[(k, s)] for k, s in SYMBOLS}
    assert sorted(g.topic for g in got) == sorted(want), "one retained message per symbol"
    for g in got:
        assert g.retain, g.topic
        msg_id, price = _envelope(g.payload)
        assert (msg_id, price) == (want[g.topic].id, want[g.topic].price), g.topic
        if mqtt_broker.v5:
            assert g.message_expiry_s is not None and 0 < g.message_expiry_s <= 60


async def test_mqtt_message_expiry_removes_stale_retained_prices(
    simulator: Simulator, mqtt_broker: MqttBroker,
) -> None:
    """Two retaining sinks on the same feed: ``short`` with ``message_expiry_s: 1``,
    ``keep`` without. After the expiry a new subscriber gets nothing from ``short``'s
    topics and still every price from ``keep``'s (the control: the subscriber works)."""
    if not mqtt_broker.v5:
        pytest.skip(f"the {mqtt_broker.kind} broker speaks MQTT 3.1.1 only (amqtt 0.12): "
                    "no Message Expiry Interval to test")
    short, keep = f"lv-short-{uuid.uuid4().hex[:8]}", f"lv-keep-{uuid.uuid4().hex[:8]}"
    live = MqttConsumer(mqtt_broker).connect()
    sinks = "\n".join([_mqtt_sink_yaml("short", mqtt_broker, message_expiry_s=1),
                       _mqtt_sink_yaml("keep", mqtt_broker)])
    routes = "\n".join([_mqtt_route("short", short), _mqtt_route("keep", keep)])
    try:
        await live.subscribe(f"{short}/#", 1)
        latest = await run_until_each_twice(simulator, sinks, routes)
        stopped = time.monotonic()
        live_got = live.messages()
        # Mosquitto counts expiry in whole seconds: 1 s can last until the 3rd second
        await asyncio.sleep(max(0.0, stopped + 3.0 - time.monotonic()))
        # the control below shows retained messages arrive within milliseconds
        expired = await _retained(mqtt_broker, short, settle_s=0.0, wait_s=1.0)
        kept = await _retained(mqtt_broker, keep)
    finally:
        live.close()
        _clear_retained(mqtt_broker, keep)
        _clear_retained(mqtt_broker, short)
    # every message carried the expiry (what the broker forwards is what is left of it)
    assert live_got and all(g.message_expiry_s in (0, 1) for g in live_got), live_got[:3]
    assert expired == [], f"expired retained messages still delivered: {expired}"
    assert sorted(g.topic for g in kept) == sorted(_mqtt_topic(keep, k, s) for k, s in SYMBOLS)
    for g in kept:
        kind, _, safe = g.topic.removeprefix(keep + "/").partition("/")
        symbol = next(s for k, s in SYMBOLS if k == kind and MqttSink.safe_token(s) == safe)
        assert _envelope(g.payload) == (latest[(kind, symbol)].id,
                                        latest[(kind, symbol)].price)


# ---------------------------------------------------------------------------
# NATS JetStream: last message per subject, direct get, KV view


@contextlib.asynccontextmanager
async def _nats(url: str) -> AsyncIterator[Nats]:
    nc = Nats()
    await asyncio.wait_for(nc.connect(url, allow_reconnect=False), 10)
    try:
        yield nc
    finally:
        await asyncio.wait_for(nc.close(), 5)


def _nats_subject(prefix: str, kind: str, symbol: str) -> str:
    return f"{prefix}.{kind}.{NatsSink.safe_token(symbol)}"


async def test_nats_late_consumer_gets_the_last_message_per_subject(
    simulator: Simulator, nats_js_url: str,
) -> None:
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"LV_{tag}", f"lv-{tag}"
    bucket = f"lv{tag}"  # a KV bucket is the stream KV_<bucket> on $KV.<bucket>.>
    sinks = f"""  last:
    driver: nats
    servers: {nats_js_url}
    jetstream: true
    stream: {{name: {stream}, subjects: ["{prefix}.>"], storage: memory,
              max_msgs_per_subject: 1, allow_direct: true}}
  kv:
    driver: nats
    servers: {nats_js_url}
    jetstream: true
    stream: {{name: KV_{bucket}, subjects: ["$KV.{bucket}.>"], storage: memory,
              max_msgs_per_subject: 1, allow_direct: true}}"""
    routes = f"""  - {{match: {{kind: "*"}}, sinks: [last], topic: "{prefix}.{{kind}}.{{symbol}}"}}
  - {{match: {{kind: "*"}}, sinks: [kv], topic: "$KV.{bucket}.{{kind}}.{{symbol}}"}}"""
    async with _nats(nats_js_url) as nc:
        js = nc.jetstream(timeout=5)
        try:
            latest = await run_until_each_twice(simulator, sinks, routes)
            info = await js.stream_info(stream)
            plain = {k: await js.get_last_msg(stream, _nats_subject(prefix, *k))
                     for k in SYMBOLS}
            direct = {k: await js.get_last_msg(stream, _nats_subject(prefix, *k), direct=True)
                      for k in SYMBOLS}
            kv = await js.key_value(bucket)
            entries = {k: await kv.get(f"{k[0]}.{NatsSink.safe_token(k[1])}") for k in SYMBOLS}
        finally:
            for name in (stream, f"KV_{bucket}"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
    # the stream the sink created has the configuration asked for...
    assert info.config.max_msgs_per_subject == 1
    assert info.config.allow_direct is True
    # ...and holds exactly the last message of each subject, nothing older
    assert info.state.messages == len(SYMBOLS)
    for k in SYMBOLS:
        want = (latest[k].id, latest[k].price)
        assert _envelope(plain[k].data or b"") == want, k
        assert _envelope(direct[k].data or b"") == want, k
        assert _envelope(entries[k].value or b"") == want, k
        assert plain[k].headers is not None and plain[k].headers["Nats-Msg-Id"] == latest[k].id


async def test_nats_stream_of_the_same_name_with_other_settings_is_left_alone(
    nats_js_url: str,
) -> None:
    """An existing stream without the per-subject limit is not changed by a sink that
    asks for one: connect fails naming the stream, and the stream keeps its config."""
    name = f"LV_{uuid.uuid4().hex[:8]}"
    subjects = [f"{name.lower()}.>"]
    async with _nats(nats_js_url) as nc:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name=name, subjects=subjects, storage="memory")
        sink = NatsSink("last", NatsOptions.model_validate({
            "servers": nats_js_url, "jetstream": True,
            "stream": {"name": name, "subjects": subjects, "storage": "memory",
                       "max_msgs_per_subject": 1, "allow_direct": True},
        }))
        try:
            with pytest.raises(SinkError, match=f"stream '{name}' exists with other settings"):
                await asyncio.wait_for(sink.connect(), 15)
            info = await js.stream_info(name)
        finally:
            await sink.close()
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
    assert info.config.max_msgs_per_subject == -1
    assert not info.config.allow_direct


# ---------------------------------------------------------------------------
# Kafka: compacted topics, read from the beginning and folded by key


async def _topic_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    """DescribeConfigs of ``topics``: name -> {config: value}."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await asyncio.wait_for(admin.start(), 10)
    try:
        responses = await asyncio.wait_for(admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]), 10)
    finally:
        await admin.close()
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            error_code, _msg, _type, name, entries = resource[:5]
            assert error_code == 0, resource
            out[name] = {e[0]: e[1] for e in entries}
    return out


async def _fold_from_beginning(bootstrap: str, topics: list[str],
                               done: Callable[[dict[tuple[str, bytes], bytes]], bool],
                               timeout: float = 20.0) -> dict[tuple[str, bytes], bytes]:
    """A fresh consumer group reads ``topics`` from the beginning to the end and keeps
    the last value per (topic, key): the table view of a compacted topic."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=f"late-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False,
        # Tansu answers the first JoinGroup of a new group after half the session
        # timeout; 6 s is the smallest a real Kafka accepts (group.min.session.timeout.ms)
        session_timeout_ms=6000, heartbeat_interval_ms=1000,
    )
    await asyncio.wait_for(consumer.start(), 20)
    table: dict[tuple[str, bytes], bytes] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300, max_records=10_000)
            for tp, records in batches.items():
                for r in records:
                    assert r.key is not None, "a record without a key cannot be compacted"
                    table[(tp.topic, r.key)] = r.value or b""
            assigned: set[TopicPartition] = consumer.assignment()
            # the end of the log: the fetch high watermark (Tansu's ListOffsets answers
            # the last batch's base offset + 1)
            at_end = bool(assigned)
            for tp in assigned:
                high = consumer.highwater(tp)
                if high is None or await consumer.position(tp) < high:
                    at_end = False
            if at_end and done(table):
                break
    finally:
        await asyncio.wait_for(consumer.stop(), 10)
    return table


async def test_kafka_compacted_topic_is_the_table_of_last_prices(
    simulator: Simulator, kafka_bootstrap: str,
) -> None:
    prefix = f"lv-{uuid.uuid4().hex[:8]}"
    topics = [f"{prefix}.ticker", f"{prefix}.equity"]
    sinks = f"""  bus:
    driver: kafka
    bootstrap_servers: {kafka_bootstrap}
    create_topics: true
    compact: true
    topic_config: {{min.cleanable.dirty.ratio: 0.01, segment.ms: 100}}
    request_timeout_ms: 5000
    batch: {{max_events: 50, linger_ms: 5}}"""
    # one topic per kind, no `key:` in the route: the default key is the symbol
    routes = f'  - {{match: {{kind: "*"}}, sinks: [bus], topic: "{prefix}.{{kind}}"}}'
    latest = await run_until_each_twice(simulator, sinks, routes)

    configs = await _topic_configs(kafka_bootstrap, topics)
    for topic in topics:
        assert configs[topic].get("cleanup.policy") == "compact", configs[topic]
        assert configs[topic].get("segment.ms") == "100", configs[topic]

    want = {(f"{prefix}.{k}", s.encode()): latest[(k, s)] for k, s in SYMBOLS}
    table = await _fold_from_beginning(kafka_bootstrap, topics, lambda t: set(want) <= set(t))
    assert set(table) == set(want)
    for key, value in table.items():
        assert _envelope(value) == (want[key].id, want[key].price), key

