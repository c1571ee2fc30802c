"""The control surface: what a client can ask a running bridge, behind two doors.

Both doors call the same core functions, :class:`Control`: :meth:`Control.snapshot`
and the leases, :meth:`Control.lease` / :meth:`Control.renew` / :meth:`Control.release`.

* HTTP, on the control listener (``control.http``, :mod:`bridge.control.http`; the
  ``/v1`` routes are :mod:`bridge.control.v1`)::

      GET /v1/snapshot?kind=ticker&symbols=BTC/*,ETH/USD&limit=500&after=ticker:BTC/USD

* NATS, one "micro" service (:func:`start_nats_control`, :mod:`bridge.control.nats`)
  that shows up in ``$SRV`` discovery.

Who may call is decided by the doors (:mod:`bridge.control.auth`: bearer tokens with the
scopes ``snapshot`` and ``lease``); the core functions take the principal's name as the
owner of a lease. Requests are parsed and checked by :mod:`bridge.control.requests`,
whose names (and those of :mod:`bridge.control.nats`) this module re-exports.

The human reference of both doors is ``docs/control-api.md``, with complete nats-py
client programs (``full_snapshot``: every page of every shard; ``lease_all``,
``renew_all``, ``release_all``: leases over every shard) that the integration tests run
as they are; the HTTP door's OpenAPI document is ``docs/openapi.json``.

**Snapshots.** A reply is ``{"shard": {"index", "count"} | null, "count": N, "items":
[{"ageMs": ..., "event": {<CloudEvents envelope>}}, ...], "next": <cursor> | null}``:
per symbol its latest valid envelope, byte for byte what a sink receives in
``cloudevents-json``, tickers first, then equities, each by symbol (code point order).
The reply is spliced from the cached envelope bytes, never decoded or encoded again: a
full snapshot of 10,000 symbols takes a few milliseconds (``bench/snapshot.py``).

**Leases.** With ``source.leases.enabled: true`` a client leases symbols: the bridge
subscribes them upstream for as long as a lease on them lives, and unsubscribes them
``source.leases.grace_s`` after the last one ended, unless the configuration pins them
(:mod:`bridge.upstream.subscriptions`). A reply (``subscribe``, ``renew``) holds the
lease id (``null``: no symbol held), ``ttlS``, ``expiresInS``, the ``owner`` and, per
symbol, the upstream's ``status`` (the lease holds the ``accepted`` and ``pending``
ones), ``error``, latest ``event`` and ``ageMs``. Refusals raise :class:`ControlError`:
404 no live lease of that id for this owner here, 409 leases are off, 429 over a cap. A
lease id is ``<shard index>.<process>.<lease>`` (``0`` when not sharded): a lease lives
in the memory of the process that granted it, and the id says which.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, itemgetter, sub
from typing import Any, Final, Protocol, TypeVar, cast

import orjson

from bridge.config.schema import ShardConfig
from bridge.config.settings import Settings
from bridge.control.nats import (
    CLOSE_TIMEOUT_S,
    ControlConnectError,
    NatsControl,
    Redact,
    lease_queue_group,
    queue_group,
    start_nats_control,
)
from bridge.control.requests import (
    KINDS,
    LEASE_KINDS,
    LEASE_PARAMETERS,
    MAX_HOLDER_LEN,
    MAX_LEASE_ID_LEN,
    MAX_LEASE_SYMBOLS,
    MAX_LIMIT,
    MAX_PATTERN_LEN,
    MAX_PATTERNS,
    MAX_SYMBOL_LEN,
    PARAMETERS,
    RELEASE_PARAMETERS,
    RENEW_PARAMETERS,
    ControlError,
    LeaseRequest,
    QueryError,
    QueryParams,
    RenewRequest,
    SnapshotQuery,
    lease_from_json,
    make_cursor,
    parse_cursor,
    parse_lease,
    parse_lease_id,
    parse_query,
    parse_ttl,
    query_from_json,
    query_from_params,
    release_from_json,
    renew_from_json,
)
from bridge.control.thread import call_on
from bridge.core.kinds import BAR_KIND, PRICE_KINDS
from bridge.pipeline.market import BODY, RECEIVED, Entry, LastValue, monotonic_ms
from bridge.upstream.protocol import SubscriptionResult, SubscriptionStatus, normalize_symbols
from bridge.upstream.sharding import shard_of
from bridge.upstream.subscriptions import (
    LeaseCapError,
    LeaseError,
    LeaseNotFound,
    LeaseReply,
    Subscriptions,
)

T = TypeVar("T")

#: the order of the items: tickers, then equities (``*``), each sorted; bars by name
ORDER: Final = (*PRICE_KINDS, BAR_KIND)
#: the answer when the bridge takes no lease
LEASES_OFF: Final = ("leases are off on this bridge (source.leases.enabled is false): "
                     "only the configured symbols are subscribed")


# -- what the control surface reads of a bridge ---------------------------------------


class LastValuesView(Protocol):
    """The last-value cache (:class:`bridge.pipeline.market.LastValues`)."""

    def select(self, kind: str, symbols: Sequence[str] | None = None) -> Sequence[str]: ...

    def by_kind(self, kind: str) -> Mapping[str, Entry]: ...

    def get(self, kind: str, symbol: str) -> LastValue | None: ...


class ControlHost(Protocol):
    """What :class:`Control` reads of a bridge (:class:`bridge.app.Bridge` is one).

    Both are read on every request, so a reloaded configuration is seen at once.
    """

    @property
    def last_values(self) -> LastValuesView: ...

    @property
    def settings(self) -> Settings: ...

    # ``subscriptions`` (or ``None``: leases are off), read with ``getattr``


# -- the core function --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotReply:
    """One snapshot page: ``body`` is the JSON reply (see the module docstring)."""

    body: bytes
    count: int
    next: str | None


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """The answer to ``subscribe`` or ``renew``: ``body`` is the JSON reply."""

    body: bytes
    #: the lease id (``None``: no symbol held, nothing to renew)
    lease: str | None
    #: how many of the requested symbols this process answered for (the rest belong
    #: to other shards); the broadcast NATS ``subscribe`` stays silent at 0
    owned: int


def _not_live(lease: str) -> str:
    return (f"no live lease {lease!r} of this token (released, expired, never granted, "
            "or another token's)")




def _age_prefix(age: int) -> bytes:
    return b'{"ageMs":%d,"event":' % max(0, age)


#: the item prefix of every age below this many milliseconds is made once
_AGES: Final = 10_000
_age_table: list[bytes] = []


def _age_prefixes(ages: list[int]) -> list[bytes]:
    """The item prefix (``{"ageMs":N,"event":``) of each age, in milliseconds."""
    global _age_table
    table = _age_table
    if not table:
        table = _age_table = [_age_prefix(a) for a in range(_AGES)]
    if ages and (min(ages) < 0 or max(ages) >= _AGES):
        return [table[a] if 0 <= a < _AGES else _age_prefix(a) for a in ages]
    return list(map(table.__getitem__, ages))


_body = itemgetter(BODY)
_received = itemgetter(RECEIVED)
_NULL_TAIL: Final = len(b'],"next":null}')
_CURSOR_TAIL: Final = len(b'],"next":}')
#: the shortest tail a page can end with (a cursor is at least ``"ticker:X"``)
_MIN_TAIL: Final = min(_NULL_TAIL, _CURSOR_TAIL + len('"ticker:X"'))


class Control:
    """The core functions of the control surface; the doors only translate.

    :meth:`snapshot` is synchronous and quick (no I/O: a full snapshot of 10,000
    symbols splices ~6 MB of cached bytes in ~3 ms) and safe to call from another
    thread: the doors call it on the control thread (:mod:`bridge.control.thread`),
    beside the data path. The lease calls run on the bridge's loop (:attr:`home`),
    wherever they are awaited.
    """

    def __init__(self, last_values: LastValuesView, settings: Callable[[], Settings],
                 subscriptions: Subscriptions | None = None) -> None:
        """``settings`` is read on every request (a reload is seen at once);
        ``subscriptions`` ``None``: leases are off (409)."""
        self._values = last_values
        self._settings = settings
        self._leases = subscriptions
        #: this process among the replicas: part of every lease id it grants, so
        #: ``renew`` / ``release`` over NATS find the process that holds the lease
        self.instance = secrets.token_hex(4)
        #: the bridge's event loop, where the leases live: a lease request that
        #: arrives on another loop (the control thread, :mod:`bridge.control.thread`)
        #: is run there (``None``: where it is awaited)
        self.home: asyncio.AbstractEventLoop | None = None
        #: lease requests being served now (both doors, any thread)
        self.in_flight = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, host: ControlHost) -> Control:
        """The control surface of ``host`` (its last values, settings and leases)."""
        return cls(host.last_values, lambda: host.settings, getattr(host, "subscriptions", None))

    @property
    def shard(self) -> ShardConfig | None:
        return self._settings().config.source.shard

    @property
    def source(self) -> str:
        """The upstream this bridge republishes (the envelopes' ``source``)."""
        return self._settings().config.source.endpoint

    def answer(self, query: SnapshotQuery, max_bytes: int | None = None) -> SnapshotReply:
        """:meth:`snapshot` of a parsed query."""
        return self.snapshot(query.kind, query.symbols, after=query.after,
                             max_bytes=max_bytes, limit=query.limit)

    def snapshot(
        self,
        kind: str | None = None,
        symbols: Sequence[str] | None = None,
        *,
        after: tuple[str, str] | str | None = None,
        max_bytes: int | None = None,
        limit: int | None = None,
    ) -> SnapshotReply:
        """The latest envelope of every cached symbol that matches, with its age.

        ``kind``: ``ticker``, ``equity``, ``*`` or ``None`` (both). ``symbols``:
        upper-case shell-style globs, ``None`` for all. ``after``: a cursor (the
        ``next`` of a previous reply, as text or (kind, symbol)). ``limit``: at most
        this many items. ``max_bytes``: the body is at most this long, except that a
        page always holds at least one item (an envelope is well under a kilobyte).
        """
        if isinstance(after, str):
            after = parse_cursor(after)
        patterns = list(symbols) if symbols is not None else None
        cache = self._values
        # what matches, per kind: the symbols and their entries (read once: another
        # thread may replace entries meanwhile, each read is one whole entry)
        chosen: list[tuple[str, Sequence[str], list[Entry]]] = []
        for k in PRICE_KINDS if kind in (None, "*") else (kind,):
            if after is not None and ORDER.index(k) < ORDER.index(after[0]):
                continue
            names = cache.select(k, patterns)
            if after is not None and k == after[0]:
                names = names[bisect.bisect_right(names, after[1]):]
            found = list(map(cache.by_kind(k).get, names))
            if None in found:  # forgotten since the names were read
                kept = [(s, e) for s, e in zip(names, found, strict=True) if e is not None]
                names, found = [s for s, _ in kept], [e for _, e in kept]
            if found:
                chosen.append((k, names, cast("list[Entry]", found)))
        total = sum(len(e) for _, _, e in chosen)
        shard = self.shard
        head = (b'{"shard":' + (b"null" if shard is None else b'{"index":%d,"count":%d}'
                                % (shard.index, shard.count)) + b',"count":')
        # the reply is one join of small constant pieces and the cached envelope bytes:
        # [head, count, items-open] [age prefix, envelope, "},"] ... with the last "},"
        # turned into "}". Every step over the items is one call into C (map, zip,
        # accumulate, bisect), none a Python loop per item: ~3 ms for 10,000 symbols,
        # most of it the copy of ~6 MB.
        budget = None if max_bytes is None else (
            # the count's digits are bounded by those of the whole selection
            max_bytes - len(head) - len(str(total)) - len(b',"items":['))
        now_ms = monotonic_ms()
        pieces: list[bytes] = []
        n = 0
        used = 0  # the bytes of the items placed, each with its "}" and a comma
        more = False
        last: tuple[str, str] | None = None
        for c, (k, names, entries) in enumerate(chosen):
            if limit is not None:
                if n >= limit:
                    more = True
                    break
                if len(entries) > limit - n:
                    entries = entries[:limit - n]
                    more = True
            m = len(entries)
            bodies = list(map(_body, entries))
            prefixes = _age_prefixes(list(map(sub, repeat(now_ms, m),
                                              map(_received, entries))))
            took = m
            if budget is not None:
                # sizes[j]: the bytes of this kind's first j+1 items, "}" and comma each
                sizes = list(map(add, accumulate(map(add, map(len, prefixes),
                                                     map(len, bodies))),
                                 range(2, 2 * m + 1, 2)))
                final = c == len(chosen) - 1 and not more
                # the longest run that fits with the shortest tail, then shortened
                # while the exact tail does not fit (the cursor of its last item, or
                # null after the very last item; a cursor is a few dozen bytes)
                j = bisect.bisect_right(sizes, budget - used + 1 - _MIN_TAIL) - 1
                while j >= 0:
                    tail = (_NULL_TAIL if final and j == m - 1 else
                            _CURSOR_TAIL + len(orjson.dumps(make_cursor(k, names[j]))))
                    if used + sizes[j] - 1 + tail <= budget:
                        break
                    j -= 1
                took = j + 1
                if took == 0 and n == 0:
                    took = 1  # a page always holds at least one item
                if took < m:
                    more = True
                if took:
                    used += sizes[took - 1]
            if took:
                pieces.extend(chain.from_iterable(
                    zip(prefixes[:took], bodies[:took], repeat(b"},", took), strict=True)))
                n += took
                last = (k, names[took - 1])
            if more:
                break
        if n:
            pieces[-1] = b"}"
        parts = [head, str(n).encode(), b',"items":[', *pieces]
        cursor = make_cursor(*last) if more and last is not None else None
        parts.append(b'],"next":null}' if cursor is None
                     else b'],"next":' + orjson.dumps(cursor) + b"}")
        return SnapshotReply(b"".join(parts), n, cursor)

    # -- leases ---------------------------------------------------------------------

    def check_leases(self) -> None:
        """Raise :class:`ControlError` (409) when this bridge takes no lease."""
        self._subscriptions()

    def _subscriptions(self) -> Subscriptions:
        subs = self._leases
        if subs is None or not subs.config.enabled:
            raise ControlError(LEASES_OFF, None, 409)
        return subs

    def owner(self, kind: str, symbol: str) -> int | None:
        """The shard that owns ``symbol`` of ``kind``; ``None`` when not sharded."""
        shard = self.shard
        return None if shard is None else shard_of(kind, symbol, shard.count)

    def lease_id(self, internal: str) -> str:
        """The id a client sees: ``<shard index>.<process>.<lease>`` (see the module)."""
        shard = self.shard
        return f"{0 if shard is None else shard.index}.{self.instance}.{internal}"

    def granted_here(self, lease: str) -> bool:
        """Whether this process granted ``lease`` (alive or not): the NATS door answers
        ``renew`` / ``release`` only for its own leases."""
        return self._internal(lease) is not None

    def _internal(self, lease: str) -> str | None:
        index, _, rest = lease.partition(".")
        instance, _, internal = rest.partition(".")
        shard = self.shard
        mine = str(0 if shard is None else shard.index)
        if index != mine or instance != self.instance or not internal:
            return None
        return internal

    def _own(self, lease: str) -> str:
        internal = self._internal(lease)
        if internal is not None:
            return internal
        shard = self.shard
        index = lease.partition(".")[0]
        if shard is not None and index.isdigit() and int(index) != shard.index \
                and int(index) < shard.count:
            msg = (f"lease {lease!r} belongs to shard {index} of {shard.count}; this is "
                   f"shard {shard.index}: renew or release it there")
        else:
            msg = (f"no live lease {lease!r} here: it was granted by another bridge "
                   "process, or before this one restarted, or never")
        raise ControlError(msg, "lease", 404)

    async def lease(self, kind: str, symbols: Sequence[str], ttl_s: float | None = None,
                    holder: str = "", *, foreign: str = "report", owner: str = "",
                    max_symbols: int | None = None) -> LeaseAnswer:
        """Lease ``symbols`` of ``kind`` (see "Leases" in the module docstring) for
        ``owner`` (the token's name, :mod:`bridge.control.auth`; ``holder`` is only a label),
        whose live leases may hold at most ``max_symbols`` symbols.

        Symbols owned by another shard are not leased here: ``foreign="report"``
        answers each with ``status: error`` naming its shard, ``"omit"`` leaves them
        out of the reply. Raises :class:`ControlError`: 409 when leases are off, 429
        over a cap.
        """
        with self._in_flight():
            return await self._at_home(functools.partial(
                self._lease, kind, symbols, ttl_s, holder, foreign=foreign, owner=owner,
                max_symbols=max_symbols))

    async def renew(self, lease: str, ttl_s: float | None = None, *,
                    owner: str | None = None) -> LeaseAnswer:
        """Extend a live lease to ``ttl_s`` from now (default: the default TTL).
        Raises :class:`ControlError`: 404 for a lease that is not live here or not
        ``owner``'s (``None``: whoever's)."""
        with self._in_flight():
            return await self._at_home(functools.partial(self._renew, lease, ttl_s, owner))

    async def release(self, lease: str, *, owner: str | None = None) -> None:
        """End a live lease now (its symbols go ``grace_s`` later unless held
        otherwise). Raises :class:`ControlError`: 404 for a lease that is not live
        here or not ``owner``'s."""
        with self._in_flight():
            await self._at_home(functools.partial(self._release, lease, owner))

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count a lease request being served; 429 beyond
        ``source.leases.max_requests_in_flight`` (each may wait for the upstream)."""
        cap = self._settings().config.source.leases.max_requests_in_flight
        with self._lock:
            if self.in_flight >= cap:
                msg = (f"too many lease requests in flight ({cap}, "
                       "source.leases.max_requests_in_flight); retry shortly")
                raise ControlError(msg, None, 429)
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _at_home(self, call: Callable[[], Awaitable[T]]) -> T:
        # no timeout: the call runs to its end on the bridge's loop whatever the
        # caller does, so only its own answer says what it did (a 503 for a lease
        # that is granted anyway would make the client lease twice)
        return await call_on(self.home, call, timeout=None)

    async def _lease(self, kind: str, symbols: Sequence[str], ttl_s: float | None,
                     holder: str, *, foreign: str, owner: str,
                     max_symbols: int | None) -> LeaseAnswer:
        subs = self._subscriptions()
        wanted = normalize_symbols(symbols)
        shard = self.shard
        mine = [s for s in wanted if shard is None or self.owner(kind, s) == shard.index]
        reply: LeaseReply | None = None
        if mine:
            try:
                reply = await subs.lease(kind, mine, ttl_s, holder, owner=owner,
                                         max_symbols=max_symbols)
            except LeaseCapError as exc:
                raise ControlError(str(exc), None, 429) from None
            except LeaseError as exc:
                raise ControlError(str(exc), None, 409) from None
        results: dict[str, SubscriptionResult | None] = {}
        for s in wanted:
            if reply is not None and s in reply.results:
                results[s] = reply.results[s]
            elif foreign == "report" and shard is not None:
                results[s] = SubscriptionResult(
                    SubscriptionStatus.ERROR,
                    f"owned by shard {self.owner(kind, s)} of {shard.count}")
        if reply is None:
            cfg = subs.config
            ttl = min(cfg.default_ttl_s if ttl_s is None else ttl_s, cfg.max_ttl_s)
            reply = LeaseReply(None, kind, holder, ttl, None, {}, owner=owner)
        lease = None if reply.lease_id is None else self.lease_id(reply.lease_id)
        return LeaseAnswer(self._lease_body(subs, reply, lease, results), lease, len(mine))

    async def _renew(self, lease: str, ttl_s: float | None,
                     owner: str | None) -> LeaseAnswer:
        subs = self._subscriptions()
        internal = self._own(lease)
        try:
            reply = await subs.renew(internal, ttl_s, owner=owner)
        except LeaseNotFound:
            raise ControlError(_not_live(lease), "lease", 404) from None
        except LeaseError as exc:
            raise ControlError(str(exc), None, 409) from None
        return LeaseAnswer(self._lease_body(subs, reply, lease, dict(reply.results)), lease,
                           len(reply.results))

    async def _release(self, lease: str, owner: str | None) -> None:
        subs = self._subscriptions()
        internal = self._own(lease)
        try:
            await subs.release(internal, owner=owner)
        except LeaseNotFound:
            raise ControlError(_not_live(lease), "lease", 404) from None
        except LeaseError as exc:
            raise ControlError(str(exc), None, 409) from None

    def _lease_body(self, subs: Subscriptions, reply: LeaseReply, lease: str | None,
                    results: Mapping[str, SubscriptionResult | None]) -> bytes:
        now_ms = monotonic_ms()
        values = self._values
        symbols: dict[str, Any] = {}
        for s, r in results.items():
            if r is None:
                continue
            lv = values.get(reply.kind, s)
            symbols[s] = {
                "status": r.status.value,
                "error": r.error,
                # the cached envelope's bytes, spliced as they are (never re-encoded)
                "event": None if lv is None else orjson.Fragment(lv.body),
                "ageMs": None if lv is None else max(0, now_ms - lv.received_ms),
            }
        expires = None if reply.expires_at is None else \
            round(max(0.0, reply.expires_at - subs.clock()), 3)
        shard = self.shard
        return orjson.dumps({
            "lease": lease,
            "kind": reply.kind,
            "holder": reply.holder,
            "owner": getattr(reply, "owner", ""),
            "ttlS": reply.ttl_s,
            "expiresInS": expires,
            "symbols": symbols,
            "shard": None if shard is None else {"index": shard.index, "count": shard.count},
        })


__all__ = [
    "CLOSE_TIMEOUT_S",
    "KINDS",
    "LEASES_OFF",
    "LEASE_KINDS",
    "LEASE_PARAMETERS",
    "MAX_HOLDER_LEN",
    "MAX_LEASE_ID_LEN",
    "MAX_LEASE_SYMBOLS",
    "MAX_LIMIT",
    "MAX_PATTERNS",
    "MAX_PATTERN_LEN",
    "MAX_SYMBOL_LEN",
    "ORDER",
    "PARAMETERS",
    "RELEASE_PARAMETERS",
    "RENEW_PARAMETERS",
    "Control",
    "ControlConnectError",
    "ControlError",
    "ControlHost",
    "LastValuesView",
    "LeaseAnswer",
    "LeaseRequest",
    "NatsControl",
    "QueryError",
    "QueryParams",
    "Redact",
    "RenewRequest",
    "SnapshotQuery",
    "SnapshotReply",
    "lease_from_json",
    "lease_queue_group",
    "make_cursor",
    "parse_cursor",
    "parse_lease",
    "parse_lease_id",
    "parse_query",
    "parse_ttl",
    "query_from_json",
    "query_from_params",
    "queue_group",
    "release_from_json",
    "renew_from_json",
    "start_nats_control",
]
