"""Several API keys in one bridge: one :class:`~bridge.source.AlenoSource` connection
per key, the symbols packed across them within each key's limit.

The upstream limits the subscriptions of one API key ("Subscription limit reached.
Contact us to increase limits."). :class:`UpstreamPool` owns one connection per key
and places every symbol on exactly one of them:

- a connection takes symbols while it has room: its ``limit`` (``source.api_keys[].limit``)
  minus the symbols it holds; without a configured limit it takes symbols until the
  upstream answers with the limit error, and then the count it had subscribed *is* its
  limit from then on (learned; the refused symbols go to the next connection);
- a live connection is preferred to one that is reconnecting, so a request is answered
  by the upstream now whenever some connection can take it;
- a request that fits nowhere is refused for its new symbols only, with the limit
  error: what is subscribed already never moves or breaks;
- one connection's trouble is its own: a drop or a refused key reconnects that one only;
  a key refused until its source gives up marks the connection failed and its symbols
  move to the others (within their room); :meth:`UpstreamPool.run` raises only when
  every connection gave up.

- symbols a connection's (re)connect subscription was refused for its limit leave
  that connection (with one key too: they are not re-issued on every reconnect) and go
  to the others; those that fit nowhere are told to :attr:`UpstreamPool.on_unplaced`
  (the :class:`~bridge.subscriptions.Subscriptions`, which evicts leased symbols for
  configured ones and retries the configured ones on a schedule);
- a learned limit is a guess: the upstream counts every connection of the key,
  other processes' too. :meth:`UpstreamPool.pin` (the configured symbols) asks the
  upstream whenever only a learned limit stands in the way, and a connection that
  takes more than its learned limit learns the larger one; :meth:`UpstreamPool.subscribe`
  (leases) keeps within it. A configured ``limit`` is kept by both;
- a symbol the upstream rejected as unsupported is answered ``rejected`` without a
  request for :data:`REJECTED_TTL_S` (at most :data:`MAX_REJECTED_CACHE` symbols, the
  oldest forgotten first): clients asking for junk again and again cost no request;
- :meth:`UpstreamPool.capacity` is what the keys can hold in total when every usable
  connection's limit is known (configured or learned), for the leases to keep within
  what the configured symbols leave.

With a single key the pool is the single source it holds: the same desired set, the
same ``wanted`` dict object, the same errors.

The pool answers the :class:`~bridge.subscriptions.Upstream` protocol (``subscribe``,
``unsubscribe``, ``subscribed``) that leases and reloads drive, and the
:class:`~bridge.subscriptions.Placement` one (``capacity``, ``pin``, ``unplaced``,
``set_unplaced``, ``on_unplaced``) that puts the configured symbols first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from bridge.schema import SourceConfig
from bridge.settings import DEFAULT_NAME, UpstreamKey, upstream_keys
from bridge.sharding import configured_symbols
from bridge.source import (
    LIMIT_MARK,
    AlenoSource,
    AuthError,
    Handler,
    InvalidHandler,
    LinkHandler,
    SourceError,
    SourceStats,
    SubscriptionResult,
    SubscriptionStatus,
    normalize_symbols,
)
from bridge.state import ConnectionSnapshot, UpstreamSnapshot, UpstreamState, frozen_counts

log = logging.getLogger("aleno_bridge.upstream")

KINDS: Final = ("ticker", "equity")
#: the limit error given for a request that fits on no connection (the upstream's words)
LIMIT_ERROR: Final = "Subscription limit reached. Contact us to increase limits."
#: how long a symbol the upstream rejected as unsupported is answered ``rejected``
#: without asking again
REJECTED_TTL_S: Final = 600.0
#: the most symbols remembered as unsupported (the oldest forgotten first)
MAX_REJECTED_CACHE: Final = 10_000

#: worst first: the aggregate state of the connections that carry symbols
_STATE_ORDER: Final = (UpstreamState.REFUSED, UpstreamState.DISCONNECTED,
                       UpstreamState.CONNECTING, UpstreamState.IDLE, UpstreamState.CONNECTED,
                       UpstreamState.SUBSCRIBED, UpstreamState.STOPPED)

#: ``(connection name, up, cause)``: the ``up`` / ``down`` of one connection
ConnectionLinkHandler = Callable[[str, bool, str], None]
#: ``(kind, symbols)``: symbols dropped from every connection because they fit nowhere
UnplacedHandler = Callable[[str, list[str]], None]
_LimitHandler = Callable[[str, list[str]], None]


class _Connection:
    def __init__(self, key: UpstreamKey, source: AlenoSource) -> None:
        self.name = key.name
        self.source = source
        #: the operator's ``limit`` (kept), and the one in force (maybe learned lower)
        self.configured = key.limit
        self.limit = key.limit
        self.learned = False
        self.failed: str | None = None
        self.error: SourceError | None = None

    def room(self, probe: bool = False) -> int | None:
        """Symbols it may still take; ``None``: unknown (ask the upstream). ``probe``
        ignores a learned limit (only the configured one holds)."""
        limit = self.configured if probe else self.limit
        if limit is None:
            return None
        return max(0, limit - self.source.desired_count())


class UpstreamPool:
    """One :class:`AlenoSource` per key, symbols packed across them (see the module).

    ``on_payload`` / ``on_invalid`` receive what every connection receives. ``on_link``
    is told ``(up, cause)`` for each connection (the cause names the connection when
    there are several); ``on_connection_link`` gets ``(name, up, cause)``.
    """

    def __init__(
        self,
        config: SourceConfig,
        keys: Sequence[UpstreamKey],
        on_payload: Handler,
        on_invalid: InvalidHandler | None = None,
    ) -> None:
        if not keys:
            msg = "an upstream pool needs at least one key"
            raise ValueError(msg)
        self.config = config
        self.on_link: LinkHandler | None = None
        self.on_connection_link: ConnectionLinkHandler | None = None
        #: told ``(kind, symbols)`` when symbols were dropped because they fit on no
        #: connection (a (re)connect subscription refused for the limit, a connection
        #: that gave up); called inside the pool's lock, must not block
        self.on_unplaced: UnplacedHandler | None = None
        #: the clock of the unsupported-symbol memory (seconds, monotonic)
        self.clock: Callable[[], float] = time.monotonic
        self._lock = asyncio.Lock()
        self._owner: dict[tuple[str, str], _Connection] = {}
        #: (kind, symbol) -> until when it is answered ``rejected`` without a request;
        #: in insertion order, the oldest forgotten first beyond MAX_REJECTED_CACHE
        self._unsupported: dict[tuple[str, str], float] = {}
        #: configured symbols that fit in no key's limit (logged, counted); with
        #: :class:`~bridge.subscriptions.Subscriptions` the configured symbols it could
        #: not place for the limit (it keeps this up to date, see :meth:`set_unplaced`)
        self.unplaced: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}
        placement = self._pack(keys, configured_symbols(config))
        self._connections: list[_Connection] = []
        for key, symbols in zip(keys, placement, strict=True):
            secret = key.key.get_secret_value() if key.key is not None else None
            src = AlenoSource(config, secret, on_payload, on_invalid, symbols=symbols)
            conn = _Connection(key, src)
            src.on_link = self._link_handler(conn)
            self._connections.append(conn)
            for kind, syms in symbols.items():
                for s in syms:
                    self._owner[(kind, s)] = conn
        self._single = len(self._connections) == 1
        #: the symbols whose records are ours, by kind, across every connection: the
        #: same dict object for the pool's life, each kind's frozenset replaced whole
        self.wanted: dict[str, frozenset[str]]
        if self._single:
            self.wanted = self._connections[0].source.wanted
        else:
            self.wanted = {k: frozenset() for k in KINDS}
            for conn in self._connections:
                conn.source.on_wanted = self._refresh_wanted
            self._refresh_wanted()
        for conn in self._connections:
            conn.source.on_limit = self._limit_handler(conn)
        self._tasks: set[asyncio.Task[None]] = set()

    def _pack(self, keys: Sequence[UpstreamKey],
              symbols: Mapping[str, Sequence[str]]) -> list[dict[str, list[str]]]:
        """First fit of the configured symbols within the configured limits; a key
        without a limit takes every symbol that reaches it (its limit is learned)."""
        out: list[dict[str, list[str]]] = [{k: [] for k in KINDS} for _ in keys]
        used = [0] * len(keys)
        unplaced: dict[str, list[str]] = {k: [] for k in KINDS}
        for kind in KINDS:
            for s in normalize_symbols(symbols.get(kind, ())):
                for i, key in enumerate(keys):
                    if key.limit is None or used[i] < key.limit:
                        out[i][kind].append(s)
                        used[i] += 1
                        break
                else:
                    unplaced[kind].append(s)
        self._set_unplaced(unplaced)
        return out

    def _set_unplaced(self, add: Mapping[str, Iterable[str]]) -> None:
        for kind, syms in add.items():
            new = set(syms) - self.unplaced[kind]
            if not new:
                continue
            self.unplaced[kind] = self.unplaced[kind] | new
            log.error("%d %s symbol(s) fit in no API key's limit and are not subscribed: %s "
                      "(add a key to source.api_keys or raise a limit)", len(new), kind,
                      ", ".join(sorted(new)[:50]), extra={"kind": kind})

    def set_unplaced(self, unplaced: Mapping[str, Iterable[str]]) -> None:
        """Replace :attr:`unplaced` (the owner of the configured set says which of its
        symbols fit nowhere); the newly unplaced ones are logged."""
        known = {k: frozenset(unplaced.get(k, ())) for k in KINDS}
        for kind in KINDS:
            self.unplaced[kind] = self.unplaced[kind] & known[kind]
        self._set_unplaced(known)

    # -- read side ------------------------------------------------------------------

    def __repr__(self) -> str:
        names = ", ".join(c.name for c in self._connections)
        return f"UpstreamPool(url={self.url!r}, connections=[{names}])"

    @property
    def url(self) -> str:
        return self._connections[0].source.url

    @property
    def endpoint(self) -> str:
        """The CloudEvents ``source`` attribute (the same for every connection)."""
        return self._connections[0].source.endpoint

    @property
    def sources(self) -> list[AlenoSource]:
        """The connections' sources, in the order of the keys."""
        return [c.source for c in self._connections]

    @property
    def stats(self) -> SourceStats:
        """The counters of the first connection (the only one with a single key);
        :meth:`connection_snapshots` has every connection's."""
        return self._connections[0].source.stats

    def source_of(self, kind: str, symbol: str) -> AlenoSource | None:
        """The connection a symbol is placed on (``None``: on none)."""
        conn = self._owner.get((kind, symbol.strip().upper()))
        return conn.source if conn is not None else None

    @property
    def pending_moves(self) -> int:
        """Moves of symbols refused by a connection's limit to the others, still running."""
        return len(self._tasks)

    def capacity(self) -> int | None:
        """The symbols the usable connections can hold in total, when each of their
        limits is known (configured or learned); ``None``: some limit is unknown."""
        total = 0
        for conn in self._connections:
            if conn.failed is not None:
                continue
            if conn.limit is None:
                return None
            total += conn.limit
        return total

    def subscribed(self) -> dict[str, frozenset[str]]:
        """What the upstream's last acknowledgements say is subscribed, across every
        open connection, by kind."""
        out: dict[str, frozenset[str]] = {}
        for kind in KINDS:
            acc: set[str] = set()
            for conn in self._connections:
                acc |= conn.source.upstream_subscribed(kind)
            out[kind] = frozenset(acc)
        return out

    def _refresh_wanted(self) -> None:
        for kind in KINDS:
            acc: set[str] = set()
            for conn in self._connections:
                acc |= conn.source.wanted[kind]
            self.wanted[kind] = frozenset(acc)

    def connection_snapshots(self) -> tuple[ConnectionSnapshot, ...]:
        """Every connection now, in the order of the keys (metrics and ``/readyz`` per
        connection)."""
        return tuple(
            ConnectionSnapshot(name=c.name, limit=c.limit, limit_learned=c.learned,
                               symbols=c.source.desired_count(), failed=c.failed,
                               upstream=c.source.snapshot())
            for c in self._connections)

    def snapshot(self) -> UpstreamSnapshot:
        """The connections as one :class:`UpstreamSnapshot` (the single connection's own
        with one key). With several: the worst state and the oldest update among the
        connections that carry symbols (ready only when each of them is), counters
        summed, the first connection's error named."""
        if self._single:
            return self._connections[0].source.snapshot()
        snaps = self.connection_snapshots()
        carrying = [s for s in snaps if s.symbols > 0] or list(snaps)
        ups = [s.upstream for s in carrying]
        state = min((u.state for u in ups), key=_STATE_ORDER.index)
        if any(s.failed for s in carrying):
            state = UpstreamState.REFUSED if state != UpstreamState.STOPPED else state
        ages = [u.seconds_since_update for u in ups]
        acks: dict[str, int] = {}
        subs: dict[str, int] = {}
        for s in snaps:
            for k, v in s.upstream.acks.items():
                acks[k] = acks.get(k, 0) + v
            for k, v in s.upstream.subscriptions.items():
                subs[k] = subs.get(k, 0) + v
        error = next((f"{s.name}: {s.failed or s.upstream.last_error}" for s in snaps
                      if s.failed or s.upstream.last_error), None)
        return UpstreamSnapshot(
            state=state,
            flowing=all(u.flowing for u in ups),
            seconds_since_update=None if any(a is None for a in ages)
            else max(a for a in ages if a is not None),
            stale_after_s=self.config.stale_after_s,
            connects=sum(s.upstream.connects for s in snaps),
            reconnects=sum(s.upstream.reconnects for s in snaps),
            connect_failures=sum(s.upstream.connect_failures for s in snaps),
            watchdog_restarts=sum(s.upstream.watchdog_restarts for s in snaps),
            acks=frozen_counts(acks),
            rejected_symbols=sum(s.upstream.rejected_symbols for s in snaps),
            subscriptions=frozen_counts(subs),
            last_error=error,
        )

    # -- live changes -----------------------------------------------------------------

    def _usable(self, exclude: _Connection | None = None) -> list[_Connection]:
        """The connections that may take new symbols, the live ones first."""
        ok = [c for c in self._connections if c.failed is None and c is not exclude]
        return sorted(ok, key=lambda c: not c.source.live)

    async def subscribe(self, kind: str,
                        symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """Subscribe ``symbols`` of ``kind``, each on the connection that holds it or on
        the first with room; per symbol what the upstream's ack said (see
        :meth:`AlenoSource.subscribe`); ``limit`` when it fits on no connection;
        ``rejected`` without a request for a symbol the upstream rejected lately."""
        return await self._subscribe(kind, symbols, probe=False)

    async def _subscribe(self, kind: str, symbols: Iterable[str],
                         probe: bool) -> dict[str, SubscriptionResult]:
        _check_kind(kind)
        wanted = normalize_symbols(symbols)
        async with self._lock:
            out: dict[str, SubscriptionResult] = {}
            groups: dict[int, list[str]] = {}
            new: list[str] = []
            now = self.clock()
            for s in wanted:
                until = self._unsupported.get((kind, s))
                if until is not None:
                    if until > now:
                        out[s] = _KNOWN_UNSUPPORTED
                        continue
                    del self._unsupported[(kind, s)]
                conn = self._owner.get((kind, s))
                if conn is not None and conn.failed is None:
                    groups.setdefault(self._connections.index(conn), []).append(s)
                else:
                    new.append(s)
            for i, syms in groups.items():
                conn = self._connections[i]
                results = await conn.source.subscribe(kind, syms)
                self._settle(conn, kind, results, out)
            leftover, error = await self._place(kind, new, out, probe=probe)
            limited = SubscriptionResult(SubscriptionStatus.LIMIT, error or LIMIT_ERROR)
            for s in leftover:
                out[s] = limited
            return {s: out[s] for s in wanted}

    def _remember_unsupported(self, kind: str, symbol: str) -> None:
        key = (kind, symbol)
        self._unsupported.pop(key, None)
        self._unsupported[key] = self.clock() + REJECTED_TTL_S
        while len(self._unsupported) > MAX_REJECTED_CACHE:
            del self._unsupported[next(iter(self._unsupported))]

    def known_unsupported(self) -> int:
        """Symbols answered ``rejected`` without a request now (bounded)."""
        return len(self._unsupported)

    async def unsubscribe(self, kind: str,
                          symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """Unsubscribe ``symbols`` of ``kind`` on the connection holding each (see
        :meth:`AlenoSource.unsubscribe`); a symbol placed nowhere is ``accepted``."""
        _check_kind(kind)
        wanted = normalize_symbols(symbols)
        async with self._lock:
            out: dict[str, SubscriptionResult] = {}
            groups: dict[int, list[str]] = {}
            for s in wanted:
                conn = self._owner.pop((kind, s), None)
                if conn is None:
                    out[s] = SubscriptionResult(SubscriptionStatus.ACCEPTED)
                else:
                    groups.setdefault(self._connections.index(conn), []).append(s)
            if kind in self.unplaced and self.unplaced[kind] & set(wanted):
                self.unplaced[kind] = self.unplaced[kind] - set(wanted)
            for i, syms in groups.items():
                out.update(await self._connections[i].source.unsubscribe(kind, syms))
            return {s: out[s] for s in wanted}

    async def pin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`subscribe` for configured symbols (see :meth:`AlenoSource.pin`): a
        learned limit does not keep them from being asked (the room it counted may have
        been freed meanwhile, by this process or another on the same key); a configured
        ``limit`` does."""
        return await self._subscribe(kind, symbols, probe=True)

    async def unpin(self, kind: str, symbols: Iterable[str]) -> dict[str, SubscriptionResult]:
        """:meth:`unsubscribe` (see :meth:`AlenoSource.unpin`)."""
        return await self.unsubscribe(kind, symbols)

    def _settle(self, conn: _Connection, kind: str, results: Mapping[str, SubscriptionResult],
                out: dict[str, SubscriptionResult]) -> list[str]:
        """Record what one connection answered; return the symbols refused for its limit
        (and learn the limit from them)."""
        limited: list[str] = []
        for s, r in results.items():
            if r.status == SubscriptionStatus.LIMIT:
                limited.append(s)
                self._owner.pop((kind, s), None)
                continue
            out[s] = r
            if r.held:
                self._owner[(kind, s)] = conn
                if s in self.unplaced[kind]:
                    self.unplaced[kind] = self.unplaced[kind] - {s}
            else:
                self._owner.pop((kind, s), None)
                if r.status == SubscriptionStatus.REJECTED:
                    self._remember_unsupported(kind, s)
        if limited:
            self._learn(conn)
        elif conn.learned and conn.limit is not None \
                and any(r.status == SubscriptionStatus.ACCEPTED for r in results.values()) \
                and conn.source.desired_count() > conn.limit:
            # the upstream took more than the learned limit: the room it lacked then
            # was freed since (by us, or by another process on the same key)
            conn.limit = conn.source.desired_count()
        return limited

    def _learn(self, conn: _Connection) -> None:
        count = conn.source.upstream_count()
        if conn.limit is not None and count >= conn.limit:
            return
        if conn.limit is not None:
            log.warning("the upstream refused a subscription of connection %s at %d symbol(s), "
                        "below its configured limit of %d; using %d", conn.name, count,
                        conn.limit, count, extra={"connection": conn.name})
        else:
            log.info("connection %s: the upstream's limit is %d symbol(s) (learned from its "
                     "limit error)", conn.name, count, extra={"connection": conn.name})
        conn.limit = count
        conn.learned = True

    async def _place(self, kind: str, new: list[str], out: dict[str, SubscriptionResult],
                     exclude: _Connection | None = None,
                     probe: bool = False) -> tuple[list[str], str | None]:
        """Place ``new`` symbols on the connections with room; return those that fit
        nowhere and the last limit error seen. ``probe``: see :meth:`pin`."""
        error: str | None = None
        for conn in self._usable(exclude):
            if not new:
                break
            room = conn.room(probe)
            take = new if room is None else new[:room]
            if not take:
                continue
            results = await conn.source.subscribe(kind, take)
            for r in results.values():
                if r.status == SubscriptionStatus.LIMIT:
                    error = r.error
            limited = self._settle(conn, kind, results, out)
            new = limited + new[len(take):]
        return new, error

    # -- connections' trouble ------------------------------------------------------------

    def _link_handler(self, conn: _Connection) -> LinkHandler:
        def tell(up: bool, cause: str) -> None:
            if self.on_connection_link is not None:
                self.on_connection_link(conn.name, up, cause)
            if self.on_link is not None:
                named = cause if self._single or not cause else f"connection {conn.name}: {cause}"
                self.on_link(up, named)
        return tell

    def _limit_handler(self, conn: _Connection) -> _LimitHandler:
        def refused(kind: str, symbols: list[str]) -> None:
            # told inside the connection's subscription: move them in a task of our own
            task = asyncio.get_running_loop().create_task(
                self._spill(conn, kind, symbols), name=f"upstream-spill-{conn.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return refused

    async def _spill(self, conn: _Connection, kind: str, symbols: list[str]) -> None:
        """Symbols a connection's (re)connect subscription was refused for its limit go
        to the other connections."""
        async with self._lock:
            self._learn(conn)
            mine = [s for s in symbols if self._owner.get((kind, s)) is conn]
            await self._move(conn, kind, mine)

    async def _move(self, conn: _Connection, kind: str, symbols: list[str]) -> None:
        if not symbols:
            return
        conn.source.forget(kind, symbols)
        for s in symbols:
            self._owner.pop((kind, s), None)
        out: dict[str, SubscriptionResult] = {}
        leftover, _ = await self._place(kind, symbols, out, exclude=conn)
        dropped = [s for s, r in out.items() if not r.held]
        if leftover or dropped:
            self._set_unplaced({kind: [*leftover, *dropped]})
            if self.on_unplaced is not None:
                try:
                    self.on_unplaced(kind, [*leftover, *dropped])
                except Exception:  # a listener must never break the connection
                    log.exception("upstream unplaced-symbols listener failed")
        moved = len(symbols) - len(leftover) - len(dropped)
        if moved:
            log.info("moved %d %s symbol(s) from connection %s to the others", moved, kind,
                     conn.name, extra={"connection": conn.name, "kind": kind})

    async def _run_one(self, conn: _Connection) -> None:
        try:
            await conn.source.run()
        except SourceError as exc:
            conn.failed = str(exc)
            conn.error = exc
            if self._single:
                return
            alive = [c for c in self._connections if c.failed is None]
            log.error("upstream connection %s gave up: %s%s", conn.name, exc,
                      "; its symbols move to the others" if alive else "",
                      extra={"connection": conn.name})
            if alive:
                async with self._lock:
                    for kind in KINDS:
                        await self._move(conn, kind, sorted(conn.source.wanted[kind]))

    async def run(self) -> None:
        """Keep every connection up until :meth:`stop`. Raises :class:`SourceError`
        (:class:`AuthError` when every key was refused) only when every connection gave
        up; with one key, that connection's own error."""
        tasks = [asyncio.create_task(self._run_one(c), name=f"source-{c.name}")
                 for c in self._connections]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in (*tasks, *self._tasks):
                t.cancel()
            await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        errors = [c.error for c in self._connections if c.error is not None]
        if errors and len(errors) == len(self._connections):
            if self._single:
                raise errors[0]
            causes = "; ".join(f"{c.name}: {c.failed}" for c in self._connections)
            msg = f"every upstream connection gave up ({causes})"
            if all(isinstance(e, AuthError) for e in errors):
                raise AuthError(msg) from None
            raise SourceError(msg) from None

    def stop(self) -> None:
        for conn in self._connections:
            conn.source.stop()


_KNOWN_UNSUPPORTED: Final = SubscriptionResult(
    SubscriptionStatus.REJECTED,
    f"unsupported symbol (the upstream rejected it within the last {REJECTED_TTL_S:g}s)")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        msg = f"unknown kind {kind!r} (ticker or equity)"
        raise ValueError(msg)


__all__ = [
    "DEFAULT_NAME",
    "LIMIT_ERROR",
    "LIMIT_MARK",
    "MAX_REJECTED_CACHE",
    "REJECTED_TTL_S",
    "ConnectionLinkHandler",
    "ConnectionSnapshot",
    "UnplacedHandler",
    "UpstreamKey",
    "UpstreamPool",
    "upstream_keys",
]
