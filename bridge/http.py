"""``/healthz``, ``/readyz`` and ``/metrics`` (aiohttp).

``/healthz`` is 200 while the process loop and the dispatcher run (liveness).
``/readyz`` is 200 when the upstream is subscribed, a price arrived within
``source.stale_after_s`` and every required sink is connected with its last publish
successful; 503 otherwise, with the failing checks in the JSON body.
``/metrics`` is the Prometheus text format.
The server runs on the control thread (:mod:`bridge.controlloop`): ``/v1/snapshot`` is
answered there, beside the data path; the other endpoints are answered by the bridge's
own event loop, which the control thread waits for (503 after
:data:`~bridge.controlloop.HOP_TIMEOUT_S`: a stuck loop fails the liveness probe).

``/v1/snapshot`` is the HTTP door of the control surface: the latest envelope of every
symbol (``?kind=ticker|equity|*&symbols=BTC/*,ETH/USD&limit=N&after=CURSOR``), answered
by :meth:`bridge.control.Control.snapshot`; the query and the reply are described in
:mod:`bridge.control`. A malformed query is a 400 whose JSON body names the parameter;
404 when the bridge has no control surface.
``/v1/subscriptions`` leases symbols (:meth:`bridge.control.Control.lease`)::

    POST   /v1/subscriptions                  {"kind": "ticker", "symbols": ["BTC/USD"],
                                               "ttl_s": 60, "holder": "svc-a"}  -> 200
    POST   /v1/subscriptions/{lease}/renew    {"ttl_s": 60} (or no body)        -> 200
    DELETE /v1/subscriptions/{lease}                                            -> 204

A lease whose every symbol was refused is still a 200 (``"lease": null``, the
per-symbol statuses say why): the upstream's answer is the reply. 400: a malformed
request (the body names the parameter); 404: no live lease of that id on this pod;
409: leases are off (``source.leases.enabled``). Request bodies are at most 64 KiB.

The port may be reachable from the pod network, so the server protects the rest of
the process from its clients: at most ``http.max_connections`` connections are open at
once (one more is accepted and closed at once, so it cannot pin a file descriptor the
sinks need), and a connection that has not sent a complete request within
``http.idle_timeout_s`` (slow or partial headers, or idle keep-alive) is closed.
Refused connections are counted and logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.config import HttpConfig
from bridge.control import (
    ControlError,
    lease_from_json,
    parse_lease_id,
    query_from_params,
    renew_from_json,
)
from bridge.controlloop import ControlLoop, LoopTimeout, call_on

if TYPE_CHECKING:
    from bridge.control import Control

log = logging.getLogger("aleno_bridge.http")

REFUSAL_LOG_INTERVAL_S: Final = 60.0
#: the largest request body (a lease of 256 symbols is ~5 KiB)
MAX_BODY_BYTES: Final = 64 * 1024


class Observed(Protocol):
    """What the endpoints read of a bridge (:class:`~bridge.app.Bridge` is one)."""

    @property
    def http_config(self) -> HttpConfig: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    def alive(self) -> bool: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    #: the control surface (``/v1/...``); ``None``: those paths answer 404. An object
    #: without the attribute (written before the control surface) is served as ``None``.
    @property
    def control(self) -> Control | None: ...


def make_app(bridge: Observed, home: asyncio.AbstractEventLoop | None = None
             ) -> web.Application:
    """The endpoints of ``bridge``. ``home``: the bridge's event loop when the app is
    served on another one (the control thread, :mod:`bridge.controlloop`): every
    endpoint but ``/v1/snapshot`` then reads the bridge there."""

    def at_home(handle: Callable[[web.Request], Awaitable[web.Response]]
                ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def route(request: web.Request) -> web.Response:
            try:
                return await handle(request)
            except LoopTimeout as exc:
                return web.json_response({"error": str(exc)}, status=503)
        return route

    @at_home
    async def healthz(_: web.Request) -> web.Response:
        alive = await call_on(home, bridge.alive)
        return web.json_response({"status": "ok" if alive else "dead"},
                                 status=200 if alive else 503)

    @at_home
    async def readyz(_: web.Request) -> web.Response:
        ok, checks = await call_on(home, bridge.readiness)
        body = orjson.dumps({"ready": ok, "checks": checks})
        return web.Response(body=body, status=200 if ok else 503, content_type="application/json")

    @at_home
    async def metrics(_: web.Request) -> web.Response:
        payload = await call_on(home, generate_latest, bridge.registry)
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def door(handle: Callable[[Control, web.Request], Awaitable[web.Response]]
             ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A ``/v1/`` route: 404 without a control surface, a refused request's
        :class:`ControlError` as its JSON body and status."""
        async def route(request: web.Request) -> web.Response:
            control: Control | None = getattr(bridge, "control", None)
            if control is None:
                return web.json_response({"error": "this bridge has no control surface"},
                                         status=404)
            try:
                return await handle(control, request)
            except ControlError as exc:
                return web.Response(body=exc.body(), status=exc.status,
                                    content_type="application/json")
        return route

    def _json(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def snapshot(control: Control, request: web.Request) -> web.Response:
        # answered here, on the control thread: the cache is made to be read from it
        return _json(control.answer(query_from_params(request.query)).body)

    async def subscribe(control: Control, request: web.Request) -> web.Response:
        req = lease_from_json(await request.read())
        return _json((await control.lease(req.kind, req.symbols, req.ttl_s, req.holder)).body)

    async def renew(control: Control, request: web.Request) -> web.Response:
        req = renew_from_json(await request.read(), request.match_info["lease"])
        return _json((await control.renew(req.lease, req.ttl_s)).body)

    async def release(control: Control, request: web.Request) -> web.Response:
        await control.release(parse_lease_id(request.match_info["lease"]))
        return web.Response(status=204)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/snapshot", door(snapshot))
    app.router.add_post("/v1/subscriptions", door(subscribe))
    app.router.add_post("/v1/subscriptions/{lease}/renew", door(renew))
    app.router.add_delete("/v1/subscriptions/{lease}", door(release))
    return app


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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
        self._guard.open -= 1
        self._inner.connection_lost(exc)


class ConnectionGuard:
    """Protocol factory that caps the number of open connections."""

    def __init__(self, factory: Any, limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._last_log = 0.0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
                self._last_log = now
                log.warning(
                    "http: %d connection(s) open, the limit (http.max_connections); refused "
                    "%d connection(s) so far", self.open, self.refused,
                    extra={"refused": self.refused},
                )
            return _Refused()
        self.open += 1
        return _Counted(self._factory(), self)


class HttpServer:
    """The running endpoints; :meth:`cleanup` stops them (idempotent)."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server,
                 guard: ConnectionGuard) -> None:
        self._runner = runner
        self._server = server
        self.guard = guard
        self.port: int = server.sockets[0].getsockname()[1]
        #: the control thread the server runs on (``None``: the caller's loop)
        self.thread: ControlLoop | None = None

    async def cleanup(self) -> None:
        if self.thread is not None and self.thread.loop is not None:
            await self.thread.run(self._cleanup())
        else:
            await self._cleanup()

    async def _cleanup(self) -> None:
        self._server.close()
        await self._runner.cleanup()


async def serve_http(bridge: Observed, thread: ControlLoop | None = None) -> HttpServer:
    """Serve the endpoints of ``bridge`` on ``http.host``/``http.port`` until
    :meth:`HttpServer.cleanup`; on the control ``thread`` when given (started), else on
    the running loop."""
    if thread is not None:
        home = asyncio.get_running_loop()
        http = await thread.run(_serve(bridge, home))
        http.thread = thread
        return http
    return await _serve(bridge, None)


async def _serve(bridge: Observed, home: asyncio.AbstractEventLoop | None) -> HttpServer:
    cfg = bridge.http_config
    # aiohttp closes a connection whose handler waited this long for a complete
    # request: idle keep-alive and never-finished headers alike
    runner = web.AppRunner(make_app(bridge, home), handle_signals=False, access_log=None,
                           keepalive_timeout=cfg.idle_timeout_s)
    await runner.setup()
    guard = ConnectionGuard(runner.server, cfg.max_connections)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(guard, cfg.host, cfg.port, reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    http = HttpServer(runner, server, guard)
    log.info("http endpoints on http://%s:%d (/healthz /readyz /metrics /v1/snapshot "
             "/v1/subscriptions)",
             cfg.host, http.port)
    return http
