"""Placement of symbols on a pool's connections (see :mod:`bridge.upstream.pool`): each
symbol on exactly one connection, within what each key's limit is known to leave; a
request the upstream refuses whole for the limit is split to find the part that fits,
and what a refusal says of the limit is learned."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from bridge.upstream.limits import KeyConnection
from bridge.upstream.protocol import SubscriptionResult, SubscriptionStatus


class Placer:
    """Places symbols on ``connections`` and keeps ``owner`` ((kind, symbol) -> the name
    of the connection holding it, the symbol book's ``placed``) and ``unplaced`` (the
    book's, by kind) up to date.

    ``clock()`` is the pool's; ``max_split_depth()`` bounds the halvings of a refused
    request; ``remember_unsupported(kind, symbol)`` is told each symbol the upstream
    rejected as unsupported. The caller holds the pool's lock.
    """

    def __init__(self, connections: list[KeyConnection],
                 owner: dict[tuple[str, str], str],
                 unplaced: dict[str, frozenset[str]], clock: Callable[[], float],
                 max_split_depth: Callable[[], int],
                 remember_unsupported: Callable[[str, str], None]) -> None:
        self.connections = connections
        self.owner = owner
        self.unplaced = unplaced
        self.clock = clock
        self.max_split_depth = max_split_depth
        self.remember_unsupported = remember_unsupported

    def usable(self, exclude: KeyConnection | None = None,
               probe: bool = False) -> list[KeyConnection]:
        """The connections that may take new symbols: the live ones first, and among
        them those whose room is known before those the upstream must be asked about
        (each refused request costs more requests to find how much of it fits)."""
        now = self.clock()
        ok = [c for c in self.connections if c.failed is None and c is not exclude]
        return sorted(ok, key=lambda c: (not c.source.live, c.room(now, probe) is None))

    def settle(self, conn: KeyConnection, kind: str,
               results: Mapping[str, SubscriptionResult],
               out: dict[str, SubscriptionResult]) -> list[str]:
        """Record what one connection answered; return the symbols refused for its limit
        (what a refusal teaches about the limit is the caller's to learn: it knows how
        many new symbols the request had)."""
        limited: list[str] = []
        for s, r in results.items():
            out[s] = r
            if r.status == SubscriptionStatus.LIMIT:
                limited.append(s)
                self.owner.pop((kind, s), None)
                continue
            if r.held:
                self.owner[(kind, s)] = conn.name
                if s in self.unplaced[kind]:
                    self.unplaced[kind] = self.unplaced[kind] - {s}
            else:
                self.owner.pop((kind, s), None)
                if r.status == SubscriptionStatus.REJECTED:
                    self.remember_unsupported(kind, s)
        if any(r.status == SubscriptionStatus.ACCEPTED for r in results.values()):
            conn.took_past(self.clock())
        return limited

    def learn(self, conn: KeyConnection, exact: bool) -> None:
        """See :meth:`KeyConnection.learn`."""
        conn.learn(exact, self.clock())

    async def place(self, kind: str, new: list[str], out: dict[str, SubscriptionResult],
                    exclude: KeyConnection | None = None, probe: bool = False) -> list[str]:
        """Place ``new`` symbols on the connections with room (see :meth:`offer`);
        return those that fit nowhere, in order. ``probe``: ignore learned limits (see
        :meth:`bridge.upstream.pool.UpstreamPool.pin`)."""
        for conn in self.usable(exclude, probe):
            if not new:
                break
            new = await self.offer(conn, kind, new, out, probe)
        return new

    async def offer(self, conn: KeyConnection, kind: str, symbols: list[str],
                    out: dict[str, SubscriptionResult], probe: bool) -> list[str]:
        """Ask one connection for as many of ``symbols`` as it takes; return the rest,
        in order.

        Within a known room (configured, or learned and not due a re-check) only what
        fits is asked. Past a learned limit (``probe``, or a re-check): first what the
        learned limit leaves, then one symbol (refused: the limit is confirmed at the
        cost of one request), then the rest (a refusal is split, see :meth:`split`)."""
        now = self.clock()
        room = conn.room(now, probe)
        over: list[str] = []
        if room is not None:
            symbols, over = symbols[:room], symbols[room:]
        learned = conn.learned_room() if probe or conn.doubtful(now) else None
        if learned is None or learned >= len(symbols):
            return await self.fill(conn, kind, symbols, out) + over
        head, tail = symbols[:learned], symbols[learned:]
        left = await self.fill(conn, kind, head, out)
        if left:
            return left + tail + over
        left = await self.fill(conn, kind, tail[:1], out)
        if left:
            return left + tail[1:] + over
        return await self.fill(conn, kind, tail[1:], out) + over

    async def fill(self, conn: KeyConnection, kind: str, symbols: list[str],
                   out: dict[str, SubscriptionResult], depth: int = 0) -> list[str]:
        """Subscribe ``symbols`` on ``conn``; a refusal for the limit is split (see
        :meth:`split`). Returns the symbols it did not take for its limit, in order."""
        if not symbols:
            return []
        limited = self.settle(conn, kind, await conn.source.subscribe(kind, symbols), out)
        return await self.split(conn, kind, limited, out, depth)

    async def split(self, conn: KeyConnection, kind: str, limited: list[str],
                    out: dict[str, SubscriptionResult], depth: int = 0) -> list[str]:
        """``limited`` were refused together for the key's limit. The upstream refuses a
        whole request that would pass it, so the key may still have room for part of
        it: ask for the first half, then (if it all fit) for the second, each refused
        half split again, down to one symbol (whose refusal is the exact limit) or
        ``max_split_depth()`` halvings. Once a part is refused, what follows it is not
        asked for. Each request waits for the key's pace like any live request.
        Returns the symbols the key did not take, in order."""
        if not limited:
            return []
        if len(limited) == 1 or depth >= self.max_split_depth():
            self.learn(conn, exact=len(limited) == 1)
            return limited
        half = (len(limited) + 1) // 2
        left = await self.fill(conn, kind, limited[:half], out, depth + 1)
        if left:
            return left + limited[half:]
        return await self.fill(conn, kind, limited[half:], out, depth + 1)


__all__ = ["Placer"]
