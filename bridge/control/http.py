"""The bridge's two HTTP listeners (aiohttp), apart so that no client can starve a probe.

``http`` (default ``127.0.0.1:9464``): the probes' and Prometheus' listener.

- ``/healthz`` is 200 while the process loop and the dispatcher run (liveness).
- ``/readyz`` is 200 when the upstream is subscribed, a price arrived within
  ``source.stale_after_s`` and every required sink is connected with its last publish
  successful; 503 otherwise, with the failing checks in the JSON body.
- ``/metrics`` is the Prometheus text format.

``control.http`` (default ``127.0.0.1:9465``): ``/v1/``, the HTTP door of the control
surface (:mod:`bridge.control.core`), routed by :mod:`bridge.control.v1` (its paths,
scopes and errors are described there; the whole API is ``docs/openapi.json``).

A configuration without ``control.http`` whose ``http`` listener is loopback-only keeps
``/v1/`` on the ``http`` listener, as before this split (deprecated: the replies carry a
``Deprecation`` header, and the start-up log says to set ``control.http``); with a
non-loopback ``http`` listener, ``/v1/`` there is a 404 naming where it moved.

What a client can hold, on either listener:

- **connections**: at most ``max_connections`` open; a new one over the cap evicts the
  oldest connection that is not serving a request (slow or partial headers, idle
  keep-alive), and is refused only when every one of them is serving one
  (:mod:`bridge.control.connections`). So any number of idle or slow clients cannot
  keep a probe out. A connection that has not sent a complete request within
  ``idle_timeout_s`` is closed, and a request body must arrive within it too.
- **bytes**: a reply is written in parts, each of which the client must take within
  ``send_timeout_s`` or the connection is cut (a client that does not read its answer
  frees what it pinned). On the control listener, snapshots are assembled for at most
  ``max_concurrent_snapshots`` requests at once and the replies assembled or being sent
  hold at most ``max_reply_bytes`` in total; beyond, 503 with ``Retry-After``.

Both servers run on the control thread (:mod:`bridge.control.thread`): ``/v1/snapshot`` is
answered there, beside the data path; health, readiness, metrics and leases hop to the
bridge's own loop (503 after :data:`~bridge.control.thread.HOP_TIMEOUT_S` for the first
three: a stuck loop fails the liveness probe).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.config.schema import ControlHttpConfig, HttpConfig
from bridge.control.auth import Guard
from bridge.control.connections import (
    ConnectionGuard,
    Handler,
    LateGuard,
    busy_middleware,
    busy_while,
)
from bridge.control.thread import ControlLoop, LoopTimeout, call_on
from bridge.control.v1 import (
    JSON,
    MAX_BODY_BYTES,
    Controlled,
    ReplyBudget,
    add_v1,
    send_body,
)

log = logging.getLogger("aleno_bridge.http")


class Observed(Controlled, Protocol):
    """What the endpoints read of a bridge (:class:`~bridge.app.Bridge` is one); its
    ``control`` (``/v1/...``): see :class:`~bridge.control.v1.Controlled`."""

    @property
    def http_config(self) -> HttpConfig: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    def alive(self) -> bool: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...


# -- the apps ----------------------------------------------------------------------------


def make_app(bridge: Observed, home: asyncio.AbstractEventLoop | None = None, *,
             guard: Guard | None = None, v1: str = "serve",
             control_http: ControlHttpConfig | None = None,
             connections: ConnectionGuard | LateGuard | None = None) -> web.Application:
    """The probes' endpoints of ``bridge`` (``/healthz``, ``/readyz``, ``/metrics``).

    ``home``: the bridge's event loop when the app is served on another one (the
    control thread): every endpoint but ``/v1/snapshot`` then reads the bridge there.
    ``v1``: ``"serve"`` adds ``/v1/`` here (deprecated, marked so), ``"moved"`` answers
    ``/v1/`` with a 404 naming ``control_http``, ``"none"`` leaves it out.
    """

    def at_home(handle: Handler) -> Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            busy_while(connections, request)
            try:
                return await handle(request)
            except LoopTimeout as exc:
                return web.json_response({"error": str(exc)}, status=503)
        return route

    @at_home
    async def healthz(_: web.Request) -> web.StreamResponse:
        alive = await call_on(home, bridge.alive)
        return web.json_response({"status": "ok" if alive else "dead"},
                                 status=200 if alive else 503)

    @at_home
    async def readyz(_: web.Request) -> web.StreamResponse:
        ok, checks = await call_on(home, bridge.readiness)
        body = orjson.dumps({"ready": ok, "checks": checks})
        return web.Response(body=body, status=200 if ok else 503, content_type=JSON)

    @at_home
    async def metrics(_: web.Request) -> web.StreamResponse:
        payload = await call_on(home, generate_latest, bridge.registry)
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[busy_middleware])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if v1 == "serve":
        cfg = bridge.http_config
        add_v1(app, bridge, home, guard or Guard((), frozenset({"snapshot", "lease"}), 100),
               ControlHttpConfig(host=cfg.host, port=cfg.port,
                                 max_connections=cfg.max_connections,
                                 idle_timeout_s=cfg.idle_timeout_s,
                                 send_timeout_s=cfg.send_timeout_s),
               connections, deprecated=True)
    elif v1 == "moved":
        where = control_http or ControlHttpConfig()

        async def moved(_: web.Request) -> web.StreamResponse:
            msg = (f"/v1 is served on the control listener (control.http: "
                   f"{where.host}:{where.port}), not on the probes' listener")
            return web.json_response({"error": msg, "parameter": None}, status=404)
        app.router.add_route("*", "/v1/{tail:.*}", moved)
    return app


def make_control_app(bridge: Observed, cfg: ControlHttpConfig, guard: Guard,
                     home: asyncio.AbstractEventLoop | None = None,
                     connections: ConnectionGuard | LateGuard | None = None) -> web.Application:
    """The control listener's app: ``/v1/`` only."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[busy_middleware])
    add_v1(app, bridge, home, guard, cfg, connections)
    return app


# -- serving -----------------------------------------------------------------------------


class HttpServer:
    """A running listener; :meth:`cleanup` stops it (idempotent)."""

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


async def serve_http(bridge: Observed, thread: ControlLoop | None = None, *,
                     guard: Guard | None = None, v1: str = "serve",
                     control_http: ControlHttpConfig | None = None) -> HttpServer:
    """Serve the probes' endpoints of ``bridge`` on ``http.host``/``http.port`` until
    :meth:`HttpServer.cleanup`; on the control ``thread`` when given (started), else on
    the running loop. ``v1``, ``guard``, ``control_http``: see :func:`make_app`."""
    cfg = bridge.http_config
    home = asyncio.get_running_loop() if thread is not None else None

    def app(connections: LateGuard) -> web.Application:
        return make_app(bridge, home, guard=guard, v1=v1, control_http=control_http,
                        connections=connections)
    served = await _on(thread, _serve(app, cfg, "http"))
    paths = "/healthz /readyz /metrics" + (" /v1/ (deprecated here)" if v1 == "serve" else "")
    log.info("http endpoints on http://%s:%d (%s)", cfg.host, served.port, paths)
    return served


async def serve_control(bridge: Observed, cfg: ControlHttpConfig, guard: Guard,
                        thread: ControlLoop | None = None) -> HttpServer:
    """Serve ``/v1/`` on the control listener (``control.http``)."""
    home = asyncio.get_running_loop() if thread is not None else None

    def app(connections: LateGuard) -> web.Application:
        return make_control_app(bridge, cfg, guard, home, connections)
    served = await _on(thread, _serve(app, cfg, "control.http"))
    who = ("tokens: " + ", ".join(repr(n) for n in guard.names)
           if guard.names else "no tokens")
    log.info("control endpoints on http://%s:%d (/v1/snapshot /v1/subscriptions; %s; "
             "anonymous: %s)", cfg.host, served.port, who,
             ", ".join(sorted(guard.anonymous)) or "refused")
    return served


def _token_names(guard: Guard) -> list[str]:
    return [p.name for p in guard._principals]


async def _on(thread: ControlLoop | None, coro: Any) -> HttpServer:
    if thread is not None:
        served: HttpServer = await thread.run(coro)
        served.thread = thread
        return served
    result: HttpServer = await coro
    return result


async def _serve(app: Callable[[LateGuard], web.Application], cfg: HttpConfig,
                 name: str) -> HttpServer:
    # aiohttp closes a connection whose handler waited this long for a complete
    # request: idle keep-alive and never-finished headers alike
    holder: list[ConnectionGuard] = []
    proxy = LateGuard(holder)
    runner = web.AppRunner(app(proxy), handle_signals=False,
                           access_log=None, keepalive_timeout=cfg.idle_timeout_s)
    await runner.setup()
    guard = ConnectionGuard(runner.server, cfg.max_connections, name)
    holder.append(guard)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(guard, cfg.host, cfg.port, reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpServer(runner, server, guard)


__all__ = [
    "MAX_BODY_BYTES",
    "ConnectionGuard",
    "HttpServer",
    "Observed",
    "ReplyBudget",
    "add_v1",
    "make_app",
    "make_control_app",
    "send_body",
    "serve_control",
    "serve_http",
]
