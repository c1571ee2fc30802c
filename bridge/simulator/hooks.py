"""The state of the simulator's test hooks: the feed paused whole, single symbols paused,
and updates to drop (with the send times they would have carried). The hooks themselves
are methods of :class:`bridge.simulator.Simulator` (and ``/admin/`` over HTTP).
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.simulator.protocol import Client, Kind, check_kind, subscribed
from bridge.simulator.universe import Universe, normalize_symbol


class FeedHooks:
    """What the test hooks leave out of the feed (see :meth:`left_out`)."""

    def __init__(self, universe: Universe) -> None:
        self._universe = universe
        #: the whole feed paused (ticks are skipped, not queued)
        self.paused = False
        self.paused_symbols: dict[Kind, set[str]] = {"ticker": set(), "equity": set()}
        #: (kind, symbol) -> updates still to leave out
        self.drops: dict[tuple[Kind, str], int] = {}
        self.dropped_at: dict[tuple[Kind, str], list[int]] = {}

    def symbols(self, kind: Kind, symbols: Iterable[str]) -> set[str]:
        """``symbols`` normalized; a ``ValueError`` if one is outside the universe."""
        if isinstance(symbols, str):
            msg = "symbols must be a list of symbols, not one string"
            raise TypeError(msg)
        universe = self._universe.of(kind == "ticker")
        out = {normalize_symbol(s) for s in symbols}
        unknown = sorted(out - universe.keys())
        if unknown:
            msg = f"not in the simulator's {kind} universe: {', '.join(unknown)}"
            raise ValueError(msg)
        return out

    def pause_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        k = check_kind(kind)
        self.paused_symbols[k] |= self.symbols(k, symbols)

    def resume_symbols(self, kind: str, symbols: Iterable[str]) -> None:
        k = check_kind(kind)
        self.paused_symbols[k] -= self.symbols(k, symbols)

    def paused_of(self, kind: str) -> set[str]:
        return set(self.paused_symbols[check_kind(kind)])

    def drop(self, kind: str, symbols: Iterable[str], ticks: int) -> None:
        k = check_kind(kind)
        if ticks < 0:
            msg = f"ticks must be 0 or more, not {ticks}"
            raise ValueError(msg)
        for sym in self.symbols(k, symbols):
            if ticks:
                self.drops[(k, sym)] = ticks
            else:
                self.drops.pop((k, sym), None)

    def dropped(self, kind: str, symbol: str) -> list[int]:
        return list(self.dropped_at.get((check_kind(kind), normalize_symbol(symbol)), []))

    def left_out(self, sent_ms: int, clients: Iterable[Client]) -> dict[Kind, set[str]]:
        """The symbols this tick leaves out: paused ones, and those with a drop pending
        that some client (of ``clients``) subscribes to (their sent time is recorded,
        the drop counts down)."""
        out = {k: set(v) for k, v in self.paused_symbols.items()}
        if self.drops:
            wanted = subscribed(clients)
            for (kind, sym), left in list(self.drops.items()):
                if sym not in wanted[kind] or sym in out[kind]:
                    continue
                self.dropped_at.setdefault((kind, sym), []).append(sent_ms)
                out[kind].add(sym)
                if left <= 1:
                    del self.drops[(kind, sym)]
                else:
                    self.drops[(kind, sym)] = left - 1
        return out


__all__ = ["FeedHooks"]
