"""The upstream client: Aleno's Socket.IO feed, kept connected and subscribed.

One supervisor task owns the connection. python-socketio's own reconnection is off
because it only covers a transport that drops while connected: a refused CONNECT
(bad key), a server-side namespace disconnect and a silent feed are not retried by
the library. Here every cause goes through one loop, one *attempt* at a time::

    connecting --(TCP, TLS, WebSocket upgrade, Engine.IO OPEN, Socket.IO CONNECT:
                  all within connect_timeout_s)--> connected
    connected  --(subscribe in chunks of SUBSCRIBE_CHUNK symbols, each ack within
                  connect_timeout_s)--> subscribed
    subscribed --(first update: data flows, backoff reset)--> ... until the
                  connection drops, or the watchdog finds the feed silent for
                  ``stale_after_s`` (counted from the last update, or from the
                  subscription while none came yet), or stop
    any failure --> disconnected --(backoff, capped, jittered)--> connecting

Promises:

- nothing that happens during an attempt crashes the process: every exception (a
  timeout, a malformed packet, a refused TLS certificate, an unreadable URL) is a
  failed attempt, counted, logged with its cause (what timed out, the TLS or DNS
  error under python-engineio's "Connection error") and retried after a backoff;
  only cancellation propagates;
- after ``max_connect_attempts`` attempts in a row that delivered no data (0: never
  give up) :meth:`run` raises :class:`SourceError` naming the upstream and the last
  cause (the CLI exits 3); a refused API key ``max_auth_failures`` times in a row
  raises :class:`AuthError`;
- the backoff is reset and the attempt counter cleared only when data flows (the
  first update of a connection), so an upstream that accepts and drops, or acks and
  stays silent, is retried ever more slowly; readiness needs an update received on
  the current connection (``seconds_since_update`` is ``None`` until then);
- every configured subscription is re-issued on every (re)connect, in requests of at
  most :data:`SUBSCRIBE_CHUNK` symbols, from the supervisor task; ``partial`` /
  ``error`` acknowledgements are logged and counted; a rejected symbol is named once
  per process, not on every reconnect;
- the symbol set is live: :meth:`AlenoSource.subscribe` / :meth:`AlenoSource.unsubscribe`
  change it with ``subscribe_*`` / ``unsubscribe_*`` on the open connection (never a
  reconnect), serialized with the (re)connect subscription by one lock, and answer per
  symbol what the acknowledgement said (:class:`SubscriptionResult`); the desired set
  they leave is what every reconnect re-issues; a request the upstream refuses for its
  limit changes nothing that was subscribed before (the upstream refuses the whole
  request: what part of it fits is the pool's to find, :mod:`bridge.upstream.pool`);
- the requests of a (re)connect subscription refused for the limit are told to
  ``on_limit`` (kind, symbols) once the whole desired set was issued and the connection
  is live, so that the listener sees what the key holds of every kind and can ask
  again on this connection for the part that fits;
- live requests are paced, whoever asks: at most ``source.max_subscribe_requests_per_s``
  ``subscribe_*`` / ``unsubscribe_*`` requests per second on this connection (one API
  key), in bursts of twice that (a token bucket, :class:`RateLimit`); a caller over the
  rate waits for its turn, it is not refused. The (re)connect subscription is not paced:
  it is the configured set, issued once per connection;
- the symbols the upstream rejected as unsupported are remembered for the log and the
  metrics in a bounded set (:data:`MAX_REJECTED_SYMBOLS`, the oldest dropped first), so
  that clients asking for junk cannot grow it without end;
- a packet the client cannot read (bad JSON, nesting beyond the decoder's limit, an
  unreadable ack) is counted and reported through ``on_invalid``, never a stray task
  traceback; a frame over :data:`MAX_FRAME_BYTES` drops the connection with that reason;
- WebSocket permessage-deflate is offered unless ``source.compression`` is ``off``;
  the upstream decides, and :attr:`SourceStats.compression` says what was negotiated;
- the API key is sent in ``auth.apiKey`` and in the ``x-api-key`` header and is never
  logged (the Socket.IO and Engine.IO packet loggers stay off); credentials in
  ``source.url`` never reach a log line, an error or ``repr``: :attr:`AlenoSource.url`
  is the sanitized URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from bridge.config.schema import DEFAULT_NAME, SourceConfig
from bridge.core.backoff import Backoff
from bridge.core.kinds import EQUITY_EVENT, TICKER_EVENT
from bridge.core.state import UpstreamSnapshot, UpstreamState
from bridge.upstream.protocol import (
    LIMIT_MARK,
    SUBSCRIBE_CHUNK,
    AuthError,
    BoundedSet,
    Handler,
    InvalidHandler,
    LinkHandler,
    RateLimit,
    SourceError,
    SourceStats,
    SubscriptionResult,
    SubscriptionStatus,
    normalize_symbols,
)
from bridge.upstream.protocol import results_of_ack as _results
from bridge.upstream.sharding import configured_symbols
from bridge.upstream.snapshots import source_snapshot
from bridge.upstream.subscribing import SubscriptionRequests
from bridge.upstream.symbols import ConnectionSymbols, SymbolBook
from bridge.upstream.transport import (
    MAX_FRAME_BYTES,
    REFUSED_MARK,
    TEARDOWN_S,
    WS_DEFLATE_BITS,
    SocketClient,
    Stopped,
    Transport,
    sanitize_url,
    url_password,
)

log = logging.getLogger("aleno_bridge.source")

#: the most symbols :attr:`SourceStats.rejected_symbols` keeps (the oldest dropped first):
#: junk asked for by clients must not grow it without end (read when a source is made:
#: a test may lower it to reach it in seconds)
MAX_REJECTED_SYMBOLS: Final = 10_000


class _Watchdog:
    """Waits until the connection drops, the feed goes silent for ``stale_after_s``, or
    stop; says which."""

    def __init__(self, stale_after_s: float, stop: asyncio.Event, dropped: asyncio.Event,
                 watched: Callable[[], bool], since: Callable[[], float | None]) -> None:
        self.stale_after_s = stale_after_s
        self._stop = stop
        self._dropped = dropped
        #: whether there is anything to watch (the set is live: a source with nothing
        #: to watch has no watchdog)
        self._watched = watched
        #: the watchdog's clock: the last update, or the subscription if none came yet
        self._since = since

    async def watch(self) -> str:
        stale = self.stale_after_s
        while True:
            watched = self._watched()
            if self._stop.is_set():
                return "stop"
            if self._dropped.is_set():
                return "dropped"
            ref = self._since()
            if watched and ref is not None and time.monotonic() - ref > stale:
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


class AlenoSource:
    """Connects, subscribes and hands every ``new_token_states`` /
    ``new_equity_states`` payload to ``on_payload(event_name, payload)``.

    ``on_payload`` is called in the receive loop and must not block. ``on_invalid(kind,
    reason, sample)``, when given, receives every upstream packet that could not be
    decoded (the normalizer's invalid-record counter takes it).

    It composes a :class:`~bridge.upstream.transport.Transport` (the Socket.IO client,
    one connection at a time), a :class:`~bridge.upstream.subscribing.SubscriptionRequests`
    (the desired set and the requests that subscribe it) and a watchdog; it supervises
    them (see the module).
    """

    def __init__(
        self,
        config: SourceConfig,
        api_key: str | None,
        on_payload: Handler,
        on_invalid: InvalidHandler | None = None,
        symbols: dict[str, list[str]] | ConnectionSymbols | None = None,
        *,
        on_link: LinkHandler | None = None,
        on_limit: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.on_payload = on_payload
        self.on_invalid = on_invalid
        #: told when data begins to flow and when a flowing connection ends
        #: (the status events ``up`` / ``down``)
        self.on_link: LinkHandler | None = on_link
        #: told when a (re)connect subscription was refused for the per-key limit, with
        #: the kind and the symbols refused (a pool moves them to another connection)
        self.on_limit: Callable[[str, list[str]], None] | None = on_limit
        # read here, not in SourceStats: a test may lower the bound to reach it in seconds
        self.stats = SourceStats(rejected_symbols=BoundedSet(MAX_REJECTED_SYMBOLS))
        if not isinstance(symbols, ConnectionSymbols):
            # a connection of its own: a symbol book of its own
            symbols = SymbolBook().connection(
                DEFAULT_NAME, configured_symbols(config) if symbols is None else symbols)
        self._stop = asyncio.Event()
        self.transport = Transport(config, api_key, self._stop, self._on_update,
                                   self._bad_packet)
        #: this connection's desired set, in the symbol book
        self.symbols: ConnectionSymbols = symbols
        self.requests = SubscriptionRequests(
            config, self.stats, self.transport,
            lambda sio, event, syms: self._ack(sio, event, syms),
            self._tell_limit, symbols)
        #: the symbols this source asks for, by kind (see
        #: :attr:`SubscriptionRequests.wanted`: the same dict object for the source's life)
        self.wanted: dict[str, frozenset[str]] = self.requests.wanted
        #: paces the live requests of this connection (one API key)
        self.rate_limit: RateLimit = self.requests.rate_limit
        #: the upstream URL without credentials: the one to log and show
        self.url = self.transport.url
        self.ws_url = self.transport.ws_url
        self._watchdog = _Watchdog(
            config.stale_after_s, self._stop, self.transport.dropped,
            lambda: any(self.requests.desired.values()),
            lambda: self.stats.last_update_monotonic or self.requests.subscribed_at)
        self._logged_packets: set[str] = set()
        self._backoff = Backoff(config.backoff.initial_s, config.backoff.max_s)
        self._attempts = 0
        self._flowing = False
        self._warned = False
        self._url_secrets = url_password(config.url)
        self._delivered = False
        self._last_drop = "connection lost"

    def __repr__(self) -> str:
        return f"AlenoSource(url={self.url!r}, tickers={len(self.tickers)}, " \
               f"equities={len(self.equities)})"

    @property
    def endpoint(self) -> str:
        """The CloudEvents ``source`` attribute: sanitized URL and Socket.IO path."""
        return f"{self.url}{self.config.path}"

    # -- the desired set ----------------------------------------------------------

    @property
    def tickers(self) -> list[str]:
        """The desired tickers, in subscription order."""
        return list(self.requests.desired["ticker"])

    @property
    def equities(self) -> list[str]:
        """The desired equities, in subscription order."""
        return list(self.requests.desired["equity"])

    def desired_count(self) -> int:
        """Symbols of every kind in the desired set (the upstream's limit counts them
        together)."""
        return self.requests.count()

    def upstream_subscribed(self, kind: str) -> frozenset[str]:
        """What the last acknowledgement said is subscribed upstream (empty while not
        connected)."""
        return self.requests.upstream_subscribed(kind)

    def upstream_count(self) -> int:
        """Symbols of every kind subscribed upstream by the last acknowledgements of the
        current (or last) connection."""
        return sum(len(v) for v in self.stats.subscribed.values())

    @property
    def live(self) -> bool:
        """The desired set is subscribed on an open connection: a change goes out now."""
        return self.requests.live is not None

    @property
    def _live(self) -> SocketClient | None:
        """The connection on which the desired set is subscribed (None: not now)."""
        return self.requests.live

    @_live.setter
    def _live(self, sio: SocketClient | None) -> None:
        self.requests.live = sio

    def _set_desired(self, kind: str, add: Iterable[str] = (),
                     remove: Iterable[str] = ()) -> None:
        self.requests.set_desired(kind, add, remove)

    def forget(self, kind: str, symbols: Iterable[str]) -> None:
        """Drop ``symbols`` from the desired set without asking the upstream (they were
        never subscribed: a pool moves them to another connection)."""
        self._set_desired(kind, remove=normalize_symbols(symbols))

    # -- state ------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        return any(self.stats.subscribed.values())

    @property
    def flowing(self) -> bool:
        """An update arrived on the current connection."""
        return self._flowing

    def seconds_since_update(self) -> float | None:
        """Seconds since the last update on the current connection (None: none yet)."""
        last = self.stats.last_update_monotonic
        return None if last is None else time.monotonic() - last

    def snapshot(self) -> UpstreamSnapshot:
        """The connection and its subscriptions now, for operator code."""
        return source_snapshot(self.stats, self._flowing, self.seconds_since_update(),
                               self.config.stale_after_s)

    def _scrub(self, text: str) -> str:
        text = sanitize_url(text)
        for s in self._url_secrets:
            text = text.replace(s, "***")
        return text

    def _set_state(self, state: UpstreamState, detail: str = "") -> None:
        if state != self.stats.state:
            msg = f"upstream {state}" + (f": {self._scrub(detail)}" if detail else "")
            warn = state in (UpstreamState.DISCONNECTED, UpstreamState.REFUSED)
            level = logging.WARNING if warn else logging.INFO
            log.log(level, msg, extra={"state": state, "url": self.url})
        self.stats.state = state

    def _warn_insecure(self) -> None:
        # plain http:// and tls_verify: false are reported by the configuration's
        # warnings (validate prints them, run logs them once); credentials in the URL
        # are refused there, but a source built in code can still carry them
        if self._warned:
            return
        self._warned = True
        if self._url_secrets:
            log.warning("source.url contains credentials (user:password@); they are never "
                        "logged, but put the API key in source.api_key or api_key_file")

    # -- data -------------------------------------------------------------------

    def _on_update(self, event: str, data: Any) -> None:
        self.stats.last_update_monotonic = time.monotonic()
        if not self._flowing:
            self._flowing = True
            self._backoff.reset()
            self._attempts = 0
            self.stats.last_error = None
            log.info("upstream data flowing", extra={"url": self.url})
            self._tell_link(True, "")
        self.on_payload(event, data)

    def _tell_link(self, up: bool, cause: str) -> None:
        if self.on_link is not None:
            try:
                self.on_link(up, cause)
            except Exception:  # a status listener must never break the connection
                log.exception("upstream link listener failed")

    def _bad_packet(self, data: Any, exc: BaseException) -> None:
        text = data if isinstance(data, str) else repr(data)
        reason = "too_deep" if "too deeply" in str(exc) else "undecodable_packet"
        head = text[:64]
        if TICKER_EVENT in head:
            kind = "ticker"
        elif EQUITY_EVENT in head:
            kind = "equity"
        elif text.startswith("3"):
            kind, reason = "upstream", "unreadable_ack"
        else:
            kind = "upstream"
        key = f"{kind}:{reason}"
        self.stats.bad_packets[key] = self.stats.bad_packets.get(key, 0) + 1
        sample = text[:200] + ("..." if len(text) > 200 else "")
        if self.on_invalid is not None:
            with contextlib.suppress(Exception):
                self.on_invalid(kind, reason, sample)
        elif key not in self._logged_packets:
            self._logged_packets.add(key)
            log.warning("dropped an upstream packet that cannot be read (%s: %s: %s); later "
                        "ones are only counted. sample: %s", reason, type(exc).__name__,
                        str(exc)[:200], sample, extra={"kind": kind, "reason": reason})

    # -- subscriptions ----------------------------------------------------------

    async def _ack(self, sio: SocketClient, event: str, symbols: list[str]) -> Any:
        """Send one request on ``sio`` and return its acknowledgement."""
        return await self.transport.ack(sio, event, symbols)

    def _handle_ack(self, kind: str, requested: list[str], ack: Any, part: str = "") -> bool:
        """Count and log one acknowledgement; False when the request failed."""
        return self.requests.handle_ack(kind, requested, ack, part)

    def _tell_limit(self, kind: str, refused: list[str]) -> None:
        if self.on_limit is None or not refused:
            return
        try:
            self.on_limit(kind, refused)
        except Exception:
            log.exception("upstream limit listener failed")

    async def subscribe(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """Add ``symbols`` (normalized) to the desired set of ``kind`` and, when the
        connection is subscribed, subscribe them on it now, in requests of at most
        :data:`SUBSCRIBE_CHUNK` symbols.

        Returns, per symbol, what the acknowledgement said. Symbols refused (``rejected``,
        ``limit``, ``error``) leave the desired set; ``accepted`` and ``pending`` ones
        stay in it and are re-issued on every reconnect. A symbol already desired
        answers ``accepted`` (subscribed upstream now) or ``pending`` without a request.
        Their records are accepted (:attr:`wanted`) from before the request leaves.
        Each request waits for its turn under :attr:`rate_limit`.
        """
        return await self.requests.change(kind, normalize_symbols(symbols), subscribe=True)

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """Remove ``symbols`` from the desired set of ``kind`` (their records are dropped
        as ``unsubscribed`` from now on) and, when the connection is subscribed,
        unsubscribe them on it now. ``pending``: not connected, nothing to undo;
        ``accepted``: the upstream confirmed (or never had it)."""
        return await self.requests.change(kind, normalize_symbols(symbols), subscribe=False)

    async def pin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`subscribe`, for the configuration's symbols (a reload). With leases,
        reloads go through :meth:`bridge.upstream.subscriptions.Subscriptions.set_pinned`, which
        keeps a symbol a lease still holds."""
        return await self.subscribe(kind, symbols)

    async def unpin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`unsubscribe`, for symbols a reload removed from the configuration."""
        return await self.unsubscribe(kind, symbols)

    def _restart(self, cause: str) -> None:
        """Replace a connection that is open but broken (an unanswered request)."""
        self.transport.restart(cause)

    # -- the loop ---------------------------------------------------------------

    async def _attempt(self) -> str:
        """One connection, from TCP to its end; returns why it ended."""
        self._flowing = False
        self.requests.subscribed_at = None
        self.stats.last_update_monotonic = None
        session, sio = self.transport.open()
        try:
            await self.transport.connect(sio)
            self.stats.compression = self.transport.compression(sio)
            self.stats.connects += 1
            if self.stats.connects > 1:
                self.stats.reconnects += 1
            self._set_state(UpstreamState.CONNECTED)
            await self.requests.subscribe_all(sio)
            self.requests.subscribed_at = time.monotonic()
            feeds = sum(map(len, self.stats.subscribed.values()))
            self._set_state(UpstreamState.SUBSCRIBED, f"{feeds} feed(s)")
            reason = await self._watchdog.watch()
            if reason == "dropped":
                self._last_drop = self.transport.drop_reason()
            return reason
        finally:
            self.requests.live = None
            self._delivered = self._flowing
            self.requests.subscribed_at = None
            try:
                await self.transport.teardown(sio, session)
            finally:
                self.transport.sio = None
                self._flowing = False
                self.stats.last_update_monotonic = None

    async def run(self) -> None:
        """Keep the feed up until :meth:`stop`. Raises :class:`SourceError` when giving up."""
        self._warn_insecure()
        auth_failures = 0
        while not self._stop.is_set():
            self._set_state(UpstreamState.CONNECTING)
            cause: str | None = None
            refused = False
            try:
                reason = await self._attempt()
            except Stopped:
                break
            except Exception as exc:
                reason = "failed"
                cause = self._scrub(self.transport.describe(exc))
                error = self.transport.connect_error
                refused = bool(error and REFUSED_MARK in error)
            if reason == "stop" or self._stop.is_set():
                break
            if reason == "stale":
                self.stats.watchdog_restarts += 1
                cause = f"no update for {self.config.stale_after_s:g}s"
            elif reason == "dropped":
                cause = self._scrub(self._last_drop)
            delivered = self._delivered
            if delivered:
                self._tell_link(False, cause or reason)
            if reason == "failed" and self.stats.state == UpstreamState.CONNECTING:
                self.stats.connect_failures += 1
            self.stats.last_error = cause
            if not delivered:
                self._attempts += 1
            limit = self.config.max_connect_attempts
            giving_up = not delivered and bool(limit) and self._attempts >= limit
            if refused:
                auth_failures += 1
                self._set_state(UpstreamState.REFUSED, cause or "")
                if auth_failures >= self.config.max_auth_failures:
                    msg = (
                        f"the upstream {self.url} refused the API key {auth_failures} "
                        f"time(s) in a row ({cause!r}). Check source.api_key / "
                        "source.api_key_file (or ALENO_API_KEY) and that the key is active."
                    )
                    raise AuthError(msg) from None
            else:
                auth_failures = 0
                attempt = "" if delivered else f" (attempt {self._attempts})"
                self._set_state(UpstreamState.DISCONNECTED, f"{cause}{attempt}"
                                + ("; giving up" if giving_up else "; reconnecting"))
            if giving_up:
                msg = (
                    f"could not connect to the upstream {self.url} and get prices after "
                    f"{self._attempts} attempt(s); last error: {cause}. Check source.url "
                    "and the network, or raise source.max_connect_attempts (0 retries "
                    "forever)."
                )
                raise SourceError(msg) from None
            await self._sleep(self._backoff.next())
        self._set_state(UpstreamState.STOPPED)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def stop(self) -> None:
        self._stop.set()

__all__ = [
    "LIMIT_MARK",
    "MAX_FRAME_BYTES",
    "MAX_REJECTED_SYMBOLS",
    "REFUSED_MARK",
    "SUBSCRIBE_CHUNK",
    "TEARDOWN_S",
    "WS_DEFLATE_BITS",
    "AlenoSource",
    "AuthError",
    "BoundedSet",
    "Handler",
    "InvalidHandler",
    "LinkHandler",
    "RateLimit",
    "SourceError",
    "SourceStats",
    "SubscriptionResult",
    "SubscriptionStatus",
    "_results",
    "normalize_symbols",
    "sanitize_url",
]
