"""The example third-party plugin ``aleno-bridge-webhook`` (plugins/examples/webhook),
installed as its own distribution and found only through its entry point.

Everything runs against a real aiohttp server on 127.0.0.1 (:class:`HookServer`) that
records every POST and answers scripted statuses; nothing the sink sends is mocked.
The plugin must be installed first: ``pip install ./plugins/examples/webhook``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from bridge.app import Bridge
from bridge.config import Settings, parse_config
from bridge.simulator import Simulator
from bridge.sinks import SinkConnectionError
from bridge.testing import wait_until
from bridge.testing.conformance import BusProbe, Received, SinkConformance
from bridge.testing.sample import messages, sample_events
from tests.support.bridges import config_text as _config
from tests.support.proc import venv_bin

NOT_INSTALLED = (
    "the example plugin is not installed in this environment: run "
    "`pip install ./plugins/examples/webhook` (from the repository root) first"
)

try:
    from aleno_bridge_webhook import WebhookOptions, WebhookSink
except ImportError:  # every test below then fails with NOT_INSTALLED (never skips)
    WebhookOptions = WebhookSink = None

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _plugin_is_installed(request: pytest.FixtureRequest) -> None:
    """Every test needs the installed plugin (tests/drivers/webhook/test_webhook_unit.py's
    discovery test reports it itself)."""
    if WebhookSink is None:
        pytest.fail(NOT_INSTALLED, pytrace=False)

TOKEN = "whk-8f3e1c0d-secret-token"
BATCH_TYPE = "application/cloudevents-batch+json"


# ---------------------------------------------------------------------------
# A real webhook endpoint


@dataclass
class Post:
    """One request the endpoint received, and the status it answered."""

    path: str
    status: int
    topic: str
    content_type: str
    authorization: str | None
    headers: Mapping[str, str]
    items: list[Any]


class HookServer:
    """An HTTP endpoint on 127.0.0.1 that records every POST.

    ``script`` holds the statuses to answer next, in order; once it is empty every
    request gets 200. ``delay_s`` holds every answer back. :meth:`restart` closes every
    connection and binds the same port again.
    """

    def __init__(self) -> None:
        self.port = 0
        self.posts: list[Post] = []
        self.script: deque[int] = deque()
        #: seconds to wait before answering (a hung endpoint)
        self.delay_s = 0.0
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server: Any = site._server
            self.port = int(server.sockets[0].getsockname()[1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.script.popleft() if self.script else 200
        self.posts.append(Post(
            path=request.path,
            status=status,
            topic=request.headers.get("X-Aleno-Topic", ""),
            content_type=request.content_type,
            authorization=request.headers.get("Authorization"),
            headers=dict(request.headers),
            items=orjson.loads(body),
        ))
        return web.Response(status=status)

    def accepted(self, path: str = "/hook") -> list[Post]:
        return [p for p in self.posts if p.path == path and 200 <= p.status < 300]

    def accepted_items(self, path: str = "/hook") -> list[Any]:
        return [item for p in self.accepted(path) for item in p.items]


@pytest.fixture
async def hook_server() -> AsyncIterator[HookServer]:
    server = HookServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---------------------------------------------------------------------------
# (a), (b) discovery through the entry point only


def test_cli_lists_the_plugin() -> None:
    exe = venv_bin("aleno-bridge")
    argv = [exe, "plugins"] if exe else [sys.executable, "-m", "bridge", "plugins"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if " webhook " in line]
    assert rows, f"webhook missing from `aleno-bridge plugins`:\n{done.stdout}"
    assert "aleno-bridge-webhook" in rows[0] and " ok " in rows[0], rows[0]


# ---------------------------------------------------------------------------
# (c) the conformance suite


class HookProbe(BusProbe):
    """Reads what the endpoint accepted: one :class:`Received` per array element, with
    the topic of the request's ``X-Aleno-Topic`` header."""

    delivers_keys = False  # the webhook sends no key

    def __init__(self, server: HookServer) -> None:
        self.server = server
        self.topics: set[str] = set()

    async def subscribe(self, topic: str) -> None:
        self.topics.add(topic)

    def _got(self) -> list[Received]:
        return [
            Received(topic=p.topic, body=orjson.dumps(item), headers=p.headers)
            for p in self.server.accepted()
            if p.topic in self.topics
            for item in p.items
        ]

    async def received(self, count: int, timeout: float) -> list[Received]:
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(self._got()) >= count, timeout, "probe")
        return self._got()

    async def drop_connections(self) -> bool:
        await self.server.restart()
        return True

    async def stop_bus(self) -> bool:
        await self.server.stop()
        return True

    async def start_bus(self) -> None:
        await self.server.start()

    def bus_address(self) -> tuple[str, int] | None:
        return "127.0.0.1", self.server.port

    def options_via(
        self, options: Mapping[str, Any], host: str, port: int,
    ) -> dict[str, Any] | None:
        return {**options, "url": f"http://{host}:{port}/hook", "timeout_s": 1.0}


class TestWebhookConformance(SinkConformance):
    driver = WebhookSink

    def secret_options(self, sentinel: str) -> dict[str, Any] | None:
        return {"auth_token": sentinel}

    @pytest.fixture
    def options(self, hook_server: HookServer) -> dict[str, Any]:
        return {"url": hook_server.url(), "auth_token": TOKEN, "timeout_s": 5.0}

    @pytest.fixture
    def secret_values(self) -> list[str]:
        return [TOKEN]

    @pytest.fixture
    async def probe(self, hook_server: HookServer) -> AsyncIterator[BusProbe]:
        probe = HookProbe(hook_server)
        yield probe
        await probe.close()


# ---------------------------------------------------------------------------
# configurations of the tests below (options, formats and the topic rule without
# an endpoint: tests/drivers/webhook/test_webhook_unit.py)


# ---------------------------------------------------------------------------
# (d) end to end: simulator -> Bridge -> webhook


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Bridge]:
    """A bridge running in this event loop; stopped (drained) on exit."""
    bridge = Bridge(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15.0)
        finally:
            if not task.done():
                task.cancel()


async def test_end_to_end_simulator_to_webhook(
    simulator: Simulator, hook_server: HookServer
) -> None:
    sinks = (
        f"  hook: {{driver: webhook, url: '{hook_server.url('/hook')}', auth_token: {TOKEN},"
        " batch: {max_events: 100, linger_ms: 20}}\n"
        f"  hook_raw: {{driver: webhook, url: '{hook_server.url('/raw')}', format: raw,"
        " headers: {X-Tenant: acme}}"
    )
    routes = (
        "  - {match: {kind: ticker}, sinks: [hook, hook_raw],"
        " topic: 'prices.{kind}.{base}-{quote}'}\n"
        "  - {match: {kind: equity}, sinks: [hook, hook_raw], topic: 'prices.equity.{symbol}'}"
    )
    settings = parse_config(_config(simulator.url, sinks, routes))
    want = {"BTC/USD", "ETH/USD", "AAPL"}

    def subjects() -> set[str]:
        return {env["subject"] for env in hook_server.accepted_items("/hook")}

    def raw_symbols() -> set[str]:
        return {r.get("symbol", r.get("id")) for r in hook_server.accepted_items("/raw")}

    async with running(settings) as bridge:
        await wait_until(lambda: subjects() == want and raw_symbols() == want, 15.0,
                         "every subscribed symbol on both endpoints")
    assert subjects() == want and raw_symbols() == want  # nothing unsubscribed arrived

    def topic_of(kind: str, symbol: str) -> str:
        return f"prices.ticker.{symbol.replace('/', '-')}" if kind == "ticker" \
            else f"prices.equity.{symbol}"

    for post in hook_server.accepted("/hook"):
        assert post.content_type == BATCH_TYPE
        assert post.authorization == f"Bearer {TOKEN}"
        for env in post.items:
            assert env["specversion"] == "1.0" and env["type"].startswith("ai.aleno.")
            assert post.topic == topic_of(env["data"]["kind"], env["subject"]), post.topic
    for post in hook_server.accepted("/raw"):
        assert post.content_type == "application/json"
        assert post.authorization is None and post.headers.get("X-Tenant") == "acme"
        for rec in post.items:
            is_ticker = "aggregated" in rec
            kind, symbol = ("ticker", rec["id"]) if is_ticker else ("equity", rec["symbol"])
            assert post.topic == topic_of(kind, symbol), post.topic
            assert "specversion" not in rec
    # drained at shutdown: every envelope the workers confirmed is one the endpoint holds
    for name, path in (("hook", "/hook"), ("hook_raw", "/raw")):
        stats = bridge.workers[name].stats
        assert stats.published == len(hook_server.accepted_items(path)) > 0
        assert stats.dropped == {} and stats.failed_batches == 0
    ids = [env["id"] for env in hook_server.accepted_items("/hook")]
    assert len(ids) == len(set(ids)), "an envelope was sent twice without any failure"


# ---------------------------------------------------------------------------
# (e), (f) retriable and rejected answers; the token stays out of repr and logs


def _one_sink(sim_url: str, server: HookServer) -> Settings:
    sinks = (
        f"  hook: {{driver: webhook, url: '{server.url()}', auth_token: {TOKEN}, timeout_s: 2,"
        " batch: {max_events: 100, linger_ms: 20},"
        " retry: {initial_backoff_s: 0.05, max_backoff_s: 0.2}}"
    )
    routes = "  - {match: {kind: ticker}, sinks: [hook], topic: prices}"
    return parse_config(_config(sim_url, sinks, routes, equities="[]"))


def _assert_no_token(caplog: pytest.LogCaptureFixture, bridge: Bridge) -> None:
    sink = bridge.workers["hook"].sink
    assert TOKEN not in repr(sink) + repr(sink.options) + str(sink.options)
    for record in caplog.records:
        assert TOKEN not in record.getMessage(), record.getMessage()
    assert TOKEN not in caplog.text


async def test_5xx_408_429_are_retried_until_the_endpoint_recovers(
    simulator: Simulator, hook_server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    failures = [500, 503, 429, 408]
    hook_server.script.extend(failures)
    routed: list[str] = []
    async with running(_one_sink(simulator.url, hook_server)) as bridge:
        bridge.add_tap(lambda ev: routed.append(ev.id))
        await wait_until(lambda: len(hook_server.accepted()) >= 3, 15.0,
                         "deliveries after recovery")
    stats = bridge.workers["hook"].stats
    assert [p.status for p in hook_server.posts[: len(failures)]] == failures
    first_try = {env["id"] for env in hook_server.posts[0].items}
    delivered = {env["id"] for env in hook_server.accepted_items()}
    assert first_try <= delivered, "a batch answered 5xx was not retried until delivered"
    assert set(routed) <= delivered, "an event was lost"
    assert stats.failed_batches == len(failures)
    assert stats.reconnects >= len(failures)
    assert stats.dropped.get("rejected", 0) == 0
    assert stats.published == len(hook_server.accepted_items())
    assert "answered 500" in caplog.text  # the failure was logged, without the token:
    _assert_no_token(caplog, bridge)


async def test_4xx_drops_the_batch_as_rejected(
    simulator: Simulator, hook_server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hook_server.script.append(400)
    async with running(_one_sink(simulator.url, hook_server)) as bridge:
        await wait_until(lambda: len(hook_server.accepted()) >= 2, 15.0, "deliveries after the 400")
    stats = bridge.workers["hook"].stats
    rejected = hook_server.posts[0]
    assert rejected.status == 400
    assert stats.dropped.get("rejected") == len(rejected.items) > 0
    assert stats.failed_batches == 1
    rejected_ids = {env["id"] for env in rejected.items}
    assert not rejected_ids & {env["id"] for env in hook_server.accepted_items()}, "retried"
    assert stats.published == len(hook_server.accepted_items()) > 0
    assert "answered 400" in caplog.text
    _assert_no_token(caplog, bridge)


async def test_connection_refused_is_retried_and_nothing_is_lost(
    simulator: Simulator, hook_server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    routed: list[str] = []
    async with running(_one_sink(simulator.url, hook_server)) as bridge:
        bridge.add_tap(lambda ev: routed.append(ev.id))
        stats = bridge.workers["hook"].stats
        await wait_until(lambda: stats.published > 0, 15.0, "a first delivery")
        await hook_server.stop()  # nothing listens on the port: connection refused
        failed = stats.failed_batches
        # the first publish fails, then connect() finds the endpoint still down
        await wait_until(lambda: stats.failed_batches > failed and stats.connect_failures >= 1,
                         10.0, "failing while down")
        before = len(hook_server.accepted())
        await hook_server.start()
        await wait_until(lambda: len(hook_server.accepted()) >= before + 2, 15.0,
                         "delivering again")
    delivered = {env["id"] for env in hook_server.accepted_items()}
    assert set(routed) <= delivered, f"{len(set(routed) - delivered)} event(s) lost"
    assert stats.dropped == {}
    assert stats.reconnects >= 1 and stats.connect_failures >= 1
    assert "ClientConnectorError" in caplog.text or "failed:" in caplog.text
    _assert_no_token(caplog, bridge)


async def test_a_hung_endpoint_times_out_as_retriable(hook_server: HookServer) -> None:
    hook_server.delay_s = 3.0
    sink = WebhookSink("hung", WebhookOptions(url=hook_server.url(), timeout_s=0.3))
    batch = messages(sample_events(symbols=2, updates=1), "prices")
    started = time.monotonic()
    try:
        await sink.connect()
        with pytest.raises(SinkConnectionError, match=r"did not answer within 0\.3s") as err:
            await asyncio.wait_for(sink.publish(batch), 5.0)
        assert sink.is_retriable(err.value)
    finally:
        await asyncio.wait_for(sink.close(), 5.0)
    assert time.monotonic() - started < 2.0
