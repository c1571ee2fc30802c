"""What a client may hold of an HTTP listener: connections (both listeners of
:mod:`bridge.control.http`).

At most ``max_connections`` are open; a new one over the cap evicts the oldest
connection that is not serving a request (slow or partial headers, idle keep-alive), and
is refused only when every one of them is serving one. So any number of idle or slow
clients cannot keep a probe out. A request marks its connection as serving
(:func:`busy_while`) until its handler ends (the :func:`busy_middleware` middleware).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

log = logging.getLogger("aleno_bridge.http")

REFUSAL_LOG_INTERVAL_S: Final = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def busy_while(connections: ConnectionGuard | LateGuard | None,
               request: web.Request) -> None:
    """Mark the request's connection as serving a request (not evictable) until its
    handler ends (:func:`busy_middleware`)."""
    if connections is None or _BUSY in request:
        return
    conn = connections.of(request.transport)
    if conn is not None:
        conn.busy += 1
        request[_BUSY] = conn


@web.middleware
async def busy_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    finally:
        conn = request.get(_BUSY)
        if conn is not None:
            conn.busy -= 1


# -- connections -------------------------------------------------------------------------


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            transport.close()


class _Counted(asyncio.Protocol):
    """Delegates to aiohttp's request handler and keeps the open-connection count."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self.transport: asyncio.BaseTransport | None = None
        #: requests being served on this connection (it is not evicted meanwhile)
        self.busy = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._guard.opened(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed(self)
        self._inner.connection_lost(exc)

    def evict(self) -> None:
        transport = self.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        elif transport is not None:
            transport.close()


#: the connection a request marked busy (:func:`busy_while`)
_BUSY: Final = web.RequestKey("aleno_bridge.busy", _Counted)


class ConnectionGuard:
    """Protocol factory that caps the number of open connections: at the cap, a new
    connection evicts the oldest one that serves no request, or is refused when all of
    them serve one."""

    def __init__(self, factory: Any, limit: int, name: str = "http") -> None:
        self._factory = factory
        self.limit = limit
        self.name = name
        #: open connections, oldest first
        self._open: dict[_Counted, None] = {}
        self._by_transport: dict[int, _Counted] = {}
        self.reserved = 0
        self.refused = 0
        self.evicted = 0
        self._last_log = 0.0

    @property
    def open(self) -> int:
        return len(self._open) + self.reserved

    def of(self, transport: asyncio.BaseTransport | None) -> _Counted | None:
        return None if transport is None else self._by_transport.get(id(transport))

    def opened(self, conn: _Counted) -> None:
        self.reserved -= 1
        self._open[conn] = None
        if conn.transport is not None:
            self._by_transport[id(conn.transport)] = conn

    def closed(self, conn: _Counted) -> None:
        if self._open.pop(conn, 0) is None and conn.transport is not None:
            self._by_transport.pop(id(conn.transport), None)

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            victim = next((c for c in self._open if c.busy == 0), None)
            if victim is None:
                self.refused += 1
                self._log("refused")
                return _Refused()
            self.evicted += 1
            self.closed(victim)
            victim.evict()
            self._log("evicted")
        self.reserved += 1
        return _Counted(self._factory(), self)

    def _log(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            self._last_log = now
            log.warning(
                "%s: %d connection(s) open, the limit (max_connections); so far %d idle "
                "connection(s) evicted for new ones and %d refused (every one busy)",
                self.name, self.open, self.evicted, self.refused,
                extra={"refused": self.refused, "evicted": self.evicted, "last": what},
            )


class LateGuard:
    """The connection guard of an app built before its server (the guard needs the
    runner's request handler factory, the app needs the guard)."""

    def __init__(self, holder: list[ConnectionGuard]) -> None:
        self._holder = holder

    def of(self, transport: asyncio.BaseTransport | None) -> _Counted | None:
        return self._holder[0].of(transport) if self._holder else None


__all__ = [
    "REFUSAL_LOG_INTERVAL_S",
    "ConnectionGuard",
    "Handler",
    "LateGuard",
    "busy_middleware",
    "busy_while",
]
