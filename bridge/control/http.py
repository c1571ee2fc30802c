"""The bridge's two HTTP listeners (aiohttp), apart so that no client can starve a probe.

``http`` (default ``127.0.0.1:9464``): the probes' and Prometheus' listener.

- ``/healthz`` is 200 while the process loop and the dispatcher run (liveness).
- ``/readyz`` is 200 when the upstream is subscribed, a price arrived within
  ``source.stale_after_s`` and every required sink is connected with its last publish
  successful; 503 otherwise, with the failing checks in the JSON body.
- ``/metrics`` is the Prometheus text format.

``control.http`` (default ``127.0.0.1:9465``): ``/v1/``, the HTTP door of the control
surface (:mod:`bridge.control.core`), guarded by bearer tokens with scopes
(:mod:`bridge.control.auth`)::

    GET    /v1/snapshot?kind=&symbols=&limit=&after=    scope snapshot
    POST   /v1/subscriptions                  {"kind": "ticker", "symbols": ["BTC/USD"],
                                               "ttl_s": 60, "holder": "label"}   scope lease
    POST   /v1/subscriptions/{lease}/renew    {"ttl_s": 60} (or no body)        scope lease
    DELETE /v1/subscriptions/{lease}                                            scope lease
    GET    /v1/openapi.json                   the API reference (no token)

Every error is ``{"error": "...", "parameter": <name> | null}``: 400 a malformed request
(naming the parameter); 401 no or a wrong token (``WWW-Authenticate: Bearer``); 403 a
token without the scope, or a browser ``Origin`` that ``control.http.allowed_origins``
does not list; 404 no live lease of that id for this token; 409 leases are off; 413 a
body over 64 KiB; 415 a lease body that is not ``application/json`` (a browser's form or
``text/plain`` cannot lease cross-site); 429 a cap (the text names it); 503 busy (too
many snapshots in flight, ``Retry-After``). The whole API is ``docs/openapi.json``.

A configuration without ``control.http`` whose ``http`` listener is loopback-only keeps
``/v1/`` on the ``http`` listener, as before this split (deprecated: the replies carry a
``Deprecation`` header, and the start-up log says to set ``control.http``); with a
non-loopback ``http`` listener, ``/v1/`` there is a 404 naming where it moved.

What a client can hold, on either listener:

- **connections**: at most ``max_connections`` open; a new one over the cap evicts the
  oldest connection that is not serving a request (slow or partial headers, idle
  keep-alive), and is refused only when every one of them is serving one. So any number
  of idle or slow clients cannot keep a probe out. A connection that has not sent a
  complete request within ``idle_timeout_s`` is closed, and a request body must
  arrive within it too.
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
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bridge.config.schema import ControlHttpConfig, HttpConfig
from bridge.control.auth import CHALLENGE, AuthError, Guard, Principal
from bridge.control.core import (
    ControlError,
    lease_from_json,
    parse_lease_id,
    query_from_params,
    renew_from_json,
)
from bridge.control.thread import ControlLoop, LoopTimeout, call_on

if TYPE_CHECKING:
    from bridge.control.core import Control

log = logging.getLogger("aleno_bridge.http")

REFUSAL_LOG_INTERVAL_S: Final = 60.0
#: the largest request body (a lease of 256 symbols is ~5 KiB)
MAX_BODY_BYTES: Final = 64 * 1024
#: a reply is written in parts of this size, each within ``send_timeout_s``
SEND_CHUNK: Final = 64 * 1024
#: what a 503 for a busy snapshot door asks the client to wait (seconds)
RETRY_AFTER_S: Final = 1
#: the media type of every ``/v1`` request body
JSON: Final = "application/json"


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


# -- what a client may hold ------------------------------------------------------------


class ReplyBudget:
    """Snapshots in flight and the bytes they hold (assembled or being sent), bounded.

    Used on one event loop (the control thread's): no lock is needed.
    """

    def __init__(self, max_replies: int, max_bytes: int) -> None:
        self.max_replies = max_replies
        self.max_bytes = max_bytes
        self.replies = 0
        self.bytes = 0
        self.refused = 0

    def enter(self) -> None:
        """Take a reply slot; raises :class:`ControlError` 503 when none is free."""
        if self.replies >= self.max_replies:
            self.refused += 1
            msg = (f"busy: {self.replies} snapshot(s) are being assembled or sent, the most "
                   "at once (control.http.max_concurrent_snapshots); retry shortly")
            raise _busy(msg)
        self.replies += 1

    def hold(self, size: int) -> None:
        """Account ``size`` bytes for the reply of a taken slot; raises 503 (and frees
        the slot) when they would exceed the total."""
        if self.bytes + size > self.max_bytes and self.bytes > 0:
            self.refused += 1
            self.replies -= 1
            msg = (f"busy: {self.bytes} bytes of replies are queued for clients, the most "
                   f"at once (control.http.max_reply_bytes); retry shortly, or ask for "
                   "less (symbols=, limit=)")
            raise _busy(msg)
        self.bytes += size

    def leave(self, size: int) -> None:
        self.replies -= 1
        self.bytes -= size


def _busy(message: str) -> ControlError:
    exc = ControlError(message, None, 503)
    exc.headers = {"Retry-After": str(RETRY_AFTER_S)}
    return exc


async def send_body(request: web.Request, body: bytes, timeout: float,
                    headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Send ``body`` (JSON) in parts, each within ``timeout``; a client that does not
    take a part in time is cut off (its connection aborted), so what it pinned is
    freed."""
    resp = web.StreamResponse(status=200, headers=headers)
    resp.content_type = JSON
    resp.content_length = len(body)
    view = memoryview(body)
    try:
        await asyncio.wait_for(resp.prepare(request), timeout)
        for offset in range(0, len(view), SEND_CHUNK):
            await asyncio.wait_for(resp.write(view[offset:offset + SEND_CHUNK]), timeout)
        await asyncio.wait_for(resp.write_eof(), timeout)
    except (TimeoutError, ConnectionError):
        transport = request.transport
        if transport is not None:
            transport.abort()
        log.debug("http: a client did not take its reply within %gs; cut off", timeout)
    finally:
        view.release()
    return resp


# -- the apps ----------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(bridge: Observed, home: asyncio.AbstractEventLoop | None = None, *,
             guard: Guard | None = None, v1: str = "serve",
             control_http: ControlHttpConfig | None = None,
             connections: ConnectionGuard | _LateGuard | None = None) -> web.Application:
    """The probes' endpoints of ``bridge`` (``/healthz``, ``/readyz``, ``/metrics``).

    ``home``: the bridge's event loop when the app is served on another one (the
    control thread): every endpoint but ``/v1/snapshot`` then reads the bridge there.
    ``v1``: ``"serve"`` adds ``/v1/`` here (deprecated, marked so), ``"moved"`` answers
    ``/v1/`` with a 404 naming ``control_http``, ``"none"`` leaves it out.
    """

    def at_home(handle: Handler) -> Handler:
        async def route(request: web.Request) -> web.StreamResponse:
            _busy_while(connections, request)
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

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_served])
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
                     connections: ConnectionGuard | _LateGuard | None = None) -> web.Application:
    """The control listener's app: ``/v1/`` only."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_served])
    add_v1(app, bridge, home, guard, cfg, connections)
    return app


def add_v1(app: web.Application, bridge: Observed, home: asyncio.AbstractEventLoop | None,
           guard: Guard, cfg: ControlHttpConfig,
           connections: ConnectionGuard | _LateGuard | None,
           *, deprecated: bool = False) -> None:
    """Route ``/v1/`` on ``app`` (see the module)."""
    budget = ReplyBudget(cfg.max_concurrent_snapshots, cfg.max_reply_bytes)
    origins = frozenset(cfg.allowed_origins)
    extra: dict[str, str] = {}
    if deprecated:
        extra["Deprecation"] = "true"

    def cors(request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None:
            return extra
        return {**extra, "Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def error(exc: ControlError, request: web.Request) -> web.StreamResponse:
        headers = {**cors(request), **getattr(exc, "headers", {})}
        return web.Response(body=exc.body(), status=exc.status, content_type=JSON,
                            headers=headers)

    def door(scope: str, handle: Callable[[Control, Principal, web.Request],
                                          Awaitable[web.StreamResponse]]) -> Handler:
        """A ``/v1/`` route: origin, token and scope checked first; a refused request's
        :class:`ControlError` as its JSON body and status."""
        async def route(request: web.Request) -> web.StreamResponse:
            try:
                origin = request.headers.get("Origin")
                if origin is not None and origin not in origins:
                    msg = ("requests from a browser page are refused (its Origin is not in "
                           "control.http.allowed_origins)")
                    raise ControlError(msg, "Origin", 403)
                try:
                    principal = guard.check(request.headers.get("Authorization"), scope)
                except AuthError as exc:
                    err = ControlError(str(exc), "Authorization", exc.status)
                    if exc.status == 401:
                        err.headers = {"WWW-Authenticate": CHALLENGE}
                    raise err from None
                control: Control | None = getattr(bridge, "control", None)
                if control is None:
                    raise ControlError("this bridge has no control surface", None, 404)
                resp = await handle(control, principal, request)
            except ControlError as exc:
                return error(exc, request)
            resp.headers.update(cors(request))
            return resp
        return route

    def _json(body: bytes) -> web.Response:
        return web.Response(body=body, content_type=JSON)

    async def body_of(request: web.Request, *, required: bool) -> bytes:
        """The request body, JSON only, within the idle timeout; then the request
        counts as being served (its connection is no longer evictable)."""
        if (request.body_exists or required) and request.content_type != JSON:
            msg = (f"the body must be {JSON} (Content-Type: {JSON}); got "
                   f"{request.content_type[:64]!r}")
            raise ControlError(msg, "Content-Type", 415)
        try:
            data = await asyncio.wait_for(request.read(), cfg.idle_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            msg = f"the body is larger than {MAX_BODY_BYTES // 1024} KiB"
            raise ControlError(msg, "body", 413) from None
        except TimeoutError:
            msg = f"the body did not arrive within {cfg.idle_timeout_s:g}s"
            raise ControlError(msg, "body", 408) from None
        _busy_while(connections, request)
        return data

    async def snapshot(control: Control, _: Principal, request: web.Request
                       ) -> web.StreamResponse:
        query = query_from_params(request.query)
        _busy_while(connections, request)
        budget.enter()
        try:
            # answered here, on the control thread: the cache is made to be read from it
            body = control.answer(query).body
        except BaseException:
            budget.replies -= 1
            raise
        size = len(body)
        budget.hold(size)  # 503 (and the slot freed) when the total is reached
        try:
            return await send_body(request, body, cfg.send_timeout_s, cors(request))
        finally:
            budget.leave(size)

    async def subscribe(control: Control, who: Principal, request: web.Request
                        ) -> web.StreamResponse:
        req = lease_from_json(await body_of(request, required=True))
        answer = await control.lease(req.kind, req.symbols, req.ttl_s, req.holder,
                                     owner=who.name, max_symbols=who.max_symbols)
        return _json(answer.body)

    async def renew(control: Control, who: Principal, request: web.Request
                    ) -> web.StreamResponse:
        req = renew_from_json(await body_of(request, required=False),
                              request.match_info["lease"])
        return _json((await control.renew(req.lease, req.ttl_s, owner=who.name)).body)

    async def release(control: Control, who: Principal, request: web.Request
                      ) -> web.StreamResponse:
        _busy_while(connections, request)
        await control.release(parse_lease_id(request.match_info["lease"]), owner=who.name)
        return web.Response(status=204)

    async def openapi(request: web.Request) -> web.StreamResponse:
        _busy_while(connections, request)
        return web.Response(body=_openapi(), content_type=JSON, headers=extra)

    async def preflight(request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or origin not in origins:
            body = ControlError("this Origin may not call /v1 (control.http.allowed_origins)",
                                "Origin", 403).body()
            return web.Response(body=body, status=403, content_type=JSON)
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })

    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/snapshot", door("snapshot", snapshot))
    app.router.add_post("/v1/subscriptions", door("lease", subscribe))
    app.router.add_post("/v1/subscriptions/{lease}/renew", door("lease", renew))
    app.router.add_delete("/v1/subscriptions/{lease}", door("lease", release))
    app.router.add_route("OPTIONS", "/v1/{tail:.*}", preflight)


def _openapi() -> bytes:
    """The API reference (``bridge/openapi.json``, also ``docs/openapi.json``)."""
    global _OPENAPI
    if _OPENAPI is None:
        try:
            _OPENAPI = resources.files("bridge").joinpath("openapi.json").read_bytes()
        except OSError:
            _OPENAPI = orjson.dumps({"error": "the API reference is not installed"})
    return _OPENAPI


_OPENAPI: bytes | None = None


def _busy_while(connections: ConnectionGuard | _LateGuard | None,
                request: web.Request) -> None:
    """Mark the request's connection as serving a request (not evictable) until its
    handler ends (:func:`_served`)."""
    if connections is None or _BUSY in request:
        return
    conn = connections.of(request.transport)
    if conn is not None:
        conn.busy += 1
        request[_BUSY] = conn


@web.middleware
async def _served(request: web.Request, handler: Handler) -> web.StreamResponse:
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


#: the connection a request marked busy (:func:`_busy_while`)
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

    def app(connections: _LateGuard) -> web.Application:
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

    def app(connections: _LateGuard) -> web.Application:
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


async def _serve(app: Callable[[_LateGuard], web.Application], cfg: HttpConfig,
                 name: str) -> HttpServer:
    # aiohttp closes a connection whose handler waited this long for a complete
    # request: idle keep-alive and never-finished headers alike
    holder: list[ConnectionGuard] = []
    proxy = _LateGuard(holder)
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


class _LateGuard:
    """The connection guard of an app built before its server (the guard needs the
    runner's request handler factory, the app needs the guard)."""

    def __init__(self, holder: list[ConnectionGuard]) -> None:
        self._holder = holder

    def of(self, transport: asyncio.BaseTransport | None) -> _Counted | None:
        return self._holder[0].of(transport) if self._holder else None


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
