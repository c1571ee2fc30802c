"""The HTTP endpoints under hostile clients: a connection cap and an idle timeout."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.http import HttpServer, serve_http
from bridge.sinks import Drivers
from bridge.testing import MemorySink

pytestmark = pytest.mark.integration


@pytest.fixture
async def served() -> AsyncIterator[tuple[Bridge, HttpServer]]:
    text = """
sinks: {mem: {driver: memory}}
http: {port: 0, max_connections: 8, idle_timeout_s: 1}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, with_source=False)
    await bridge.start()
    http = await serve_http(bridge)
    try:
        yield bridge, http
    finally:
        await http.cleanup()
        await bridge.shutdown()


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _slowloris(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    return reader, writer


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_partial_headers_are_closed_after_the_idle_timeout(
    served: tuple[Bridge, HttpServer],
) -> None:
    _, http = served
    clients = [await _slowloris(http.port) for _ in range(4)]
    start = time.monotonic()
    for reader, writer in clients:
        # the server closes: read() returns at EOF instead of waiting forever
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert time.monotonic() - start < 4
    assert b"200 OK" in await _get(http.port, "/healthz")


async def test_connections_over_the_cap_are_refused_and_fds_stay_bounded(
    served: tuple[Bridge, HttpServer],
) -> None:
    _, http = served
    before = _open_fds()
    clients = [await _slowloris(http.port) for _ in range(200)]
    await asyncio.sleep(0.3)
    # each client holds one fd here; the server holds at most max_connections of its own
    assert http.guard.open <= 8
    assert http.guard.refused >= 192
    assert _open_fds() - before <= 200 + 8 + 4
    for _, writer in clients:
        writer.close()
    # once the hostile clients are gone, the endpoints answer again
    for _ in range(100):
        if not http.guard.open:
            break
        await asyncio.sleep(0.05)
    assert b"200 OK" in await _get(http.port, "/healthz")
