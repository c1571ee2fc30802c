"""What is known of each API key's subscription limit (see :mod:`bridge.upstream.pool`):
the configured ``limit``, or the one learned from the upstream's refusals, re-checked
since the upstream counts every connection of the key, other processes' too; and the
first fit of the configured symbols within the configured limits before connecting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final

from bridge.config.schema import UpstreamKey
from bridge.core.kinds import PRICE_KINDS
from bridge.upstream.client import AlenoSource
from bridge.upstream.protocol import SourceError, normalize_symbols

log = logging.getLogger("aleno_bridge.upstream")

#: how long a learned limit stands before the key may be asked past it again (seconds):
#: the upstream counts every connection of the key, other processes' too
RECHECK_S: Final = 300.0


class KeyConnection:
    """One key's connection in a pool and what is known of the key's limit."""

    def __init__(self, key: UpstreamKey, source: AlenoSource) -> None:
        self.name = key.name
        self.source = source
        #: the operator's ``limit`` (kept), and the one in force (maybe learned lower)
        self.configured = key.limit
        self.limit = key.limit
        self.learned = False
        #: the learned limit may be too low (room was freed on the key since): the next
        #: request may go past it
        self.recheck = False
        #: when the learned limit was last confirmed (the pool's clock), and the source's
        #: connection count then: a reconnect makes it due a re-check
        self.checked_at = 0.0
        self.checked_connects = 0
        self.failed: str | None = None
        self.error: SourceError | None = None

    def doubtful(self, now: float) -> bool:
        """A learned limit due a re-check: room was freed on the key (an unsubscribe),
        the connection was re-established, or it was confirmed :data:`RECHECK_S` ago."""
        return self.learned and (self.recheck or now - self.checked_at >= RECHECK_S
                                 or self.source.stats.connects != self.checked_connects)

    def confirm(self, now: float) -> None:
        """The learned limit was just confirmed by the upstream."""
        self.recheck = False
        self.checked_at = now
        self.checked_connects = self.source.stats.connects

    def room(self, now: float, probe: bool = False) -> int | None:
        """Symbols it may still take; ``None``: unknown (ask the upstream). ``probe``
        ignores a learned limit (only the configured one holds), and so does a learned
        limit due a re-check."""
        limit = self.configured if probe or self.doubtful(now) else self.limit
        if limit is None:
            return None
        return max(0, limit - self.source.desired_count())

    def learned_room(self) -> int | None:
        """What the learned limit leaves (``None``: no limit learned)."""
        if not self.learned or self.limit is None:
            return None
        return max(0, self.limit - self.source.desired_count())

    def took_past(self, now: float) -> None:
        """A request was accepted: if the key now holds more than its learned limit,
        the room it lacked then was freed since (by us, or by another process on the
        same key): the larger limit is learned."""
        if not self.learned or self.limit is None:
            return
        count = self.source.upstream_count()
        if count > self.limit:
            log.info("connection %s holds %d symbol(s), past its learned limit of %d: "
                     "the limit was raised", self.name, count, self.limit,
                     extra={"connection": self.name})
            self.limit = count
            if self.configured is not None and count >= self.configured:
                self.limit, self.learned = self.configured, False
            self.confirm(now)

    def learn(self, exact: bool, now: float) -> None:
        """A request was refused for the key's limit while it held
        :meth:`~bridge.upstream.client.AlenoSource.upstream_count` symbols (every kind, with what
        it accepted so far). ``exact``: the request had one new symbol, so the limit
        is that count. Otherwise the count is only a lower bound: a limit in force that
        is not below it stands (due a re-check), none is ever learned below it."""
        count = self.source.upstream_count()
        if self.configured is not None and count >= self.configured:
            self.limit, self.learned = self.configured, False
            return
        if not exact and self.limit is not None and self.limit >= count:
            self.recheck = self.learned
            return
        if self.limit != count or not self.learned:
            if self.configured is not None:
                log.warning("the upstream refused a subscription of connection %s at %d "
                            "symbol(s), below its configured limit of %d; using %d",
                            self.name, count, self.configured, count,
                            extra={"connection": self.name})
            else:
                log.info("connection %s: the upstream's limit is %d symbol(s) (learned from "
                         "its limit error%s)", self.name, count,
                         "" if exact else "; a lower bound", extra={"connection": self.name})
        self.limit = count
        self.learned = True
        if exact:
            self.confirm(now)
        else:
            self.recheck = True


def pack(keys: Sequence[UpstreamKey], symbols: Mapping[str, Sequence[str]],
         ) -> tuple[list[dict[str, list[str]]], dict[str, list[str]]]:
    """First fit of the configured symbols within the configured limits, tickers then
    equities, a key's room counting both (so the equities take what the tickers left); a
    key without a limit takes every symbol that reaches it (its limit is learned from the
    upstream's refusals). Returns each key's symbols and those that fit nowhere."""
    out: list[dict[str, list[str]]] = [{k: [] for k in PRICE_KINDS} for _ in keys]
    used = [0] * len(keys)
    unplaced: dict[str, list[str]] = {k: [] for k in PRICE_KINDS}
    for kind in PRICE_KINDS:
        for s in normalize_symbols(symbols.get(kind, ())):
            for i, key in enumerate(keys):
                if key.limit is None or used[i] < key.limit:
                    out[i][kind].append(s)
                    used[i] += 1
                    break
            else:
                unplaced[kind].append(s)
    return out, unplaced


__all__ = ["RECHECK_S", "KeyConnection", "pack"]
