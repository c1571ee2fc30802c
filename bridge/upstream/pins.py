"""The configured (pinned) symbols of :class:`~bridge.upstream.subscriptions.Subscriptions`:
what a change of them did (:class:`PinDiff`), when those not held are tried again
(:class:`RetrySchedule`), and the room they reserve from the leases."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from bridge.core.kinds import PRICE_KINDS
from bridge.upstream.protocol import LIMIT_MARK, Placement, SubscriptionResult


@dataclass(frozen=True, slots=True)
class PinDiff:
    """What :meth:`Subscriptions.set_pinned` (or a retry of the unplaced pinned symbols)
    changed, per kind and symbol."""

    added: Mapping[str, Mapping[str, SubscriptionResult]]
    removed: Mapping[str, Mapping[str, SubscriptionResult]]
    #: symbols held for leases (or in grace) unsubscribed to make room for pinned ones
    evicted: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(self.added.values()) and not any(self.removed.values())


class RetrySchedule:
    """When the pinned symbols not held are tried again: ``initial_s`` after a refusal,
    doubling up to ``max_s``, back to the start when one is placed; sooner (but not more
    often than every ``initial_s``) once room was freed."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)
        self.delay = initial_s
        #: when the unplaced pinned symbols are tried again (``None``: nothing to retry)
        self.at: float | None = None
        self.last: float | None = None
        #: room was freed (grace ended, unpinned) since the last retry
        self.room_freed = False

    def clear(self) -> None:
        """Nothing waits: back to the start."""
        self.delay = self.initial_s
        self.at = None

    def due(self, now: float) -> bool:
        return self.at is None or now >= self.at or (
            self.room_freed and (self.last is None or now - self.last >= self.initial_s))

    def tried(self, now: float) -> None:
        """A retry begins now."""
        self.room_freed = False
        self.last = now

    def after(self, now: float, *, waiting: bool, tried: bool, placed: bool) -> None:
        """Schedule the next retry after a change of the pinned symbols (``tried``: some
        were asked for; ``placed``: some were placed); ``waiting``: some are not held."""
        if not waiting:
            self.clear()
        elif tried:
            if placed:
                self.delay = self.initial_s
            self.at = now + self.delay
            if not placed:
                self.delay = min(self.delay * 2, self.max_s)
        elif self.at is None:
            self.at = now + self.delay


def pinned_reserve(pinned: Mapping[str, Set[str]], held: Mapping[str, Set[str]],
                   unsupported: Set[tuple[str, str]]) -> int:
    """Pinned symbols not held that will need room (not those rejected)."""
    out = 0
    for kind in PRICE_KINDS:
        missing = pinned[kind] - held[kind]
        out += len(missing) - sum(1 for s in missing if (kind, s) in unsupported)
    return out


def lease_room(placement: Placement | None, pinned: Mapping[str, Set[str]],
               held: Mapping[str, Set[str]], unsupported: Set[tuple[str, str]]) -> int | None:
    """New symbols leases may still take: what the keys hold, less every pinned
    symbol (placed or not) and what is held for leases or in grace; ``None``:
    unknown (the upstream's limit error will say). While the capacity is unknown
    (a learned limit being re-checked) and pinned symbols wait for room, none:
    whatever room there is, is theirs first."""
    if placement is None:
        return None
    reserve = pinned_reserve(pinned, held, unsupported)
    capacity = placement.capacity()
    if capacity is None:
        return 0 if reserve else None
    return capacity - sum(map(len, held.values())) - reserve


def room_error(placement: Placement | None, pinned: Mapping[str, Set[str]],
               held: Mapping[str, Set[str]], unsupported: Set[tuple[str, str]]) -> str:
    """The error of a leased symbol refused for want of the room the pinned ones leave."""
    capacity = placement.capacity() if placement is not None else None
    npinned = sum(map(len, pinned.values()))
    leased = sum(len(held[k] - pinned[k]) for k in PRICE_KINDS)
    keys = "an API key's limit is being learned or re-checked" if capacity is None \
        else f"{capacity} subscription(s) across the API keys"
    waiting = pinned_reserve(pinned, held, unsupported)
    return (f"{LIMIT_MARK}: the capacity left after the configured symbols is used up "
            f"({keys}, {npinned} configured, {waiting} of them waiting for room, "
            f"{leased} held for leases)")


__all__ = ["PinDiff", "RetrySchedule", "lease_room", "pinned_reserve", "room_error"]
