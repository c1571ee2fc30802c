"""A TCP fault proxy: put it between a driver and its bus to break the link on demand.

A plugin author's tests often run against a bus they cannot kill or restart (a shared
broker, a managed service). Pointing the driver at a :class:`FaultProxy` instead gives
every failure the conformance suite needs without touching the bus::

    async with FaultProxy("broker.example", 4222) as proxy:
        sink = make_sink(servers=f"nats://127.0.0.1:{proxy.port}")
        await sink.connect()
        proxy.set_mode("stall")     # a hung bus: TCP open, nothing answers
        ...
        proxy.set_mode("pass")

Modes (:data:`Mode`):

``pass``
    forward bytes both ways (the default).
``refuse``
    close every open connection and abort every new one as soon as it is accepted
    (the client sees a reset or EOF: the bus is down).
``stall``
    accept connections and keep them open, but forward nothing in either direction:
    what a client sends is held (and delivered if the mode goes back to ``pass``),
    a new connection reaches the bus only once the mode is ``pass`` again. This is a
    hung bus: a driver without its own timeouts waits forever.
``reset``
    drop every open connection once (a broker restart, a load balancer's idle
    timeout), then behave like ``pass``: new connections are forwarded.

Dropped connections are aborted (TCP RST), not closed politely. The counters
(:attr:`accepted`, :attr:`active`, :attr:`refused`, :attr:`dropped`) let a test prove
that a driver closed its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "refuse", "stall", "reset"]
_MODES: tuple[Mode, ...] = ("pass", "refuse", "stall", "reset")
_CHUNK = 65536


class _Link:
    """One client connection and, once the bus was reached, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards TCP connections from ``127.0.0.1:<port>`` to ``target_host:target_port``
    and breaks them on demand (see the module docstring for the modes).

    Use it as an async context manager (or :meth:`start` / :meth:`close`); :attr:`port`
    is the free port it listens on (or ``port`` when given).
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        #: connections accepted (in any mode), currently open, aborted at once by
        #: ``refuse``, and dropped while open (by ``refuse`` or ``reset``)
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self._mode: Mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def active(self) -> int:
        """Client connections open through the proxy right now."""
        return len(self._links)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _refusing(self) -> bool:
        return self._mode == "refuse"

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; ``refuse`` and ``reset`` drop every open connection at once."""
        if mode not in _MODES:
            msg = f"unknown mode {mode!r}; choose one of {', '.join(_MODES)}"
            raise ValueError(msg)
        if mode in ("refuse", "reset"):
            self.drop_all()
        self._mode = "pass" if mode == "reset" else mode
        if self._mode == "stall":
            self._flowing.clear()
        else:
            self._flowing.set()

    def drop_all(self) -> int:
        """Abort every open connection (both sides); return how many there were."""
        links, self._links = list(self._links), set()
        for link in links:
            link.abort()
        self.dropped += len(links)
        return len(links)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening and abort every connection; idempotent."""
        server, self._server = self._server, None
        self.drop_all()
        self._flowing.set()
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (f"FaultProxy({self.host}:{self.port} -> {self.target_host}:{self.target_port}, "
                f"mode={self._mode}, active={self.active})")

    # -- forwarding ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == "refuse" or self._server is None:
            self.refused += 1
            writer.transport.abort()
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a stalled bus does not even answer the connect
            if link not in self._links or self._refusing():  # changed while waiting
                return
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self.connect_timeout_s,
            )
            link.upstream = up_writer
            if link not in self._links:
                up_writer.transport.abort()
                return
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except (TimeoutError, OSError):
            pass  # the bus itself is unreachable: the client sees its connection close
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await src.read(_CHUNK)
                if not data:
                    return
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
