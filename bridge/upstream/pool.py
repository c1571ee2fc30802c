"""Several API keys in one bridge: one :class:`~bridge.upstream.client.AlenoSource` connection
per key, the symbols packed across them within each key's limit.

The upstream limits the subscriptions of one API key, tickers and equities counted
together, and refuses a *whole* request that would pass it ("Subscription limit
reached. Contact us to increase limits."): nothing of a refused request is subscribed,
even when part of it would have fit. :class:`UpstreamPool` owns one connection per key
and places every symbol on exactly one of them:

- a connection takes symbols while it has room: its ``limit`` (``source.api_keys[].limit``)
  minus the symbols it holds, of every kind. The configured symbols are packed before
  connecting, first fit across the keys and across kinds (a key with room for 4 that
  took 3 tickers takes an equity); a key without a configured limit takes every
  symbol that reaches it, and its limit is learned from the upstream's answers;
- a request refused for the limit is split: the first half is asked for, then (if it
  all fit) the second, each refused half split again (:data:`MAX_SPLIT_DEPTH` at most,
  each request paced like any live request), so a key takes every symbol it has room
  for. The limit is learned from a single symbol refused: what the key holds then,
  every kind and what the split requests added counted. A refusal of several symbols
  only bounds it from below (what the key holds): no limit is ever learned below what
  the key holds and accepted. What the key did not take goes to the next connection;
- symbols a connection's (re)connect subscription was refused for the limit (it issues
  tickers and equities in separate requests, so a refusal of one kind may leave room
  the other kind's requests did not use) are asked for again on that connection,
  split, once the connection is live; the rest leave it (with one key too: they are
  not re-issued on every reconnect) and go to the others; those that fit nowhere are
  in :attr:`UpstreamPool.unplaced` and told to the symbol book's keeper (the
  :class:`~bridge.upstream.subscriptions.Subscriptions`, which evicts leased symbols for
  configured ones and retries the configured ones on a bounded schedule);
- a learned limit is a guess: the upstream counts every connection of the key, other
  processes' too, and room is freed behind our back. It is re-checked: after an
  unsubscribe on that key, after its connection was re-established (and
  the symbol book's keeper is told, for the configured symbols waiting for room to
  be asked for again), and :data:`RECHECK_S` after it was last confirmed, the next
  request may go past it: first what the learned limit leaves, then one symbol (refused:
  the limit is confirmed for one request), then the rest. :meth:`UpstreamPool.pin`
  (the configured symbols) does so whenever only a learned limit stands in the way;
  a connection that takes more than its learned limit learns the larger one. A
  configured ``limit`` is kept by every request;
- a live connection is preferred to one that is reconnecting, and a connection whose
  room is known to one the upstream must be asked about, so a request is answered by
  the upstream now, at the fewest requests, whenever some connection can take it;
- a request that fits nowhere is refused for its new symbols only, with the limit
  error: what is subscribed already never moves or breaks;
- one connection's trouble is its own: a drop or a refused key reconnects that one only;
  a key refused until its source gives up marks the connection failed and its symbols
  move to the others (within their room); :meth:`UpstreamPool.run` raises only when
  every connection gave up;
- a symbol the upstream rejected as unsupported is answered ``rejected`` without a
  request for :data:`REJECTED_TTL_S` (at most :data:`MAX_REJECTED_CACHE` symbols, the
  oldest forgotten first): clients asking for junk again and again cost no request;
- :meth:`UpstreamPool.capacity` is what the keys can hold in total when every usable
  connection's limit is known (configured, or learned and not due a re-check), for
  the leases to keep within what the configured symbols leave.

With a single key the pool is the single source it holds: the same desired set, the
same ``wanted`` dict object, the same errors.

The pool answers the :class:`~bridge.upstream.subscriptions.Upstream` protocol (``subscribe``,
``unsubscribe``, ``subscribed``) that leases and reloads drive, and the
:class:`~bridge.upstream.subscriptions.Placement` one (``capacity``, ``pin``, ``unplaced``,
``set_unplaced``, ``symbols``) that puts the configured symbols first. The state of
the symbol set (the placement, the learned limits, each connection's desired set) is
in the :class:`~bridge.upstream.symbols.SymbolBook` the pool is given or makes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from bridge.config.schema import DEFAULT_NAME, SourceConfig, UpstreamKey
from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import ConnectionSnapshot, UpstreamSnapshot
from bridge.upstream.client import AlenoSource
from bridge.upstream.limits import RECHECK_S, KeyConnection, pack
from bridge.upstream.placement import Placer
from bridge.upstream.protocol import (
    LIMIT_MARK,
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
from bridge.upstream.sharding import configured_symbols
from bridge.upstream.snapshots import merge_snapshots
from bridge.upstream.symbols import SymbolBook

log = logging.getLogger("aleno_bridge.upstream")

KINDS: Final = PRICE_KINDS
#: the limit error given for a request that fits on no connection (the upstream's words)
LIMIT_ERROR: Final = "Subscription limit reached. Contact us to increase limits."
#: how long a symbol the upstream rejected as unsupported is answered ``rejected``
#: without asking again
REJECTED_TTL_S: Final = 600.0
#: the most symbols remembered as unsupported (the oldest forgotten first)
MAX_REJECTED_CACHE: Final = 10_000
#: how many times a request refused whole for the limit is halved, at most: each level
#: costs one or two requests, so a refused request of n symbols costs at most about
#: 2·log2(n) more (and a live request is at most SUBSCRIBE_CHUNK symbols)
MAX_SPLIT_DEPTH: Final = 12
#: ``(connection name, up, cause)``: the ``up`` / ``down`` of one connection
ConnectionLinkHandler = Callable[[str, bool, str], None]
_LimitHandler = Callable[[str, list[str]], None]


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
        *,
        symbols: SymbolBook | None = None,
        on_link: LinkHandler | None = None,
        on_connection_link: ConnectionLinkHandler | None = None,
        on_connection_retired: Callable[[str], None] | None = None,
    ) -> None:
        if not keys:
            msg = "an upstream pool needs at least one key"
            raise ValueError(msg)
        self.config = config
        self.on_link: LinkHandler | None = on_link
        self.on_connection_link: ConnectionLinkHandler | None = on_connection_link
        #: told the name of a connection that gave up (its symbols moved to the others)
        self.on_connection_retired: Callable[[str], None] | None = on_connection_retired
        #: the clock of the unsupported-symbol memory (seconds, monotonic)
        self.clock: Callable[[], float] = time.monotonic
        self._lock = asyncio.Lock()
        #: the symbol set: what is wanted, where each symbol is placed (by connection
        #: name), what fits nowhere, each key's limit, each connection's desired set
        self.symbols = symbols if symbols is not None \
            else SymbolBook(configured_symbols(config))
        book = self.symbols
        #: (kind, symbol) -> until when it is answered ``rejected`` without a request;
        #: in insertion order, the oldest forgotten first beyond MAX_REJECTED_CACHE
        self._unsupported: dict[tuple[str, str], float] = {}
        placement, unplaced = pack(keys, configured_symbols(config))
        book.set_unplaced(unplaced)
        self._connections: list[KeyConnection] = []
        self._by_name: dict[str, KeyConnection] = {}
        for key, syms in zip(keys, placement, strict=True):
            secret = key.key.get_secret_value() if key.key is not None else None
            src = AlenoSource(config, secret, on_payload, on_invalid,
                              book.connection(key.name, syms),
                              on_link=self._link_handler(key.name),
                              on_limit=self._limit_handler(key.name))
            conn = KeyConnection(key, src)
            book.keys[key.name] = self._by_name[key.name] = conn
            self._connections.append(conn)
            for kind, kind_syms in syms.items():
                for s in kind_syms:
                    book.placed[(kind, s)] = key.name
        self._single = len(self._connections) == 1
        #: the symbols whose records are ours, by kind, across every connection: the
        #: book's (the same dict object for the pool's life, each kind's frozenset
        #: replaced whole)
        self.wanted: dict[str, frozenset[str]] = book.wanted
        self._tasks: set[asyncio.Task[None]] = set()
        self._placer = Placer(self._connections, book.placed, book.unplaced,
                              lambda: self.clock(), lambda: MAX_SPLIT_DEPTH,
                              self._remember_unsupported)

    @property
    def unplaced(self) -> dict[str, frozenset[str]]:
        """Configured symbols that fit in no key's limit (logged, counted); with
        :class:`~bridge.upstream.subscriptions.Subscriptions` the configured symbols it
        could not place for the limit (it keeps this up to date, see :meth:`set_unplaced`)."""
        return self.symbols.unplaced

    def set_unplaced(self, unplaced: Mapping[str, Iterable[str]]) -> None:
        """Replace :attr:`unplaced` (the owner of the configured set says which of its
        symbols fit nowhere); the newly unplaced ones are logged."""
        self.symbols.replace_unplaced(unplaced)

    def _conn(self, kind: str, symbol: str) -> KeyConnection | None:
        name = self.symbols.placed.get((kind, symbol))
        return self._by_name[name] if name is not None else None

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
        conn = self._conn(kind, symbol.strip().upper())
        return conn.source if conn is not None else None

    @property
    def pending_moves(self) -> int:
        """Moves of symbols refused by a connection's limit to the others, still running."""
        return len(self._tasks)

    def capacity(self) -> int | None:
        """The symbols the usable connections can hold in total, when each of their
        limits is known (configured, or learned and not due a re-check); ``None``: some
        limit is unknown, or is being re-checked (the upstream will say)."""
        now = self.clock()
        total = 0
        for conn in self._connections:
            if conn.failed is not None:
                continue
            if conn.limit is None or conn.doubtful(now):
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
        return merge_snapshots(self.connection_snapshots(), self.config.stale_after_s)

    # -- live changes -----------------------------------------------------------------

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
                conn = self._conn(kind, s)
                if conn is not None and conn.failed is None:
                    groups.setdefault(self._connections.index(conn), []).append(s)
                else:
                    new.append(s)
            for i, syms in groups.items():
                conn = self._connections[i]
                results = await conn.source.subscribe(kind, syms)
                # one its connection no longer holds for the limit is placed anew
                new.extend(self._placer.settle(conn, kind, results, out))
            leftover = await self._placer.place(kind, new, out, probe=probe)
            for s in leftover:
                # the upstream's answer when it was asked, else the same words
                out.setdefault(s, _NO_ROOM)
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
                name = self.symbols.placed.pop((kind, s), None)
                conn = self._by_name[name] if name is not None else None
                if conn is None:
                    out[s] = SubscriptionResult(SubscriptionStatus.ACCEPTED)
                else:
                    groups.setdefault(self._connections.index(conn), []).append(s)
            unplaced = self.symbols.unplaced
            if kind in unplaced and unplaced[kind] & set(wanted):
                unplaced[kind] = unplaced[kind] - set(wanted)
            for i, syms in groups.items():
                conn = self._connections[i]
                out.update(await conn.source.unsubscribe(kind, syms))
                # room freed on the key: what it learned may be too low (another
                # process on the key may have left too), the next request may go past it
                conn.recheck = conn.learned
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

    # -- connections' trouble ------------------------------------------------------------

    def _link_handler(self, name: str) -> LinkHandler:
        def tell(up: bool, cause: str) -> None:
            if up and self._by_name[name].learned:
                # re-established: its learned limit is due a re-check (see doubtful())
                self.symbols.room()
            if self.on_connection_link is not None:
                self.on_connection_link(name, up, cause)
            if self.on_link is not None:
                named = cause if self._single or not cause else f"connection {name}: {cause}"
                self.on_link(up, named)
        return tell

    def _limit_handler(self, name: str) -> _LimitHandler:
        def refused(kind: str, symbols: list[str]) -> None:
            # told inside the connection's subscription: move them in a task of our own
            conn = self._by_name[name]
            task = asyncio.get_running_loop().create_task(
                self._spill(conn, kind, symbols), name=f"upstream-spill-{conn.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return refused

    async def _spill(self, conn: KeyConnection, kind: str, symbols: list[str]) -> None:
        """Symbols a connection's (re)connect subscription was refused for its limit:
        the upstream refused the whole request, so part of it may still fit on this
        connection (with what the other requests of the subscription, of every kind,
        left): that part is asked for again, split (see :meth:`Placer.split`); the rest goes
        to the other connections. A connection no longer live learns from the refusal
        only (its symbols move)."""
        async with self._lock:
            placed = self.symbols.placed
            mine = [s for s in symbols if placed.get((kind, s)) == conn.name]
            if not mine:
                return
            out: dict[str, SubscriptionResult] = {}
            if conn.source.live and conn.failed is None:
                room = conn.room(self.clock())
                if room is not None and room < len(mine):
                    left = await self._placer.fill(conn, kind, mine[:room], out) + mine[room:]
                else:
                    left = await self._placer.split(conn, kind, mine, out)
            else:
                self._placer.learn(conn, exact=len(mine) == 1)
                left = mine
            await self._move(conn, kind, left)

    async def _move(self, conn: KeyConnection, kind: str, symbols: list[str]) -> None:
        if not symbols:
            return
        conn.source.forget(kind, symbols)
        for s in symbols:
            self.symbols.placed.pop((kind, s), None)
        out: dict[str, SubscriptionResult] = {}
        leftover = await self._placer.place(kind, symbols, out, exclude=conn)
        dropped = [s for s, r in out.items()
                   if not r.held and r.status != SubscriptionStatus.LIMIT]
        if leftover or dropped:
            self.symbols.set_unplaced({kind: [*leftover, *dropped]})
            # the keeper of the desired set (the subscriptions) hears it
            self.symbols.lost(kind, [*leftover, *dropped])
        moved = len(symbols) - len(leftover) - len(dropped)
        if moved:
            log.info("moved %d %s symbol(s) from connection %s to the others", moved, kind,
                     conn.name, extra={"connection": conn.name, "kind": kind})

    async def _run_one(self, conn: KeyConnection) -> None:
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
            if self.on_connection_retired is not None:
                # it carries nothing any more and never comes up: its "down" must not
                # hold the others' stale watch off for good
                self.on_connection_retired(conn.name)

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


#: a symbol that fits on no connection (the upstream's words)
_NO_ROOM: Final = SubscriptionResult(SubscriptionStatus.LIMIT, LIMIT_ERROR)
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
    "MAX_SPLIT_DEPTH",
    "RECHECK_S",
    "REJECTED_TTL_S",
    "ConnectionLinkHandler",
    "ConnectionSnapshot",
    "UpstreamKey",
    "UpstreamPool",
]
