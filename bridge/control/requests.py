"""What a client sends the control surface, parsed and checked: the snapshot query, the
lease requests, and the error both doors answer a refused request with.

Both doors (:mod:`bridge.control.v1` over HTTP, :mod:`bridge.control.nats`) parse here;
:class:`bridge.control.core.Control` serves what was parsed. The human reference is
``docs/control-api.md``.

The query
---------
``kind``
    ``ticker``, ``equity``, ``*`` (default: tickers and equities) or ``bar`` (the last
    final OHLC bar of every (symbol, interval), named ``SYMBOL@interval``; a ``symbols``
    glob without ``@`` selects by symbol, one with ``@`` the whole name: ``BTC/*@1m``).
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

Lease requests
--------------
A JSON object; anything else is refused, naming the parameter:

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

``renew`` takes ``{"lease": id, "ttl_s": 60}`` (over HTTP the lease is in the path),
``release`` ``{"lease": id}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from bridge.core.kinds import BAR_KIND, PRICE_KINDS

KINDS: Final = ("ticker", "equity", "*", BAR_KIND)
#: the kinds a cursor names (``*`` is not one: a cursor names an item)
CURSOR_KINDS: Final = (*PRICE_KINDS, BAR_KIND)
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
#: the largest ``limit`` of a snapshot query
MAX_LIMIT: Final = 1_000_000
_DIGITS: Final = re.compile(r"^[0-9]{1,7}$")


# -- refusals ---------------------------------------------------------------------------


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


# -- the query ------------------------------------------------------------------------


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
    """``"ticker:BTC/USD"`` -> ``("ticker", "BTC/USD")``, ``"bar:BTC/USD@1m"`` ->
    ``("bar", "BTC/USD@1m")`` (raises :class:`QueryError`)."""
    kind, sep, symbol = cursor.partition(":")
    if not sep or kind not in CURSOR_KINDS or not symbol.strip():
        msg = "must be the 'next' of a previous reply (kind:SYMBOL, e.g. ticker:BTC/USD)"
        raise QueryError("after", msg)
    if kind == BAR_KIND:  # SYMBOL@interval: intervals are spelled in lower case (1m)
        name, at, interval = symbol.strip().rpartition("@")
        return kind, f"{name.upper()}{at}{interval.lower()}" if at else interval.upper()
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
        raise QueryError("kind", "must be ticker, equity, * or bar")
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
    """A validated ``subscribe`` request (see "Lease requests" in the module docstring)."""

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


__all__ = [
    "CURSOR_KINDS",
    "KINDS",
    "LEASE_KINDS",
    "LEASE_PARAMETERS",
    "MAX_HOLDER_LEN",
    "MAX_LEASE_ID_LEN",
    "MAX_LEASE_SYMBOLS",
    "MAX_LIMIT",
    "MAX_PATTERNS",
    "MAX_PATTERN_LEN",
    "MAX_SYMBOL_LEN",
    "PARAMETERS",
    "RELEASE_PARAMETERS",
    "RENEW_PARAMETERS",
    "ControlError",
    "LeaseRequest",
    "QueryError",
    "QueryParams",
    "RenewRequest",
    "SnapshotQuery",
    "lease_from_json",
    "make_cursor",
    "parse_cursor",
    "parse_lease",
    "parse_lease_id",
    "parse_query",
    "parse_ttl",
    "query_from_json",
    "query_from_params",
    "release_from_json",
    "renew_from_json",
]
