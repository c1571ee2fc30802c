"""``/v1/``: the HTTP door of the control surface (:mod:`bridge.control.core`), guarded
by bearer tokens with scopes (:mod:`bridge.control.auth`). :func:`add_v1` routes it on
an app of :mod:`bridge.control.http` (the control listener's, or the probes' listener's
as a deprecated fallback)::

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

What a client may hold besides its connections (:mod:`bridge.control.connections`):
a reply is written in parts, each of which the client must take within
``send_timeout_s`` or the connection is cut (a client that does not read its answer
frees what it pinned); snapshots are assembled for at most ``max_concurrent_snapshots``
requests at once and the replies assembled or being sent hold at most
``max_reply_bytes`` in total; beyond, 503 with ``Retry-After``.

``/v1/snapshot`` is answered on the loop that serves the app (the control thread,
:mod:`bridge.control.thread`), beside the data path; the leases run on the bridge's own
loop (:meth:`Control.lease <bridge.control.core.Control.lease>` goes there by itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Final, Protocol

import orjson
from aiohttp import web

from bridge.config.schema import ControlHttpConfig
from bridge.control.auth import CHALLENGE, AuthError, Guard, Principal
from bridge.control.connections import ConnectionGuard, Handler, LateGuard, busy_while
from bridge.control.requests import (
    ControlError,
    lease_from_json,
    parse_lease_id,
    query_from_params,
    renew_from_json,
)

if TYPE_CHECKING:
    from bridge.control.core import Control

log = logging.getLogger("aleno_bridge.http")

#: the largest request body (a lease of 256 symbols is ~5 KiB)
MAX_BODY_BYTES: Final = 64 * 1024
#: a reply is written in parts of this size, each within ``send_timeout_s``
SEND_CHUNK: Final = 64 * 1024
#: what a 503 for a busy snapshot door asks the client to wait (seconds)
RETRY_AFTER_S: Final = 1
#: the media type of every ``/v1`` request body
JSON: Final = "application/json"


class Controlled(Protocol):
    """What ``/v1/`` reads of a bridge (:class:`bridge.control.http.Observed` is one)."""

    #: the control surface; ``None``: the ``/v1/`` routes answer 404. An object
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



def add_v1(app: web.Application, bridge: Controlled, home: asyncio.AbstractEventLoop | None,
           guard: Guard, cfg: ControlHttpConfig,
           connections: ConnectionGuard | LateGuard | None,
           *, deprecated: bool = False) -> None:
    """Route ``/v1/`` on ``app`` (see the module); ``home`` is unused (the lease calls
    find the bridge's loop by themselves)."""
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
        busy_while(connections, request)
        return data

    async def snapshot(control: Control, _: Principal, request: web.Request
                       ) -> web.StreamResponse:
        query = query_from_params(request.query)
        busy_while(connections, request)
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
        busy_while(connections, request)
        await control.release(parse_lease_id(request.match_info["lease"]), owner=who.name)
        return web.Response(status=204)

    async def openapi(request: web.Request) -> web.StreamResponse:
        busy_while(connections, request)
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


__all__ = [
    "JSON",
    "MAX_BODY_BYTES",
    "RETRY_AFTER_S",
    "SEND_CHUNK",
    "Controlled",
    "ReplyBudget",
    "add_v1",
    "send_body",
]
