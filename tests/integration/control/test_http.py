"""The HTTP endpoints under hostile clients: a connection cap and an idle timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.control.http import HttpServer, serve_http
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


async def test_idle_connections_over_the_cap_are_evicted_and_fds_stay_bounded(
    served: tuple[Bridge, HttpServer],
) -> None:
    _, http = served
    before = _open_fds()
    clients = [await _slowloris(http.port) for _ in range(200)]
    await asyncio.sleep(0.3)
    # each client holds one fd here; the server holds at most max_connections of its own:
    # every new connection over the cap evicted the oldest idle one
    assert http.guard.open <= 8
    assert http.guard.evicted >= 192 and http.guard.refused == 0
    assert _open_fds() - before <= 200 + 8 + 4
    # the first 192 were closed by the server, the last 8 are still open
    closed = 0
    for reader, _ in clients:
        with contextlib.suppress(TimeoutError, ConnectionError):
            if await asyncio.wait_for(reader.read(), 0.01) == b"":
                closed += 1
    assert closed >= 192
    # a probe gets in while they hold the cap
    assert b"200 OK" in await _get(http.port, "/healthz")
    for _, writer in clients:
        writer.close()


async def test_busy_connections_are_not_evicted_and_new_ones_are_refused(
    served: tuple[Bridge, HttpServer],
) -> None:
    """A connection whose request is being served is never evicted: at the cap with
    every connection busy, a new one is refused instead."""
    bridge, http = served
    release = asyncio.Event()
    # make /readyz wait: its handler is busy until `release` is set
    import bridge.control.http as bhttp

    orig_call_on = bhttp.call_on

    async def waiting_call_on(loop: object, fn: object, *args: object, **kw: object) -> object:
        if fn == bridge.readiness:
            await release.wait()
        return await orig_call_on(loop, fn, *args, **kw)  # type: ignore[arg-type]

    bhttp.call_on = waiting_call_on  # type: ignore[assignment]
    try:
        waiting = [asyncio.create_task(_get(http.port, "/readyz")) for _ in range(8)]
        await asyncio.sleep(0.3)
        assert http.guard.open == 8
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # refused: closed at once
        writer.close()
        assert http.guard.refused >= 1 and http.guard.evicted == 0
        release.set()
        for got in await asyncio.gather(*waiting):
            assert b"200 OK" in got or b"503" in got
    finally:
        bhttp.call_on = orig_call_on
        release.set()
