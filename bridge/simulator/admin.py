"""The simulator's admin HTTP API (``/admin/``, only with ``admin=True``): the test hooks
over HTTP, for a simulator in another process (bench, demo, black-box tests). Keys are
named by :func:`~bridge.simulator.protocol.fingerprint` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from bridge.core import jsoncodec
from bridge.simulator.hooks import FeedHooks
from bridge.simulator.protocol import Sessions, check_kind, fingerprint
from bridge.simulator.universe import normalize_symbol


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = jsoncodec.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        msg = "the body must be a JSON object"
        raise ValueError(msg)
    return body


class AdminApi:
    """The routes of ``/admin/`` over the simulator's sessions and hooks; ``limit`` is
    the simulator's limit of a key, ``kick`` its disconnection of every client (``None``)
    or those of one key."""

    def __init__(self, sessions: Sessions, hooks: FeedHooks, limit: Callable[[str], int],
                 kick: Callable[[str | None], Awaitable[int]]) -> None:
        self._sessions = sessions
        self._hooks = hooks
        self._limit = limit
        self._kick = kick

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/subscriptions", self._subscriptions)
        app.router.add_post("/admin/pause", self._symbols(self._hooks.pause_symbols))
        app.router.add_post("/admin/resume", self._symbols(self._hooks.resume_symbols))
        app.router.add_post("/admin/drop", self._drop)
        app.router.add_get("/admin/dropped", self._dropped)
        app.router.add_post("/admin/kick", self._kick_clients)

    async def _subscriptions(self, _: web.Request) -> web.Response:
        sessions = self._sessions
        by_key = sessions.subscriptions_by_key()
        keys = {}
        for key in sorted(sessions.api_keys, key=fingerprint):
            feeds = by_key.get(key, {"ticker": set(), "equity": set()})
            keys[fingerprint(key)] = {
                "tickers": sorted(feeds["ticker"]), "equities": sorted(feeds["equity"]),
                "connections": sessions.connections(key), "connects": sessions.connects[key],
                "limit": self._limit(key),
                "subscribe_requests": sessions.subscribe_requests[key],
                "unsubscribe_requests": sessions.unsubscribe_requests[key],
            }
        return web.json_response({
            "keys": keys,
            "paused": {k: sorted(v) for k, v in self._hooks.paused_symbols.items()},
            "feed_paused": self._hooks.paused,
        })

    def _symbols(
        self, hook: Callable[[str, Iterable[str]], None],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await _json(request)
                kind = check_kind(body.get("kind"))
                symbols = body.get("symbols")
                if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
                    return _bad("symbols must be an array of strings")
                hook(kind, symbols)
            except (ValueError, TypeError) as exc:
                return _bad(str(exc))
            return web.json_response({"kind": kind,
                                      "paused": sorted(self._hooks.paused_symbols[kind])})
        return handler

    async def _drop(self, request: web.Request) -> web.Response:
        try:
            body = await _json(request)
            kind = check_kind(body.get("kind"))
            symbols, ticks = body.get("symbols"), body.get("ticks")
            if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
                return _bad("symbols must be an array of strings")
            if not isinstance(ticks, int) or isinstance(ticks, bool):
                return _bad("ticks must be an integer")
            self._hooks.drop(kind, symbols, ticks)
        except (ValueError, TypeError) as exc:
            return _bad(str(exc))
        return web.Response(status=204)

    async def _dropped(self, request: web.Request) -> web.Response:
        try:
            kind = check_kind(request.query.get("kind"))
        except ValueError as exc:
            return _bad(str(exc))
        symbol = request.query.get("symbol")
        if not symbol:
            return _bad("the symbol query parameter is required")
        return web.json_response({"kind": kind, "symbol": normalize_symbol(symbol),
                                  "sentTimestampMs": self._hooks.dropped(kind, symbol)})

    async def _kick_clients(self, request: web.Request) -> web.Response:
        try:
            body = await _json(request)
        except ValueError as exc:
            return _bad(str(exc))
        wanted = body.get("key_fingerprint")
        if wanted is None:
            return web.json_response({"disconnected": await self._kick(None)})
        keys = [k for k in self._sessions.api_keys if fingerprint(k) == wanted]
        if not keys:
            return _bad("no accepted API key has this fingerprint", status=404)
        return web.json_response({"disconnected": sum([await self._kick(k) for k in keys])})


__all__ = ["AdminApi"]
