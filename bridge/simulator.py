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
the subscription limit counts tickers and equities together per connection; a request
that would pass the limit is refused whole (``error``, nothing changes); a request whose
every symbol is unsupported is ``error``; a payload that is not an array of strings or
holds more than ``MAX_SYMBOLS_PER_REQUEST`` entries is ``error``; unsubscribing an
unsupported symbol rejects it (``partial``); unknown events are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import socketio
from aiohttp import web
from engineio.async_drivers.aiohttp import WebSocket as _EioWebSocket

from bridge import jsoncodec

log = logging.getLogger("aleno_bridge.simulator")

REFUSED: Final = "Missing or invalid API key."
LIMIT_REACHED: Final = "Subscription limit reached. Contact us to increase limits."
BAD_PAYLOAD: Final = "Invalid payload: expected an array of symbol strings."
NONE_SUPPORTED: Final = "None of the requested symbols is supported."
MAX_SYMBOLS_PER_REQUEST: Final = 1000
TOO_MANY: Final = f"Too many symbols in one request (at most {MAX_SYMBOLS_PER_REQUEST})."
MAX_SYMBOL_LEN: Final = 64

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


class Simulator:
    """The server. ``await start()`` binds (``port=0`` picks a free port), ``await
    stop()`` closes every connection and the socket.

    Test hooks: :meth:`pause` / :meth:`resume` stop and restart the updates while
    connections stay up; :meth:`inject` sends an arbitrary payload to every client;
    :meth:`kick` disconnects every client from the server side.
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
    ) -> None:
        self.host = host
        self.port = port
        self.api_keys = frozenset(api_keys)
        self.interval = interval
        self.max_subscriptions = max_subscriptions
        self.path = path
        self._rng = random.Random(seed)
        self._tickers = self._universe(tickers, default_tickers(), TICKERS, ticker=True)
        self._equities = self._universe(equities, default_equities(), EQUITIES, ticker=False)
        self._clients: dict[str, _Client] = {}
        self._paused = False
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

    async def start(self) -> Simulator:
        app = web.Application()
        self.sio.attach(app, socketio_path=self.path.strip("/"))
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
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    async def inject(self, event: str, payload: Any) -> None:
        for sid in list(self._clients):
            await self.sio.emit(event, payload, to=sid)

    async def kick(self) -> None:
        for sid in list(self._clients):
            await self.sio.disconnect(sid)

    def subscriptions(self) -> list[tuple[set[str], set[str]]]:
        """(tickers, equities) of every connected client."""
        return [(set(c.tickers), set(c.equities)) for c in self._clients.values()]

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
            new = [s for s in accepted if s not in current]
            if client.total() + len(new) > self.max_subscriptions:
                return ack("error", accepted, rejected, LIMIT_REACHED)
            current.update(new)
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

    async def _tick(self) -> None:
        self._step()
        self.ticks += 1
        sent_ms = time.time_ns() // 1_000_000
        ticker_cache: dict[str, dict[str, Any]] = {}
        equity_cache: dict[str, dict[str, Any]] = {}
        for sid, client in list(self._clients.items()):
            if client.tickers:
                states = []
                for s in sorted(client.tickers):
                    if s not in ticker_cache:
                        ticker_cache[s] = self.ticker_state(s, sent_ms)
                    states.append(ticker_cache[s])
                await self.sio.emit("new_token_states", states, to=sid)
            if client.equities:
                eq = []
                for s in sorted(client.equities):
                    if s not in equity_cache:
                        equity_cache[s] = self.equity_state(s, sent_ms)
                    eq.append(equity_cache[s])
                await self.sio.emit("new_equity_states", eq, to=sid)
