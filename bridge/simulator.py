"""An Aleno-compatible pricing server: the development target, the test double and
the engine of ``aleno-bridge demo``.

It speaks the Aleno WebSocket V1 protocol over Socket.IO (path ``/v1/socket``):

- API key in the CONNECT packet (``auth: {apiKey}``) or the ``x-api-key`` handshake
  header; a missing or unknown key is refused with ``connect_error`` message
  ``Missing or invalid API key.``
- ``subscribe_ticker`` / ``unsubscribe_ticker`` / ``subscribe_equity`` /
  ``unsubscribe_equity`` with an array of symbols, each acknowledged with
  ``{status, involvedSubscriptions, subscriptionsAfterUpdate, rejectedSubscriptions?,
  error?}``. Symbols are trimmed and upper-cased; unknown symbols are rejected.
- ``new_token_states`` / ``new_equity_states`` arrays every ``interval`` seconds, each
  record stamped with ``sentTimestampMs``; prices follow a geometric random walk.

Choices where the upstream documentation is silent (documented in docs/simulator.md):
the subscription limit is per API key ("per-key feed limit"): it counts the distinct
tickers and equities of all that key's open connections together; a request
that would pass the limit is refused whole (``error``, nothing changes); a request whose
every symbol is unsupported is ``error``; a payload that is not an array of strings or
holds more than ``MAX_SYMBOLS_PER_REQUEST`` entries is ``error``; unsubscribing an
unsupported symbol rejects it (``partial``); unknown events are ignored.

Test hooks (Python, and over HTTP under ``/admin/`` when ``admin=True``) pause single
symbols, drop a number of updates and record their sent times, and disconnect the
clients of one key, so that a consumer's status events (``down``/``stale``/``gap``) and
live subscriptions can be tested end to end. The admin API never shows a key: it names
each by :func:`fingerprint`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import socketio
from aiohttp import web
from engineio.async_drivers.aiohttp import WebSocket as _EioWebSocket

from bridge.core import jsoncodec
from bridge.core.kinds import PRICE_KINDS, PriceKind

log = logging.getLogger("aleno_bridge.simulator")

REFUSED: Final = "Missing or invalid API key."
LIMIT_REACHED: Final = "Subscription limit reached. Contact us to increase limits."
BAD_PAYLOAD: Final = "Invalid payload: expected an array of symbol strings."
NONE_SUPPORTED: Final = "None of the requested symbols is supported."
MAX_SYMBOLS_PER_REQUEST: Final = 1000
TOO_MANY: Final = f"Too many symbols in one request (at most {MAX_SYMBOLS_PER_REQUEST})."
MAX_SYMBOL_LEN: Final = 64
#: the two feeds of the protocol, as the test hooks and the admin API name them
KINDS: Final = PRICE_KINDS
Kind = PriceKind

#: a plausible universe: symbol -> starting price (USD)
TICKERS: Final[dict[str, float]] = {
    "BTC": 87107.08, "ETH": 3120.55, "SOL": 242.1, "BNB": 640.3, "XRP": 1.42, "ADA": 0.98,
    "DOGE": 0.39, "AVAX": 42.7, "DOT": 8.9, "LINK": 17.6, "MATIC": 0.61, "TRX": 0.2,
    "LTC": 96.4, "BCH": 470.2, "UNI": 11.3, "ATOM": 7.6, "XLM": 0.46, "ETC": 31.2,
    "FIL": 5.9, "APT": 12.4, "ARB": 0.97, "OP": 2.1, "NEAR": 6.8, "ICP": 11.9,
    "AAVE": 232.8, "MKR": 1620.0, "INJ": 28.4, "SUI": 3.6, "SEI": 0.55, "TIA": 6.2,
    "RUNE": 5.4, "GRT": 0.27, "SAND": 0.55, "MANA": 0.5, "AXS": 6.9, "CRV": 0.74,
    "LDO": 1.62, "SNX": 2.3, "COMP": 68.2, "SUSHI": 1.1, "YFI": 7400.0, "1INCH": 0.36,
    "PEPE": 0.0000198, "SHIB": 0.0000245, "WIF": 3.1, "BONK": 0.0000452, "JUP": 1.08,
    "PYTH": 0.41, "ENA": 0.62, "ONDO": 0.98, "HBAR": 0.11, "VET": 0.042, "ALGO": 0.31,
    "USDC": 1.0, "USDT": 1.0, "DAI": 1.0, "WBTC": 87090.0, "STETH": 3118.0,
}
EQUITIES: Final[dict[str, float]] = {
    "AAPL": 229.87, "MSFT": 417.0, "GOOGL": 168.9, "AMZN": 197.1, "META": 559.1,
    "NVDA": 141.9, "TSLA": 352.6, "BRK.B": 475.2, "JPM": 247.3, "V": 311.2,
    "UNH": 597.4, "XOM": 121.8, "JNJ": 155.9, "WMT": 90.3, "MA": 520.7, "PG": 173.2,
    "HD": 414.6, "CVX": 161.4, "LLY": 768.9, "ABBV": 172.9, "MRK": 99.8, "KO": 63.5,
    "PEP": 161.2, "AVGO": 163.3, "COST": 947.1, "ADBE": 520.4, "CSCO": 58.9,
    "CRM": 338.7, "NFLX": 897.8, "AMD": 138.7, "INTC": 24.1, "ORCL": 190.2,
    "TMO": 519.4, "ABT": 118.5, "DIS": 115.9, "NKE": 77.6, "MCD": 296.2, "BA": 153.9,
    "IBM": 222.4, "QCOM": 159.2, "TXN": 201.3, "GS": 594.3, "MS": 131.5, "CAT": 397.2,
    "GE": 181.9, "UBER": 71.3, "PYPL": 86.9, "SBUX": 99.4, "PFE": 25.6, "T": 22.9,
    "VZ": 43.8, "BAC": 46.9, "C": 70.1, "SPY": 595.5, "QQQ": 505.8,
}


def default_tickers() -> list[str]:
    return [f"{b}/USD" for b in TICKERS]


def default_equities() -> list[str]:
    return list(EQUITIES)


@dataclass
class _Quote:
    price: float
    volume: float
    cex_share: float
    tvl: float


@dataclass
class _Client:
    key: str
    tickers: set[str] = field(default_factory=set)
    equities: set[str] = field(default_factory=set)

    def total(self) -> int:
        return len(self.tickers) + len(self.equities)


def normalize_symbol(value: str) -> str:
    return value.strip().upper()


def fingerprint(key: str) -> str:
    """A short stable name for an API key that does not reveal it: the first 8 hex
    digits of its SHA-256. The admin API and error messages name keys only this way."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _kind(value: object) -> Kind:
    if value not in KINDS:
        msg = f"kind must be one of {', '.join(KINDS)}, not {value!r}"
        raise ValueError(msg)
    return value


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
        self._rng = random.Random(seed)
        self._tickers = self._universe(tickers, default_tickers(), TICKERS, ticker=True)
        self._equities = self._universe(equities, default_equities(), EQUITIES, ticker=False)
        self._clients: dict[str, _Client] = {}
        self._paused = False
        self._paused_symbols: dict[Kind, set[str]] = {"ticker": set(), "equity": set()}
        #: (kind, symbol) -> updates still to leave out
        self._drops: dict[tuple[Kind, str], int] = {}
        self._dropped: dict[tuple[Kind, str], list[int]] = {}
        #: accepted connections per key, since start (reconnects count)
        self.connects: dict[str, int] = dict.fromkeys(self.api_keys, 0)
        #: ``subscribe_*`` / ``unsubscribe_*`` requests per key, since start, whatever
        #: their answer (what a client's pace costs the key)
        self.subscribe_requests: dict[str, int] = dict.fromkeys(self.api_keys, 0)
        self.unsubscribe_requests: dict[str, int] = dict.fromkeys(self.api_keys, 0)
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

    def _universe(
        self, chosen: Iterable[str] | None, default: list[str], prices: dict[str, float],
        ticker: bool,
    ) -> dict[str, _Quote]:
        out = {}
        for sym in (normalize_symbol(s) for s in (chosen if chosen is not None else default)):
            base = sym.split("/")[0] if ticker else sym
            start = prices.get(base, self._rng.uniform(1, 500))
            out[sym] = _Quote(
                price=start,
                volume=self._rng.uniform(1e6, 5e9),
                cex_share=self._rng.uniform(0.6, 0.95),
                tvl=self._rng.uniform(1e6, 1e9),
            )
        return out

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tickers(self) -> list[str]:
        return list(self._tickers)

    @property
    def equities(self) -> list[str]:
        return list(self._equities)

    def limit(self, key: str) -> int:
        """The subscription limit of ``key`` (``limits[key]``, else ``max_subscriptions``)."""
        return self._limits.get(key, self.max_subscriptions)

    async def start(self) -> Simulator:
        app = web.Application()
        self.sio.attach(app, socketio_path=self.path.strip("/"))
        if self.admin:
            self._add_admin_routes(app)
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
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def _symbols(self, kind: Kind, symbols: Iterable[str]) -> set[str]:
        if isinstance(symbols, str):
            msg = "symbols must be a list of symbols, not one string"
            raise TypeError(msg)
        universe = self._tickers if kind == "ticker" else self._equities
        out = {normalize_symbol(s) for s in symbols}
        unknown = sorted(out - universe.keys())
        if unknown:
            msg = f"not in the simulator's {kind} universe: {', '.join(unknown)}"
            raise ValueError(msg)
        return out

    def pause_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        """Leave these symbols out of every update until :meth:`resume_symbols`; the
        other symbols keep flowing and connections stay up. A client whose every
        subscribed symbol of ``kind`` is paused gets no event of that kind at all.

        ``kind`` is ``ticker`` or ``equity``; symbols are trimmed and upper-cased like
        the protocol does; a symbol outside the universe is a ``ValueError``."""
        k = _kind(kind)
        self._paused_symbols[k] |= self._symbols(k, symbols)

    def resume_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        k = _kind(kind)
        self._paused_symbols[k] -= self._symbols(k, symbols)

    def paused_symbols(self, kind: str) -> set[str]:
        """The symbols of ``kind`` paused now."""
        return set(self._paused_symbols[_kind(kind)])

    def drop(self, kind: str, symbols: Iterable[str], ticks: int) -> None:
        """Leave the next ``ticks`` updates of each symbol out, recording the
        ``sentTimestampMs`` each would have carried (:meth:`dropped`).

        An update is a tick in which at least one client is subscribed to the symbol and
        it is not paused: a drop waits for a subscriber and through a pause, so exactly
        ``ticks`` updates go missing for the client. Ticks keep their cadence, so the
        next sent time after the drop is ``ticks + 1`` intervals after the last one
        before it. A new drop of a symbol replaces the remainder of the previous one."""
        k = _kind(kind)
        if ticks < 0:
            msg = f"ticks must be 0 or more, not {ticks}"
            raise ValueError(msg)
        for sym in self._symbols(k, symbols):
            if ticks:
                self._drops[(k, sym)] = ticks
            else:
                self._drops.pop((k, sym), None)

    def dropped(self, kind: str, symbol: str) -> list[int]:
        """The ``sentTimestampMs`` of every update of ``symbol`` left out by
        :meth:`drop`, in order."""
        return list(self._dropped.get((_kind(kind), normalize_symbol(symbol)), []))

    async def inject(self, event: str, payload: Any) -> None:
        for sid in list(self._clients):
            await self.sio.emit(event, payload, to=sid)

    async def kick(self, key: str | None = None) -> int:
        """Disconnect every client from the server side, or only the clients that
        connected with ``key``; returns how many were disconnected."""
        sids = [sid for sid, c in self._clients.items() if key is None or c.key == key]
        for sid in sids:
            await self.sio.disconnect(sid)
        return len(sids)

    def subscriptions(self) -> list[tuple[set[str], set[str]]]:
        """(tickers, equities) of every connected client."""
        return [(set(c.tickers), set(c.equities)) for c in self._clients.values()]

    def subscriptions_by_key(self) -> dict[str, dict[str, set[str]]]:
        """key -> ``{"ticker": set, "equity": set}``: the union over that key's open
        connections (what its limit counts); keys without a connection are absent."""
        out: dict[str, dict[str, set[str]]] = {}
        for c in self._clients.values():
            mine = out.setdefault(c.key, {"ticker": set(), "equity": set()})
            mine["ticker"] |= c.tickers
            mine["equity"] |= c.equities
        return out

    def connections(self, key: str | None = None) -> int:
        """How many clients are connected now (of ``key`` only, if given)."""
        return sum(1 for c in self._clients.values() if key is None or c.key == key)

    def _feeds_of(self, key: str) -> tuple[set[str], set[str]]:
        tickers: set[str] = set()
        equities: set[str] = set()
        for c in self._clients.values():
            if c.key == key:
                tickers |= c.tickers
                equities |= c.equities
        return tickers, equities

    # -- admin HTTP API (only with admin=True) ------------------------------------

    def _add_admin_routes(self, app: web.Application) -> None:
        """The test hooks over HTTP, for a simulator in another process (bench, demo,
        black-box tests). Keys are named by :func:`fingerprint` only."""
        app.router.add_get("/admin/subscriptions", self._admin_subscriptions)
        app.router.add_post("/admin/pause", self._admin_symbols(self.pause_symbols))
        app.router.add_post("/admin/resume", self._admin_symbols(self.resume_symbols))
        app.router.add_post("/admin/drop", self._admin_drop)
        app.router.add_get("/admin/dropped", self._admin_dropped)
        app.router.add_post("/admin/kick", self._admin_kick)

    @staticmethod
    def _bad(message: str, status: int = 400) -> web.Response:
        return web.json_response({"error": message}, status=status)

    @staticmethod
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

    async def _admin_subscriptions(self, _: web.Request) -> web.Response:
        by_key = self.subscriptions_by_key()
        keys = {}
        for key in sorted(self.api_keys, key=fingerprint):
            feeds = by_key.get(key, {"ticker": set(), "equity": set()})
            keys[fingerprint(key)] = {
                "tickers": sorted(feeds["ticker"]), "equities": sorted(feeds["equity"]),
                "connections": self.connections(key), "connects": self.connects[key],
                "limit": self.limit(key),
                "subscribe_requests": self.subscribe_requests[key],
                "unsubscribe_requests": self.unsubscribe_requests[key],
            }
        return web.json_response({
            "keys": keys,
            "paused": {k: sorted(v) for k, v in self._paused_symbols.items()},
            "feed_paused": self._paused,
        })

    def _admin_symbols(
        self, hook: Callable[[str, Iterable[str]], None],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await self._json(request)
                kind = _kind(body.get("kind"))
                symbols = body.get("symbols")
                if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
                    return self._bad("symbols must be an array of strings")
                hook(kind, symbols)
            except (ValueError, TypeError) as exc:
                return self._bad(str(exc))
            return web.json_response({"kind": kind, "paused": sorted(self._paused_symbols[kind])})
        return handler

    async def _admin_drop(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            kind = _kind(body.get("kind"))
            symbols, ticks = body.get("symbols"), body.get("ticks")
            if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
                return self._bad("symbols must be an array of strings")
            if not isinstance(ticks, int) or isinstance(ticks, bool):
                return self._bad("ticks must be an integer")
            self.drop(kind, symbols, ticks)
        except (ValueError, TypeError) as exc:
            return self._bad(str(exc))
        return web.Response(status=204)

    async def _admin_dropped(self, request: web.Request) -> web.Response:
        try:
            kind = _kind(request.query.get("kind"))
        except ValueError as exc:
            return self._bad(str(exc))
        symbol = request.query.get("symbol")
        if not symbol:
            return self._bad("the symbol query parameter is required")
        return web.json_response({"kind": kind, "symbol": normalize_symbol(symbol),
                                  "sentTimestampMs": self.dropped(kind, symbol)})

    async def _admin_kick(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
        except ValueError as exc:
            return self._bad(str(exc))
        wanted = body.get("key_fingerprint")
        if wanted is None:
            return web.json_response({"disconnected": await self.kick()})
        keys = [k for k in self.api_keys if fingerprint(k) == wanted]
        if not keys:
            return self._bad("no accepted API key has this fingerprint", status=404)
        return web.json_response({"disconnected": sum([await self.kick(k) for k in keys])})

    # -- protocol ------------------------------------------------------------------

    def _register(self) -> None:
        sio = self.sio

        @sio.event
        async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
            key = None
            if isinstance(auth, dict) and isinstance(auth.get("apiKey"), str):
                key = auth["apiKey"]
            if key is None:
                key = environ.get("HTTP_X_API_KEY")
            if key not in self.api_keys:
                raise socketio.exceptions.ConnectionRefusedError(REFUSED)
            self._clients[sid] = _Client(key)
            self.connects[key] += 1

        @sio.event
        async def disconnect(sid: str, *_: Any) -> None:
            self._clients.pop(sid, None)

        @sio.on("subscribe_ticker")
        async def subscribe_ticker(sid: str, data: Any = None) -> dict[str, Any]:
            return self._update(sid, data, ticker=True, subscribe=True)

        @sio.on("unsubscribe_ticker")
        async def unsubscribe_ticker(sid: str, data: Any = None) -> dict[str, Any]:
            return self._update(sid, data, ticker=True, subscribe=False)

        @sio.on("subscribe_equity")
        async def subscribe_equity(sid: str, data: Any = None) -> dict[str, Any]:
            return self._update(sid, data, ticker=False, subscribe=True)

        @sio.on("unsubscribe_equity")
        async def unsubscribe_equity(sid: str, data: Any = None) -> dict[str, Any]:
            return self._update(sid, data, ticker=False, subscribe=False)

    def _update(self, sid: str, data: Any, ticker: bool, subscribe: bool) -> dict[str, Any]:
        client = self._clients.get(sid)
        if client is None:
            return {"status": "error", "error": REFUSED, "involvedSubscriptions": [],
                    "subscriptionsAfterUpdate": []}
        counts = self.subscribe_requests if subscribe else self.unsubscribe_requests
        counts[client.key] += 1
        current = client.tickers if ticker else client.equities
        universe = self._tickers if ticker else self._equities

        def ack(status: str, involved: list[str], rejected: list[str] | None = None,
                error: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "status": status,
                "involvedSubscriptions": involved,
                "subscriptionsAfterUpdate": sorted(current),
            }
            if rejected:
                out["rejectedSubscriptions"] = rejected
            if error is not None:
                out["error"] = error
            return out

        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            return ack("error", [], error=BAD_PAYLOAD)
        if len(data) > MAX_SYMBOLS_PER_REQUEST:
            return ack("error", [], error=TOO_MANY)
        accepted: list[str] = []
        rejected: list[str] = []
        for raw in data:
            sym = normalize_symbol(raw)
            if sym in universe and len(sym) <= MAX_SYMBOL_LEN:
                if sym not in accepted:
                    accepted.append(sym)
            elif sym not in rejected:
                rejected.append(sym[:MAX_SYMBOL_LEN])
        if not accepted:
            return ack("error", [], rejected, NONE_SUPPORTED)
        if subscribe:
            # the limit is the key's: distinct feeds over all its open connections
            key_tickers, key_equities = self._feeds_of(client.key)
            held = key_tickers if ticker else key_equities
            costs = [s for s in accepted if s not in held]
            if len(key_tickers) + len(key_equities) + len(costs) > self.limit(client.key):
                return ack("error", accepted, rejected, LIMIT_REACHED)
            current.update(accepted)
        else:
            current.difference_update(accepted)
        return ack("partial" if rejected else "ok", accepted, rejected)

    # -- price feed ----------------------------------------------------------------

    def _step(self) -> None:
        dt = max(self.interval, 0.001)
        rng = self._rng
        for q in (*self._tickers.values(), *self._equities.values()):
            q.price *= math.exp(rng.gauss(0.0, 0.0008 * math.sqrt(dt)))
            q.volume *= math.exp(rng.gauss(0.0, 0.002 * math.sqrt(dt)))
            q.tvl *= math.exp(rng.gauss(0.0, 0.001 * math.sqrt(dt)))

    def ticker_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        q = self._tickers[symbol]
        spread = 1.0 + self._rng.uniform(-0.0004, 0.0004)
        return {
            "id": symbol,
            "aggregated": {"price": round(q.price, 10), "h24UsdVolume": round(q.volume, 2)},
            "cex": {"price": round(q.price * spread, 10),
                    "h24UsdVolume": round(q.volume * q.cex_share, 2)},
            "dex": {"price": round(q.price / spread, 10),
                    "h24UsdVolume": round(q.volume * (1 - q.cex_share), 2),
                    "usdTvl": round(q.tvl, 2)},
            "sentTimestampMs": sent_ms,
        }

    def equity_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        return {"sentTimestampMs": sent_ms, "symbol": symbol,
                "price": round(self._equities[symbol].price, 4)}

    async def _tick_forever(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if self._paused:
                continue
            try:
                await self._tick()
            except Exception:  # a failing emit to one client must not stop the feed
                log.exception("simulator tick failed")

    def _left_out(self, sent_ms: int) -> dict[Kind, set[str]]:
        """The symbols this tick leaves out: paused ones, and those with a drop pending
        that some client subscribes to (their sent time is recorded, the drop counts
        down)."""
        out = {k: set(v) for k, v in self._paused_symbols.items()}
        if self._drops:
            wanted: dict[Kind, set[str]] = {"ticker": set(), "equity": set()}
            for c in self._clients.values():
                wanted["ticker"] |= c.tickers
                wanted["equity"] |= c.equities
            for (kind, sym), left in list(self._drops.items()):
                if sym not in wanted[kind] or sym in out[kind]:
                    continue
                self._dropped.setdefault((kind, sym), []).append(sent_ms)
                out[kind].add(sym)
                if left <= 1:
                    del self._drops[(kind, sym)]
                else:
                    self._drops[(kind, sym)] = left - 1
        return out

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
