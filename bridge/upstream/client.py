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
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableSet
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar
from urllib.parse import unquote

import aiohttp
import engineio
import socketio

from bridge.config.schema import SourceConfig
from bridge.core import jsoncodec
from bridge.core.backoff import Backoff
from bridge.core.kinds import EQUITY_EVENT, TICKER_EVENT
from bridge.core.state import UpstreamSnapshot, UpstreamState, frozen_counts
from bridge.upstream.sharding import configured_symbols

log = logging.getLogger("aleno_bridge.source")

REFUSED_MARK: Final = "invalid API key"
#: symbols per subscribe request (a Socket.IO server limits the message size, 1 MB by
#: default, and the upstream may limit the symbols of one request)
SUBSCRIBE_CHUNK: Final = 200
#: the largest WebSocket frame accepted from the upstream (aiohttp's default limit)
#: one ``new_token_states`` tick of 50,000 tickers is about 10 MB; a frame larger than
#: this is refused (the connection drops with that reason) instead of buffered
MAX_FRAME_BYTES: Final = 32 * 1024 * 1024
#: the permessage-deflate window (bits) offered when ``source.compression`` is ``auto``
WS_DEFLATE_BITS: Final = 15
#: how long tearing a connection down may take before its tasks are cancelled
TEARDOWN_S: Final = 2.0
#: the most symbols :attr:`SourceStats.rejected_symbols` keeps (the oldest dropped first):
#: junk asked for by clients must not grow it without end
MAX_REJECTED_SYMBOLS: Final = 10_000

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*@")
_ACK_ID = re.compile(r"^3(?:/[^,]*,)?(\d+)")
_MESSAGE_TOO_BIG: Final = 1009
_T = TypeVar("_T")


def sanitize_url(text: str) -> str:
    """``text`` without the userinfo (``user:password@``) of any URL in it."""
    return _USERINFO.sub(r"\1", text)


def _url_password(url: str) -> list[str]:
    m = _USERINFO.match(url)
    if m is None:
        return []
    userinfo = url[m.end(1):m.end() - 1]
    _, _, password = userinfo.partition(":")
    return [v for v in (userinfo, password, unquote(password)) if v]


class SourceError(Exception):
    """The upstream cannot be used; the message names the cause and the fix."""


class AuthError(SourceError):
    pass


class _AttemptFailed(Exception):
    """One connection attempt failed; the message is the cause, ready to log."""


class _Stopped(Exception):
    pass


class _UnreadableAck:
    """Handed to an ack callback whose acknowledgement could not be decoded."""

    def __init__(self, raw: str, error: BaseException) -> None:
        self.raw = raw
        self.error = error

    def __repr__(self) -> str:
        return f"<unreadable ack ({type(self.error).__name__}): {self.raw[:120]!r}>"


#: the start of the upstream's per-key limit error ("Subscription limit reached. Contact
#: us to increase limits.")
LIMIT_MARK: Final = "Subscription limit reached"
#: the price kinds and their subscribe / unsubscribe events
_EVENTS: Final = {
    "ticker": ("subscribe_ticker", "unsubscribe_ticker"),
    "equity": ("subscribe_equity", "unsubscribe_equity"),
}


class SubscriptionStatus(StrEnum):
    """What became of one symbol of a live (un)subscribe request."""

    #: the upstream acknowledged it (subscribed; for unsubscribe: no longer subscribed)
    ACCEPTED = "accepted"
    #: the upstream does not support the symbol
    REJECTED = "rejected"
    #: refused by the upstream's per-key limit; nothing subscribed before changed
    LIMIT = "limit"
    #: refused for another reason (the ack's error text), or the ack was unreadable
    ERROR = "error"
    #: not connected now: it is (un)subscribed on the next connect
    PENDING = "pending"
    #: held by a lease until the configured symbols needed its room (see
    #: :mod:`bridge.upstream.subscriptions`); no longer subscribed for that lease
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class SubscriptionResult:
    """One symbol's answer: the status and, when refused, the upstream's error text."""

    status: SubscriptionStatus
    error: str | None = None

    @property
    def held(self) -> bool:
        """The symbol is in the desired set: subscribed now, or on the next connect."""
        return self.status in (SubscriptionStatus.ACCEPTED, SubscriptionStatus.PENDING)


ACCEPTED: Final = SubscriptionResult(SubscriptionStatus.ACCEPTED)
PENDING: Final = SubscriptionResult(SubscriptionStatus.PENDING)


def normalize_symbols(symbols: Iterable[str]) -> list[str]:
    """``symbols`` as the upstream normalizes them (trimmed, upper-cased), each once, in
    order, without empty ones."""
    out: dict[str, None] = {}
    for s in symbols:
        n = s.strip().upper()
        if n:
            out[n] = None
    return list(out)


class BoundedSet(MutableSet[str]):
    """A set of at most ``maxlen`` strings: adding one more drops the oldest.

    It compares equal to a ``set`` with the same members, so readers that treated
    :attr:`SourceStats.rejected_symbols` as a set still do.
    """

    __slots__ = ("_items", "maxlen")

    def __init__(self, maxlen: int, items: Iterable[str] = ()) -> None:
        if maxlen < 1:
            msg = "maxlen must be at least 1"
            raise ValueError(msg)
        self.maxlen = maxlen
        self._items: dict[str, None] = {}
        self.update(items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"BoundedSet({len(self._items)}/{self.maxlen})"

    def add(self, value: str) -> None:
        if value in self._items:
            return
        self._items[value] = None
        while len(self._items) > self.maxlen:
            del self._items[next(iter(self._items))]

    def discard(self, value: str) -> None:
        self._items.pop(value, None)

    def update(self, values: Iterable[str]) -> None:
        for v in values:
            self.add(v)


def _rejected_set() -> BoundedSet:
    # read at call time: a test may lower the bound to reach it in seconds
    return BoundedSet(MAX_REJECTED_SYMBOLS)


class RateLimit:
    """A token bucket: ``rate`` requests per second on average, bursts of ``burst``
    (default twice the rate, at least 1).

    :meth:`take` waits until the caller's request may go: callers over the rate are
    delayed in the order they came, never refused. A caller cancelled while it waits
    has spent its token (the bucket errs on the side of fewer requests).
    """

    __slots__ = ("_at", "_tokens", "burst", "clock", "rate", "waited_s")

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            msg = "rate must be positive"
            raise ValueError(msg)
        self.rate = float(rate)
        self.burst = max(1.0, 2.0 * self.rate if burst is None else float(burst))
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()
        #: seconds callers were delayed in total (for tests and curiosity)
        self.waited_s = 0.0

    def reserve(self) -> float:
        """Take one token now; return how long the caller must wait before its request."""
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self) -> None:
        delay = self.reserve()
        if delay > 0:
            self.waited_s += delay
            await asyncio.sleep(delay)


@dataclass
class SourceStats:
    state: UpstreamState = UpstreamState.IDLE
    connects: int = 0
    reconnects: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    #: ``kind:symbol`` the upstream rejected as unsupported, at most
    #: :data:`MAX_REJECTED_SYMBOLS` (the oldest dropped first)
    rejected_symbols: BoundedSet = field(default_factory=_rejected_set)
    subscribed: dict[str, list[str]] = field(default_factory=dict)
    #: the last update on the current connection (None until one arrived)
    last_update_monotonic: float | None = None
    watchdog_restarts: int = 0
    connect_failures: int = 0
    #: subscribe requests that were refused, unreadable or unanswered
    failed_subscriptions: int = 0
    #: packets the client could not read, by reason
    bad_packets: dict[str, int] = field(default_factory=dict)
    #: the cause of the last failed attempt or drop (cleared when data flows)
    last_error: str | None = None
    #: permessage-deflate window bits negotiated on the current (or last) connection;
    #: 0: uncompressed
    compression: int = 0
    #: live ``subscribe_*`` / ``unsubscribe_*`` requests sent (paced by
    #: ``source.max_subscribe_requests_per_s``; the (re)connect subscription not counted)
    live_requests: int = 0


Handler = Callable[[str, Any], None]
InvalidHandler = Callable[[str, str, Any], None]
#: ``(up, cause)``: data began to flow on a connection (``True``, cause ``""``), or a
#: connection that had delivered data ended (``False`` and why)
LinkHandler = Callable[[bool, str], None]

_PHASES: Final = {
    "tcp": "no TCP/TLS connection within {t}s to {url}",
    "upgrade": "no WebSocket upgrade response within {t}s from {url}",
    "open": "no Engine.IO OPEN within {t}s from {url}",
    "connect": "no Socket.IO CONNECT reply within {t}s from {url}",
}


class _Client(socketio.AsyncClient):  # type: ignore[misc]
    """python-socketio's client, with every packet that fails to decode or dispatch
    reported to ``bad_packet`` instead of dying in a background task, and the
    handshake phases reported to ``on_phase``."""

    def __init__(self, bad_packet: Callable[[Any, BaseException], None],
                 on_phase: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._bad_packet = bad_packet
        self._on_phase = on_phase

    async def _handle_eio_connect(self) -> None:
        self._on_phase("connect")
        await super()._handle_eio_connect()

    async def _handle_eio_message(self, data: Any) -> None:
        callback = None
        if isinstance(data, str) and (m := _ACK_ID.match(data)) is not None:
            callback = self.callbacks.get("/", {}).get(int(m.group(1)))
        try:
            await super()._handle_eio_message(data)
        except Exception as exc:
            self._binary_packet = None
            self._bad_packet(data, exc)
            if callback is not None:
                self.callbacks.get("/", {}).pop(int(m.group(1)), None)  # type: ignore[union-attr]
                callback(_UnreadableAck(str(data), exc))


class AlenoSource:
    """Connects, subscribes and hands every ``new_token_states`` /
    ``new_equity_states`` payload to ``on_payload(event_name, payload)``.

    ``on_payload`` is called in the receive loop and must not block. ``on_invalid(kind,
    reason, sample)``, when given, receives every upstream packet that could not be
    decoded (the normalizer's invalid-record counter takes it).
    """

    def __init__(
        self,
        config: SourceConfig,
        api_key: str | None,
        on_payload: Handler,
        on_invalid: InvalidHandler | None = None,
        symbols: dict[str, list[str]] | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self.on_payload = on_payload
        self.on_invalid = on_invalid
        #: told when data begins to flow and when a flowing connection ends
        #: (the status events ``up`` / ``down``)
        self.on_link: LinkHandler | None = None
        #: told whenever :attr:`wanted` changed (an :class:`~bridge.upstream.pool.UpstreamPool`
        #: keeps its union of every connection's set with it)
        self.on_wanted: Callable[[], None] | None = None
        #: told when a (re)connect subscription was refused for the per-key limit, with
        #: the kind and the symbols refused (a pool moves them to another connection)
        self.on_limit: Callable[[str, list[str]], None] | None = None
        self.stats = SourceStats()
        if symbols is None:
            symbols = configured_symbols(config)
        #: the desired set, in subscription order: what every (re)connect re-issues
        self._desired: dict[str, dict[str, None]] = {
            kind: dict.fromkeys(normalize_symbols(symbols.get(kind, ()))) for kind in _EVENTS
        }
        #: the symbols this source asks for, by kind: records of any other are not ours.
        #: The dict stays the same object; each kind's frozenset is replaced, never
        #: changed, so a reader in another task always sees a whole set.
        self.wanted: dict[str, frozenset[str]] = {
            kind: frozenset(d) for kind, d in self._desired.items()
        }
        #: serializes the (re)connect subscription and live (un)subscribe requests
        self._sub_lock = asyncio.Lock()
        #: paces the live requests of this connection (one API key)
        self.rate_limit = RateLimit(config.max_subscribe_requests_per_s)
        #: the connection on which the desired set is subscribed (None: not now)
        self._live: _Client | None = None
        #: why the supervisor must replace a connection that is still open
        self._restart_cause: str | None = None
        #: the upstream URL without credentials: the one to log and show
        self.url = sanitize_url(config.url)
        self.ws_url = re.sub(r"^http", "ws", self.url) + "/" + config.path.strip("/") + "/"
        self._stop = asyncio.Event()
        self._dropped = asyncio.Event()
        self._sio: socketio.AsyncClient | None = None
        self._connect_error: str | None = None
        self._logged_errors: set[str] = set()
        self._logged_packets: set[str] = set()
        self._backoff = Backoff(config.backoff.initial_s, config.backoff.max_s)
        self._attempts = 0
        self._flowing = False
        self._subscribed_at: float | None = None
        self._phase = "tcp"
        self._warned = False
        self._url_secrets = _url_password(config.url)
        self._delivered = False
        self._responses: list[aiohttp.ClientResponse] = []
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
        return list(self._desired["ticker"])

    @property
    def equities(self) -> list[str]:
        """The desired equities, in subscription order."""
        return list(self._desired["equity"])

    def desired_count(self) -> int:
        """Symbols of every kind in the desired set (the upstream's limit counts them
        together)."""
        return sum(map(len, self._desired.values()))

    def upstream_subscribed(self, kind: str) -> frozenset[str]:
        """What the last acknowledgement said is subscribed upstream (empty while not
        connected)."""
        if self._live is None:
            return frozenset()
        return frozenset(self.stats.subscribed.get(kind, ()))

    def upstream_count(self) -> int:
        """Symbols of every kind subscribed upstream by the last acknowledgements of the
        current (or last) connection."""
        return sum(len(v) for v in self.stats.subscribed.values())

    @property
    def live(self) -> bool:
        """The desired set is subscribed on an open connection: a change goes out now."""
        return self._live is not None

    def _set_desired(self, kind: str, add: Iterable[str] = (),
                     remove: Iterable[str] = ()) -> None:
        d = self._desired[kind]
        for s in remove:
            d.pop(s, None)
        for s in add:
            d[s] = None
        self.wanted[kind] = frozenset(d)
        if self.on_wanted is not None:
            try:
                self.on_wanted()
            except Exception:  # a listener must never break the connection
                log.exception("upstream wanted-set listener failed")

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
        st = self.stats
        return UpstreamSnapshot(
            state=st.state,
            flowing=self._flowing,
            seconds_since_update=self.seconds_since_update(),
            stale_after_s=self.config.stale_after_s,
            connects=st.connects,
            reconnects=st.reconnects,
            connect_failures=st.connect_failures,
            watchdog_restarts=st.watchdog_restarts,
            acks=frozen_counts(st.acks),
            rejected_symbols=len(st.rejected_symbols),
            subscriptions=frozen_counts({k: len(v) for k, v in st.subscribed.items()}),
            last_error=st.last_error,
        )

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

    # -- client -----------------------------------------------------------------

    def _set_phase(self, phase: str) -> None:
        self._phase = phase

    def _session(self) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()

        async def created(*_: Any) -> None:
            self._set_phase("upgrade")

        async def responded(_s: Any, _c: Any, params: aiohttp.TraceRequestEndParams) -> None:
            self._set_phase("open")
            # the upgraded response: closed at teardown even if python-engineio lost it
            self._responses.append(params.response)

        trace.on_connection_create_end.append(created)
        trace.on_request_end.append(responded)
        return aiohttp.ClientSession(trace_configs=[trace])

    def _client(self, session: aiohttp.ClientSession) -> _Client:
        sio = _Client(
            self._bad_packet,
            self._set_phase,
            reconnection=False,
            logger=False,
            engineio_logger=False,
            json=jsoncodec,
            ssl_verify=self.config.tls_verify,
            handle_sigint=False,
            http_session=session,
            websocket_extra_options={
                "max_msg_size": MAX_FRAME_BYTES,
                # permessage-deflate: offered (aiohttp's window bits) unless "off";
                # the upstream decides whether to take it
                "compress": WS_DEFLATE_BITS if self.config.compression == "auto" else 0,
            },
        )

        @sio.event
        async def connect_error(data: Any = None, *_: Any) -> None:
            msg = data.get("message") if isinstance(data, dict) else data
            self._connect_error = str(msg)

        @sio.event
        async def disconnect(*_: Any) -> None:
            self._dropped.set()

        @sio.on(TICKER_EVENT)
        async def tickers(data: Any = None, *_: Any) -> None:
            self._on_update(TICKER_EVENT, data)

        @sio.on(EQUITY_EVENT)
        async def equities(data: Any = None, *_: Any) -> None:
            self._on_update(EQUITY_EVENT, data)

        return sio

    async def _bounded(self, aw: Awaitable[_T], timeout: float,
                       what: Callable[[], str]) -> _T:
        """``aw`` within ``timeout`` (else :class:`_AttemptFailed` with ``what()``),
        abandoned at once on stop (:class:`_Stopped`)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=TEARDOWN_S)
        if not task.cancelled() and task.done():
            task.exception()  # retrieved: a failure racing the timeout is not news
        if self._stop.is_set():
            raise _Stopped
        raise _AttemptFailed(what())

    async def _connect(self, sio: _Client) -> None:
        key = self._api_key or ""
        t = self.config.connect_timeout_s
        self._connect_error = None
        self._phase = "tcp"

        def what() -> str:
            return _PHASES[self._phase].format(t=f"{t:g}", url=self.ws_url)

        await self._bounded(sio.connect(
            self.config.url,
            headers={"x-api-key": key} if key else {},
            auth={"apiKey": key} if key else None,
            transports=["websocket"],
            socketio_path=self.config.path.strip("/"),
            # the outer bound names the phase; this one only must not fire first
            wait_timeout=t + 5,
            retry=False,
        ), t, what)

    async def _teardown(self, sio: _Client, session: aiohttp.ClientSession) -> None:
        """Close the connection and make sure none of the client's tasks survive it."""
        eio = sio.eio
        tasks = {t for t in (getattr(eio, "read_loop_task", None),
                             getattr(eio, "write_loop_task", None))
                 if isinstance(t, asyncio.Future)}
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sio.disconnect(), TEARDOWN_S)
        finally:
            if eio.state != "disconnected":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(eio.disconnect(abort=True), TEARDOWN_S)
                eio.state = "disconnected"
            with contextlib.suppress(ValueError):
                engineio.base_client.connected_clients.remove(eio)
            tasks |= {t for t in (getattr(eio, "read_loop_task", None),
                                  getattr(eio, "write_loop_task", None))
                      if isinstance(t, asyncio.Future)}
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=TEARDOWN_S)
            for response in self._responses:
                response.close()
            self._responses.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), TEARDOWN_S)

    # -- subscriptions ----------------------------------------------------------

    async def _ack(self, sio: _Client, event: str, symbols: list[str]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, ...]] = loop.create_future()

        def done(*args: Any) -> None:
            if not fut.done():
                fut.set_result(args)

        await sio.emit(event, symbols, callback=done)
        dropped = asyncio.ensure_future(self._dropped.wait())
        waiters: set[asyncio.Future[Any]] = {fut, dropped}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
        if not fut.done():
            fut.cancel()
            raise _AttemptFailed(f"{self._drop_reason()} while waiting for the {event} ack")
        args = fut.result()
        return args[0] if len(args) == 1 else args

    async def _subscribe(self, sio: _Client) -> None:
        """Issue the whole desired set on a new connection; then it is live.

        Requests refused for the limit are told to :attr:`on_limit` once the whole set
        was issued and the connection is live: the listener (the pool) learns the limit
        from what the key then holds, every kind counted, and may ask again for the part
        that fits on this connection."""
        refused: list[tuple[str, list[str]]] = []
        async with self._sub_lock:
            self.stats.subscribed = {}
            t = self.config.connect_timeout_s
            for kind, (event, _) in _EVENTS.items():
                symbols = list(self._desired[kind])
                chunks = [symbols[i:i + SUBSCRIBE_CHUNK]
                          for i in range(0, len(symbols), SUBSCRIBE_CHUNK)]
                for i, chunk in enumerate(chunks, 1):
                    part = f" (request {i}/{len(chunks)})" if len(chunks) > 1 else ""

                    def what(event: str = event, part: str = part) -> str:
                        return f"no {event} ack{part} within {t:g}s from {self.ws_url}"

                    try:
                        ack = await self._bounded(self._ack(sio, event, list(chunk)), t, what)
                    except _AttemptFailed:
                        self.stats.failed_subscriptions += 1
                        raise
                    if not self._handle_ack(kind, list(chunk), ack, part):
                        self.stats.failed_subscriptions += 1
                        if isinstance(ack, dict) and LIMIT_MARK in str(ack.get("error") or ""):
                            after = set(self.stats.subscribed.get(kind, ()))
                            refused.append((kind, [s for s in chunk if s not in after]))
            self._live = sio
            for kind, symbols in refused:
                self._tell_limit(kind, symbols)

    def _tell_limit(self, kind: str, refused: list[str]) -> None:
        if self.on_limit is None or not refused:
            return
        try:
            self.on_limit(kind, refused)
        except Exception:
            log.exception("upstream limit listener failed")

    # -- live changes -------------------------------------------------------------

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
        return await self._change(kind, normalize_symbols(symbols), subscribe=True)

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """Remove ``symbols`` from the desired set of ``kind`` (their records are dropped
        as ``unsubscribed`` from now on) and, when the connection is subscribed,
        unsubscribe them on it now. ``pending``: not connected, nothing to undo;
        ``accepted``: the upstream confirmed (or never had it)."""
        return await self._change(kind, normalize_symbols(symbols), subscribe=False)

    async def pin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`subscribe`, for the configuration's symbols (a reload). With leases,
        reloads go through :meth:`bridge.upstream.subscriptions.Subscriptions.set_pinned`, which
        keeps a symbol a lease still holds."""
        return await self.subscribe(kind, symbols)

    async def unpin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`unsubscribe`, for symbols a reload removed from the configuration."""
        return await self.unsubscribe(kind, symbols)

    async def _change(self, kind: str, symbols: list[str],
                      subscribe: bool) -> dict[str, SubscriptionResult]:
        if kind not in _EVENTS:
            msg = f"unknown kind {kind!r} (ticker or equity)"
            raise ValueError(msg)
        out: dict[str, SubscriptionResult] = {}
        async with self._sub_lock:
            desired = self._desired[kind]
            upstream = self.upstream_subscribed(kind)
            if subscribe:
                todo = [s for s in symbols if s not in desired or s not in upstream]
                for s in symbols:
                    if s in desired and s in upstream:
                        out[s] = ACCEPTED
                self._set_desired(kind, add=todo)
            else:
                todo = [s for s in symbols if s in upstream]
                self._set_desired(kind, remove=symbols)
                for s in symbols:
                    if s not in upstream:
                        out[s] = PENDING if self._live is None else ACCEPTED
            sio = self._live
            if not todo:
                return out
            if sio is None:
                out.update(dict.fromkeys(todo, PENDING))
                return out
            event = _EVENTS[kind][0 if subscribe else 1]
            t = self.config.connect_timeout_s
            for i in range(0, len(todo), SUBSCRIBE_CHUNK):
                chunk = todo[i:i + SUBSCRIBE_CHUNK]
                # paced per key, whoever asks; the (re)connect subscription waits for
                # this lock meanwhile, which is at most one request's turn
                await self.rate_limit.take()
                if self._live is not sio:
                    # the connection ended while we waited: the desired set (already
                    # changed) is what the next connect issues
                    for s in todo[i:]:
                        out[s] = PENDING
                    break
                self.stats.live_requests += 1
                try:
                    ack = await self._bounded(
                        self._ack(sio, event, chunk), t,
                        lambda: f"no {event} ack within {t:g}s from {self.ws_url}")
                except (_AttemptFailed, _Stopped) as exc:
                    # the connection is gone or broken: what is desired now is
                    # re-issued on the next connect
                    self.stats.failed_subscriptions += 1
                    if isinstance(exc, _AttemptFailed) and not self._dropped.is_set():
                        self._restart(str(exc))
                    for s in todo[i:]:
                        out[s] = PENDING
                    break
                ok = self._handle_ack(kind, chunk, ack, " (live)")
                if not ok:
                    self.stats.failed_subscriptions += 1
                results = _results(chunk, ack, subscribe)
                out.update(results)
                if subscribe:
                    self._set_desired(kind, remove=[s for s, r in results.items()
                                                    if not r.held])
                    if any(r.held for r in results.values()) \
                            and self.stats.last_update_monotonic is None:
                        # the watchdog counts from here while no update came yet
                        self._subscribed_at = time.monotonic()
        return out

    def _restart(self, cause: str) -> None:
        """Replace a connection that is open but broken (an unanswered request)."""
        self._restart_cause = cause
        self._dropped.set()

    def _handle_ack(self, kind: str, requested: list[str], ack: Any, part: str = "") -> bool:
        """Count and log one acknowledgement; False when the request failed."""
        if not isinstance(ack, dict):
            self.stats.acks["invalid"] = self.stats.acks.get("invalid", 0) + 1
            log.error("upstream sent an unreadable %s subscription ack%s: %.200r",
                      kind, part, ack, extra={"kind": kind, "ack_status": "invalid"})
            return False
        status = ack.get("status")
        status = status if status in ("ok", "partial", "error") else "invalid"
        self.stats.acks[status] = self.stats.acks.get(status, 0) + 1
        after = ack.get("subscriptionsAfterUpdate")
        if isinstance(after, list):
            self.stats.subscribed[kind] = [s for s in after if isinstance(s, str)]
        raw_rejected = ack.get("rejectedSubscriptions")
        if isinstance(raw_rejected, str):
            raw_rejected = [raw_rejected]
        elif not isinstance(raw_rejected, list):
            raw_rejected = []
        rejected = [s for s in raw_rejected if isinstance(s, str)][:10_000]
        new_rejections = [s for s in rejected if f"{kind}:{s}" not in self.stats.rejected_symbols]
        self.stats.rejected_symbols.update(f"{kind}:{s}" for s in rejected)
        if status == "ok":
            return True
        if status == "partial":
            if new_rejections:
                # a live request's rejections are answered to whoever asked (a lease, a
                # reload's outcome); only the configured set's deserve a warning
                log.log(
                    logging.DEBUG if part == " (live)" else logging.WARNING,
                    "upstream rejected %d %s symbol(s) as unsupported: %s "
                    "(remove them from source.%ss)",
                    len(new_rejections), kind, ", ".join(new_rejections[:50]), kind,
                    extra={"kind": kind, "rejected": new_rejections[:50]},
                )
            return True
        error = str(ack.get("error") or ("no reason given" if status == "error"
                                          else f"unknown ack status {ack.get('status')!r}"))
        marker = f"{kind}:{error}"
        if marker not in self._logged_errors:
            self._logged_errors.add(marker)
            log.error(
                "upstream refused the %s subscription of %d symbol(s)%s: %s",
                kind, len(requested), part, error[:300], extra={"kind": kind,
                                                               "ack_status": status},
            )
        return False

    # -- the loop ---------------------------------------------------------------

    def _drop_reason(self) -> str:
        if self._restart_cause is not None:
            return self._restart_cause
        ws = getattr(self._sio.eio, "ws", None) if self._sio is not None else None
        code = getattr(ws, "close_code", None)
        if code == _MESSAGE_TOO_BIG:
            return (f"the upstream sent a frame larger than {MAX_FRAME_BYTES // (1024 * 1024)} "
                    "MiB (the client's limit), connection dropped")
        exc = ws.exception() if ws is not None else None
        if exc is not None:
            return f"connection lost ({self._describe(exc)})"
        return "connection lost" + (f" (close code {code})" if code else "")

    async def _watch(self) -> str:
        """Wait until the connection drops, the feed goes silent, or stop; say which."""
        stale = self.config.stale_after_s
        while True:
            # the set is live: a source with nothing to watch has no watchdog
            watched = any(self._desired.values())
            if self._stop.is_set():
                return "stop"
            if self._dropped.is_set():
                return "dropped"
            # the watchdog's clock: the last update, or the subscription if none came yet
            ref = self.stats.last_update_monotonic or self._subscribed_at
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

    async def _attempt(self) -> str:
        """One connection, from TCP to its end; returns why it ended."""
        self._flowing = False
        self._subscribed_at = None
        self.stats.last_update_monotonic = None
        self._restart_cause = None
        self._dropped.clear()
        session = self._session()
        sio = self._client(session)
        self._sio = sio
        try:
            await self._connect(sio)
            ws = getattr(sio.eio, "ws", None)
            self.stats.compression = int(getattr(ws, "compress", 0) or 0)
            self.stats.connects += 1
            if self.stats.connects > 1:
                self.stats.reconnects += 1
            self._set_state(UpstreamState.CONNECTED)
            await self._subscribe(sio)
            self._subscribed_at = time.monotonic()
            feeds = sum(map(len, self.stats.subscribed.values()))
            self._set_state(UpstreamState.SUBSCRIBED, f"{feeds} feed(s)")
            reason = await self._watch()
            if reason == "dropped":
                self._last_drop = self._drop_reason()
            return reason
        finally:
            self._live = None
            self._delivered = self._flowing
            self._subscribed_at = None
            try:
                await self._teardown(sio, session)
            finally:
                self._sio = None
                self._flowing = False
                self.stats.last_update_monotonic = None

    def _describe(self, exc: BaseException) -> str:
        """The cause of a failed attempt, in words (python-engineio wraps aiohttp's
        errors in a bare "Connection error": the real one is in the chain)."""
        if isinstance(exc, _AttemptFailed):
            return str(exc)
        seen: set[int] = set()
        cur: BaseException | None = exc
        chain: list[BaseException] = []
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        for e in chain:
            text = _describe_one(e, self.url)
            if text is not None:
                return text
        if self._connect_error and isinstance(exc, socketio.exceptions.ConnectionError):
            return self._connect_error
        if isinstance(exc, KeyError | TypeError | ValueError | AttributeError | IndexError) \
                and self._phase == "open":
            return f"malformed Engine.IO OPEN packet from {self.ws_url} " \
                   f"({type(exc).__name__}: {exc})"
        msg = str(exc)
        if msg == "no OPEN packet":
            return f"{self.ws_url} answered without an Engine.IO OPEN packet " \
                   "(is it a Socket.IO server? check source.path)"
        return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__

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
            except _Stopped:
                break
            except Exception as exc:
                reason = "failed"
                cause = self._scrub(self._describe(exc))
                refused = bool(self._connect_error and REFUSED_MARK in self._connect_error)
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


def _results(chunk: list[str], ack: Any, subscribe: bool) -> dict[str, SubscriptionResult]:
    """Per symbol of one request, what its acknowledgement said.

    ``subscriptionsAfterUpdate`` is the truth of what is subscribed: after a subscribe,
    a symbol in it is accepted, even when the request as a whole was refused (it was
    subscribed before); after an unsubscribe, a symbol no longer in it is accepted.
    """
    if not isinstance(ack, dict):
        err = SubscriptionResult(SubscriptionStatus.ERROR, "unreadable acknowledgement")
        return dict.fromkeys(chunk, err)
    status = ack.get("status")
    raw_after = ack.get("subscriptionsAfterUpdate")
    after = {s for s in raw_after if isinstance(s, str)} if isinstance(raw_after, list) \
        else None
    raw_rejected = ack.get("rejectedSubscriptions")
    if isinstance(raw_rejected, str):
        raw_rejected = [raw_rejected]
    rejected = {s.strip().upper() for s in raw_rejected if isinstance(s, str)} \
        if isinstance(raw_rejected, list) else set()
    error = str(ack.get("error") or "") or None
    if status == "error" and error is None:
        error = "no reason given"
    elif status not in ("ok", "partial", "error"):
        error = f"unknown ack status {str(status)[:40]!r}"
    out: dict[str, SubscriptionResult] = {}
    for s in chunk:
        if s in rejected:
            out[s] = SubscriptionResult(SubscriptionStatus.REJECTED,
                                        "unsupported symbol" if error is None else error)
        elif (s in after) == subscribe if after is not None else status in ("ok", "partial"):
            out[s] = ACCEPTED
        elif error is not None and LIMIT_MARK in error and subscribe:
            out[s] = SubscriptionResult(SubscriptionStatus.LIMIT, error)
        else:
            what = "subscribed" if subscribe else "unsubscribed"
            out[s] = SubscriptionResult(SubscriptionStatus.ERROR,
                                        error or f"not {what} after the update")
    return out


def _describe_one(e: BaseException, url: str) -> str | None:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert = e.certificate_error
        detail = getattr(cert, "verify_message", None) or str(cert)
        return f"TLS certificate verify failed for {e.host}:{e.port}: {detail}"
    if isinstance(e, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS handshake with {e.host}:{e.port} failed: {e.os_error}"
    if isinstance(e, aiohttp.ClientConnectorError):
        os_error = e.os_error
        if isinstance(os_error, socket.gaierror) or type(e).__name__ == "ClientConnectorDNSError":
            return f"cannot resolve host {e.host!r}: {os_error.strerror or os_error}"
        return f"cannot connect to {e.host}:{e.port}: {os_error.strerror or os_error}"
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return f"the WebSocket upgrade to {url} was refused: HTTP {e.status} {e.message} " \
               "(check source.url and source.path)"
    if isinstance(e, aiohttp.InvalidURL):
        return f"invalid upstream URL {sanitize_url(str(e.url))!r} (check source.url)"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return f"{url} closed the connection during the handshake"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {e.verify_message or e}"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e}"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host of {url}: {e.strerror or e}"
    if isinstance(e, ValueError) and ("port" in str(e).lower() or "IPv6" in str(e)):
        return f"invalid upstream URL {url!r}: {e} (check source.url)"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot connect to {url}: {e.strerror}"
    return None


__all__ = [
    "LIMIT_MARK",
    "MAX_REJECTED_SYMBOLS",
    "SUBSCRIBE_CHUNK",
    "AlenoSource",
    "AuthError",
    "BoundedSet",
    "RateLimit",
    "SourceError",
    "SourceStats",
    "SubscriptionResult",
    "SubscriptionStatus",
    "normalize_symbols",
    "sanitize_url",
]
