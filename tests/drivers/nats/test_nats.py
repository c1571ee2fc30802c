"""The ``nats`` driver against real nats-server processes.

Shared server: ``nats_url`` (see tests/support/nats.py). Tests that kill a server, or
need auth or TLS, start a private one on a free port with ``nats_servers``. The
independent consumer is always a plain nats-py client (core subscription or reading
the JetStream stream), never the driver under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aleno_bridge_plugins.nats import CLOSE_TIMEOUT_S, NatsOptions, NatsSink
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bridge.app import Bridge
from bridge.config import (
    RetryConfig,
    SinkCommon,
    SinkSpec,
    parse_config,
)
from bridge.simulator import Simulator
from bridge.sinks import Message, SinkConnectionError, SinkError, SinkRejectedError
from bridge.sinks.worker import SinkWorker
from bridge.testing.conformance import (
    BusProbe,
    Received,
    SinkConformance,
    refusing_every_third,
    unique_topic,
)
from bridge.testing.sample import messages, sample_events
from bridge.testing.wait import wait_until
from tests.support.nats import NatsServer
from tests.support.tls import make_tls_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[3]
KEY_HEADER = "aleno-key"


# ---------------------------------------------------------------------------
# helpers: an independent consumer written with nats-py itself


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every reconnect attempt as an error by default."""


async def client(url: str, **kw: Any) -> Client:
    """A nats-py client that reconnects by itself (the consumer side)."""
    nc = Client()
    opts: dict[str, Any] = {
        "servers": [url], "connect_timeout": 2, "reconnect_time_wait": 0.2,
        "max_reconnect_attempts": -1, "error_cb": _quiet,
    }
    opts.update(kw)
    await asyncio.wait_for(nc.connect(**opts), 10)
    return nc


async def close_client(nc: Client | None) -> None:
    if nc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


def to_received(subject: str, data: bytes, headers: dict[str, str] | None) -> Received:
    h = dict(headers or {})
    return Received(subject, data, h.get(KEY_HEADER), h)


async def read_stream(nc: Client, stream: str) -> list[Received]:
    """Every message stored in ``stream``, in stream order."""
    jsm = nc.jsm(timeout=5)
    info = await jsm.stream_info(stream)
    first, last = info.state.first_seq, info.state.last_seq
    out: list[Received] = []
    seqs = list(range(first, last + 1)) if info.state.messages else []
    for i in range(0, len(seqs), 64):
        chunk = await asyncio.gather(*(jsm.get_msg(stream, s) for s in seqs[i:i + 64]))
        out += [to_received(m.subject or "", m.data or b"", m.headers) for m in chunk]
    return out


async def delete_stream(url: str, stream: str) -> None:
    with contextlib.suppress(Exception):
        nc = await client(url, max_reconnect_attempts=1)
        try:
            await nc.jsm(timeout=5).delete_stream(stream)
        finally:
            await close_client(nc)


#: a body over 1 MiB: larger than the broker or sink limit of these tests
OVERSIZED_BODY = b'"' + b"x" * 1_100_000 + b'"'


class CoreProbe(BusProbe):
    """A core-NATS subscriber. Across a server restart it reconnects and re-subscribes
    (nats-py does it), and ``drop_connections`` returns only once it did, so what the
    sink publishes after the restart reaches it."""

    delivers_keys = True
    exact_bodies = True

    def __init__(self, url: str, server: NatsServer | None = None, **connect: Any) -> None:
        self.url = url
        self.server = server
        self.connect_kw = connect
        self.nc: Client | None = None
        self.got: list[Received] = []
        self._reconnected = asyncio.Event()

    async def _client(self) -> Client:
        if self.nc is None:
            async def on_reconnect() -> None:
                self._reconnected.set()

            self.nc = await client(self.url, reconnected_cb=on_reconnect, **self.connect_kw)
        return self.nc

    async def subscribe(self, topic: str) -> None:
        nc = await self._client()

        async def on_msg(msg: Msg) -> None:
            self.got.append(to_received(msg.subject, msg.data, msg.headers))

        await nc.subscribe(topic, cb=on_msg)
        await nc.flush(5)

    async def received(self, count: int, timeout: float) -> list[Received]:
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(self.got) >= count, timeout)
        return list(self.got)

    async def drop_connections(self) -> bool:
        if self.server is None:
            return False
        nc = await self._client()
        self._reconnected.clear()
        await asyncio.to_thread(self.server.restart)
        await asyncio.wait_for(self._reconnected.wait(), 20)
        await nc.flush(5)
        return True

    async def close(self) -> None:
        await close_client(self.nc)

    def refusing(self, batch: Sequence[Message]) -> tuple[list[Message], list[int]] | None:
        """Every third message made larger than the server's max_payload (1 MiB)."""
        return refusing_every_third(batch, lambda m: replace(m, body=OVERSIZED_BODY))

    def bus_address(self) -> tuple[str, int] | None:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 4222

    def options_via(
        self, options: Mapping[str, Any], host: str, port: int,
    ) -> dict[str, Any] | None:
        return {**options, "servers": f"nats://{host}:{port}", "connect_timeout_s": 1.0,
                "flush_timeout_s": 1.5, "ping_interval_s": 1.0}


class StreamProbe(CoreProbe):
    """A JetStream consumer: ``subscribe`` creates a file-store stream capturing the
    topic; ``received`` reads what the stream stored, which survives a restart of the
    (private) server, so nothing published while the probe was away is missed."""

    stream: str | None = None
    streams: tuple[str, ...] = ()
    #: the driver sets Nats-Msg-Id with JetStream; the stream's duplicate window drops
    #: a retried batch
    idempotent = True

    # Only a stream keeps what is published while this probe is away: core NATS would
    # drop what the sink sends between the restart and the probe's resubscription.
    async def stop_bus(self) -> bool:
        if self.server is None:
            return False
        await self._client()
        self._reconnected.clear()
        self.server.kill()
        return True

    async def start_bus(self) -> None:
        assert self.server is not None
        nc = await self._client()
        await asyncio.to_thread(self.server.start)
        await asyncio.wait_for(self._reconnected.wait(), 20)
        await nc.flush(5)

    async def subscribe(self, topic: str) -> None:
        nc = await self._client()
        self.stream = f"CONFORMANCE_{uuid.uuid4().hex[:10]}"
        config = StreamConfig(name=self.stream, subjects=[topic], storage=StorageType.FILE,
                              duplicate_window=60)
        await nc.jsm(timeout=5).add_stream(config)
        self.streams += (self.stream,)

    async def received(self, count: int, timeout: float) -> list[Received]:
        assert self.stream is not None
        nc = await self._client()
        deadline = time.monotonic() + timeout
        while True:
            got = [r for stream in self.streams for r in await read_stream(nc, stream)]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for stream in self.streams:
            await delete_stream(self.url, stream)
        await super().close()


def make_sink(name: str = "nats-test", **options: Any) -> NatsSink:
    return NatsSink(name, NatsOptions.model_validate(options))


# ---------------------------------------------------------------------------
# the conformance suite, core NATS and JetStream

FAST = {"ping_interval_s": 1.0, "connect_timeout_s": 2.0, "flush_timeout_s": 5.0}


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, nats_servers: Callable[..., NatsServer],
) -> tuple[str, NatsServer | None]:
    """The shared server, except for the reconnect test, which restarts a private one."""
    if request.node.name.startswith("test_reconnect"):
        server = nats_servers()
        return server.url, server
    url: str = request.getfixturevalue("nats_url")
    return url, None


def nats_secret(sentinel: str) -> dict[str, Any]:
    return {"user": "conformance", "password": sentinel}


class TestNatsCoreConformance(SinkConformance):
    driver = NatsSink

    def secret_options(self, sentinel: str) -> dict[str, Any] | None:
        return nats_secret(sentinel)

    @pytest.fixture
    def options(self, broker: tuple[str, NatsServer | None]) -> dict[str, Any]:
        return {"servers": broker[0], **FAST}

    @pytest.fixture
    async def probe(self, broker: tuple[str, NatsServer | None]) -> AsyncIterator[BusProbe]:
        p = CoreProbe(*broker)
        yield p
        await p.close()


@pytest.fixture
def js_broker(
    request: pytest.FixtureRequest, nats_servers: Callable[..., NatsServer],
) -> tuple[str, NatsServer | None]:
    """Like ``broker``, for a server with JetStream (private for the outage test too)."""
    if request.node.name.startswith(("test_reconnect", "test_publishing_during")):
        server = nats_servers()
        return server.url, server
    url: str = request.getfixturevalue("nats_js_url")
    return url, None


class TestNatsJetStreamConformance(SinkConformance):
    driver = NatsSink

    def secret_options(self, sentinel: str) -> dict[str, Any] | None:
        return nats_secret(sentinel)

    @pytest.fixture
    def options(self, js_broker: tuple[str, NatsServer | None]) -> dict[str, Any]:
        return {"servers": js_broker[0], "jetstream": True, **FAST}

    @pytest.fixture
    async def probe(self, js_broker: tuple[str, NatsServer | None]) -> AsyncIterator[BusProbe]:
        p = StreamProbe(*js_broker)
        yield p
        await p.close()


# ---------------------------------------------------------------------------
# end to end: simulator -> Bridge -> NATS -> an independent consumer


async def run_bridge(text: str, done: Callable[[Bridge], bool], timeout: float) -> Bridge:
    """Run a bridge built from ``text`` until ``done(bridge)``, then stop it (drained)."""
    bridge = Bridge(parse_config(text, env={}))
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await wait_until(lambda: task.done() or done(bridge), timeout, "bridge condition")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return bridge


def e2e_config(sim: Simulator, url: str, prefix: str, fmt: str, extra: str = "") -> str:
    return f"""
source:
  url: {sim.url}
  api_key: test-key
  tickers: [BTC/USD, ETH/USD]
  equities: [BRK.B, AAPL]
sinks:
  bus:
    driver: nats
    servers: {url}
    format: {fmt}
    ping_interval_s: 1
    {extra}
routes:
  - sinks: [bus]
    topic: "{prefix}.{{kind}}.{{symbol}}"
    key: "{{symbol}}"
http: {{enabled: false}}
shutdown_timeout_s: 5
"""


SUBJECTS = {
    "BTC/USD": "ticker.BTC/USD", "ETH/USD": "ticker.ETH/USD",
    "BRK.B": "equity.BRK_B", "AAPL": "equity.AAPL",
}


def check_message(r: Received, prefix: str, fmt: str, sim: Simulator) -> str:
    """Check one received message in format ``fmt``; return its symbol."""
    body = orjson.loads(r.body)
    h = r.headers
    if fmt == "cloudevents-json":
        assert h["content-type"] == "application/cloudevents+json"
        assert not any(k.startswith("ce-") for k in h)
        symbol = body["subject"]
        kind = body["data"]["kind"]
        assert body["specversion"] == "1.0"
        assert body["type"] == f"ai.aleno.{kind}.v1"
        assert body["source"] == f"{sim.url}/v1/socket"
        assert body["id"] == f"{kind}:{symbol}:{body['data']['sentTimestampMs']}"
        assert body["data"]["symbol"] == symbol
    elif fmt == "cloudevents-binary":
        assert h["content-type"] == "application/json"
        symbol = h["ce-subject"]
        kind = body["kind"]
        assert h["ce-specversion"] == "1.0"
        assert h["ce-type"] == f"ai.aleno.{kind}.v1"
        assert h["ce-source"] == f"{sim.url}/v1/socket"
        assert h["ce-id"] == f"{kind}:{symbol}:{body['sentTimestampMs']}"
        assert h["ce-time"].endswith("Z")
        assert body["symbol"] == symbol and "specversion" not in body
    else:
        assert h["content-type"] == "application/json"
        assert not any(k.startswith("ce-") for k in h)
        # the upstream record as Aleno sent it: tickers carry "id", equities "symbol"
        symbol = body.get("id") or body["symbol"]
        assert "sentTimestampMs" in body and "data" not in body
    assert r.key == symbol, "the route key travels in the aleno-key header"
    assert r.topic == f"{prefix}.{SUBJECTS[symbol]}"
    return str(symbol)


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary", "raw"])
async def test_end_to_end_core(fmt: str, simulator: Simulator, nats_url: str) -> None:
    prefix = f"aleno-e2e.{uuid.uuid4().hex[:8]}"
    probe = CoreProbe(nats_url)
    await probe.subscribe(f"{prefix}.>")
    try:
        def all_symbols(_b: Bridge) -> bool:
            return len({r.topic for r in probe.got}) == len(SUBJECTS) and len(probe.got) >= 8

        await run_bridge(e2e_config(simulator, nats_url, prefix, fmt), all_symbols, 20)
    finally:
        await probe.close()
    seen = {check_message(r, prefix, fmt, simulator) for r in probe.got}
    assert seen == set(SUBJECTS)
    assert not any("Nats-Msg-Id" in r.headers for r in probe.got)


async def test_end_to_end_jetstream_creates_the_stream(
    simulator: Simulator, nats_js_url: str,
) -> None:
    """JetStream mode with ``stream:``: the sink creates the stream, every stored
    message carries ``Nats-Msg-Id`` = the CloudEvents id."""
    tag = uuid.uuid4().hex[:8]
    prefix, stream = f"aleno-e2e-js.{tag}", f"ALENO_E2E_{tag}"
    extra = (f"jetstream: true\n    stream: {{name: {stream}, subjects: ['{prefix}.>'], "
             "max_age_s: 600, storage: memory}")
    nc = await client(nats_js_url)
    try:
        bridge = await run_bridge(
            e2e_config(simulator, nats_js_url, prefix, "cloudevents-binary", extra),
            lambda b: b.workers["bus"].stats.published >= 12, 20,
        )
        got = await read_stream(nc, stream)
    finally:
        await delete_stream(nats_js_url, stream)
        await close_client(nc)
    assert len(got) == bridge.workers["bus"].stats.published
    for r in got:
        check_message(r, prefix, "cloudevents-binary", simulator)
        assert r.headers["Nats-Msg-Id"] == r.headers["ce-id"]


# ---------------------------------------------------------------------------
# JetStream: dedup, stream creation


async def test_jetstream_dedups_a_replayed_batch(nats_js_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    subject, stream = f"aleno-dedup.{tag}", f"ALENO_DEDUP_{tag}"
    stream_opts = {"name": stream, "subjects": [subject], "storage": "memory"}
    batch = messages(sample_events(symbols=5, updates=6), subject, "cloudevents-json")
    sink = make_sink(servers=nats_js_url, jetstream=True, stream=stream_opts)
    again = make_sink(servers=nats_js_url, jetstream=True, stream=stream_opts)
    nc = await client(nats_js_url)
    try:
        await sink.connect()
        await sink.publish(batch)
        await sink.publish(batch)  # a retried batch
        await again.connect()  # another replica: same stream settings are fine
        await again.publish(batch[:10])
        info = await nc.jsm().stream_info(stream)
        stored = await read_stream(nc, stream)
    finally:
        await sink.close()
        await again.close()
        await delete_stream(nats_js_url, stream)
        await close_client(nc)
    assert info.state.messages == len(batch)
    assert [r.headers["Nats-Msg-Id"] for r in stored] == [m.id for m in batch]


async def test_stream_with_other_settings_is_a_clear_error(nats_js_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    stream = f"ALENO_OTHER_{tag}"
    first = make_sink(servers=nats_js_url, jetstream=True,
                      stream={"name": stream, "subjects": [f"o.{tag}"], "storage": "memory"})
    second = make_sink(servers=nats_js_url, jetstream=True,
                       stream={"name": stream, "subjects": [f"o.{tag}"], "storage": "memory",
                               "max_age_s": 3600})
    try:
        await first.connect()
        with pytest.raises(SinkError) as info:
            await second.connect()
    finally:
        await first.close()
        await second.close()
        await delete_stream(nats_js_url, stream)
    assert "exists with other settings" in str(info.value)
    assert second.is_retriable(info.value)


async def test_no_stream_for_the_subject_is_retriable(nats_js_url: str) -> None:
    sink = make_sink(servers=nats_js_url, jetstream=True, flush_timeout_s=3)
    batch = messages(sample_events(symbols=1, updates=2), f"aleno-nostream.{uuid.uuid4().hex}")
    try:
        await sink.connect()
        with pytest.raises(SinkError) as info:
            await sink.publish(batch)
    finally:
        await sink.close()
    assert "no JetStream stream captures subject" in str(info.value)
    assert sink.is_retriable(info.value)


# ---------------------------------------------------------------------------
# refusals, bounded waits


async def test_too_large_is_rejected_and_the_rest_delivered(nats_url: str) -> None:
    topic = unique_topic()
    probe = CoreProbe(nats_url)
    await probe.subscribe(topic)
    sink = make_sink(servers=nats_url)
    batch = messages(sample_events(symbols=3, updates=1), topic)
    batch[1].body = b"x" * (2 * 1024 * 1024)
    try:
        await sink.connect()
        with pytest.raises(SinkRejectedError) as info:
            await sink.publish(batch)
        got = await probe.received(2, 5)
    finally:
        await sink.close()
        await probe.close()
    assert not sink.is_retriable(info.value)
    assert batch[1].id in str(info.value) and "max_payload" in str(info.value)
    assert {r.envelope()["id"] for r in got} == {batch[0].id, batch[2].id}


def open_fds() -> int:
    """File descriptors this process holds (Linux)."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc/self/fd")
    return len(list(fd_dir.iterdir()))


async def test_a_dead_server_fails_publish_fast_and_close_is_bounded(
    nats_servers: Callable[..., NatsServer],
) -> None:
    """No nats-py pending buffer: with the server gone, publish fails at once
    (retriable) instead of "succeeding" into a client-side buffer."""
    server = nats_servers(jetstream=False)
    sink = make_sink(servers=server.url, flush_timeout_s=5)
    batch = messages(sample_events(symbols=2, updates=2), unique_topic())
    fds = open_fds()
    await sink.connect()
    await sink.publish(batch)
    server.kill()
    started = time.monotonic()
    with pytest.raises(SinkConnectionError) as info:
        for _ in range(50):  # the first may still be written before the socket closes
            await sink.publish(batch)
            await asyncio.sleep(0.05)
    failed_after = time.monotonic() - started
    started = time.monotonic()
    await sink.close()
    await sink.close()
    closed_after = time.monotonic() - started
    await asyncio.sleep(0.1)  # sockets are released on the next loop iterations
    assert open_fds() <= fds, "the closed sink left a socket open"
    assert sink.is_retriable(info.value)
    assert failed_after < 3.0, failed_after
    assert closed_after < 3.0, closed_after
    with pytest.raises(SinkConnectionError):
        await sink.publish(batch)


async def test_connect_to_a_silent_server_is_bounded() -> None:
    """A peer that accepts TCP but never speaks NATS must not hang connect()."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = make_sink(servers=f"nats://127.0.0.1:{port}", connect_timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(SinkConnectionError) as info:
            await sink.connect()
    finally:
        await sink.close()
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 4.0
    assert "nats-test" in str(info.value)


async def test_unreachable_server_names_the_cause(nats_servers: Callable[..., NatsServer]) -> None:
    server = nats_servers(jetstream=False)
    server.stop()
    sink = make_sink(servers=server.url)
    with pytest.raises(SinkConnectionError) as info:
        await sink.connect()
    await sink.close()
    assert "nats-test" in str(info.value) and server.url in str(info.value)
    assert "Connect call failed" in str(info.value) or "refused" in str(info.value).lower()


# ---------------------------------------------------------------------------
# authentication and TLS (private servers)

PASSWORD = "correct-Horse-9"
WRONG = "wrong-Battery-7"


async def test_user_password(nats_servers: Callable[..., NatsServer]) -> None:
    server = nats_servers(jetstream=False, args=["--user", "alice", "--pass", PASSWORD])
    topic = unique_topic()
    probe = CoreProbe(server.url, user="alice", password=PASSWORD)
    await probe.subscribe(topic)
    sink = make_sink(servers=server.url, user="alice", password=PASSWORD)
    batch = messages(sample_events(symbols=2, updates=2), topic)
    try:
        await sink.connect()
        await sink.publish(batch)
        got = await probe.received(len(batch), 5)
    finally:
        await sink.close()
        await probe.close()
    assert [r.envelope()["id"] for r in got] == [m.id for m in batch]


async def test_wrong_password_is_a_clear_error_without_the_password(
    nats_servers: Callable[..., NatsServer], caplog: pytest.LogCaptureFixture,
) -> None:
    server = nats_servers(jetstream=False, args=["--user", "alice", "--pass", PASSWORD])
    caplog.set_level(logging.DEBUG)
    sink = make_sink("nats-auth", servers=server.url, user="alice", password=WRONG)
    with pytest.raises(SinkConnectionError) as info:
        await sink.connect()
    await sink.close()
    text = str(info.value)
    assert "nats-auth" in text and "refused the credentials" in text
    assert WRONG not in text and PASSWORD not in text

    # the runner's state line for the same failure
    retry = RetryConfig(initial_backoff_s=0.1, max_backoff_s=0.2)
    common = SinkCommon(driver="nats", retry=retry)
    worker = SinkWorker(SinkSpec("nats-auth", common, NatsSink, sink.options), sink)
    worker.start()
    try:
        await wait_until(lambda: worker.stats.connects == 0 and worker.state == "failing", 10)
        await asyncio.sleep(0.5)  # a few retries
    finally:
        await worker.stop(1.0)
    lines = [r.getMessage() for r in caplog.records]
    state = [ln for ln in lines if "nats-auth" in ln and "failing" in ln]
    assert state and "Authorization Violation" in state[0]
    assert len(state) == 1, "the failure is logged once per state change, not per retry"
    for line in lines:
        assert WRONG not in line and PASSWORD not in line


async def test_token(nats_servers: Callable[..., NatsServer]) -> None:
    server = nats_servers(jetstream=False, args=["--auth", "tok-Secret-55"])
    good = make_sink(servers=server.url, token="tok-Secret-55")
    bad = make_sink(servers=server.url, token="tok-Wrong-66")
    try:
        await good.connect()
        await good.publish(messages(sample_events(symbols=1, updates=1), unique_topic()))
        with pytest.raises(SinkConnectionError) as info:
            await bad.connect()
    finally:
        await good.close()
        await bad.close()
    assert "refused the credentials" in str(info.value)
    assert "tok-Wrong-66" not in str(info.value)


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost it signed."""
    tls = make_tls_files(directory)
    return tls.ca, tls.cert, tls.key


async def test_tls(nats_servers: Callable[..., NatsServer], tmp_path: Path) -> None:
    """Publishing over TLS works with ``tls_ca_file``; without it the server's
    certificate fails verification (verification is on by default)."""
    pytest.importorskip("cryptography")
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    server = nats_servers(jetstream=False,
                          args=["--tls", "--tlscert", str(cert), "--tlskey", str(key)])
    import ssl

    probe_ctx = ssl.create_default_context(cafile=str(ca))
    topic = unique_topic()
    probe = CoreProbe(server.url, tls=probe_ctx)
    await probe.subscribe(topic)
    batch = messages(sample_events(symbols=2, updates=2), topic)
    trusted = make_sink(servers=server.url, tls_ca_file=str(ca))
    untrusted = make_sink(servers=f"tls://127.0.0.1:{server.port}")
    unverified = make_sink(servers=server.url, tls_verify=False)
    try:
        await trusted.connect()
        await trusted.publish(batch)
        got = await probe.received(len(batch), 5)
        with pytest.raises(SinkConnectionError) as info:
            await untrusted.connect()
        await unverified.connect()  # explicitly asked for: works, unverified
        await unverified.publish(batch[:1])
    finally:
        for s in (trusted, untrusted, unverified):
            await s.close()
        await probe.close()
    assert [r.envelope()["id"] for r in got] == [m.id for m in batch]
    assert "verification of the server certificate failed" in str(info.value)
    assert "tls_ca_file" in str(info.value)


# ---------------------------------------------------------------------------
# broker outage in a running bridge


async def test_broker_killed_mid_stream(
    simulator: Simulator, nats_servers: Callable[..., NatsServer], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGKILL the NATS server mid-stream and restart it on the same port 3 s later.

    The consumer is the JetStream stream itself, read after the fact: its file store
    (in tmp_path, fsynced on every write) survives the kill, so a message the stream
    acknowledged before the kill, and every message published after the restart,
    are there to be counted, whether or not any subscriber was connected at the time.
    A core subscriber would miss whatever was published while it was reconnecting.

    Checked: the bridge reconnects by itself; the jsonl sink of the same bridge keeps
    publishing during the outage (a dead bus never stalls another sink); every
    envelope the bridge produced (the jsonl file holds them all), including those
    produced during the outage, is in the stream at least once. Duplicates are
    counted and reported, not forbidden (JetStream dedup by Nats-Msg-Id should make
    them zero).
    """
    server = nats_servers(jetstream=True, name="outage")
    tag = uuid.uuid4().hex[:8]
    prefix, stream = f"aleno-outage.{tag}", f"ALENO_OUTAGE_{tag}"
    jsonl = tmp_path / "all.jsonl"
    text = f"""
source: {{url: {simulator.url}, api_key: test-key, tickers: [BTC/USD, ETH/USD, SOL/USD],
          equities: [AAPL, MSFT]}}
sinks:
  bus:
    driver: nats
    servers: {server.url}
    jetstream: true
    stream: {{name: {stream}, subjects: ["{prefix}.>"], duplicate_window_s: 120}}
    ping_interval_s: 1
    connect_timeout_s: 1
    flush_timeout_s: 2
    buffer: {{max_events: 100000, when_full: drop_oldest}}
    batch: {{max_events: 50, linger_ms: 0}}
    retry: {{initial_backoff_s: 0.1, max_backoff_s: 0.5, publish_timeout_s: 3,
             connect_timeout_s: 3}}
  file:
    driver: jsonl
    path: {jsonl}
routes:
  - sinks: [bus, file]
    topic: "{prefix}.{{kind}}.{{symbol}}"
http: {{enabled: false}}
shutdown_timeout_s: 10
"""
    bridge = Bridge(parse_config(text, env={}))
    bus, file = bridge.workers["bus"], bridge.workers["file"]
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    file_growth: list[int] = []
    try:
        await wait_until(lambda: bus.stats.published >= 20 or task.done(), 20, "first publishes")
        await asyncio.to_thread(server.kill)
        file_at_kill = file.stats.published
        for _ in range(6):  # 3 s of outage
            await asyncio.sleep(0.5)
            file_growth.append(file.stats.published)
        bus_during = bus.stats.published
        await asyncio.to_thread(server.start)
        file_at_restart = file.stats.published
        await wait_until(lambda: bus.stats.reconnects >= 1 or task.done(), 20, "reconnect")
        # let the backlog drain and a little more flow through the healthy link
        await wait_until(lambda: (bus.depth == 0 and bus.stats.published > file_at_restart)
                         or task.done(), 30, "backlog drained")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    nc = await client(server.url)
    try:
        stored = await read_stream(nc, stream)
    finally:
        await close_client(nc)

    produced = [orjson.loads(line)["id"] for line in jsonl.read_bytes().splitlines()]
    during = produced[file_at_kill:file_at_restart]
    counts = Counter(r.headers["Nats-Msg-Id"] for r in stored)
    missing = [i for i in produced if i not in counts]
    duplicates = sum(n - 1 for n in counts.values())
    with capsys.disabled():
        print(f"\n[nats outage] produced={len(produced)} during_outage={len(during)} "
              f"stored={len(stored)} missing={len(missing)} duplicates={duplicates} "
              f"reconnects={bus.stats.reconnects} failed_batches={bus.stats.failed_batches}")
    assert file_growth[-1] > file_at_kill + 10, f"the jsonl sink stalled: {file_growth}"
    assert file_growth == sorted(file_growth) and len(set(file_growth)) > 3
    assert bus_during <= file_at_kill + 50, "nothing can be acknowledged by a dead server"
    assert bus.stats.reconnects >= 1
    assert len(during) >= 10
    assert not missing, f"{len(missing)} envelope(s) never reached the stream: {missing[:5]}"
    assert bus.stats.dropped == {} and file.stats.dropped == {}
    assert all(r.topic.startswith(prefix) for r in stored)


# ---------------------------------------------------------------------------
# permissions and TLS downgrade

PERMISSIONS = """
authorization {
  users = [
    {user: pub, password: pub-Secret-1,
     permissions: {publish: ["allowed.>", "$JS.API.>"], subscribe: ["_INBOX.>"]}}
    {user: all, password: all-Secret-2}
  ]
}
"""


@pytest.mark.parametrize("jetstream", [False, True], ids=["core", "jetstream"])
async def test_a_denied_subject_is_rejected_and_the_rest_delivered(
    jetstream: bool, nats_servers: Callable[..., NatsServer],
) -> None:
    """A publish permission violation comes back as -ERR (the connection stays up):
    the driver refuses those messages for good, after delivering the others.

    Repeated: nats-py's ``flush()`` PING can overtake publishes still in its buffer
    (then the PONG arrives before the -ERR); the driver must not be fooled by that.
    """
    server = nats_servers(jetstream=jetstream, config=PERMISSIONS)
    tag = uuid.uuid4().hex[:8]
    probe = (StreamProbe if jetstream else CoreProbe)(server.url, user="all",
                                                      password="all-Secret-2")
    await probe.subscribe(f"allowed.{tag}")
    sink = make_sink(servers=server.url, user="pub", password="pub-Secret-1",
                     jetstream=jetstream, flush_timeout_s=3)
    ok = messages(sample_events(symbols=2, updates=2), f"allowed.{tag}")
    denied = messages(sample_events(symbols=1, updates=2, start_ms=1_800_000_000_000),
                      f"Denied.{tag}")
    try:
        await sink.connect()
        for _ in range(20):
            with pytest.raises(SinkRejectedError) as info:
                await sink.publish([ok[0], denied[0], *ok[1:], denied[1]])
        got = await probe.received(len(ok), 5)
        await sink.publish(ok)  # the connection survived the refusals
    finally:
        await sink.close()
        await probe.close()
    assert not sink.is_retriable(info.value)
    assert "2 of 6" in str(info.value) and "permission denied" in str(info.value)
    assert f"Denied.{tag}" in str(info.value)
    assert {r.envelope()["id"] for r in got} == {m.id for m in ok}


async def test_tls_configured_against_a_plain_server_is_refused(
    nats_servers: Callable[..., NatsServer], tmp_path: Path,
) -> None:
    """nats-py upgrades to TLS only when the server requires it; asking for TLS must
    never end in a plain-text connection."""
    ca, _cert, _key = make_ca_and_server_cert(tmp_path)
    server = nats_servers(jetstream=False)
    sink = make_sink(servers=server.url, tls_ca_file=str(ca))
    with pytest.raises(SinkConnectionError) as info:
        await sink.connect()
    await sink.close()
    assert "does not require TLS" in str(info.value)
    with pytest.raises(SinkConnectionError):
        await sink.publish(messages(sample_events(symbols=1, updates=1), unique_topic()))


# the frozen-server test's settings; every bound it checks is derived from them
PING_INTERVAL_S = 0.2
MAX_OUTSTANDING_PINGS = 2
FLUSH_TIMEOUT_S = 1.0
#: nats-py sends a PING every ping_interval_s and declares the link stale at the tick
#: that would exceed max_outstanding_pings unanswered ones: at most this long after the
#: last PONG (the first tick comes at most one interval after it)
STALE_AFTER_S = PING_INTERVAL_S * (MAX_OUTSTANDING_PINGS + 1)
#: what a loaded machine (2 cores, a busy loop on one) may add to any bound: the test's
#: event loop and nats-py's ping timer wait for a CPU like everything else
SLACK_S = 1.5


async def test_a_frozen_server_is_detected_by_pings_and_never_hangs(
    nats_servers: Callable[..., NatsServer],
) -> None:
    """SIGSTOP: the TCP connection stays open but nothing answers (a dead link that
    no RST reveals). A publish gives up after ``flush_timeout_s``; left idle, the
    sink's pings notice within ``ping_interval_s * (max_outstanding_pings + 1)`` and
    the next publish fails at once; ``close()`` stays bounded by ``CLOSE_TIMEOUT_S``.

    ``signal_stop`` returns once every thread of the server is stopped: ``kill()``
    alone returns earlier, and a server still answering the PING of the flush made
    the first publish succeed (the flaky ``DID NOT RAISE``)."""
    server = nats_servers(jetstream=False)
    sink = make_sink(servers=server.url, ping_interval_s=PING_INTERVAL_S,
                     max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                     flush_timeout_s=FLUSH_TIMEOUT_S)
    batch = messages(sample_events(symbols=2, updates=2), unique_topic())
    await sink.connect()
    await sink.publish(batch)
    server.signal_stop()
    # the last PONG the sink can ever get was sent before this point
    frozen_at = time.monotonic()
    try:
        started = time.monotonic()
        with pytest.raises(SinkConnectionError):
            await sink.publish(batch)
        assert time.monotonic() - started < FLUSH_TIMEOUT_S + SLACK_S
        # idle until the pings must have given up, then the publish fails without waiting
        await asyncio.sleep(max(0.0, frozen_at + STALE_AFTER_S + SLACK_S - time.monotonic()))
        started = time.monotonic()
        with pytest.raises(SinkConnectionError) as info:
            await sink.publish(batch)
        assert time.monotonic() - started < FLUSH_TIMEOUT_S / 2, "it waited"
        assert "not connected" in str(info.value)
        started = time.monotonic()
        await sink.close()
        assert time.monotonic() - started < CLOSE_TIMEOUT_S + SLACK_S
    finally:
        server.signal_continue()
