"""The NATS door of the control surface: one "micro" service on a connection of its own.

:func:`start_nats_control` serves a :class:`~bridge.control.core.Control` as the service
``control.nats.name`` (default ``aleno-bridge``), which shows up in ``$SRV`` discovery
(``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``, each also per service name). Requests are
parsed by :mod:`bridge.control.requests`; who may call is decided by
:mod:`bridge.control.auth` (the ``Authorization: Bearer <token>`` message header). The
human reference, with complete nats-py clients (every snapshot page of every shard;
leasing, renewing and releasing over every shard), is ``docs/control-api.md``.

Endpoints
---------
``snapshot`` on ``<subject_prefix>.snapshot``
    every shard answers (each shard listens in its own queue group ``shard-<index>``,
    so one replica per shard answers; an unsharded bridge uses the queue group ``q``).
    Request body: the query as JSON, ``{"kind": "ticker", "symbols": ["BTC/*"]}``;
    an empty body asks for everything.
``snapshot-shard`` on ``<subject_prefix>.snapshot.<index>`` (sharded bridges only)
    the same query, answered by shard ``<index>`` alone: how a client fetches the next
    pages of one shard.
``subscribe`` on ``<subject_prefix>.subscribe``
    in the per-shard queue group like ``snapshot``: every shard receives the request
    once and answers for the symbols it owns (``crc32(kind:SYMBOL) % count``, see
    :mod:`bridge.upstream.sharding`); a shard that owns none of them stays silent. An unsharded
    bridge always answers. So a client collects replies until every symbol it asked
    for is answered, one lease per answering shard.
``subscribe-shard`` on ``<subject_prefix>.subscribe.<index>`` (sharded bridges only)
    shard ``<index>`` alone; symbols of other shards are answered ``error``,
    ``"owned by shard N of M"`` (what the HTTP door does too: an HTTP request reaches
    one pod, and the error says where to ask).
``renew`` on ``<subject_prefix>.renew``, ``release`` on ``<subject_prefix>.release``
    bodies ``{"lease": id, "ttl_s": 60}`` and ``{"lease": id}``; ``release`` answers
    ``{"lease": id, "released": true}``. Unlike ``subscribe``,
    every process receives these (each listens in a queue group of its own,
    ``lease-<process>``) and only the process named in the id answers; the others stay
    silent, so plain request/reply works whatever the shards and replicas.

A NATS message is limited by the server's ``max_payload`` (1 MiB by default): a snapshot
reply holds at most ``min(max_payload, control.nats.snapshot_page_bytes)`` bytes, and
``next`` says where the next page starts (the ``shard`` of each first reply says how many
shards to wait for). A refusal is the micro protocol's error: the headers
``Nats-Service-Error-Code`` (the HTTP status) and ``Nats-Service-Error`` (the text), and
the JSON body ``{"error": ..., "parameter": ...}``.

With replicas of a shard, one replica (the queue group's pick) grants a lease and
subscribes its symbols; the others do not. If that replica goes, its leases go with
it: the client's next renew is not answered, and leasing again reaches a live one.

The door has a connection of its own, independent of any NATS sink: nats-py
reconnects it forever once it was made (the service's subscriptions come back with
it); a bus unreachable at start-up is retried in the background with capped, jittered
backoff while the bridge runs. Nothing here logs a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import orjson

from bridge import __version__
from bridge.config.schema import ControlNatsConfig, ShardConfig
from bridge.control.auth import AuthError, Guard, Principal
from bridge.control.requests import (
    ControlError,
    SnapshotQuery,
    lease_from_json,
    query_from_json,
    release_from_json,
    renew_from_json,
)
from bridge.core.backoff import Backoff
from bridge.sinks.kit import TlsFilesError, mask_secrets
from bridge.sinks.natsconn import (
    CREDENTIAL_OPTIONS,
    connect_kwargs,
    plain_text_problem,
    refused_credentials,
    server_url,
)

log = logging.getLogger("aleno_bridge.control")

#: how long :meth:`NatsControl.close` waits for the service and connection to close
CLOSE_TIMEOUT_S: Final = 2.0
_SEMVER: Final = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


# -- what the door calls ----------------------------------------------------------------


class Reply(Protocol):
    """A reply of the core: the JSON body sent as it is."""

    @property
    def body(self) -> bytes: ...


class Leased(Reply, Protocol):
    """The answer to ``subscribe`` / ``renew``
    (:class:`~bridge.control.core.LeaseAnswer`)."""

    @property
    def owned(self) -> int: ...


class Surface(Protocol):
    """What the door calls of :class:`~bridge.control.core.Control` (which imports this
    module to re-export it: so the door knows the core only by this protocol)."""

    @property
    def instance(self) -> str: ...

    @property
    def shard(self) -> ShardConfig | None: ...

    @property
    def source(self) -> str: ...

    def answer(self, query: SnapshotQuery, max_bytes: int | None = None) -> Reply: ...

    def check_leases(self) -> None: ...

    def granted_here(self, lease: str) -> bool: ...

    async def lease(self, kind: str, symbols: Sequence[str], ttl_s: float | None = None,
                    holder: str = "", *, foreign: str = "report", owner: str = "",
                    max_symbols: int | None = None) -> Leased: ...

    async def renew(self, lease: str, ttl_s: float | None = None, *,
                    owner: str | None = None) -> Leased: ...

    async def release(self, lease: str, *, owner: str | None = None) -> None: ...


# -- the door -----------------------------------------------------------------------------


Redact = Callable[[str], str]


def queue_group(shard: ShardConfig | None) -> str:
    """The queue group of this process's endpoints: one per shard, so that every shard
    answers a request once, whichever of its replicas does."""
    return "q" if shard is None else f"shard-{shard.index}"


def lease_queue_group(control: Surface) -> str:
    """The queue group of ``renew`` / ``release``: this process's own, so that every
    process receives them (the one that granted the lease answers)."""
    return f"lease-{control.instance}"


class NatsControl:
    """The micro service of :class:`~bridge.control.core.Control` on NATS, on a
    connection of its own.

    :meth:`start` returns at once; the connection is made in the background, retried
    with backoff while it fails (each failure logged, redacted). Once made, nats-py
    keeps it (reconnects forever; the service's subscriptions are restored with it).
    :meth:`close` stops the service and the connection; it is safe to call twice.
    :class:`~bridge.app.Bridge` runs it on the control thread
    (:mod:`bridge.control.thread`): ``snapshot`` is answered there, the lease endpoints
    by the bridge's loop (:meth:`~bridge.control.core.Control.lease` goes there by
    itself).
    """

    def __init__(self, control: Surface, cfg: ControlNatsConfig,
                 redact: Redact | None = None, guard: Guard | None = None) -> None:
        self.control = control
        self.cfg = cfg
        self._redact = redact
        #: who may call (:mod:`bridge.control.auth`); ``None``: anyone, for every scope
        self.guard = guard
        self._backoff = Backoff(cfg.backoff.initial_s, cfg.backoff.max_s)
        self._task: asyncio.Task[None] | None = None
        self._nc: Any = None
        self._service: Any = None
        self._closed = False
        #: set while the service is registered and the connection is up
        self.ready = asyncio.Event()
        self.attempts = 0
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and not self._closed:
            try:
                import nats.micro  # noqa: F401
            except ImportError:
                self.last_error = ("control.nats needs nats-py 2.7 or later "
                                   "(pip install 'aleno-bridge[nats]')")
                log.error("control: %s; the NATS door stays closed", self.last_error)
                return
            self._task = asyncio.create_task(self._connect_forever(), name="control-nats")

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the service is registered (raises :class:`TimeoutError`)."""
        await asyncio.wait_for(self.ready.wait(), timeout)

    @property
    def service_id(self) -> str | None:
        return None if self._service is None else str(self._service.id)

    async def close(self) -> None:
        self._closed = True
        self.ready.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        service, self._service = self._service, None
        nc, self._nc = self._nc, None
        if service is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service.stop(), CLOSE_TIMEOUT_S)
        if nc is not None:
            await _discard(nc)

    # -- connection ------------------------------------------------------------------

    def _text(self, text: str) -> str:
        text = mask_secrets(text, self.cfg)
        return self._redact(text) if self._redact is not None else text

    async def _connect_forever(self) -> None:
        while not self._closed:
            self.attempts += 1
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = self._text(_describe(exc))
                delay = self._backoff.next()
                level = logging.WARNING if self._backoff.attempts <= 1 or \
                    self._backoff.attempts % 10 == 0 else logging.DEBUG
                log.log(level, "control: cannot reach NATS at %s (%s); retrying in %.1fs "
                        "(the bridge runs on meanwhile)",
                        ", ".join(self.cfg.servers), self.last_error, delay,
                        extra={"attempts": self.attempts})
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self.last_error = None
            return

    async def _connect_once(self) -> None:
        from nats.aio.client import Client
        from nats.micro import add_service

        cfg = self.cfg
        errors: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)
            del errors[:-10]
            log.debug("control: nats client error: %s", self._text(_describe(exc)))

        async def on_disconnected() -> None:
            if self.ready.is_set():
                self.ready.clear()
                log.warning("control: lost the NATS connection; reconnecting (snapshots "
                            "over NATS pause meanwhile, the data path does not)")

        async def on_reconnected() -> None:
            if self._service is not None:
                self.ready.set()
                log.info("control: NATS connection back (%s)", server_url(nc))

        try:
            tls = cfg.connection_tls()
        except TlsFilesError as exc:
            raise ControlConnectError(str(exc)) from None
        kwargs = connect_kwargs(
            cfg, name=f"{cfg.name}-control", tls=tls,
            callbacks={"error_cb": on_error, "disconnected_cb": on_disconnected,
                       "reconnected_cb": on_reconnected},
            allow_reconnect=True,
            # once connected: reconnect forever, independent of the sinks
            max_reconnect_attempts=-1,
            reconnect_time_wait=cfg.backoff.initial_s,
        )
        nc = Client()
        # with reconnection on, nats-py's first connect would loop forever: bound it,
        # and let this task's backoff decide when to try again
        bound = len(cfg.servers) * (cfg.connect_timeout_s + cfg.backoff.initial_s) + 1.0
        try:
            await asyncio.wait_for(nc.connect(**kwargs), bound)
        except BaseException as exc:
            await _discard(nc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            cause = next((e for e in reversed(errors)), exc)
            raise ControlConnectError(_explain(cause)) from None
        # never fall back to plain text when TLS was asked for
        plain = plain_text_problem(nc, tls)
        if plain is not None:
            await _discard(nc)
            raise ControlConnectError(plain)
        try:
            service = await add_service(
                nc, name=cfg.name, version=_semver(__version__),
                description="aleno-bridge control surface: snapshots of the last prices, leases",
                metadata=self._metadata(),
            )
            await self._add_endpoints(service)
            await nc.flush(timeout=max(1, math.ceil(cfg.connect_timeout_s)))
        except BaseException:
            await _discard(nc)
            raise
        self._nc, self._service = nc, service
        self.ready.set()
        log.info("control: NATS service %s (id %s) on %s.{snapshot,subscribe,renew,release}, "
                 "queue group %s (%s)", cfg.name, service.id, cfg.subject_prefix,
                 queue_group(self.control.shard), server_url(nc))

    def _metadata(self) -> dict[str, str]:
        shard = self.control.shard
        return {
            "shard": "none" if shard is None else f"{shard.index}/{shard.count}",
            "source": self.control.source,
            "subject_prefix": self.cfg.subject_prefix,
        }

    async def _add_endpoints(self, service: Any) -> None:
        prefix = self.cfg.subject_prefix
        shard = self.control.shard
        group = queue_group(shard)
        await service.add_endpoint(name="snapshot", subject=f"{prefix}.snapshot",
                                   queue_group=group, handler=self._on_snapshot,
                                   metadata={"query": "kind, symbols, after, limit"})
        if shard is not None:
            await service.add_endpoint(
                name="snapshot-shard", subject=f"{prefix}.snapshot.{shard.index}",
                queue_group=group, handler=self._on_snapshot,
                metadata={"shard": str(shard.index)})
        await service.add_endpoint(name="subscribe", subject=f"{prefix}.subscribe",
                                   queue_group=group, handler=self._on_subscribe,
                                   metadata={"request": "kind, symbols, ttl_s, holder"})
        if shard is not None:
            await service.add_endpoint(
                name="subscribe-shard", subject=f"{prefix}.subscribe.{shard.index}",
                queue_group=group, handler=self._on_subscribe_shard,
                metadata={"shard": str(shard.index)})
        # every process receives renew / release (a queue group of its own) and
        # answers only for the leases it granted: a lease lives in one process
        mine = lease_queue_group(self.control)
        await service.add_endpoint(name="renew", subject=f"{prefix}.renew",
                                   queue_group=mine, handler=self._on_renew,
                                   metadata={"request": "lease, ttl_s"})
        await service.add_endpoint(name="release", subject=f"{prefix}.release",
                                   queue_group=mine, handler=self._on_release,
                                   metadata={"request": "lease"})

    # -- handlers --------------------------------------------------------------------

    def page_bytes(self) -> int:
        """The largest reply this connection may publish now."""
        nc = self._nc
        limit = int(nc.max_payload) if nc is not None and nc.max_payload else 1 << 20
        wanted = self.cfg.snapshot_page_bytes
        return limit if wanted is None else min(wanted, limit)

    def _principal(self, request: Any, scope: str) -> Principal | None:
        """Who sent ``request`` (its ``Authorization`` header), allowed ``scope``;
        raises :class:`ControlError` 401 / 403. ``None`` without a guard."""
        if self.guard is None:
            return None
        headers = getattr(request, "headers", None) or {}
        try:
            return self.guard.check(headers.get("Authorization"), scope)
        except AuthError as exc:
            raise ControlError(str(exc), "Authorization", exc.status) from None

    async def _on_snapshot(self, request: Any) -> None:
        async def answer() -> bytes:
            self._principal(request, "snapshot")
            query = query_from_json(request.data)
            return self.control.answer(query, max_bytes=self.page_bytes()).body
        await _respond(request, answer)

    async def _lease(self, request: Any, *, foreign: str) -> Leased:
        who = self._principal(request, "lease")
        req = lease_from_json(request.data)
        return await self.control.lease(
            req.kind, req.symbols, req.ttl_s, req.holder, foreign=foreign,
            owner="" if who is None else who.name,
            max_symbols=None if who is None else who.max_symbols)

    async def _on_subscribe(self, request: Any) -> None:
        """Every shard receives it and answers for its own symbols; a shard that owns
        none of them stays silent (unsharded: always answers)."""
        async def answer() -> bytes | None:
            sharded = self.control.shard is not None
            got = await self._lease(request, foreign="omit" if sharded else "report")
            return got.body if got.owned or not sharded else None
        await _respond(request, answer)

    async def _on_subscribe_shard(self, request: Any) -> None:
        async def answer() -> bytes:
            return (await self._lease(request, foreign="report")).body
        await _respond(request, answer)

    async def _on_renew(self, request: Any) -> None:
        async def answer() -> bytes | None:
            req = renew_from_json(request.data)
            self.control.check_leases()
            if not self.control.granted_here(req.lease):
                return None  # another process's lease: that one answers
            who = self._principal(request, "lease")
            owner = None if who is None else who.name
            return (await self.control.renew(req.lease, req.ttl_s, owner=owner)).body
        await _respond(request, answer)

    async def _on_release(self, request: Any) -> None:
        async def answer() -> bytes | None:
            lease = release_from_json(request.data)
            self.control.check_leases()
            if not self.control.granted_here(lease):
                return None
            who = self._principal(request, "lease")
            await self.control.release(lease, owner=None if who is None else who.name)
            return orjson.dumps({"lease": lease, "released": True})
        await _respond(request, answer)


class ControlConnectError(Exception):
    """The control door could not connect (the message holds no secret)."""


async def _respond(request: Any, answer: Callable[[], Awaitable[bytes | None]]) -> None:
    """Reply with what ``answer()`` returns (``None``: stay silent, another process
    answers), or with the micro protocol's error for a :class:`ControlError`."""
    try:
        body = await answer()
    except ControlError as exc:
        await _respond_error(request, exc)
        return
    if body is not None:
        await request.respond(body)


async def _respond_error(request: Any, exc: ControlError) -> None:
    await request.respond_error(str(exc.status), str(exc), data=exc.body())


def _semver(version: str) -> str:
    """``version`` when it is semantic versioning (the micro protocol requires it)."""
    return version if _SEMVER.match(version) else "0.0.0"


def _describe(exc: BaseException) -> str:
    name, detail = type(exc).__name__, str(exc)
    return detail if detail.startswith(name) else f"{name}: {detail}" if detail else name


def _explain(exc: BaseException) -> str:
    text = _describe(exc)
    if refused_credentials(exc):
        return ("the server refused the credentials (Authorization Violation); check "
                f"control.nats {CREDENTIAL_OPTIONS}")
    if isinstance(exc, asyncio.TimeoutError):
        return "no server answered in time"
    return text


async def _discard(nc: Any) -> None:
    """Close a client, even a half-connected one, without hanging on a dead peer."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)


async def start_nats_control(control: Surface, cfg: ControlNatsConfig,
                             redact: Redact | None = None,
                             guard: Guard | None = None) -> NatsControl:
    """Serve ``control`` as a NATS micro service; returns at once (the connection is
    made in the background, see :class:`NatsControl`). ``redact`` scrubs the bridge's
    secrets from logged error texts (this door's own credentials are masked anyway)."""
    service = NatsControl(control, cfg, redact, guard)
    service.start()
    return service


__all__ = [
    "CLOSE_TIMEOUT_S",
    "ControlConnectError",
    "Leased",
    "NatsControl",
    "Redact",
    "Reply",
    "Surface",
    "lease_queue_group",
    "queue_group",
    "start_nats_control",
]
