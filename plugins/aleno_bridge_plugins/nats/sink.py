"""The ``nats`` driver's I/O: one nats-py client per connection (no reconnection of
its own), core publish + flush or pipelined JetStream publishes, bounded closing. The
guarantees, the subject rule and the formats are described in
:mod:`aleno_bridge_plugins.nats`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkConnectionError,
    SinkError,
    SinkOptions,
)
from bridge.sinks.kit import (
    BUDGET_SHARE,
    Refusals,
    TlsFilesError,
    budget_problems,
    ce_headers,
    derived_timeout,
    timeout_problem,
    topic_problem,
)
from bridge.sinks.natsconn import (
    CREDENTIAL_OPTIONS,
    connect_kwargs,
    plain_text_problem,
    refused_credentials,
    security_warnings,
    server_url,
)

from .options import NatsOptions, StreamOptions

log = logging.getLogger("aleno_bridge.sinks.nats")

T = TypeVar("T")

#: JetStream error codes (nats-server ``server/errors.json``)
JS_MESSAGE_TOO_LARGE: Final = 10054
JS_STREAM_NAME_IN_USE: Final = 10058
JS_SUBJECTS_OVERLAP: Final = 10065

_UNSAFE = re.compile(r"[.*>\s\x00-\x1f\x7f-\x9f]")
_BAD_SUBJECT_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
#: the subject in nats-py's (lower-cased) permission error text
_DENIED_SUBJECT = re.compile(r'permissions violation for publish to "([^"]+)"')
#: how long ``close()`` may wait for nats-py before the socket is aborted
CLOSE_TIMEOUT_S: Final = 2.0


class _Events:
    """What nats-py reports about one connection through its callbacks: its recent
    errors (to explain a failed connect), the publish permission violations (to refuse
    the messages of a batch) and the loss of the connection. A new one per connect, so
    the callbacks of an abandoned client only touch their own state."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self.errors: list[BaseException] = []
        self.denied: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(exc)
        del self.errors[:-20]
        if _is_permission(exc):
            self.denied.append(str(exc))
        log.debug("sink %s: nats client error: %s: %s", self.name, type(exc).__name__, exc)

    async def on_lost(self) -> None:
        self.lost.set()

    def denied_subjects(self) -> set[str]:
        """The subjects (lower-cased) of the permission violations reported so far."""
        return {s for e in self.denied for s in _DENIED_SUBJECT.findall(e)}

    def explain(self, exc: BaseException, connect_timeout_s: float) -> str:
        """A one-line cause of a failed connect, without any secret."""
        errors = self.errors
        causes = [exc, *reversed(errors)]
        for e in causes:
            if refused_credentials(e) or isinstance(e, nats.errors.AuthorizationError):
                return ("the server refused the credentials (Authorization Violation); "
                        f"check {CREDENTIAL_OPTIONS}")
            if isinstance(e, ssl.SSLCertVerificationError):
                return (f"TLS verification of the server certificate failed "
                        f"({e.verify_message}); "
                        "set tls_ca_file to the CA that signed the server certificate")
            if isinstance(e, ssl.SSLError):
                return f"TLS failed: {e}"
        if isinstance(exc, (asyncio.TimeoutError, nats.errors.NoServersError)):
            for e in reversed(errors):
                if not isinstance(e, nats.errors.NoServersError):
                    return f"{type(e).__name__}: {e}"
            if isinstance(exc, asyncio.TimeoutError):
                return f"timed out (connect_timeout_s={connect_timeout_s:g})"
        return f"{type(exc).__name__}: {exc}"


class NatsSink(Sink[NatsOptions]):
    """Publishes batches to NATS; see :mod:`aleno_bridge_plugins.nats` for the guarantees."""

    options_model = NatsOptions
    retriable_errors = (*Sink.retriable_errors, nats.errors.Error)
    quiet_loggers = ("nats",)

    def __init__(self, name: str, options: NatsOptions) -> None:
        super().__init__(name, options)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._events = _Events(name)
        self._valid_topics: set[str] = set()

    # -- subjects ----------------------------------------------------------------

    @classmethod
    def security_warnings(cls, options: SinkOptions) -> list[str]:
        """A password or token without TLS; TLS without certificate verification
        (:func:`bridge.sinks.natsconn.security_warnings`)."""
        if not isinstance(options, NatsOptions):
            return []
        return security_warnings(options)

    @classmethod
    def check_budget(cls, options: SinkOptions, budget: Budget) -> list[str]:
        """``connect_timeout_s`` (one attempt) and ``flush_timeout_s`` within the budget."""
        if not isinstance(options, NatsOptions):
            return []
        return budget_problems(
            timeout_problem(options, "connect_timeout_s", budget.connect_s,
                            "connect_timeout_s"),
            timeout_problem(options, "flush_timeout_s", budget.publish_s,
                            "publish_timeout_s"),
        )

    @property
    def _flush_timeout_s(self) -> float:
        return derived_timeout(self.options, "flush_timeout_s", self.budget.publish_s)

    @property
    def _connect_timeout_s(self) -> float:
        """One attempt's bound: a default one lets two attempts per server fit."""
        n = 2 * len(self.options.servers)
        return derived_timeout(self.options, "connect_timeout_s",
                               (self.budget.connect_s - 1.0) / n, reserve_s=0.2)

    @classmethod
    def safe_token(cls, value: str) -> str:
        """Replace ``.``, whitespace, ``*``, ``>`` and control characters by ``_``."""
        return _UNSAFE.sub("_", value)

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        """Why ``topic`` is not a valid NATS publish subject, or ``None``."""
        if not topic:
            return topic_problem(topic, noun="subject")
        if _BAD_SUBJECT_CHARS.search(topic):
            return "a NATS subject cannot contain whitespace or control characters"
        tokens = topic.split(".")
        if any(not t for t in tokens):
            return "a NATS subject cannot have an empty token (leading, trailing or double dot)"
        if any("*" in t or ">" in t for t in tokens):
            return "a publish subject cannot contain the wildcards * or >"
        return None

    # -- connection --------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to one of ``servers`` (random order); set up the stream if configured.

        Raises :class:`SinkConnectionError` naming the sink and the cause (refused
        credentials, failed TLS verification, no server reachable), never a secret.
        """
        await self.close()
        opts = self.options
        tls = self._tls_context()
        nc = Client()
        events = self._events = _Events(self.name)
        servers = list(opts.servers)
        random.shuffle(servers)
        kwargs = _connect_kwargs(opts, servers, events, tls, self._connect_timeout_s,
                                 self._flush_timeout_s)
        # two attempts per server plus the waits between them, within the worker's budget
        bound = min(2 * len(servers) * (self._connect_timeout_s + 0.2) + 1.0,
                    self.budget.connect_s * BUDGET_SHARE)
        try:
            await asyncio.wait_for(nc.connect(**kwargs), bound)
        except asyncio.CancelledError:
            _abort(nc)
            raise
        except Exception as exc:
            _abort(nc)
            why = events.explain(exc, self._connect_timeout_s)
            msg = f"cannot connect to {', '.join(opts.servers)}: {why}"
            raise SinkConnectionError(self.name, msg) from exc
        self._nc = nc
        # never fall back to plain text when TLS was asked for
        plain = plain_text_problem(nc, tls)
        if plain is not None:
            await self.close()
            raise SinkConnectionError(self.name, plain)
        if opts.jetstream:
            self._js = nc.jetstream(timeout=self._flush_timeout_s,
                                    publish_async_max_pending=opts.max_inflight)
            if opts.stream is not None:
                try:
                    await self._ensure_stream(nc, opts.stream)
                except BaseException:
                    await self.close()
                    raise
        log.debug("sink %s: connected to %s (server %s)", self.name,
                  server_url(nc), nc.connected_server_version)


    def _tls_context(self) -> ssl.SSLContext | None:
        try:
            return self.options.connection_tls()
        except TlsFilesError as exc:
            raise SinkConnectionError(self.name, str(exc)) from exc

    async def _ensure_stream(self, nc: Client, stream: StreamOptions) -> None:
        config = stream_config(stream)
        try:
            await nc.jsm(timeout=self._flush_timeout_s).add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == JS_STREAM_NAME_IN_USE:
                why = (f"stream {stream.name!r} exists with other settings; align `stream:` "
                       "with it or remove `stream:` to use the stream as it is")
            elif exc.err_code == JS_SUBJECTS_OVERLAP:
                why = (f"the subjects of stream {stream.name!r} overlap another stream's; "
                       "remove `stream:` to publish into the existing stream")
            elif isinstance(exc, nats.js.errors.ServiceUnavailableError):
                why = "JetStream is not enabled on the server (start nats-server with -js)"
            else:
                why = f"creating stream {stream.name!r} failed: {exc.description or exc}"
            raise SinkError(self.name, why) from exc
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            why = "JetStream is not enabled on the server or not answering (nats-server -js)"
            raise SinkError(self.name, why) from exc

    async def close(self) -> None:
        """Close the connection within ``CLOSE_TIMEOUT_S``; idempotent, never raises."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
        except Exception as exc:  # a broken connection may fail to close cleanly
            log.debug("sink %s: close: %s: %s", self.name, type(exc).__name__, exc)
        finally:
            # a no-op after a clean close; otherwise nats-py may have left the socket
            # open (its close after a lost link can fail half-way, see _until_lost)
            _abort(nc)

    # -- publishing -----------------------------------------------------------------

    async def publish(self, batch: Sequence[Message]) -> None:
        """Return once the server accepted every message (flush or JetStream acks).

        Fails at once when the connection is lost. Messages that can never be
        published (too large, invalid subject, permission denied) do not stop the
        others: the rest of the batch is delivered first, then
        :class:`SinkRejectedError` names what was refused.
        """
        nc = self._nc
        if nc is None or not nc.is_connected or self._events.lost.is_set():
            raise SinkConnectionError(self.name, "not connected to NATS")
        jetstream = self._js is not None
        refused = Refusals(self.name, batch)
        sendable: list[tuple[Message, dict[str, str]]] = []
        limit = nc.max_payload
        for m in batch:
            headers = self._headers(m, jetstream)
            problem = self._problem(m, headers, limit)
            if problem is None:
                sendable.append((m, headers))
            else:
                refused.add(m, problem)
        try:
            if self._js is not None:
                acks = self._publish_js(nc, self._js, sendable)
                late = await self._bounded(acks, "publish acks")
            else:
                late = await self._bounded(self._publish_core(nc, sendable), "flush")
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError,
                nats.errors.StaleConnectionError, nats.errors.FlushTimeoutError) as exc:
            msg = f"connection lost while publishing: {exc}"
            raise SinkConnectionError(self.name, msg) from exc
        for m, why in late:
            refused.add(m, why)
        refused.raise_if_any()

    def _problem(self, m: Message, headers: dict[str, str], max_payload: int) -> str | None:
        topic = m.topic
        if topic not in self._valid_topics:
            problem = self.check_topic(topic)
            if problem is not None:
                return f"subject {topic!r}: {problem}"
            if len(self._valid_topics) > 100_000:
                self._valid_topics.clear()
            self._valid_topics.add(topic)
        # the server counts the header block too (NATS/1.0 line, "k: v" lines, CRLFs)
        size = len(m.body) + 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
        if size > max_payload:
            return f"{size} bytes is more than the server's max_payload of {max_payload}"
        return None

    def _headers(self, m: Message, jetstream: bool) -> dict[str, str]:
        h = ce_headers(m)
        key_header = self.options.key_header
        if key_header is not None and m.key is not None:
            h[key_header] = m.key
        if jetstream:
            h["Nats-Msg-Id"] = m.id
        return h

    async def _publish_core(
        self, nc: Client, batch: Sequence[tuple[Message, dict[str, str]]],
    ) -> list[tuple[Message, str]]:
        """Write the batch, then one PING/PONG; the refused messages and why."""
        self._events.denied.clear()
        for m, headers in batch:
            await nc.publish(m.topic, m.body, headers=headers)
        await self._flush(nc)
        # the server answers a denied PUB with -ERR before the PONG of the flush
        denied = self._events.denied_subjects()
        return [(m, f"permission denied to publish to {m.topic!r}")
                for m, _ in batch if m.topic.lower() in denied]

    async def _publish_js(
        self, nc: Client, js: JetStreamContext,
        batch: Sequence[tuple[Message, dict[str, str]]],
    ) -> list[tuple[Message, str]]:
        """Pipeline the publishes in order, then wait for every ack; the refused ones."""
        pending: list[tuple[Message, asyncio.Future[PubAck]]] = []
        denied: set[str] = set()
        self._events.denied.clear()
        try:
            for m, headers in batch:
                fut = await js.publish_async(m.topic, m.body, headers=headers)
                pending.append((m, fut))
            if pending:
                # a denied publish gets no ack, only an -ERR that precedes this PONG
                await self._flush(nc)
                denied = self._events.denied_subjects()
                for m, f in pending:
                    if m.topic.lower() in denied:
                        f.cancel()
            results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        finally:
            # an abandoned ack future would hold a slot of publish_async_max_pending
            for _, f in pending:
                if not f.done():
                    f.cancel()
        refused: list[tuple[Message, str]] = []
        for (m, _), res in zip(pending, results, strict=True):
            if not isinstance(res, BaseException):
                continue
            if m.topic.lower() in denied:
                refused.append((m, f"permission denied to publish to {m.topic!r}"))
            elif isinstance(res, nats.js.errors.APIError) and res.err_code == JS_MESSAGE_TOO_LARGE:
                refused.append((m, "the stream refused it as too large"))
            elif isinstance(res, nats.js.errors.NoStreamResponseError):
                msg = (f"no JetStream stream captures subject {m.topic!r} (create one, or set "
                       "`stream:` in the sink options)")
                raise SinkError(self.name, msg) from res
            elif isinstance(res, nats.js.errors.APIError):
                msg = f"JetStream refused {m.id} on {m.topic!r}: {res.description or res}"
                raise SinkError(self.name, msg) from res
            else:
                msg = f"JetStream publish of {m.id} failed: {type(res).__name__}: {res}"
                raise SinkConnectionError(self.name, msg) from res
        return refused

    async def _flush(self, nc: Client) -> None:
        """PING/PONG after everything published so far: the server has read it all.

        nats-py 2.16 ``flush()`` writes its PING straight to the socket, ahead of
        publishes still waiting in the client's pending buffer for its flusher task, so
        its PONG alone does not prove the server read them: first wait until that
        buffer was handed to the socket.
        """
        spins = 0
        while nc.pending_data_size > 0:
            if not nc.is_connected:
                raise nats.errors.ConnectionClosedError
            spins += 1
            await asyncio.sleep(0 if spins < 100 else 0.001)
        # nats-py types the timeout as int; it is passed to asyncio.wait_for
        await nc.flush(self._flush_timeout_s)  # type: ignore[arg-type]

    async def _until_lost(self) -> None:
        """Return when the connection is gone.

        The closed callback is not enough: when nats-py closes on EOF with publishes
        still pending, its ``_close`` fails writing them to the dead socket and never
        calls the callbacks (nats-py 2.16), so the client's state is polled too.
        """
        nc, lost = self._nc, self._events.lost
        while nc is not None and nc.is_connected and not lost.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lost.wait(), 0.05)

    async def _bounded(self, aw: Awaitable[T], what: str) -> T:
        """Await ``aw`` for at most ``flush_timeout_s``; fail at once if the link drops."""
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self._until_lost())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=self._flush_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task in done:
            return task.result()
        if lost in done:
            msg = f"connection lost while waiting for the {what}"
        else:
            msg = f"no {what} within flush_timeout_s={self._flush_timeout_s:g}"
            if self._js is not None:
                msg += (" (is the stream's leader available? JetStream acks also need "
                        "subscribe permission on _INBOX.>)")
        raise SinkConnectionError(self.name, msg)


def stream_config(stream: StreamOptions) -> StreamConfig:
    """The JetStream configuration the sink creates ``stream`` with."""
    return StreamConfig(
        name=stream.name,
        subjects=list(stream.subjects),
        max_age=stream.max_age_s,
        duplicate_window=stream.duplicate_window_s,
        storage=StorageType.FILE if stream.storage == "file" else StorageType.MEMORY,
        # unset, these are the server's defaults (-1: no per-subject limit; no
        # direct get), so a stream created before the options existed still
        # compares equal and connect stays a no-op for it
        max_msgs_per_subject=(-1 if stream.max_msgs_per_subject is None
                              else stream.max_msgs_per_subject),
        allow_direct=stream.allow_direct or None,
    )


def _connect_kwargs(opts: NatsOptions, servers: list[str], events: _Events,
                    tls: ssl.SSLContext | None, connect_timeout_s: float,
                    flush_timeout_s: float) -> dict[str, Any]:
    """The arguments of nats-py's ``Client.connect``
    (:func:`bridge.sinks.natsconn.connect_kwargs`): no reconnection of its own, the
    callbacks of ``events``, TLS and the credentials."""
    return connect_kwargs(
        opts, name=opts.name, tls=tls, servers=servers,
        connect_timeout_s=connect_timeout_s,
        callbacks={"error_cb": events.on_error, "disconnected_cb": events.on_lost,
                   "closed_cb": events.on_lost},
        allow_reconnect=False,
        # with reconnection off this only bounds the first connect: each server is
        # tried twice, then NoServersError
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        dont_randomize=True,
        ping_interval=opts.ping_interval_s,
        max_outstanding_pings=opts.max_outstanding_pings,
        flush_timeout=flush_timeout_s,
    )


def _is_permission(exc: BaseException) -> bool:
    return "permissions violation" in str(exc).lower()


def _abort(nc: Client) -> None:
    """Tear down a client that did not close cleanly: cancel its tasks, drop the socket.

    Uses nats-py internals (guarded) because ``Client.close()`` waits for a socket
    drain that a dead peer can hold forever.
    """
    for attr in ("_reading_task", "_ping_interval_task", "_flusher_task", "_reconnection_task"):
        task = getattr(nc, attr, None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
    transport = getattr(nc, "_transport", None)
    for attr in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, attr, None)
        raw = getattr(writer, "transport", None)
        abort: Callable[[], None] | None = getattr(raw, "abort", None)
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
    with contextlib.suppress(Exception):
        nc._status = Client.CLOSED
