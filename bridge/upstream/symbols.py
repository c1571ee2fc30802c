"""The symbol set, in one place: what the bridge wants, where each symbol is placed,
what each key's limit is known to be, and what each connection asks the upstream for.

:class:`SymbolBook` is that place. The parts that change the set each keep to their
own trade and write their answers here:

- :class:`~bridge.upstream.subscriptions.Subscriptions` (the keeper) decides the
  desired set: the configured (pinned) symbols and the leased ones, and keeps
  :attr:`SymbolBook.pinned` and :attr:`SymbolBook.held` (what it asked for and the
  upstream holds: pinned and placed, leased, in grace);
- :class:`~bridge.upstream.pool.UpstreamPool` and its
  :class:`~bridge.upstream.placement.Placer` place each symbol on one key's connection
  (:attr:`SymbolBook.placed`, :attr:`SymbolBook.unplaced`) within what each key's limit
  is known to be (:attr:`SymbolBook.keys`, the learned limits);
- each connection's :class:`~bridge.upstream.subscribing.SubscriptionRequests` keeps
  its own desired set in a :class:`ConnectionSymbols` of this book: what every
  (re)connect re-issues, and what its acknowledgements changed.

What everyone else reads is here too: :attr:`SymbolBook.wanted`, the symbols whose
records are ours (the union of every connection's set, each kind's frozenset replaced
whole on every change, so a reader in another task always sees a whole set), which the
normalizer's filter, the market state and the stale watch read; ``on_change`` (given at
construction) is told after every change of it. The pool tells the keeper through the
book what it could not keep (:meth:`SymbolBook.lost`) and when a key may have room again
(:meth:`SymbolBook.room`).

This module imports neither the Socket.IO client nor the configuration loader: the
control surface and the leases read the book without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol

from bridge.core.kinds import PRICE_KINDS
from bridge.upstream.protocol import normalize_symbols

log = logging.getLogger("aleno_bridge.upstream")

KINDS: Final = PRICE_KINDS


class Keeper(Protocol):
    """The keeper of the desired set (the subscriptions), told by the book what the
    placement could not keep and when room may have been freed."""

    def lost(self, kind: str, symbols: list[str]) -> None: ...

    def room(self) -> None: ...


class KeyLimit(Protocol):
    """What is known of one API key's limit (a pool's
    :class:`~bridge.upstream.limits.KeyConnection`)."""

    name: str
    #: the operator's ``limit``, and the one in force (maybe learned lower)
    configured: int | None
    limit: int | None
    learned: bool
    #: why its connection gave up (``None``: it did not)
    failed: str | None


class ConnectionSymbols:
    """The desired set of one connection, in subscription order (what every (re)connect
    re-issues), and :attr:`wanted`, the same as sets (one dict object for the
    connection's life, each kind's frozenset replaced whole on a change)."""

    def __init__(self, name: str, symbols: Mapping[str, Iterable[str]],
                 changed: Callable[[str], None]) -> None:
        self.name = name
        self.desired: dict[str, dict[str, None]] = {
            kind: dict.fromkeys(normalize_symbols(symbols.get(kind, ()))) for kind in KINDS}
        self.wanted: dict[str, frozenset[str]] = {
            kind: frozenset(d) for kind, d in self.desired.items()}
        self._changed = changed

    def count(self) -> int:
        """Symbols of every kind (the upstream's limit counts them together)."""
        return sum(map(len, self.desired.values()))

    def set(self, kind: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Remove, then add, symbols of ``kind``; the book hears of it."""
        d = self.desired[kind]
        for s in remove:
            d.pop(s, None)
        for s in add:
            d[s] = None
        self.wanted[kind] = frozenset(d)
        self._changed(kind)

    def __repr__(self) -> str:
        return f"ConnectionSymbols({self.name!r}, {self.count()} symbol(s))"


class SymbolBook:
    """The one owner of the symbol set (see the module).

    ``pinned``: the configured symbols, by kind. ``on_change()`` is told after every
    change of :attr:`wanted` (the market state forgets the symbols that left it);
    it is called where the change is made and must not block.
    """

    def __init__(self, pinned: Mapping[str, Iterable[str]] | None = None, *,
                 on_change: Callable[[], None] | None = None) -> None:
        #: the configured symbols (a reload replaces them, through the keeper)
        self.pinned: dict[str, frozenset[str]] = {
            k: frozenset(normalize_symbols((pinned or {}).get(k, ()))) for k in KINDS}
        #: what the keeper asked the upstream for and it holds (accepted or pending):
        #: pinned and placed, leased, in grace
        self.held: dict[str, set[str]] = {k: set() for k in KINDS}
        #: (kind, symbol) -> the name of the key connection it is placed on
        self.placed: dict[tuple[str, str], str] = {}
        #: configured symbols that fit in no key's limit now, by kind
        self.unplaced: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}
        #: what is known of each key's limit, by key name (the pool's connections)
        self.keys: dict[str, KeyLimit] = {}
        #: each connection's desired set, by key name, in the order of the keys
        self.connections: dict[str, ConnectionSymbols] = {}
        #: who decides the desired set (the subscriptions), once it exists
        self.keeper: Keeper | None = None
        self._on_change = on_change
        self._wanted: dict[str, frozenset[str]] = {k: frozenset() for k in KINDS}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(self.wanted[k])}" for k in KINDS)
        return f"SymbolBook({counts}, connections={list(self.connections)})"

    # -- connections ----------------------------------------------------------------

    def connection(self, name: str, symbols: Mapping[str, Iterable[str]]
                   ) -> ConnectionSymbols:
        """Register the desired set of a new connection (a key's), starting with
        ``symbols``."""
        if name in self.connections:
            msg = f"connection {name!r} is in the symbol book already"
            raise ValueError(msg)
        conn = ConnectionSymbols(name, symbols, self._changed)
        self.connections[name] = conn
        if len(self.connections) == 1:
            # one connection: its set is the whole set (the very dict object)
            self._wanted = conn.wanted
        else:
            if len(self.connections) == 2:
                self._wanted = dict(self._wanted)
            for kind in KINDS:
                self._merge(kind)
        return conn

    @property
    def wanted(self) -> dict[str, frozenset[str]]:
        """The symbols whose records are ours, by kind, across every connection."""
        return self._wanted

    def _merge(self, kind: str) -> None:
        acc: set[str] = set()
        for conn in self.connections.values():
            acc |= conn.wanted[kind]
        self._wanted[kind] = frozenset(acc)

    def _changed(self, kind: str) -> None:
        if len(self.connections) > 1:
            self._merge(kind)
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # a listener must never break a connection
                log.exception("symbol set listener failed")

    # -- placement --------------------------------------------------------------------

    def placed_on(self, kind: str, symbol: str) -> str | None:
        """The key connection a symbol is placed on (``None``: on none)."""
        return self.placed.get((kind, symbol.strip().upper()))

    def set_unplaced(self, add: Mapping[str, Iterable[str]]) -> None:
        """Add to :attr:`unplaced`; the newly unplaced symbols are logged."""
        for kind, syms in add.items():
            new = set(syms) - self.unplaced[kind]
            if not new:
                continue
            self.unplaced[kind] = self.unplaced[kind] | new
            log.error("%d %s symbol(s) fit in no API key's limit and are not subscribed: %s "
                      "(add a key to source.api_keys or raise a limit)", len(new), kind,
                      ", ".join(sorted(new)[:50]), extra={"kind": kind})

    def replace_unplaced(self, unplaced: Mapping[str, Iterable[str]]) -> None:
        """Replace :attr:`unplaced`; the newly unplaced ones are logged."""
        known = {k: frozenset(unplaced.get(k, ())) for k in KINDS}
        for kind in KINDS:
            self.unplaced[kind] = self.unplaced[kind] & known[kind]
        self.set_unplaced(known)

    def lost(self, kind: str, symbols: list[str]) -> None:
        """The placement dropped ``symbols`` (they fit on no key): the keeper hears it."""
        if self.keeper is not None:
            try:
                self.keeper.lost(kind, symbols)
            except Exception:  # a listener must never break the connection
                log.exception("upstream unplaced-symbols listener failed")

    def room(self) -> None:
        """A key whose limit was learned may have room again: the keeper hears it."""
        if self.keeper is not None:
            try:
                self.keeper.room()
            except Exception:  # a listener must never break the connection
                log.exception("upstream room listener failed")

    # -- what it says -------------------------------------------------------------------

    def describe(self, kind: str, symbol: str) -> dict[str, object]:
        """Everything the book knows of one symbol (for operators and tests)."""
        s = symbol.strip().upper()
        return {
            "kind": kind,
            "symbol": s,
            "pinned": s in self.pinned.get(kind, frozenset()),
            "held": s in self.held.get(kind, set()),
            "wanted": s in self.wanted.get(kind, frozenset()),
            "placed_on": self.placed.get((kind, s)),
            "unplaced": s in self.unplaced.get(kind, frozenset()),
            "connections": [n for n, c in self.connections.items()
                            if s in c.wanted.get(kind, frozenset())],
        }


__all__ = ["ConnectionSymbols", "Keeper", "KeyLimit", "SymbolBook"]
