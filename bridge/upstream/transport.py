"""The Socket.IO / Engine.IO side of one upstream connection: the client, one
connection attempt (TCP, TLS, WebSocket upgrade, Engine.IO OPEN, Socket.IO CONNECT,
each phase named when it times out), an acknowledged request, the teardown that leaves
no task behind, and the cause of a failure in words (see :mod:`bridge.upstream.client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar
from urllib.parse import unquote

import aiohttp
import engineio
import socketio

from bridge.config.schema import SourceConfig
from bridge.core import jsoncodec
from bridge.core.kinds import EQUITY_EVENT, TICKER_EVENT

REFUSED_MARK: Final = "invalid API key"
#: the largest WebSocket frame accepted from the upstream (aiohttp's default limit)
#: one ``new_token_states`` tick of 50,000 tickers is about 10 MB; a frame larger than
#: this is refused (the connection drops with that reason) instead of buffered
MAX_FRAME_BYTES: Final = 32 * 1024 * 1024
#: the permessage-deflate window (bits) offered when ``source.compression`` is ``auto``
WS_DEFLATE_BITS: Final = 15
#: how long tearing a connection down may take before its tasks are cancelled
TEARDOWN_S: Final = 2.0

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*@")
_ACK_ID = re.compile(r"^3(?:/[^,]*,)?(\d+)")
_MESSAGE_TOO_BIG: Final = 1009
_T = TypeVar("_T")


def sanitize_url(text: str) -> str:
    """``text`` without the userinfo (``user:password@``) of any URL in it."""
    return _USERINFO.sub(r"\1", text)


def url_password(url: str) -> list[str]:
    m = _USERINFO.match(url)
    if m is None:
        return []
    userinfo = url[m.end(1):m.end() - 1]
    _, _, password = userinfo.partition(":")
    return [v for v in (userinfo, password, unquote(password)) if v]


class AttemptFailed(Exception):
    """One connection attempt failed; the message is the cause, ready to log."""


class Stopped(Exception):
    pass


class _UnreadableAck:
    """Handed to an ack callback whose acknowledgement could not be decoded."""

    def __init__(self, raw: str, error: BaseException) -> None:
        self.raw = raw
        self.error = error

    def __repr__(self) -> str:
        return f"<unreadable ack ({type(self.error).__name__}): {self.raw[:120]!r}>"


_PHASES: Final = {
    "tcp": "no TCP/TLS connection within {t}s to {url}",
    "upgrade": "no WebSocket upgrade response within {t}s from {url}",
    "open": "no Engine.IO OPEN within {t}s from {url}",
    "connect": "no Socket.IO CONNECT reply within {t}s from {url}",
}


class SocketClient(socketio.AsyncClient):  # type: ignore[misc]
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


class Transport:
    """The connections of one source, one at a time: opened, connected within
    ``connect_timeout_s`` (each handshake phase named when it times out), asked for
    acknowledged requests, torn down; ``on_update(event, payload)`` receives the price
    events, ``bad_packet(data, exc)`` every packet that cannot be read.

    ``stop`` is the source's: a bounded wait is abandoned at once when it is set.
    :attr:`dropped` is set when the connection drops or must be replaced
    (:meth:`restart`).
    """

    def __init__(self, config: SourceConfig, api_key: str | None, stop: asyncio.Event,
                 on_update: Callable[[str, Any], None],
                 bad_packet: Callable[[Any, BaseException], None]) -> None:
        self.config = config
        self._api_key = api_key
        self._stop = stop
        self._on_update = on_update
        self._bad_packet = bad_packet
        self.dropped = asyncio.Event()
        #: the upstream URL without credentials: the one to log and show
        self.url = sanitize_url(config.url)
        self.ws_url = re.sub(r"^http", "ws", self.url) + "/" + config.path.strip("/") + "/"
        #: the client of the current connection (None between connections)
        self.sio: SocketClient | None = None
        #: what the upstream said when it refused the Socket.IO CONNECT
        self.connect_error: str | None = None
        #: the handshake phase the current attempt reached
        self.phase = "tcp"
        #: why the supervisor must replace a connection that is still open
        self.restart_cause: str | None = None
        self._responses: list[aiohttp.ClientResponse] = []

    def open(self) -> tuple[aiohttp.ClientSession, SocketClient]:
        """A new session and client (not connected yet: :meth:`connect`)."""
        self.restart_cause = None
        self.dropped.clear()
        session = self._session()
        sio = self._client(session)
        self.sio = sio
        return session, sio

    def restart(self, cause: str) -> None:
        """Replace a connection that is open but broken (an unanswered request)."""
        self.restart_cause = cause
        self.dropped.set()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

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

    def _client(self, session: aiohttp.ClientSession) -> SocketClient:
        sio = SocketClient(
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

        async def connect_error(data: Any = None, *_: Any) -> None:
            msg = data.get("message") if isinstance(data, dict) else data
            self.connect_error = str(msg)

        async def disconnect(*_: Any) -> None:
            self.dropped.set()

        async def tickers(data: Any = None, *_: Any) -> None:
            self._on_update(TICKER_EVENT, data)

        async def equities(data: Any = None, *_: Any) -> None:
            self._on_update(EQUITY_EVENT, data)

        sio.on("connect_error", connect_error)
        sio.on("disconnect", disconnect)
        sio.on(TICKER_EVENT, tickers)
        sio.on(EQUITY_EVENT, equities)
        return sio

    async def bounded(self, aw: Awaitable[_T], timeout: float,
                      what: Callable[[], str]) -> _T:
        """``aw`` within ``timeout`` (else :class:`AttemptFailed` with ``what()``),
        abandoned at once on stop (:class:`Stopped`)."""
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
            raise Stopped
        raise AttemptFailed(what())

    async def connect(self, sio: SocketClient) -> None:
        key = self._api_key or ""
        t = self.config.connect_timeout_s
        self.connect_error = None
        self.phase = "tcp"

        def what() -> str:
            return _PHASES[self.phase].format(t=f"{t:g}", url=self.ws_url)

        await self.bounded(sio.connect(
            self.config.url,
            headers={"x-api-key": key} if key else {},
            auth={"apiKey": key} if key else None,
            transports=["websocket"],
            socketio_path=self.config.path.strip("/"),
            # the outer bound names the phase; this one only must not fire first
            wait_timeout=t + 5,
            retry=False,
        ), t, what)

    def compression(self, sio: SocketClient) -> int:
        """The permessage-deflate window bits negotiated (0: uncompressed)."""
        ws = getattr(sio.eio, "ws", None)
        return int(getattr(ws, "compress", 0) or 0)

    async def teardown(self, sio: SocketClient, session: aiohttp.ClientSession) -> None:
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

    async def ack(self, sio: SocketClient, event: str, symbols: list[str]) -> Any:
        """Emit ``event`` with ``symbols`` and wait for its acknowledgement (or the drop:
        :class:`AttemptFailed`)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Any, ...]] = loop.create_future()

        def done(*args: Any) -> None:
            if not fut.done():
                fut.set_result(args)

        await sio.emit(event, symbols, callback=done)
        dropped = asyncio.ensure_future(self.dropped.wait())
        waiters: set[asyncio.Future[Any]] = {fut, dropped}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
        if not fut.done():
            fut.cancel()
            raise AttemptFailed(f"{self.drop_reason()} while waiting for the {event} ack")
        args = fut.result()
        return args[0] if len(args) == 1 else args

    def drop_reason(self) -> str:
        if self.restart_cause is not None:
            return self.restart_cause
        ws = getattr(self.sio.eio, "ws", None) if self.sio is not None else None
        code = getattr(ws, "close_code", None)
        if code == _MESSAGE_TOO_BIG:
            return (f"the upstream sent a frame larger than {MAX_FRAME_BYTES // (1024 * 1024)} "
                    "MiB (the client's limit), connection dropped")
        exc = ws.exception() if ws is not None else None
        if exc is not None:
            return f"connection lost ({self.describe(exc)})"
        return "connection lost" + (f" (close code {code})" if code else "")

    def describe(self, exc: BaseException) -> str:
        """The cause of a failed attempt, in words (python-engineio wraps aiohttp's
        errors in a bare "Connection error": the real one is in the chain)."""
        if isinstance(exc, AttemptFailed):
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
        if self.connect_error and isinstance(exc, socketio.exceptions.ConnectionError):
            return self.connect_error
        if isinstance(exc, KeyError | TypeError | ValueError | AttributeError | IndexError) \
                and self.phase == "open":
            return f"malformed Engine.IO OPEN packet from {self.ws_url} " \
                   f"({type(exc).__name__}: {exc})"
        msg = str(exc)
        if msg == "no OPEN packet":
            return f"{self.ws_url} answered without an Engine.IO OPEN packet " \
                   "(is it a Socket.IO server? check source.path)"
        return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__

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
    "MAX_FRAME_BYTES",
    "REFUSED_MARK",
    "TEARDOWN_S",
    "WS_DEFLATE_BITS",
    "AttemptFailed",
    "SocketClient",
    "Stopped",
    "Transport",
    "sanitize_url",
    "url_password",
]
