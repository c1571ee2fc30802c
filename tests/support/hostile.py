"""A hostile Aleno upstream: an Engine.IO v4 / Socket.IO v5 server speaking raw frames.

The simulator is a well-behaved python-socketio server; this one misbehaves on purpose,
one way per ``mode``, so tests can prove the source never hangs, crashes or fakes health.

Modes:

``silent_tcp``     accepts TCP connections and never answers (not even the HTTP upgrade)
``silent_ws``      upgrades to WebSocket, never sends the Engine.IO OPEN packet
``open_empty``     OPEN packet ``0{}``
``open_string``    OPEN packet ``0"x"``
``open_bad_ping``  OPEN packet with ``pingInterval: "soon"``
``never_connect``  OPEN, then never answers the Socket.IO CONNECT
``ok``             a correct upstream: acks every subscription, sends records every ``interval``
``flapping``       acks the subscriptions, sends nothing, closes after ``close_after`` s
``never_ack``      never acknowledges a subscription
``garbage_acks``   acks with ``garbage`` raw payloads (one per request, in turn), then behaves
``oversized``      after the ack, one frame of ``oversized_bytes`` (> 32 MiB), then records
``deep``           after the ack, deeply nested JSON in ``new_token_states``, then records
``symbol_limit``   a subscribe request with more than ``symbol_limit`` symbols gets an ``error``
                   ack (or, with ``over_limit="ignore"``, no ack at all)
``unsubscribed``   sends records for symbols that were never subscribed, besides the real ones

Frames (EIO4/SIO5): OPEN ``0{json}``, CONNECT ``40`` -> ``40{"sid":..}``, event ``42[..]``,
call ``42<id>[..]`` -> ack ``43<id>[..]``, ping ``2`` / pong ``3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from bridge.testing.sample import equity_record, ticker_record

PATH: Final = "/v1/socket/"
OPEN: Final = ('0{"sid":"hostile","upgrades":[],"pingInterval":25000,"pingTimeout":20000,'
               '"maxPayload":1000000}')
BAD_OPENS: Final = {
    "open_empty": "0{}",
    "open_string": '0"x"',
    "open_bad_ping": ('0{"sid":"hostile","upgrades":[],"pingInterval":"soon",'
                      '"pingTimeout":20000,"maxPayload":1000000}'),
}
MODES: Final = frozenset({
    "silent_tcp", "silent_ws", *BAD_OPENS, "never_connect", "ok", "flapping", "never_ack",
    "garbage_acks", "oversized", "deep", "symbol_limit", "unsubscribed",
})
_CALL = re.compile(r"^42(\d+)(.*)$", re.S)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class HostileUpstream:
    """``async with HostileUpstream("flapping") as up: ... up.url ... up.connections``."""

    def __init__(
        self,
        mode: str,
        *,
        interval: float = 0.2,
        close_after: float = 0.3,
        symbol_limit: int = 200,
        over_limit: str = "error",
        garbage: Iterable[str] = (),
        oversized_bytes: int = 33 * 1024 * 1024,
        depth: int = 100_000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if mode not in MODES:
            msg = f"unknown mode {mode!r}"
            raise ValueError(msg)
        self.mode = mode
        self.interval = interval
        self.close_after = close_after
        self.symbol_limit = symbol_limit
        self.over_limit = over_limit
        self.garbage = list(garbage)
        self.oversized_bytes = oversized_bytes
        self.depth = depth
        self.ssl_context = ssl_context
        self.port = 0
        #: monotonic time of every accepted connection (TCP for silent_tcp, else WebSocket)
        self.connect_times: list[float] = []
        #: every subscribe request: (event, symbols)
        self.requests: list[tuple[str, list[str]]] = []
        self._runner: web.AppRunner | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._garbage_i = 0
        self._feeding: set[web.WebSocketResponse] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.connect_times)

    def connections_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.connect_times if start <= t < end)

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> HostileUpstream:
        if self.mode == "silent_tcp":
            self._tcp = await asyncio.start_server(self._silent_tcp, "127.0.0.1", 0)
            self.port = self._tcp.sockets[0].getsockname()[1]
            return self
        app = web.Application()
        app.router.add_get(PATH, self._ws)
        app.router.add_get(PATH.rstrip("/"), self._ws)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            w.close()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)
        if self._runner is not None:
            await self._runner.cleanup()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _silent_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                          ) -> None:
        self.connect_times.append(time.monotonic())
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()

    # -- the WebSocket side ------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.connect_times.append(time.monotonic())
        ws = web.WebSocketResponse(max_msg_size=0, compress=False)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._session(ws)
        except (ConnectionError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self._sockets.discard(ws)
            self._feeding.discard(ws)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, ws: web.WebSocketResponse) -> None:
        async for _ in ws:
            pass

    async def _session(self, ws: web.WebSocketResponse) -> None:
        mode = self.mode
        if mode == "silent_ws":
            await self._drain(ws)
            return
        if mode in BAD_OPENS:
            await ws.send_str(BAD_OPENS[mode])
            await self._drain(ws)
            return
        await ws.send_str(OPEN)
        subscribed: dict[str, set[str]] = {"ticker": set(), "equity": set()}
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            text: str = msg.data
            if text == "2":
                await ws.send_str("3")
            elif text.startswith("40"):
                if mode == "never_connect":
                    continue
                await ws.send_str('40{"sid":"hostile-ns"}')
            elif text.startswith("41"):
                break
            elif (m := _CALL.match(text)) is not None:
                await self._call(ws, int(m.group(1)), m.group(2), subscribed)

    async def _call(self, ws: web.WebSocketResponse, ack_id: int, body: str,
                    subscribed: dict[str, set[str]]) -> None:
        try:
            event, symbols = orjson.loads(body)
        except (ValueError, TypeError):
            return
        self.requests.append((event, list(symbols)))
        kind = "ticker" if event.endswith("ticker") else "equity"
        mode = self.mode
        if mode == "never_ack":
            return
        if mode == "symbol_limit" and len(symbols) > self.symbol_limit:
            if self.over_limit == "ignore":
                return
            await self._ack(ws, ack_id, {
                "status": "error", "involvedSubscriptions": [],
                "subscriptionsAfterUpdate": sorted(subscribed[kind]),
                "error": f"Too many symbols in one request (at most {self.symbol_limit}).",
            })
            return
        if mode == "garbage_acks" and self._garbage_i < len(self.garbage):
            raw = self.garbage[self._garbage_i]
            self._garbage_i += 1
            await ws.send_str(f"43{ack_id}{raw}")
            return
        norm = [str(s).strip().upper() for s in symbols]
        subscribed[kind].update(norm)
        await self._ack(ws, ack_id, {
            "status": "ok", "involvedSubscriptions": norm,
            "subscriptionsAfterUpdate": sorted(subscribed[kind]),
        })
        if ws not in self._feeding:
            self._feeding.add(ws)
            self._start_feed(ws, subscribed)

    def _start_feed(self, ws: web.WebSocketResponse, subscribed: dict[str, set[str]]) -> None:
        mode = self.mode
        if mode == "flapping":
            self._spawn(self._close_later(ws))
        elif mode in ("ok", "garbage_acks", "oversized", "deep", "symbol_limit",
                      "unsubscribed"):
            self._spawn(self._feed(ws, subscribed))

    async def _ack(self, ws: web.WebSocketResponse, ack_id: int, payload: Any) -> None:
        await ws.send_str(f"43{ack_id}" + orjson.dumps([payload]).decode())

    async def _close_later(self, ws: web.WebSocketResponse) -> None:
        await asyncio.sleep(self.close_after)
        await ws.close()

    async def emit(self, ws: web.WebSocketResponse, event: str, payload: Any) -> None:
        await ws.send_str("42" + orjson.dumps([event, payload]).decode())

    async def _feed(self, ws: web.WebSocketResponse, subscribed: dict[str, set[str]]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            if self.mode == "oversized":
                filler = "x" * self.oversized_bytes
                await ws.send_str('42["new_token_states",[{"id":"' + filler + '"}]]')
            elif self.mode == "deep":
                # beyond any JSON decoder's nesting limit, then within orjson's but deep
                d = self.depth
                await ws.send_str('42["new_token_states",' + "[" * d + "]" * d + "]")
                await ws.send_str('42["new_token_states",[{"id":"BTC/USD","aggregated":'
                                  + "[" * 900 + "]" * 900 + "}]]")
            n = 0
            while not ws.closed:
                n += 1
                now = _now_ms()
                tickers = [ticker_record(s, 100.0 + n, now) for s in sorted(subscribed["ticker"])]
                if self.mode == "unsubscribed":
                    tickers += [ticker_record(f"EVIL{n}X{i}/USD", 1.0, now) for i in range(50)]
                equities = [equity_record(s, 50.0 + n, now) for s in sorted(subscribed["equity"])]
                if tickers:
                    await self.emit(ws, "new_token_states", tickers)
                if equities:
                    await self.emit(ws, "new_equity_states", equities)
                await asyncio.sleep(self.interval)
