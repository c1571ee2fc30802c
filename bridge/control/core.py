"""The control surface: what a client can ask a running bridge, behind two doors.

Both doors call the same core functions: :meth:`Control.snapshot` (below) and the
leases, :meth:`Control.lease` / :meth:`Control.renew` / :meth:`Control.release`
("Leases" further down):

Who may call is decided by the doors (:mod:`bridge.control.auth`: bearer tokens with the scopes
``snapshot`` and ``lease``, the same header on both doors); the core functions take the
principal's name as the owner of a lease. The human reference of both doors is
``docs/control-api.md``, the HTTP door's OpenAPI document ``docs/openapi.json``.

* HTTP, on the control listener (``control.http``, :mod:`bridge.control.http`)::

      GET /v1/snapshot?kind=ticker&symbols=BTC/*,ETH/USD&limit=500&after=ticker:BTC/USD

* NATS, one "micro" service (:func:`start_nats_control`) that shows up in ``$SRV``
  discovery (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``, each also per service name).

The query
---------
``kind``
    ``ticker``, ``equity`` or ``*`` (default: ``*``, tickers and equities).
``symbols``
    shell-style globs (``BTC/*``, ``ETH/USD``, ``?APL``), case-insensitive; over HTTP
    comma-separated and/or repeated (``symbols=BTC/*&symbols=AAPL``), over NATS a JSON
    array (or one comma-separated string). Default: every symbol.
``after``
    a cursor: the ``next`` of the previous page (``kind:SYMBOL``). Items come in a fixed
    order (tickers, then equities, each by symbol); a page starts after the cursor's
    (kind, symbol), so paging needs no server state
    and a page may be asked of any replica of the same shard.
``limit``
    at most this many items in the reply (default: no limit over HTTP).

Anything else, or a malformed value, is refused: HTTP ``400`` with the JSON body
``{"error": "<what is wrong>", "parameter": "<name>"}``; NATS the same body with the
micro protocol's error headers ``Nats-Service-Error-Code: 400`` and
``Nats-Service-Error: <what is wrong>``.

The reply (``application/json``)
--------------------------------
::

    {"shard": {"index": 0, "count": 2},      // null when the bridge is not sharded
     "count": 2,                             // the items in THIS reply
     "items": [{"ageMs": 412, "event": {<CloudEvents envelope>}},
               {"ageMs": 415, "event": {...}}],
     "next": "ticker:ETH/USD"}               // null: this was the last page

``event`` is the latest valid envelope of the symbol, byte for byte what a sink
receives in ``cloudevents-json`` (``data.sentTimestampMs`` is the upstream send time).
``ageMs`` is how long ago the bridge received it. Items come tickers first, then
equities, each sorted by symbol (code point order). A symbol that never updated since the
bridge started is absent. The reply is spliced from the cached envelope bytes: no
envelope is decoded or encoded again, so a full snapshot of 10,000 symbols takes a
few milliseconds (``bench/snapshot.py``).

The NATS door
-------------
Endpoints of the service ``control.nats.name`` (default ``aleno-bridge``):

``snapshot`` on ``<subject_prefix>.snapshot``
    every shard answers (each shard listens in its own queue group ``shard-<index>``,
    so one replica per shard answers; an unsharded bridge uses the queue group ``q``).
    Request body: the query as JSON, ``{"kind": "ticker", "symbols": ["BTC/*"]}``;
    an empty body asks for everything.
``snapshot-shard`` on ``<subject_prefix>.snapshot.<index>`` (sharded bridges only)
    the same query, answered by shard ``<index>`` alone: how a client fetches the next
    pages of one shard.

A NATS message is limited by the server's ``max_payload`` (1 MiB by default): a reply
holds at most ``min(max_payload, control.nats.snapshot_page_bytes)`` bytes, and
``next`` says where the next page starts. The whole snapshot of every shard, with
nats-py (the ``shard`` of each first reply says how many shards to wait for)::

    import asyncio, json
    import nats

    async def full_snapshot(nc, prefix="aleno.bridge", query=None, timeout=2.0):
        query = dict(query or {})
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"{prefix}.snapshot", json.dumps(query).encode(), reply=inbox)
        firsts, expected = {}, 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while len(firsts) < expected:
                msg = await sub.next_msg(timeout=max(0.001, deadline - loop.time()))
                if msg.headers and "Nats-Service-Error" in msg.headers:
                    raise RuntimeError(msg.headers["Nats-Service-Error"])
                page = json.loads(msg.data)
                shard = page["shard"] or {"index": 0, "count": 1}
                expected = shard["count"]
                firsts[shard["index"]] = page
        finally:
            await sub.unsubscribe()
        items = []
        for index, page in sorted(firsts.items()):
            subject = f"{prefix}.snapshot.{index}" if page["shard"] else f"{prefix}.snapshot"
            while True:
                items += page["items"]
                if page["next"] is None:
                    break
                body = json.dumps({**query, "after": page["next"]}).encode()
                msg = await nc.request(subject, body, timeout=timeout)
                if msg.headers and "Nats-Service-Error" in msg.headers:
                    raise RuntimeError(msg.headers["Nats-Service-Error"])
                page = json.loads(msg.data)
        return items

    async def main():
        nc = await nats.connect("nats://127.0.0.1:4222")
        items = await full_snapshot(nc, query={"kind": "ticker", "symbols": ["BTC/*"]})
        for item in items:
            print(item["ageMs"], item["event"]["subject"], item["event"]["data"]["price"])
        await nc.close()

    asyncio.run(main())

(``tests/integration/test_control.py`` runs this very snippet against two shards.)

Leases: symbols on demand
-------------------------
With ``source.leases.enabled: true`` a client leases symbols: the bridge subscribes
them upstream (``subscribe_ticker`` / ``subscribe_equity`` on the open connection) for
as long as a lease on them lives, and unsubscribes them ``source.leases.grace_s`` after
the last one ended, unless the configuration pins them (:mod:`bridge.upstream.subscriptions`).
Both doors call :meth:`Control.lease`, :meth:`Control.renew` and :meth:`Control.release`.

The request (a JSON object; anything else is refused, naming the parameter):

``kind``
    ``ticker`` or ``equity`` (required).
``symbols``
    an array of exact symbols (no globs), at most 256; trimmed and upper-cased like
    the upstream does.
``ttl_s``
    a positive number of seconds (default ``source.leases.default_ttl_s``; a longer
    one is cut to ``max_ttl_s``: ``ttlS`` in the reply is what was granted).
``holder``
    a label of the client's choice, at most 64 printable characters, echoed in the
    reply. The lease's owner is the token that made it (``owner`` in the reply; the
    caps ``max_symbols`` and ``max_per_holder`` count per owner, whatever ``holder``
    says).

The reply (``subscribe`` and ``renew``)::

    {"lease": "0.3f9a1c2e.6d1f...",      // null: no symbol held, nothing to renew
     "kind": "ticker", "holder": "svc-a", "owner": "risk",
     "ttlS": 60.0,                       // the TTL granted
     "expiresInS": 59.998,               // null without a lease
     "symbols": {"BTC/USD": {"status": "accepted", "error": null,
                             "event": {<latest cloudevents-json envelope>}, "ageMs": 412},
                 "NOPE/USD": {"status": "rejected", "error": "...", "event": null,
                              "ageMs": null}},
     "shard": {"index": 0, "count": 2}}  // null when the bridge is not sharded

``status`` is what the upstream's acknowledgement said: ``accepted``; ``rejected``
(the upstream does not support the symbol); ``limit`` (the API key's subscription
limit: ``error`` holds the upstream's text, and nothing subscribed before moved);
``evicted`` (on renew: a configured symbol needed the key's room, the lease no
longer holds it); ``error`` (another refusal, or a symbol of another shard:
``"owned by shard 1 of 2"``); ``pending`` (the upstream is reconnecting: the symbol is
subscribed on the next connect, and the lease holds it). The lease holds the
``accepted`` and ``pending`` symbols. ``event`` is the symbol's latest envelope
from the last-value cache (as in a snapshot), ``null`` until its first update arrived;
the updates themselves flow through the routes like any other symbol's. A
request whose every symbol was refused is answered all the same (HTTP 200,
``"lease": null``): the per-symbol statuses are the answer.

Errors, both doors, ``{"error": "...", "parameter": "<name>"|null}``: 400 malformed;
401 no or a wrong token; 403 a token without the ``lease`` scope; 404 no live lease of
that id for this token here (released, expired, never granted, another token's, or
granted by another process); 409 leases are off (``source.leases.enabled`` is false);
429 over a cap (the token's ``max_symbols``, ``source.leases.max_leases``,
``max_symbols`` or ``max_requests_in_flight``; the text names it).

A lease id is ``<shard index>.<process>.<lease>`` (``0`` when not sharded): a lease
lives in the memory of the process that granted it (a restart ends it), and the id
says which. Renew before ``expiresInS`` runs out (every third of the TTL is a good
pace); a renew that finds nothing (404, or no answer at all over NATS) means the lease
is gone: lease again.

The NATS endpoints of leases (same service, JSON bodies as above):

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

With replicas of a shard, one replica (the queue group's pick) grants a lease and
subscribes its symbols; the others do not. If that replica goes, its leases go with
it: the client's next renew is not answered, and leasing again reaches a live one.

Leasing over every shard, renewing and releasing, with nats-py::

    import asyncio, json
    import nats

    async def lease_all(nc, kind, symbols, ttl_s=60, holder="", prefix="aleno.bridge",
                        timeout=5.0):
        # lease `symbols` on whichever shards own them: ({symbol: answer}, [lease ids])
        wanted = {s.strip().upper() for s in symbols}
        body = json.dumps({"kind": kind, "symbols": sorted(wanted), "ttl_s": ttl_s,
                           "holder": holder}).encode()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(f"{prefix}.subscribe", body, reply=inbox)
        answers, leases = {}, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not wanted <= answers.keys():
                try:
                    msg = await sub.next_msg(timeout=max(0.001, deadline - loop.time()))
                except nats.errors.TimeoutError:
                    missing = sorted(wanted - answers.keys())
                    raise TimeoutError(f"no shard answered for {missing}") from None
                if msg.headers and "Nats-Service-Error" in msg.headers:
                    raise RuntimeError(msg.headers["Nats-Service-Error"])
                reply = json.loads(msg.data)
                answers.update(reply["symbols"])
                if reply["lease"] is not None:
                    leases.append(reply["lease"])
        finally:
            await sub.unsubscribe()
        return answers, leases

    async def renew_all(nc, leases, ttl_s=60, prefix="aleno.bridge", timeout=2.0):
        # renew each lease; returns the ones that are gone (lease those symbols again)
        gone = []
        for lease in leases:
            body = json.dumps({"lease": lease, "ttl_s": ttl_s}).encode()
            try:
                msg = await nc.request(f"{prefix}.renew", body, timeout=timeout)
            except nats.errors.TimeoutError:
                gone.append(lease)  # the process that granted it is gone
                continue
            if msg.headers and "Nats-Service-Error" in msg.headers:
                gone.append(lease)  # 404: expired or released
        return gone

    async def release_all(nc, leases, prefix="aleno.bridge", timeout=2.0):
        for lease in leases:
            body = json.dumps({"lease": lease}).encode()
            await nc.request(f"{prefix}.release", body, timeout=timeout)

    async def main():
        nc = await nats.connect("nats://127.0.0.1:4222")
        answers, leases = await lease_all(nc, "ticker", ["BTC/USD", "ETH/USD"], ttl_s=30,
                                          holder="svc-a")
        for symbol, answer in sorted(answers.items()):
            price = answer["event"]["data"]["price"] if answer["event"] else None
            print(symbol, answer["status"], answer["error"] or "", price)
        await asyncio.sleep(10)
        print("gone:", await renew_all(nc, leases, ttl_s=30))
        await release_all(nc, leases)
        await nc.close()

    asyncio.run(main())

(``tests/integration/test_lease_doors.py`` runs this snippet against two shards.)

The door has a connection of its own, independent of any NATS sink: nats-py
reconnects it forever once it was made (the service's subscriptions come back with
it); a bus unreachable at start-up is retried in the background with capped, jittered
backoff while the bridge runs. Nothing here logs a credential.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import math
import re
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, itemgetter, sub
from typing import Any, Final, Protocol, TypeVar, cast

import orjson

from bridge import __version__
from bridge.config.schema import ControlNatsConfig, ShardConfig
from bridge.config.settings import Settings
from bridge.control.auth import AuthError, Guard, Principal
from bridge.control.thread import call_on
from bridge.core.backoff import Backoff
from bridge.core.kinds import PRICE_KINDS
from bridge.pipeline.market import BODY, RECEIVED, Entry, LastValue, monotonic_ms
from bridge.sinks.kit import TlsFilesError, mask_secrets, tls_context
from bridge.upstream.client import SubscriptionResult, SubscriptionStatus, normalize_symbols
from bridge.upstream.sharding import shard_of
from bridge.upstream.subscriptions import (
    LeaseCapError,
    LeaseError,
    LeaseNotFound,
    LeaseReply,
    Subscriptions,
)

log = logging.getLogger("aleno_bridge.control")

T = TypeVar("T")

KINDS: Final = ("ticker", "equity", "*")
#: the order of the items: tickers, then equities, each sorted by symbol
ORDER: Final = PRICE_KINDS
#: at most this many glob patterns per query, each at most this long (bounds the cost
#: of one request)
MAX_PATTERNS: Final = 256
MAX_PATTERN_LEN: Final = 128
#: the query parameters a snapshot accepts (both doors)
PARAMETERS: Final = ("kind", "symbols", "after", "limit")
#: the kinds a lease takes
LEASE_KINDS: Final = PRICE_KINDS
#: the parameters of ``subscribe``, ``renew`` and ``release`` (JSON bodies)
LEASE_PARAMETERS: Final = ("kind", "symbols", "ttl_s", "holder")
RENEW_PARAMETERS: Final = ("lease", "ttl_s")
RELEASE_PARAMETERS: Final = ("lease",)
#: at most this many symbols per lease request, each at most this long
MAX_LEASE_SYMBOLS: Final = 256
MAX_SYMBOL_LEN: Final = 64
MAX_HOLDER_LEN: Final = 64
MAX_LEASE_ID_LEN: Final = 128
#: the answer when the bridge takes no lease
LEASES_OFF: Final = ("leases are off on this bridge (source.leases.enabled is false): "
                     "only the configured symbols are subscribed")
#: how long :meth:`NatsControl.close` waits for the service and connection to close
CLOSE_TIMEOUT_S: Final = 2.0
#: the largest ``limit`` of a snapshot query
MAX_LIMIT: Final = 1_000_000
_DIGITS: Final = re.compile(r"^[0-9]{1,7}$")
_SEMVER: Final = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


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

    # ``subscriptions`` (:class:`bridge.upstream.subscriptions.Subscriptions` or ``None``): the
    # leases; read with ``getattr`` so that a host without it answers "leases are
    # off" (409) instead of failing.


# -- the query ------------------------------------------------------------------------


class ControlError(Exception):
    """A request the control surface refuses. ``status`` is the HTTP status (over NATS:
    the ``Nats-Service-Error-Code`` header); ``parameter`` names the offending request
    parameter, ``None`` when the request is well-formed but cannot be served."""

    status: int = 400

    def __init__(self, message: str, parameter: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        if status is not None:
            self.status = status
        #: extra HTTP headers of the refusal (``WWW-Authenticate``, ``Retry-After``)
        self.headers: dict[str, str] = {}

    def body(self) -> bytes:
        """The JSON error body both doors send."""
        return orjson.dumps({"error": str(self), "parameter": self.parameter})


class QueryError(ControlError, ValueError):
    """A malformed query or request (400); ``parameter`` names the offending parameter."""

    parameter: str

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}", parameter, 400)
        self.message = message


@dataclass(frozen=True, slots=True)
class SnapshotQuery:
    """A validated snapshot query (see the module docstring)."""

    kind: str = "*"
    #: upper-cased globs; ``None``: every symbol
    symbols: tuple[str, ...] | None = None
    #: the (kind, symbol) the page starts after
    after: tuple[str, str] | None = None
    limit: int | None = None


def parse_cursor(cursor: str) -> tuple[str, str]:
    """``"ticker:BTC/USD"`` -> ``("ticker", "BTC/USD")`` (raises :class:`QueryError`)."""
    kind, sep, symbol = cursor.partition(":")
    if not sep or kind not in PRICE_KINDS or not symbol.strip():
        msg = "must be the 'next' of a previous reply (kind:SYMBOL, e.g. ticker:BTC/USD)"
        raise QueryError("after", msg)
    return kind, symbol.strip().upper()


def make_cursor(kind: str, symbol: str) -> str:
    return f"{kind}:{symbol}"


def parse_query(
    kind: str | None = None,
    symbols: Sequence[str] | str | None = None,
    after: str | None = None,
    limit: int | str | None = None,
) -> SnapshotQuery:
    """Validate one query; each element of ``symbols`` may hold comma-separated globs.

    Raises :class:`QueryError` naming the parameter.
    """
    if kind is None or kind == "":
        kind = "*"
    if not isinstance(kind, str) or kind.strip().lower() not in KINDS:
        raise QueryError("kind", "must be ticker, equity or *")
    kind = kind.strip().lower()
    patterns: tuple[str, ...] | None = None
    if symbols is not None:
        if isinstance(symbols, str):
            symbols = [symbols]
        found: list[str] = []
        for entry in symbols:
            if not isinstance(entry, str):
                raise QueryError("symbols", "must be strings (shell-style globs)")
            for part in entry.split(","):
                pattern = part.strip().upper()
                if not pattern:
                    raise QueryError("symbols", "an empty pattern (two commas, or a "
                                     "trailing comma)")
                if len(pattern) > MAX_PATTERN_LEN or not pattern.isprintable():
                    raise QueryError("symbols", f"a pattern must be printable and at most "
                                     f"{MAX_PATTERN_LEN} characters")
                if pattern not in found:
                    found.append(pattern)
        if not found:
            raise QueryError("symbols", "no pattern given (leave it out to ask for all)")
        if len(found) > MAX_PATTERNS:
            raise QueryError("symbols", f"at most {MAX_PATTERNS} patterns per query")
        patterns = tuple(found)
    cursor = None
    if after is not None and after != "":
        if not isinstance(after, str):
            raise QueryError("after", "must be a string")
        cursor = parse_cursor(after)
    count = None
    if limit is not None and limit != "":
        if isinstance(limit, str):
            # ASCII digits only: str.isdigit() takes "²" and int() 5,000 digits slowly
            if not _DIGITS.match(limit.strip()):
                raise QueryError("limit", f"must be an integer from 1 to {MAX_LIMIT}")
            limit = int(limit.strip())
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 1 <= limit <= MAX_LIMIT:
            raise QueryError("limit", f"must be an integer from 1 to {MAX_LIMIT}")
        count = limit
    return SnapshotQuery(kind, patterns, cursor, count)


class QueryParams(Protocol):
    """An HTTP query string as a multidict (aiohttp's ``request.query``)."""

    def __iter__(self) -> Iterator[str]: ...

    def getall(self, key: str, default: list[str]) -> list[str]: ...


def query_from_params(params: QueryParams) -> SnapshotQuery:
    """The query of an HTTP query string (``symbols`` may repeat, the others not)."""
    for key in params:
        if key not in PARAMETERS:
            raise QueryError(key, f"unknown parameter (known: {', '.join(PARAMETERS)})")
    single: dict[str, str | None] = {}
    for name in ("kind", "after", "limit"):
        values = params.getall(name, [])
        if len(values) > 1:
            raise QueryError(name, "given more than once")
        single[name] = values[0] if values else None
    symbols = params.getall("symbols", [])
    return parse_query(single["kind"], symbols if symbols else None, single["after"],
                       single["limit"])


def query_from_json(body: bytes) -> SnapshotQuery:
    """The query of a NATS request body (JSON object; empty body: everything)."""
    doc = _json_object(body, PARAMETERS, empty=True)
    limit = doc.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise QueryError("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    symbols = doc.get("symbols")
    if symbols is not None and not isinstance(symbols, (list, str)):
        raise QueryError("symbols", "must be an array of globs")
    return parse_query(doc.get("kind"), symbols, doc.get("after"), limit)


# -- lease requests -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """A validated ``subscribe`` request (see "Leases" in the module docstring)."""

    kind: str
    #: upper-cased, trimmed, each once, in the order asked
    symbols: tuple[str, ...]
    #: ``None``: ``source.leases.default_ttl_s``
    ttl_s: float | None = None
    holder: str = ""


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """A validated ``renew`` request."""

    lease: str
    ttl_s: float | None = None


def _json_object(body: bytes, known: Sequence[str], *, empty: bool) -> dict[str, Any]:
    """The JSON object of a request body, with only ``known`` keys (``empty``: an empty
    body is the empty object)."""
    what = "must be a JSON object, or empty" if empty else "must be a JSON object"
    if not body.strip():
        if empty:
            return {}
        raise QueryError("body", what)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise QueryError("body", what) from None
    if not isinstance(doc, dict):
        raise QueryError("body", what)
    for key in doc:
        if key not in known:
            raise QueryError(str(key)[:64], f"unknown parameter (known: {', '.join(known)})")
    return doc


def parse_ttl(value: object) -> float | None:
    """``ttl_s``: a positive, finite number of seconds; ``None`` (absent) for the default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise QueryError("ttl_s", "must be a positive number of seconds")
    return float(value)


def parse_lease_id(value: object) -> str:
    """``lease``: the ``lease`` of a ``subscribe`` reply."""
    if not isinstance(value, str) or not value.strip():
        raise QueryError("lease", "must be the 'lease' of a subscribe reply (a string)")
    value = value.strip()
    if len(value) > MAX_LEASE_ID_LEN or not value.isprintable():
        raise QueryError("lease", f"must be printable and at most {MAX_LEASE_ID_LEN} "
                         "characters")
    return value


def parse_lease(
    kind: object = None,
    symbols: object = None,
    ttl_s: object = None,
    holder: object = None,
) -> LeaseRequest:
    """Validate one ``subscribe`` request; raises :class:`QueryError` naming the
    parameter. ``symbols`` is a list of exact symbols (no globs: a lease names what
    is subscribed upstream)."""
    if not isinstance(kind, str) or kind.strip().lower() not in LEASE_KINDS:
        raise QueryError("kind", "must be ticker or equity")
    if not isinstance(symbols, list):
        raise QueryError("symbols", "must be an array of symbols, e.g. [\"BTC/USD\"]")
    found: dict[str, None] = {}
    for entry in symbols:
        if not isinstance(entry, str):
            raise QueryError("symbols", "must be strings")
        symbol = entry.strip().upper()
        if not symbol:
            raise QueryError("symbols", "an empty symbol")
        if len(symbol) > MAX_SYMBOL_LEN or not symbol.isprintable():
            raise QueryError("symbols", f"a symbol must be printable and at most "
                             f"{MAX_SYMBOL_LEN} characters")
        if any(c in symbol for c in "*?[]"):
            raise QueryError("symbols", f"{symbol[:MAX_SYMBOL_LEN]!r} is a pattern; a lease "
                             "names exact symbols")
        found[symbol] = None
    if not found:
        raise QueryError("symbols", "at least one symbol")
    if len(found) > MAX_LEASE_SYMBOLS:
        raise QueryError("symbols", f"at most {MAX_LEASE_SYMBOLS} symbols per lease")
    if holder is None:
        holder = ""
    if not isinstance(holder, str) or len(holder) > MAX_HOLDER_LEN \
            or not holder.isprintable():
        raise QueryError("holder", f"must be a printable string of at most "
                         f"{MAX_HOLDER_LEN} characters")
    return LeaseRequest(kind.strip().lower(), tuple(found), parse_ttl(ttl_s), holder)


def lease_from_json(body: bytes) -> LeaseRequest:
    """The ``subscribe`` request of a JSON body (both doors)."""
    doc = _json_object(body, LEASE_PARAMETERS, empty=False)
    return parse_lease(doc.get("kind"), doc.get("symbols"), doc.get("ttl_s"),
                       doc.get("holder"))


def renew_from_json(body: bytes, lease: str | None = None) -> RenewRequest:
    """The ``renew`` request of a JSON body. Over HTTP the lease is in the path
    (``lease``) and the body holds ``ttl_s`` at most (it may be empty); over NATS
    the body holds both."""
    if lease is not None:
        doc = _json_object(body, ("ttl_s",), empty=True)
        return RenewRequest(parse_lease_id(lease), parse_ttl(doc.get("ttl_s")))
    doc = _json_object(body, RENEW_PARAMETERS, empty=False)
    return RenewRequest(parse_lease_id(doc.get("lease")), parse_ttl(doc.get("ttl_s")))


def release_from_json(body: bytes) -> str:
    """The lease of a NATS ``release`` request body (``{"lease": id}``)."""
    return parse_lease_id(_json_object(body, RELEASE_PARAMETERS, empty=False).get("lease"))


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

    def __init__(self, host: ControlHost) -> None:
        self._host = host
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

    @property
    def shard(self) -> ShardConfig | None:
        return self._host.settings.config.source.shard

    @property
    def source(self) -> str:
        """The upstream this bridge republishes (the envelopes' ``source``)."""
        return self._host.settings.config.source.endpoint

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
        cache = self._host.last_values
        # what matches, per kind: the symbols and their entries (read once: another
        # thread may replace entries meanwhile, each read is one whole entry)
        chosen: list[tuple[str, Sequence[str], list[Entry]]] = []
        for k in ORDER if kind in (None, "*") else (kind,):
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
        subs: Subscriptions | None = getattr(self._host, "subscriptions", None)
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
        cap = self._host.settings.config.source.leases.max_requests_in_flight
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
        values = self._host.last_values
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


# -- the NATS door --------------------------------------------------------------------


Redact = Callable[[str], str]


def queue_group(shard: ShardConfig | None) -> str:
    """The queue group of this process's endpoints: one per shard, so that every shard
    answers a request once, whichever of its replicas does."""
    return "q" if shard is None else f"shard-{shard.index}"


def lease_queue_group(control: Control) -> str:
    """The queue group of ``renew`` / ``release``: this process's own, so that every
    process receives them (the one that granted the lease answers)."""
    return f"lease-{control.instance}"


class NatsControl:
    """The micro service of :class:`Control` on NATS, on a connection of its own.

    :meth:`start` returns at once; the connection is made in the background, retried
    with backoff while it fails (each failure logged, redacted). Once made, nats-py
    keeps it (reconnects forever; the service's subscriptions are restored with it).
    :meth:`close` stops the service and the connection; it is safe to call twice.
    :class:`~bridge.app.Bridge` runs it on the control thread
    (:mod:`bridge.control.thread`): ``snapshot`` is answered there, the lease endpoints
    by the bridge's loop (:meth:`Control.lease` goes there by itself).
    """

    def __init__(self, control: Control, cfg: ControlNatsConfig,
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
                log.info("control: NATS connection back (%s)", _server_url(nc))

        kwargs: dict[str, Any] = {
            "servers": list(cfg.servers),
            "name": f"{cfg.name}-control",
            "allow_reconnect": True,
            # once connected: reconnect forever, independent of the sinks
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": cfg.backoff.initial_s,
            "connect_timeout": cfg.connect_timeout_s,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
        }
        if cfg.uses_tls:
            try:
                kwargs["tls"] = tls_context(cfg.tls_ca_file, verify=cfg.tls_verify)
            except TlsFilesError as exc:
                raise ControlConnectError(str(exc)) from None
        if cfg.username is not None and cfg.password is not None:
            kwargs["user"] = cfg.username
            kwargs["password"] = cfg.password.get_secret_value()
        if cfg.token is not None:
            kwargs["token"] = cfg.token.get_secret_value()
        if cfg.credentials_file is not None:
            kwargs["user_credentials"] = str(cfg.credentials_file)
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
                 queue_group(self.control.shard), _server_url(nc))

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

    async def _lease(self, request: Any, *, foreign: str) -> LeaseAnswer:
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
    if "authorization violation" in text.lower() or type(exc).__name__ == "AuthorizationError":
        return ("the server refused the credentials (Authorization Violation); check "
                "control.nats username/password, token or credentials_file")
    if isinstance(exc, asyncio.TimeoutError):
        return "no server answered in time"
    return text


def _server_url(nc: Any) -> str:
    server = getattr(nc, "connected_url", None)
    if server is None:
        return "?"
    # the URL as configured: never with credentials (refused by the schema)
    return f"{server.scheme}://{server.hostname}:{server.port}"


async def _discard(nc: Any) -> None:
    """Close a client, even a half-connected one, without hanging on a dead peer."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)


async def start_nats_control(control: Control, cfg: ControlNatsConfig,
                             redact: Redact | None = None,
                             guard: Guard | None = None) -> NatsControl:
    """Serve ``control`` as a NATS micro service; returns at once (the connection is
    made in the background, see :class:`NatsControl`). ``redact`` scrubs the bridge's
    secrets from logged error texts (this door's own credentials are masked anyway)."""
    service = NatsControl(control, cfg, redact, guard)
    service.start()
    return service


__all__ = [
    "KINDS",
    "LEASES_OFF",
    "LEASE_PARAMETERS",
    "PARAMETERS",
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
