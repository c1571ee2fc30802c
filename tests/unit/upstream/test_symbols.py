"""bridge.upstream.symbols: the symbol set has one owner, the :class:`SymbolBook`, that
the source, the pool, the subscriptions (reload, leases) and the market state share
(issue 21)."""

from __future__ import annotations

import pytest

from bridge.app import Bridge
from bridge.config import Settings, parse_config
from bridge.sinks import Drivers
from bridge.testing import MemorySink
from bridge.upstream.protocol import SubscriptionResult, SubscriptionStatus
from bridge.upstream.symbols import SymbolBook

DRIVERS = Drivers(injected={"memory": MemorySink})


def settings(source: str) -> Settings:
    text = (f"source:\n{source}\nsinks:\n  mem: {{driver: memory}}\n"
            "http: {enabled: false}\n")
    return parse_config(text, env={"K1": "k1", "K2": "k2"}, drivers=DRIVERS)


TWO_KEYS = """\
  url: http://127.0.0.1:9
  tickers: [A/USD, B/USD, C/USD]
  equities: [E1]
  api_keys:
    - {name: one, key: "${K1}", limit: 2}
    - {name: two, key: "${K2}", limit: 10}
"""


def test_the_bridge_has_one_symbol_book_that_every_part_shares() -> None:
    bridge = Bridge(settings(TWO_KEYS), sinks={"mem": MemorySink("mem")})
    book = bridge.symbols
    assert book is not None and bridge.source is not None and bridge.subscriptions
    assert bridge.source.symbols is book and bridge.subscriptions.symbols is book
    assert book.keeper is bridge.subscriptions
    # each connection's desired set is the book's, and the union is the book's too
    for src in bridge.source.sources:
        assert src.symbols is book.connections[src.symbols.name]
        assert src.wanted is src.symbols.wanted
    assert bridge.source.wanted is book.wanted
    assert book.wanted == {"ticker": frozenset({"A/USD", "B/USD", "C/USD"}),
                           "equity": frozenset({"E1"})}
    # placement within the limits: first fit, tickers then equities
    assert {s: book.placed_on(k, s) for k in ("ticker", "equity")
            for s in book.wanted[k]} == {"A/USD": "one", "B/USD": "one", "C/USD": "two",
                                         "E1": "two"}
    assert {n: (k.limit, k.learned) for n, k in book.keys.items()} == {
        "one": (2, False), "two": (10, False)}
    # the configured symbols are pinned and held, in the book the subscriptions keep
    assert book.pinned["ticker"] == frozenset({"A/USD", "B/USD", "C/USD"})
    assert bridge.subscriptions.desired() == {k: frozenset(v) for k, v in book.held.items()}
    assert book.describe("ticker", "c/usd") == {
        "kind": "ticker", "symbol": "C/USD", "pinned": True, "held": True, "wanted": True,
        "placed_on": "two", "unplaced": False, "connections": ["two"]}
    # no secret in what the book shows
    assert "k1" not in repr(book) and "k2" not in repr(book)


def test_what_fits_nowhere_is_in_the_book_and_not_held() -> None:
    text = TWO_KEYS.replace("limit: 10", "limit: 1")
    bridge = Bridge(settings(text), sinks={"mem": MemorySink("mem")})
    book = bridge.symbols
    assert book is not None and bridge.subscriptions is not None
    assert book.unplaced == {"ticker": frozenset(), "equity": frozenset({"E1"})}
    assert "E1" in book.pinned["equity"] and "E1" not in book.held["equity"]
    assert bridge.subscriptions.unplaced_for_room() == {"ticker": [], "equity": ["E1"]}


def test_a_move_between_connections_is_seen_by_the_market_state() -> None:
    """A symbol moved from one key's connection to another leaves the wanted set and
    comes back within one step: the listener given at construction hears both, so
    the market state forgets it (no false gap)."""
    told: list[dict[str, frozenset[str]]] = []
    book = SymbolBook({"ticker": ["A/USD"]}, on_change=lambda: told.append(dict(book.wanted)))
    one = book.connection("one", {"ticker": ["A/USD"]})
    two = book.connection("two", {})
    assert book.wanted["ticker"] == frozenset({"A/USD"})
    one.set("ticker", remove=["A/USD"])
    two.set("ticker", add=["A/USD"])
    assert [w["ticker"] for w in told] == [frozenset(), frozenset({"A/USD"})]
    assert book.wanted["ticker"] == frozenset({"A/USD"})
    assert two.desired["ticker"] == {"A/USD": None} and one.count() == 0


def test_with_one_connection_its_set_is_the_whole_set() -> None:
    book = SymbolBook()
    only = book.connection("default", {"ticker": ["x/usd"]})
    assert book.wanted is only.wanted and only.wanted["ticker"] == frozenset({"X/USD"})
    with pytest.raises(ValueError, match="already"):
        book.connection("default", {})


class Keeper:
    def __init__(self) -> None:
        self.lost_symbols: list[tuple[str, list[str]]] = []
        self.rooms = 0

    def lost(self, kind: str, symbols: list[str]) -> None:
        self.lost_symbols.append((kind, symbols))

    def room(self) -> None:
        self.rooms += 1
        raise RuntimeError("a keeper bug")


def test_the_keeper_hears_what_the_placement_lost_and_a_bug_breaks_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    book = SymbolBook()
    book.lost("ticker", ["A/USD"])  # no keeper yet: nobody to tell, nothing breaks
    keeper = Keeper()
    book.keeper = keeper
    book.lost("ticker", ["A/USD"])
    book.room()
    assert keeper.lost_symbols == [("ticker", ["A/USD"])] and keeper.rooms == 1
    assert "upstream room listener failed" in caplog.text


def test_a_failing_change_listener_does_not_break_a_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("a listener bug")
    book = SymbolBook(on_change=boom)
    conn = book.connection("default", {})
    conn.set("equity", add=["E1"])
    assert book.wanted["equity"] == frozenset({"E1"})
    assert "symbol set listener failed" in caplog.text


async def test_a_lease_and_its_end_change_the_book() -> None:
    """The subscriptions keep the book: a leased symbol is held in it and wanted on the
    connection it was placed on; its release (no grace) takes it out of both."""
    text = """\
  url: http://127.0.0.1:9
  tickers: [A/USD]
  leases: {enabled: true, grace_s: 0}
"""
    bridge = Bridge(settings(text), sinks={"mem": MemorySink("mem")})
    book, subs, pool = bridge.symbols, bridge.subscriptions, bridge.source
    assert book is not None and subs is not None and pool is not None
    # not connected: the request is pending, the symbol desired on the connection
    reply = await subs.lease("ticker", ["B/USD"], ttl_s=60, owner="me")
    assert reply.results["B/USD"] == SubscriptionResult(SubscriptionStatus.PENDING)
    assert "B/USD" in book.held["ticker"] and "B/USD" in book.wanted["ticker"]
    assert book.placed_on("ticker", "B/USD") == "default"
    assert reply.lease_id is not None
    await subs.release(reply.lease_id, owner="me")
    assert "B/USD" not in book.held["ticker"] and "B/USD" not in book.wanted["ticker"]
    assert book.placed_on("ticker", "B/USD") is None
