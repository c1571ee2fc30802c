"""Snapshots of the upstream for operator code (metrics, ``/readyz``): one connection's
from its counters, and several connections' merged into one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Final

from bridge.core.kinds import PRICE_KINDS
from bridge.core.state import (
    ConnectionSnapshot,
    SubscriptionsSnapshot,
    UpstreamSnapshot,
    UpstreamState,
    frozen_counts,
)
from bridge.upstream.leases import LeaseTable
from bridge.upstream.protocol import SourceStats

#: worst first: the aggregate state of the connections that carry symbols
STATE_ORDER: Final = (UpstreamState.REFUSED, UpstreamState.DISCONNECTED,
                      UpstreamState.CONNECTING, UpstreamState.IDLE, UpstreamState.CONNECTED,
                      UpstreamState.SUBSCRIBED, UpstreamState.STOPPED)


def source_snapshot(st: SourceStats, flowing: bool, seconds_since_update: float | None,
                    stale_after_s: float) -> UpstreamSnapshot:
    """One connection and its subscriptions now."""
    return UpstreamSnapshot(
        state=st.state,
        flowing=flowing,
        seconds_since_update=seconds_since_update,
        stale_after_s=stale_after_s,
        connects=st.connects,
        reconnects=st.reconnects,
        connect_failures=st.connect_failures,
        watchdog_restarts=st.watchdog_restarts,
        acks=frozen_counts(st.acks),
        rejected_symbols=len(st.rejected_symbols),
        subscriptions=frozen_counts({k: len(v) for k, v in st.subscribed.items()}),
        last_error=st.last_error,
    )


def merge_snapshots(snaps: Sequence[ConnectionSnapshot],
                    stale_after_s: float) -> UpstreamSnapshot:
    """Several connections as one :class:`UpstreamSnapshot`: the worst state and the
    oldest update among the connections that carry symbols (ready only when each of
    them is), counters summed, the first connection's error named."""
    carrying = [s for s in snaps if s.symbols > 0] or list(snaps)
    ups = [s.upstream for s in carrying]
    state = min((u.state for u in ups), key=STATE_ORDER.index)
    if any(s.failed for s in carrying):
        state = UpstreamState.REFUSED if state != UpstreamState.STOPPED else state
    ages = [u.seconds_since_update for u in ups]
    acks: dict[str, int] = {}
    subs: dict[str, int] = {}
    for s in snaps:
        for k, v in s.upstream.acks.items():
            acks[k] = acks.get(k, 0) + v
        for k, v in s.upstream.subscriptions.items():
            subs[k] = subs.get(k, 0) + v
    error = next((f"{s.name}: {s.failed or s.upstream.last_error}" for s in snaps
                  if s.failed or s.upstream.last_error), None)
    return UpstreamSnapshot(
        state=state,
        flowing=all(u.flowing for u in ups),
        seconds_since_update=None if any(a is None for a in ages)
        else max(a for a in ages if a is not None),
        stale_after_s=stale_after_s,
        connects=sum(s.upstream.connects for s in snaps),
        reconnects=sum(s.upstream.reconnects for s in snaps),
        connect_failures=sum(s.upstream.connect_failures for s in snaps),
        watchdog_restarts=sum(s.upstream.watchdog_restarts for s in snaps),
        acks=frozen_counts(acks),
        rejected_symbols=sum(s.upstream.rejected_symbols for s in snaps),
        subscriptions=frozen_counts(subs),
        last_error=error,
    )


def subscriptions_snapshot(table: LeaseTable, pinned: Mapping[str, Set[str]],
                           held: Mapping[str, Set[str]], evicted: int,
                           waiting: Mapping[str, list[str]]) -> SubscriptionsSnapshot:
    """The desired symbol set now: the leases of ``table``, the ``pinned`` symbols and
    those ``held``, ``evicted`` so far, and the pinned ones ``waiting`` for room."""
    return SubscriptionsSnapshot(
        leases=len(table.leases), leased=len(table.holders),
        pinned=sum(map(len, pinned.values())), in_grace=len(table.grace),
        held=sum(map(len, held.values())),
        unplaced_pinned=sum(len(pinned[k] - held[k]) for k in PRICE_KINDS),
        evicted=evicted,
        unplaced_by_kind={k: len(v) for k, v in waiting.items()},
        unplaced_sample=tuple(f"{k}:{s}" for k in PRICE_KINDS for s in waiting[k][:5])[:5])


__all__ = ["STATE_ORDER", "merge_snapshots", "source_snapshot", "subscriptions_snapshot"]
