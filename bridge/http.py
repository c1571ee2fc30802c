"""``/healthz``, ``/readyz`` and ``/metrics`` (aiohttp).

``/healthz`` is 200 while the process loop and the dispatcher run (liveness).
``/readyz`` is 200 when the upstream is subscribed, a price arrived within
``source.stale_after_s`` and every required sink is connected with its last publish
successful; 503 otherwise, with the failing checks in the JSON body.
``/metrics`` is the Prometheus text format.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from bridge.app import Bridge

log = logging.getLogger("aleno_bridge.http")


def make_app(bridge: Bridge) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        alive = bridge.alive()
        return web.json_response({"status": "ok" if alive else "dead"},
                                 status=200 if alive else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, checks = bridge.readiness()
        body = orjson.dumps({"ready": ok, "checks": checks})
        return web.Response(body=body, status=200 if ok else 503, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        payload = generate_latest(bridge.metrics.registry)
        resp = web.Response(body=payload)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_http(bridge: Bridge) -> web.AppRunner:
    cfg = bridge.settings.config.http
    runner = web.AppRunner(make_app(bridge), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bridge.http_port = sockets[0].getsockname()[1] if sockets else cfg.port
    log.info("http endpoints on http://%s:%d (/healthz /readyz /metrics)", cfg.host,
             bridge.http_port)
    return runner
