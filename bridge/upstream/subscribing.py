"""The subscriptions of one upstream connection: its desired set, the (re)connect
subscription that issues it whole, and the live ``subscribe_*`` / ``unsubscribe_*``
requests that change it, each acknowledged, paced and answered per symbol (see
:mod:`bridge.upstream.client` for the promises).

:class:`SubscriptionRequests` holds the state; the :class:`~bridge.upstream.client.AlenoSource`
that composes it gives it the connection's counters, its :class:`Transport` (bounded
waits, restart) and the way to send one request and wait for its acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from bridge.config.schema import SourceConfig
from bridge.upstream.protocol import (
    ACCEPTED,
    EVENTS,
    LIMIT_MARK,
    PENDING,
    SUBSCRIBE_CHUNK,
    RateLimit,
    SourceStats,
    SubscriptionResult,
    results_of_ack,
)
from bridge.upstream.symbols import ConnectionSymbols
from bridge.upstream.transport import AttemptFailed, SocketClient, Stopped, Transport

log = logging.getLogger("aleno_bridge.source")

#: ``(sio, event, symbols)``: send one request, return its acknowledgement
AckSender = Callable[[SocketClient, str, list[str]], Awaitable[Any]]


class SubscriptionRequests:
    """The desired set of one connection and the requests that keep it subscribed.

    The desired set is the connection's :class:`~bridge.upstream.symbols.ConnectionSymbols`
    in the :class:`~bridge.upstream.symbols.SymbolBook`; ``tell_limit(kind, symbols)`` is
    told the requests of a (re)connect subscription refused for the limit.
    """

    def __init__(self, config: SourceConfig, stats: SourceStats, transport: Transport,
                 ack: AckSender, tell_limit: Callable[[str, list[str]], None],
                 symbols: ConnectionSymbols) -> None:
        self.config = config
        self.stats = stats
        self.transport = transport
        self._ack = ack
        self._tell_limit = tell_limit
        #: this connection's part of the symbol book
        self.symbols = symbols
        #: the desired set, in subscription order: what every (re)connect re-issues
        self.desired: dict[str, dict[str, None]] = symbols.desired
        #: the symbols this source asks for, by kind: records of any other are not ours.
        #: The dict stays the same object; each kind's frozenset is replaced, never
        #: changed, so a reader in another task always sees a whole set.
        self.wanted: dict[str, frozenset[str]] = symbols.wanted
        #: serializes the (re)connect subscription and live (un)subscribe requests
        self.lock = asyncio.Lock()
        #: paces the live requests of this connection (one API key)
        self.rate_limit = RateLimit(config.max_subscribe_requests_per_s)
        #: the connection on which the desired set is subscribed (None: not now)
        self.live: SocketClient | None = None
        #: when the desired set was (last) subscribed on the current connection: the
        #: watchdog counts from here while no update came yet
        self.subscribed_at: float | None = None
        self._logged_errors: set[str] = set()

    # -- the desired set ----------------------------------------------------------

    def count(self) -> int:
        """Symbols of every kind in the desired set."""
        return self.symbols.count()

    def upstream_subscribed(self, kind: str) -> frozenset[str]:
        """What the last acknowledgement said is subscribed upstream (empty while not
        connected)."""
        if self.live is None:
            return frozenset()
        return frozenset(self.stats.subscribed.get(kind, ()))

    def set_desired(self, kind: str, add: Iterable[str] = (),
                    remove: Iterable[str] = ()) -> None:
        self.symbols.set(kind, add, remove)

    # -- acknowledgements -----------------------------------------------------------

    def handle_ack(self, kind: str, requested: list[str], ack: Any, part: str = "") -> bool:
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

    # -- the (re)connect subscription ---------------------------------------------------

    async def subscribe_all(self, sio: SocketClient) -> None:
        """Issue the whole desired set on a new connection; then it is live.

        Requests refused for the limit are told to ``tell_limit`` once the whole set
        was issued and the connection is live: the listener (the pool) learns the limit
        from what the key then holds, every kind counted, and may ask again for the part
        that fits on this connection."""
        refused: list[tuple[str, list[str]]] = []
        async with self.lock:
            self.stats.subscribed = {}
            t = self.config.connect_timeout_s
            for kind, (event, _) in EVENTS.items():
                symbols = list(self.desired[kind])
                chunks = [symbols[i:i + SUBSCRIBE_CHUNK]
                          for i in range(0, len(symbols), SUBSCRIBE_CHUNK)]
                for i, chunk in enumerate(chunks, 1):
                    part = f" (request {i}/{len(chunks)})" if len(chunks) > 1 else ""

                    def what(event: str = event, part: str = part) -> str:
                        return (f"no {event} ack{part} within {t:g}s from "
                                f"{self.transport.ws_url}")

                    try:
                        ack = await self.transport.bounded(
                            self._ack(sio, event, list(chunk)), t, what)
                    except AttemptFailed:
                        self.stats.failed_subscriptions += 1
                        raise
                    if not self.handle_ack(kind, list(chunk), ack, part):
                        self.stats.failed_subscriptions += 1
                        if isinstance(ack, dict) and LIMIT_MARK in str(ack.get("error") or ""):
                            after = set(self.stats.subscribed.get(kind, ()))
                            refused.append((kind, [s for s in chunk if s not in after]))
            self.live = sio
            for kind, symbols in refused:
                self._tell_limit(kind, symbols)

    # -- live changes -------------------------------------------------------------------

    async def change(self, kind: str, symbols: list[str],
                     subscribe: bool) -> dict[str, SubscriptionResult]:
        """See :meth:`~bridge.upstream.client.AlenoSource.subscribe` and
        :meth:`~bridge.upstream.client.AlenoSource.unsubscribe`."""
        if kind not in EVENTS:
            msg = f"unknown kind {kind!r} (ticker or equity)"
            raise ValueError(msg)
        out: dict[str, SubscriptionResult] = {}
        async with self.lock:
            desired = self.desired[kind]
            upstream = self.upstream_subscribed(kind)
            if subscribe:
                todo = [s for s in symbols if s not in desired or s not in upstream]
                for s in symbols:
                    if s in desired and s in upstream:
                        out[s] = ACCEPTED
                self.set_desired(kind, add=todo)
            else:
                todo = [s for s in symbols if s in upstream]
                self.set_desired(kind, remove=symbols)
                for s in symbols:
                    if s not in upstream:
                        out[s] = PENDING if self.live is None else ACCEPTED
            sio = self.live
            if not todo:
                return out
            if sio is None:
                out.update(dict.fromkeys(todo, PENDING))
                return out
            event = EVENTS[kind][0 if subscribe else 1]
            t = self.config.connect_timeout_s
            for i in range(0, len(todo), SUBSCRIBE_CHUNK):
                chunk = todo[i:i + SUBSCRIBE_CHUNK]
                # paced per key, whoever asks; the (re)connect subscription waits for
                # this lock meanwhile, which is at most one request's turn
                await self.rate_limit.take()
                if self.live is not sio:
                    # the connection ended while we waited: the desired set (already
                    # changed) is what the next connect issues
                    for s in todo[i:]:
                        out[s] = PENDING
                    break
                self.stats.live_requests += 1
                try:
                    ack = await self.transport.bounded(
                        self._ack(sio, event, chunk), t,
                        lambda: f"no {event} ack within {t:g}s from {self.transport.ws_url}")
                except (AttemptFailed, Stopped) as exc:
                    # the connection is gone or broken: what is desired now is
                    # re-issued on the next connect
                    self.stats.failed_subscriptions += 1
                    if isinstance(exc, AttemptFailed) and not self.transport.dropped.is_set():
                        self.transport.restart(str(exc))
                    for s in todo[i:]:
                        out[s] = PENDING
                    break
                ok = self.handle_ack(kind, chunk, ack, " (live)")
                if not ok:
                    self.stats.failed_subscriptions += 1
                results = results_of_ack(chunk, ack, subscribe)
                out.update(results)
                if subscribe:
                    self.set_desired(kind, remove=[s for s, r in results.items()
                                                   if not r.held])
                    if any(r.held for r in results.values()) \
                            and self.stats.last_update_monotonic is None:
                        # the watchdog counts from here while no update came yet
                        self.subscribed_at = time.monotonic()
        return out


__all__ = ["AckSender", "SubscriptionRequests"]
