"""The simulator's side of the Aleno WebSocket V1 protocol: who is connected with which
key, what each connection subscribes, and the acknowledgements of ``subscribe_*`` /
``unsubscribe_*`` (the rules are in :mod:`bridge.simulator` and docs/simulator.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import socketio

from bridge.core.kinds import PRICE_KINDS, PriceKind
from bridge.simulator.universe import Universe, normalize_symbol

REFUSED: Final = "Missing or invalid API key."
LIMIT_REACHED: Final = "Subscription limit reached. Contact us to increase limits."
BAD_PAYLOAD: Final = "Invalid payload: expected an array of symbol strings."
NONE_SUPPORTED: Final = "None of the requested symbols is supported."
MAX_SYMBOLS_PER_REQUEST: Final = 1000
TOO_MANY: Final = f"Too many symbols in one request (at most {MAX_SYMBOLS_PER_REQUEST})."
MAX_SYMBOL_LEN: Final = 64
#: the two feeds of the protocol, as the test hooks and the admin API name them
KINDS: Final = PRICE_KINDS
Kind = PriceKind


@dataclass
class Client:
    key: str
    tickers: set[str] = field(default_factory=set)
    equities: set[str] = field(default_factory=set)

    def total(self) -> int:
        return len(self.tickers) + len(self.equities)


def fingerprint(key: str) -> str:
    """A short stable name for an API key that does not reveal it: the first 8 hex
    digits of its SHA-256. The admin API and error messages name keys only this way."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def check_kind(value: object) -> Kind:
    """``value`` if it names a feed (``ticker`` or ``equity``), else a ``ValueError``."""
    if value not in KINDS:
        msg = f"kind must be one of {', '.join(KINDS)}, not {value!r}"
        raise ValueError(msg)
    return value


class Sessions:
    """The connected clients (Socket.IO session id -> :class:`Client`) and what each key
    did since start: accepted connections and ``subscribe_*`` / ``unsubscribe_*``
    requests. ``limit(key)``: the key's subscription limit, asked at every subscribe."""

    def __init__(self, api_keys: frozenset[str], limit: Callable[[str], int],
                 universe: Universe) -> None:
        self.api_keys = api_keys
        self._limit = limit
        self._universe = universe
        self.clients: dict[str, Client] = {}
        #: accepted connections per key, since start (reconnects count)
        self.connects: dict[str, int] = dict.fromkeys(api_keys, 0)
        #: ``subscribe_*`` / ``unsubscribe_*`` requests per key, since start, whatever
        #: their answer (what a client's pace costs the key)
        self.subscribe_requests: dict[str, int] = dict.fromkeys(api_keys, 0)
        self.unsubscribe_requests: dict[str, int] = dict.fromkeys(api_keys, 0)

    # -- connections -------------------------------------------------------------------

    def connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        """Accept the connection ``sid`` if it carries an accepted API key (the CONNECT
        packet's ``auth: {apiKey}``, else the ``x-api-key`` handshake header)."""
        key = None
        if isinstance(auth, dict) and isinstance(auth.get("apiKey"), str):
            key = auth["apiKey"]
        if key is None:
            key = environ.get("HTTP_X_API_KEY")
        if key not in self.api_keys:
            raise socketio.exceptions.ConnectionRefusedError(REFUSED)
        self.clients[sid] = Client(key)
        self.connects[key] += 1

    def disconnect(self, sid: str) -> None:
        self.clients.pop(sid, None)

    def sids(self, key: str | None = None) -> list[str]:
        """The session ids of every client, or of those that connected with ``key``."""
        return [sid for sid, c in self.clients.items() if key is None or c.key == key]

    # -- what clients subscribe ------------------------------------------------------------

    def subscriptions(self) -> list[tuple[set[str], set[str]]]:
        """(tickers, equities) of every connected client."""
        return [(set(c.tickers), set(c.equities)) for c in self.clients.values()]

    def subscriptions_by_key(self) -> dict[str, dict[str, set[str]]]:
        """key -> ``{"ticker": set, "equity": set}``: the union over that key's open
        connections (what its limit counts); keys without a connection are absent."""
        out: dict[str, dict[str, set[str]]] = {}
        for c in self.clients.values():
            mine = out.setdefault(c.key, {"ticker": set(), "equity": set()})
            mine["ticker"] |= c.tickers
            mine["equity"] |= c.equities
        return out

    def connections(self, key: str | None = None) -> int:
        """How many clients are connected now (of ``key`` only, if given)."""
        return sum(1 for c in self.clients.values() if key is None or c.key == key)

    def feeds_of(self, key: str) -> tuple[set[str], set[str]]:
        """(tickers, equities): the union over the open connections of ``key``."""
        tickers: set[str] = set()
        equities: set[str] = set()
        for c in self.clients.values():
            if c.key == key:
                tickers |= c.tickers
                equities |= c.equities
        return tickers, equities

    # -- subscribe_* / unsubscribe_* ---------------------------------------------------------

    def update(self, sid: str, data: Any, ticker: bool, subscribe: bool) -> dict[str, Any]:
        """Apply a ``(un)subscribe_ticker`` / ``(un)subscribe_equity`` request of the
        client ``sid`` and return its acknowledgement."""
        client = self.clients.get(sid)
        if client is None:
            return {"status": "error", "error": REFUSED, "involvedSubscriptions": [],
                    "subscriptionsAfterUpdate": []}
        counts = self.subscribe_requests if subscribe else self.unsubscribe_requests
        counts[client.key] += 1
        current = client.tickers if ticker else client.equities
        universe = self._universe.of(ticker)

        def ack(status: str, involved: list[str], rejected: list[str] | None = None,
                error: str | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "status": status,
                "involvedSubscriptions": involved,
                "subscriptionsAfterUpdate": sorted(current),
            }
            if rejected:
                out["rejectedSubscriptions"] = rejected
            if error is not None:
                out["error"] = error
            return out

        if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
            return ack("error", [], error=BAD_PAYLOAD)
        if len(data) > MAX_SYMBOLS_PER_REQUEST:
            return ack("error", [], error=TOO_MANY)
        accepted: list[str] = []
        rejected: list[str] = []
        for raw in data:
            sym = normalize_symbol(raw)
            if sym in universe and len(sym) <= MAX_SYMBOL_LEN:
                if sym not in accepted:
                    accepted.append(sym)
            elif sym not in rejected:
                rejected.append(sym[:MAX_SYMBOL_LEN])
        if not accepted:
            return ack("error", [], rejected, NONE_SUPPORTED)
        if subscribe:
            # the limit is the key's: distinct feeds over all its open connections
            key_tickers, key_equities = self.feeds_of(client.key)
            held = key_tickers if ticker else key_equities
            costs = [s for s in accepted if s not in held]
            if len(key_tickers) + len(key_equities) + len(costs) > self._limit(client.key):
                return ack("error", accepted, rejected, LIMIT_REACHED)
            current.update(accepted)
        else:
            current.difference_update(accepted)
        return ack("partial" if rejected else "ok", accepted, rejected)


def subscribed(clients: Iterable[Client]) -> dict[Kind, set[str]]:
    """The symbols some client subscribes to, by feed."""
    wanted: dict[Kind, set[str]] = {"ticker": set(), "equity": set()}
    for c in clients:
        wanted["ticker"] |= c.tickers
        wanted["equity"] |= c.equities
    return wanted


__all__ = [
    "BAD_PAYLOAD",
    "KINDS",
    "LIMIT_REACHED",
    "MAX_SYMBOLS_PER_REQUEST",
    "MAX_SYMBOL_LEN",
    "NONE_SUPPORTED",
    "REFUSED",
    "TOO_MANY",
    "Client",
    "Kind",
    "Sessions",
    "check_kind",
    "fingerprint",
    "subscribed",
]
