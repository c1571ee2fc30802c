"""The fault proxy of the plugin kit, against a local echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.testing.proxy import FaultProxy
from bridge.testing.wait import wait_until


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as p:
        yield p
    server.close()


async def _roundtrip(port: int, data: bytes = b"ping", timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(data)), timeout)
    finally:
        writer.close()


async def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    assert await _roundtrip(proxy.port) == b"ping"
    assert proxy.accepted == 1
    await wait_until(lambda: proxy.active == 0, 2.0)


async def test_refuse_drops_open_and_new_connections(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 2) == b"x"
    proxy.set_mode("refuse")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 2)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(proxy.port)
    assert proxy.dropped == 1 and proxy.refused == 1
    proxy.set_mode("pass")
    assert await _roundtrip(proxy.port) == b"ping"


async def test_stall_holds_data_until_pass(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.set_mode("stall")
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    with pytest.raises(TimeoutError):
        await _roundtrip(proxy.port, timeout=0.3)  # a new connection hangs too
    proxy.set_mode("pass")
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    writer.close()


async def test_reset_drops_once_then_passes(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 2)
    proxy.set_mode("reset")
    assert proxy.mode == "pass"
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 2)
    assert await _roundtrip(proxy.port) == b"ping"


async def test_unknown_mode_is_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("broken")  # type: ignore[arg-type]
