"""The simulator's server: :class:`Simulator` (the package :mod:`bridge.simulator`
describes the protocol and the hooks). It composes the market
(:mod:`bridge.simulator.universe`), the sessions and their acknowledgements
(:mod:`bridge.simulator.protocol`), the test hooks' state (:mod:`bridge.simulator.hooks`)
and the admin HTTP API (:mod:`bridge.simulator.admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import socketio
from aiohttp import web
from engineio.async_drivers.aiohttp import WebSocket as _EioWebSocket

from bridge.core import jsoncodec
from bridge.simulator.admin import AdminApi
from bridge.simulator.hooks import FeedHooks
from bridge.simulator.protocol import Client, Kind, Sessions, fingerprint
from bridge.simulator.universe import Universe

log = logging.getLogger("aleno_bridge.simulator")


class Simulator:
    """The server. ``await start()`` binds (``port=0`` picks a free port), ``await
    stop()`` closes every connection and the socket.

    Test hooks, all while connections stay up: :meth:`pause` / :meth:`resume` stop and
    restart the whole feed; :meth:`pause_symbols` / :meth:`resume_symbols` leave single
    symbols out of every update; :meth:`drop` leaves the next updates of symbols out and
    :meth:`dropped` tells their sent times; :meth:`inject` sends an arbitrary payload to
    every client; :meth:`kick` disconnects every client, or those of one key.
    :meth:`subscriptions`, :meth:`subscriptions_by_key`, :meth:`connections`,
    :attr:`connects`, :attr:`subscribe_requests` and :attr:`unsubscribe_requests` show
    what clients did. ``admin=True`` serves the same hooks over
    HTTP under ``/admin/`` (off by default: a simulator reachable on a network must not
    be steerable by whoever finds it).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        api_keys: Iterable[str] = ("demo-key",),
        interval: float = 1.0,
        max_subscriptions: int = 250,
        tickers: Iterable[str] | None = None,
        equities: Iterable[str] | None = None,
        path: str = "/v1/socket",
        seed: int | None = None,
        compression: bool = True,
        limits: Mapping[str, int] | None = None,
        admin: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.api_keys = frozenset(api_keys)
        self.interval = interval
        self.max_subscriptions = max_subscriptions
        self._limits = dict(limits or {})
        for key, limit in self._limits.items():
            if key not in self.api_keys:
                msg = (f"a subscription limit names key {fingerprint(key)} (sha256 "
                       "fingerprint), which is not an accepted API key: accept it too")
                raise ValueError(msg)
            if limit < 0:
                msg = f"the subscription limit of key {fingerprint(key)} is negative ({limit})"
                raise ValueError(msg)
        self.admin = admin
        self.path = path
        self._universe = Universe(random.Random(seed), tickers, equities)
        self._sessions = Sessions(self.api_keys, self.limit, self._universe)
        #: session id -> client (the sessions' own mapping)
        self._clients: dict[str, Client] = self._sessions.clients
        self._hooks = FeedHooks(self._universe)
        #: accepted connections per key, since start (reconnects count)
        self.connects: dict[str, int] = self._sessions.connects
        #: ``subscribe_*`` / ``unsubscribe_*`` requests per key, since start, whatever
        #: their answer (what a client's pace costs the key)
        self.subscribe_requests: dict[str, int] = self._sessions.subscribe_requests
        self.unsubscribe_requests: dict[str, int] = self._sessions.unsubscribe_requests
        self._runner: web.AppRunner | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self.ticks = 0
        #: offer WebSocket permessage-deflate (the client decides whether to take it)
        self.compression = compression
        #: the negotiated permessage-deflate window bits of every WebSocket accepted,
        #: in order (0: uncompressed)
        self.ws_compression: list[int] = []
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            cors_allowed_origins="*",
            logger=False,
            engineio_logger=False,
            json=jsoncodec,
            max_http_buffer_size=4_000_000,
        )
        self._install_websocket()
        self._register()

    def _install_websocket(self) -> None:
        # python-engineio's aiohttp driver builds a WebSocketResponse with aiohttp's
        # default (compress=True: permessage-deflate whenever the client offers it);
        # this one makes the offer an option and records what was negotiated
        sim = self

        class _WebSocket(_EioWebSocket):  # type: ignore[misc]
            async def __call__(self, environ: dict[str, Any]) -> web.WebSocketResponse:
                request = environ["aiohttp.request"]
                self._sock = web.WebSocketResponse(
                    max_msg_size=self.server.max_http_buffer_size,
                    compress=sim.compression)
                await self._sock.prepare(request)
                sim.ws_compression.append(int(self._sock.compress))
                self.environ = environ
                await self.handler(self)
                return self._sock

        eio = self.sio.eio
        eio._async = {**eio._async, "websocket": _WebSocket}

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tickers(self) -> list[str]:
        return list(self._universe.tickers)

    @property
    def equities(self) -> list[str]:
        return list(self._universe.equities)

    def limit(self, key: str) -> int:
        """The subscription limit of ``key`` (``limits[key]``, else ``max_subscriptions``)."""
        return self._limits.get(key, self.max_subscriptions)

    async def start(self) -> Simulator:
        app = web.Application()
        self.sio.attach(app, socketio_path=self.path.strip("/"))
        if self.admin:
            AdminApi(self._sessions, self._hooks, self.limit, self.kick).add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
        self._ticker_task = asyncio.create_task(self._tick_forever(), name="simulator-ticks")
        log.info("simulator listening on %s%s", self.url, self.path)
        if self.admin:
            log.warning("simulator admin API on %s/admin/: anyone who reaches it can pause, "
                        "drop and disconnect; keep it on 127.0.0.1", self.url)
        return self

    async def stop(self) -> None:
        if self._ticker_task is not None:
            self._ticker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker_task
            self._ticker_task = None
        for sid in list(self._clients):
            with contextlib.suppress(Exception):
                await self.sio.disconnect(sid)
        self._clients.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test hooks -------------------------------------------------------------

    def pause(self) -> None:
        """Stop every update (ticks are skipped, not queued) until :meth:`resume`."""
        self._hooks.paused = True

    def resume(self) -> None:
        self._hooks.paused = False

    def pause_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        """Leave these symbols out of every update until :meth:`resume_symbols`; the
        other symbols keep flowing and connections stay up. A client whose every
        subscribed symbol of ``kind`` is paused gets no event of that kind at all.

        ``kind`` is ``ticker`` or ``equity``; symbols are trimmed and upper-cased like
        the protocol does; a symbol outside the universe is a ``ValueError``."""
        self._hooks.pause_symbols(kind, symbols)

    def resume_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        self._hooks.resume_symbols(kind, symbols)

    def paused_symbols(self, kind: str) -> set[str]:
        """The symbols of ``kind`` paused now."""
        return self._hooks.paused_of(kind)

    def drop(self, kind: str, symbols: Iterable[str], ticks: int) -> None:
        """Leave the next ``ticks`` updates of each symbol out, recording the
        ``sentTimestampMs`` each would have carried (:meth:`dropped`).

        An update is a tick in which at least one client is subscribed to the symbol and
        it is not paused: a drop waits for a subscriber and through a pause, so exactly
        ``ticks`` updates go missing for the client. Ticks keep their cadence, so the
        next sent time after the drop is ``ticks + 1`` intervals after the last one
        before it. A new drop of a symbol replaces the remainder of the previous one."""
        self._hooks.drop(kind, symbols, ticks)

    def dropped(self, kind: str, symbol: str) -> list[int]:
        """The ``sentTimestampMs`` of every update of ``symbol`` left out by
        :meth:`drop`, in order."""
        return self._hooks.dropped(kind, symbol)

    async def inject(self, event: str, payload: Any) -> None:
        for sid in list(self._clients):
            await self.sio.emit(event, payload, to=sid)

    async def kick(self, key: str | None = None) -> int:
        """Disconnect every client from the server side, or only the clients that
        connected with ``key``; returns how many were disconnected."""
        sids = self._sessions.sids(key)
        for sid in sids:
            await self.sio.disconnect(sid)
        return len(sids)

    def subscriptions(self) -> list[tuple[set[str], set[str]]]:
        """(tickers, equities) of every connected client."""
        return self._sessions.subscriptions()

    def subscriptions_by_key(self) -> dict[str, dict[str, set[str]]]:
        """key -> ``{"ticker": set, "equity": set}``: the union over that key's open
        connections (what its limit counts); keys without a connection are absent."""
        return self._sessions.subscriptions_by_key()

    def connections(self, key: str | None = None) -> int:
        """How many clients are connected now (of ``key`` only, if given)."""
        return self._sessions.connections(key)

    # -- protocol ------------------------------------------------------------------

    def _register(self) -> None:
        sio = self.sio
        sio.on("connect", self._on_connect)
        sio.on("disconnect", self._on_disconnect)
        for feed, ticker in (("ticker", True), ("equity", False)):
            sio.on(f"subscribe_{feed}", self._on_update(ticker, subscribe=True))
            sio.on(f"unsubscribe_{feed}", self._on_update(ticker, subscribe=False))

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        self._sessions.connect(sid, environ, auth)

    async def _on_disconnect(self, sid: str, *_: Any) -> None:
        self._sessions.disconnect(sid)

    def _on_update(
        self, ticker: bool, subscribe: bool,
    ) -> Callable[[str, Any], Coroutine[Any, Any, dict[str, Any]]]:
        async def handler(sid: str, data: Any = None) -> dict[str, Any]:
            return self._update(sid, data, ticker=ticker, subscribe=subscribe)
        return handler

    def _update(self, sid: str, data: Any, ticker: bool, subscribe: bool) -> dict[str, Any]:
        return self._sessions.update(sid, data, ticker=ticker, subscribe=subscribe)

    # -- price feed ----------------------------------------------------------------

    def _step(self) -> None:
        self._universe.step(self.interval)

    def ticker_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        return self._universe.ticker_state(symbol, sent_ms)

    def equity_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        return self._universe.equity_state(symbol, sent_ms)

    async def _tick_forever(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self._hooks.paused:
                continue
            try:
                await self._tick()
            except Exception:  # a failing emit to one client must not stop the feed
                log.exception("simulator tick failed")

    def _left_out(self, sent_ms: int) -> dict[Kind, set[str]]:
        """The symbols this tick leaves out: paused ones, and those with a drop pending
        that some client subscribes to (their sent time is recorded, the drop counts
        down)."""
        return self._hooks.left_out(sent_ms, self._clients.values())

    async def _tick(self) -> None:
        self._step()
        self.ticks += 1
        sent_ms = time.time_ns() // 1_000_000
        left_out = self._left_out(sent_ms)
        ticker_cache: dict[str, dict[str, Any]] = {}
        equity_cache: dict[str, dict[str, Any]] = {}
        for sid, client in list(self._clients.items()):
            tickers = sorted(client.tickers - left_out["ticker"])
            if tickers:
                states = []
                for s in tickers:
                    if s not in ticker_cache:
                        ticker_cache[s] = self.ticker_state(s, sent_ms)
                    states.append(ticker_cache[s])
                await self.sio.emit("new_token_states", states, to=sid)
            equities = sorted(client.equities - left_out["equity"])
            if equities:
                eq = []
                for s in equities:
                    if s not in equity_cache:
                        equity_cache[s] = self.equity_state(s, sent_ms)
                    eq.append(equity_cache[s])
                await self.sio.emit("new_equity_states", eq, to=sid)


__all__ = ["Simulator", "log"]
