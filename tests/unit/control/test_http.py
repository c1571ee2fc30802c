"""The endpoints read a bridge only through a small protocol; ``/readyz`` redacts with
the bridge's own secrets (nobody registers them for the process)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter

from bridge.app import Bridge
from bridge.config import HttpConfig, parse_config
from bridge.control.http import make_app
from bridge.sinks import Drivers, SinkRejectedError
from bridge.testing import MemorySink, sample_events, wait_until

SECRET = "key-that-must-not-show"


class Fake:
    """Not a bridge: what the endpoints need, and nothing else."""

    def __init__(self) -> None:
        self.http_config = HttpConfig(port=0)
        self.registry = CollectorRegistry()
        Counter("fake_things", "Things.", registry=self.registry).inc(3)
        self.ready = False

    def alive(self) -> bool:
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"upstream": {"ok": self.ready}}


@pytest.fixture
async def client() -> AsyncIterator[tuple[Fake, TestClient[Any, Any]]]:
    fake = Fake()
    async with TestClient(TestServer(make_app(fake))) as c:
        yield fake, c


async def test_endpoints_answer_from_the_protocol(
    client: tuple[Fake, TestClient[Any, Any]],
) -> None:
    fake, c = client
    r = await c.get("/healthz")
    assert r.status == 200 and await r.json() == {"status": "ok"}
    r = await c.get("/readyz")
    assert r.status == 503
    assert await r.read() == b'{"ready":false,"checks":{"upstream":{"ok":false}}}'
    fake.ready = True
    assert (await c.get("/readyz")).status == 200
    r = await c.get("/metrics")
    assert r.status == 200 and "fake_things_total 3.0" in await r.text()


async def test_readyz_redacts_with_the_bridges_own_secrets() -> None:
    text = f"""
source: {{api_key: {SECRET}}}
sinks: {{bus: {{driver: memory, batch: {{linger_ms: 0}}}}}}
http: {{enabled: false}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    sink = MemorySink("bus")
    sink.fail_next(1, SinkRejectedError("bus", f"not authorized for {SECRET}"))
    bridge = Bridge(settings, sinks={"bus": sink}, with_source=False)
    await bridge.start()
    try:
        bridge.ingest(sample_events(symbols=1, updates=1))
        await wait_until(lambda: bridge.workers["bus"].stats.rejections, 5, "a rejection")
        async with TestClient(TestServer(make_app(bridge))) as c:
            body = await (await c.get("/readyz")).read()
        assert SECRET not in body.decode()
        check = orjson.loads(body)["checks"]["sink:bus"]
        assert "not authorized for ***" in check["last_rejection"]
    finally:
        await bridge.shutdown()
