"""The upstream client: Aleno's Socket.IO feed, kept connected and subscribed.

One supervisor task owns the connection. python-socketio's own reconnection is off
because it only covers a transport that drops while connected: a refused CONNECT
(bad key), a server-side namespace disconnect and a silent feed are not retried by
the library. Here every cause goes through one loop: connect -> subscribe -> wait
until the connection drops or the watchdog finds the feed silent for
``stale_after_s`` -> back off (capped, jittered, reset after success) -> again.

Promises:

- every configured subscription is re-issued on every (re)connect, from the
  supervisor task, never from the receive loop;
- ``partial`` / ``error`` acknowledgements are logged and counted; a rejected symbol is
  named once per process, not on every reconnect;
- a refused API key is retried ``max_auth_failures`` times, then :meth:`run` raises
  :class:`AuthError` (the CLI exits non-zero with a clear message);
- the API key is sent in ``auth.apiKey`` and in the ``x-api-key`` header and is never
  logged: the Socket.IO and Engine.IO packet loggers stay off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import socketio

from bridge import jsoncodec
from bridge.backoff import Backoff
from bridge.config import SourceConfig
from bridge.normalize import EQUITY_EVENT, TICKER_EVENT
from bridge.sharding import shard_symbols

log = logging.getLogger("aleno_bridge.source")

REFUSED_MARK: Final = "invalid API key"
ACK_TIMEOUT_S: Final = 15.0


class SourceError(Exception):
    """The upstream cannot be used; the message names the cause and the fix."""


class AuthError(SourceError):
    pass


@dataclass
class SourceStats:
    state: str = "idle"
    connects: int = 0
    reconnects: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    rejected_symbols: set[str] = field(default_factory=set)
    subscribed: dict[str, list[str]] = field(default_factory=dict)
    last_update_monotonic: float | None = None
    watchdog_restarts: int = 0
    connect_failures: int = 0


Handler = Callable[[str, Any], None]


class AlenoSource:
    """Connects, subscribes and hands every ``new_token_states`` /
    ``new_equity_states`` payload to ``on_payload(event_name, payload)``.

    ``on_payload`` is called in the receive loop and must not block.
    """

    def __init__(
        self,
        config: SourceConfig,
        api_key: str | None,
        on_payload: Handler,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self.on_payload = on_payload
        self.stats = SourceStats()
        tickers, equities = config.tickers, config.equities
        if config.shard is not None:
            tickers = shard_symbols("ticker", tickers, config.shard.index, config.shard.count)
            equities = shard_symbols("equity", equities, config.shard.index, config.shard.count)
        self.tickers = tickers
        self.equities = equities
        self._stop = asyncio.Event()
        self._dropped = asyncio.Event()
        self._sio: socketio.AsyncClient | None = None
        self._connect_error: str | None = None
        self._logged_errors: set[str] = set()

    def __repr__(self) -> str:
        return f"AlenoSource(url={self.config.url!r}, tickers={len(self.tickers)}, " \
               f"equities={len(self.equities)})"

    # -- state ------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        return any(self.stats.subscribed.values())

    @property
    def connected(self) -> bool:
        return self.stats.state == "subscribed" or self.stats.state == "connected"

    def seconds_since_update(self) -> float | None:
        last = self.stats.last_update_monotonic
        return None if last is None else time.monotonic() - last

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.stats.state:
            msg = f"upstream {state}" + (f": {detail}" if detail else "")
            level = logging.WARNING if state in ("disconnected", "refused") else logging.INFO
            log.log(level, msg, extra={"state": state, "url": self.config.url})
        self.stats.state = state

    # -- client -----------------------------------------------------------------

    def _client(self) -> socketio.AsyncClient:
        sio = socketio.AsyncClient(
            reconnection=False,
            logger=False,
            engineio_logger=False,
            json=jsoncodec,
            ssl_verify=self.config.tls_verify,
            handle_sigint=False,
        )

        @sio.event
        async def connect_error(data: Any) -> None:
            msg = data.get("message") if isinstance(data, dict) else data
            self._connect_error = str(msg)

        @sio.event
        async def disconnect(*_: Any) -> None:
            self._dropped.set()

        @sio.on(TICKER_EVENT)
        async def tickers(data: Any) -> None:
            self.stats.last_update_monotonic = time.monotonic()
            self.on_payload(TICKER_EVENT, data)

        @sio.on(EQUITY_EVENT)
        async def equities(data: Any) -> None:
            self.stats.last_update_monotonic = time.monotonic()
            self.on_payload(EQUITY_EVENT, data)

        return sio

    async def _connect_once(self) -> socketio.AsyncClient:
        key = self._api_key or ""
        sio = self._client()
        self._connect_error = None
        self._dropped.clear()
        try:
            await sio.connect(
                self.config.url,
                headers={"x-api-key": key} if key else {},
                auth={"apiKey": key} if key else None,
                transports=["websocket"],
                socketio_path=self.config.path.strip("/"),
                wait_timeout=self.config.connect_timeout_s,
                retry=False,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await sio.disconnect()
            raise
        return sio

    async def _subscribe(self, sio: socketio.AsyncClient) -> None:
        self.stats.subscribed = {}
        for kind, event, symbols in (
            ("ticker", "subscribe_ticker", self.tickers),
            ("equity", "subscribe_equity", self.equities),
        ):
            if not symbols:
                continue
            ack = await sio.call(event, list(symbols), timeout=ACK_TIMEOUT_S)
            self._handle_ack(kind, list(symbols), ack)

    def _handle_ack(self, kind: str, requested: list[str], ack: Any) -> None:
        if not isinstance(ack, dict):
            self.stats.acks["invalid"] = self.stats.acks.get("invalid", 0) + 1
            log.error("upstream sent an unreadable %s subscription ack: %.200r", kind, ack)
            return
        status = str(ack.get("status"))
        self.stats.acks[status] = self.stats.acks.get(status, 0) + 1
        after = ack.get("subscriptionsAfterUpdate")
        if isinstance(after, list):
            self.stats.subscribed[kind] = [s for s in after if isinstance(s, str)]
        rejected = [s for s in ack.get("rejectedSubscriptions") or [] if isinstance(s, str)]
        new_rejections = [s for s in rejected if f"{kind}:{s}" not in self.stats.rejected_symbols]
        self.stats.rejected_symbols.update(f"{kind}:{s}" for s in rejected)
        if status == "ok":
            return
        if status == "partial":
            if new_rejections:
                log.warning(
                    "upstream rejected %d %s symbol(s) as unsupported: %s "
                    "(remove them from source.%ss)",
                    len(new_rejections), kind, ", ".join(new_rejections[:50]), kind,
                    extra={"kind": kind, "rejected": new_rejections[:50]},
                )
            return
        error = str(ack.get("error") or "no reason given")
        marker = f"{kind}:{error}"
        if marker not in self._logged_errors:
            self._logged_errors.add(marker)
            log.error(
                "upstream refused the %s subscription of %d symbol(s): %s",
                kind, len(requested), error, extra={"kind": kind, "ack_status": status},
            )

    async def _watch(self) -> str:
        """Wait until the connection drops, the feed goes silent, or stop; say which."""
        stale = self.config.stale_after_s
        while True:
            if self._stop.is_set():
                return "stop"
            if self._dropped.is_set():
                return "dropped"
            since = self.seconds_since_update()
            if self.subscribed and since is not None and since > stale:
                return "stale"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wait_any(), timeout=min(1.0, stale / 4))

    async def _wait_any(self) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        dropped = asyncio.ensure_future(self._dropped.wait())
        try:
            await asyncio.wait({stop, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            dropped.cancel()

    async def run(self) -> None:
        """Keep the feed up until :meth:`stop`. Raises :class:`SourceError` when giving up."""
        backoff = Backoff(self.config.backoff.initial_s, self.config.backoff.max_s)
        auth_failures = 0
        attempts = 0
        while not self._stop.is_set():
            self._set_state("connecting")
            try:
                sio = await self._connect_once()
            except socketio.exceptions.ConnectionError as exc:
                attempts += 1
                self.stats.connect_failures += 1
                reason = self._connect_error or str(exc) or type(exc).__name__
                if REFUSED_MARK in reason:
                    auth_failures += 1
                    self._set_state("refused", reason)
                    if auth_failures >= self.config.max_auth_failures:
                        msg = (
                            f"the upstream {self.config.url} refused the API key "
                            f"{auth_failures} time(s) in a row ({reason!r}). Check "
                            "source.api_key / source.api_key_file (or ALENO_API_KEY) and "
                            "that the key is active."
                        )
                        raise AuthError(msg) from None
                else:
                    auth_failures = 0
                    self._set_state("disconnected", f"cannot connect to {self.config.url}: "
                                    f"{reason}")
                limit = self.config.max_connect_attempts
                if limit and attempts >= limit:
                    msg = (
                        f"could not connect to the upstream {self.config.url} after {attempts} "
                        f"attempt(s); last error: {reason}. Check source.url and the network, "
                        "or raise source.max_connect_attempts (0 retries forever)."
                    )
                    raise SourceError(msg) from None
                await self._sleep(backoff.next())
                continue
            attempts = 0
            auth_failures = 0
            self.stats.connects += 1
            if self.stats.connects > 1:
                self.stats.reconnects += 1
            self._sio = sio
            self._set_state("connected")
            reason = "dropped"
            try:
                await self._subscribe(sio)
                # a fresh connection gets a full stale window before the watchdog bites
                self.stats.last_update_monotonic = time.monotonic()
                self._set_state("subscribed", f"{sum(map(len, self.stats.subscribed.values()))} "
                                "feed(s)")
                backoff.reset()
                reason = await self._watch()
            except (TimeoutError, socketio.exceptions.SocketIOError, OSError) as exc:
                log.warning("upstream subscription failed: %s: %s", type(exc).__name__, exc)
            finally:
                self._sio = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sio.disconnect(), 5.0)
            if reason == "stop":
                break
            if reason == "stale":
                self.stats.watchdog_restarts += 1
                self._set_state("disconnected", f"no update for {self.config.stale_after_s:g}s; "
                                "reconnecting")
            else:
                self._set_state("disconnected", "connection lost; reconnecting")
            await self._sleep(backoff.next())
        self._set_state("stopped")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def stop(self) -> None:
        self._stop.set()
