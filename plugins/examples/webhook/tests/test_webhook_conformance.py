"""The webhook driver against aleno-bridge's conformance suite, on a real HTTP server.

This is the test module of a plugin that lives in its own distribution: copy it, swap
:class:`HookServer` for your bus (a broker the fixture starts, or one already running)
and :class:`HookProbe` for a consumer written with your bus's own client library, never
with your driver. It needs nothing from aleno-bridge's own test tree::

    pip install 'aleno-bridge[testing]' ./plugins/examples/webhook
    cd plugins/examples/webhook && pytest -q

aleno-bridge's own ``make test`` runs it too (``testpaths`` in its pyproject.toml).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aleno_bridge_webhook import WebhookSink

from bridge.sinks import Message
from bridge.testing import until
from bridge.testing.conformance import (
    BusProbe,
    Received,
    SinkConformance,
    refusing_every_third,
)

TOKEN = "whk-3b9d-conformance-secret"

# ---------------------------------------------------------------------------
# the bus: a real HTTP endpoint on 127.0.0.1


@dataclass
class Post:
    """One request the endpoint received, and the status it answered."""

    path: str
    status: int
    topic: str
    headers: Mapping[str, str]
    items: list[Any]


class HookServer:
    """An HTTP endpoint that records every POST; ``script`` holds the statuses to answer
    next (then 200); :meth:`stop` / :meth:`start` take it down and bring it back on the
    same port."""

    def __init__(self) -> None:
        self.port = 0
        self.posts: list[Post] = []
        self.script: list[int] = []
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

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.script.pop(0) if self.script else 200
        if request.headers.get("X-Aleno-Topic", "").startswith(REFUSED_PREFIX):
            status = 422  # this endpoint refuses these topics for good
        self.posts.append(Post(request.path, status, request.headers.get("X-Aleno-Topic", ""),
                               dict(request.headers), orjson.loads(body)))
        return web.Response(status=status)

    def accepted(self) -> list[Post]:
        return [p for p in self.posts if 200 <= p.status < 300]


@pytest.fixture
async def hook_server() -> AsyncIterator[HookServer]:
    server = HookServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---------------------------------------------------------------------------
# the probe and the suite


REFUSED_PREFIX = "refused."


class HookProbe(BusProbe):
    """What the endpoint accepted: one :class:`Received` per element of each POSTed
    array, under the topic of its ``X-Aleno-Topic`` header. It reads the server's
    record, never the driver."""

    delivers_keys = False  # the webhook sends no key: opt out of the key checks

    def __init__(self, server: HookServer) -> None:
        self.server = server
        self.topics: set[str] = set()

    async def subscribe(self, topic: str) -> None:
        self.topics.add(topic)

    def _got(self) -> list[Received]:
        return [Received(topic=p.topic, body=orjson.dumps(item), headers=p.headers)
                for p in self.server.accepted() if p.topic in self.topics
                for item in p.items]

    async def received(self, count: int, timeout: float) -> list[Received]:
        try:
            await until(lambda: len(self._got()) >= count, timeout, "messages at the probe")
        except AssertionError:
            pass  # the suite reports what is missing
        return self._got()

    async def drop_connections(self) -> bool:
        await self.server.stop()
        await self.server.start()
        return True

    async def stop_bus(self) -> bool:
        await self.server.stop()
        return True

    async def start_bus(self) -> None:
        await self.server.start()

    def refusing(self, batch: Sequence[Message]) -> tuple[list[Message], list[int]] | None:
        """Every third message moved to a topic the endpoint refuses (422)."""
        return refusing_every_third(
            batch, lambda m: replace(m, topic=REFUSED_PREFIX + m.topic))

    # a FaultProxy (bridge.testing.proxy) in front of the endpoint: the hung-bus tests
    def bus_address(self) -> tuple[str, int] | None:
        return "127.0.0.1", self.server.port

    def options_via(self, options: Mapping[str, Any], host: str, port: int) -> dict[str, Any]:
        return {**options, "url": f"http://{host}:{port}/hook", "timeout_s": 1.0}


class TestWebhookConformance(SinkConformance):
    driver = WebhookSink

    @pytest.fixture
    def options(self, hook_server: HookServer) -> dict[str, Any]:
        return {"url": hook_server.url(), "auth_token": TOKEN, "timeout_s": 2.0}

    @pytest.fixture
    def secret_values(self) -> list[str]:
        return [TOKEN]

    def secret_options(self, sentinel: str) -> dict[str, Any]:
        return {"auth_token": sentinel}

    @pytest.fixture
    async def probe(self, hook_server: HookServer) -> AsyncIterator[BusProbe]:
        probe = HookProbe(hook_server)
        yield probe
        await probe.close()
