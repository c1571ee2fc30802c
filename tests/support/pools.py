"""An ``UpstreamPool`` and its ``Subscriptions`` driven directly, as a bridge builds them,
for the tests of the symbol set against the real simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from bridge.config.schema import LeaseConfig, SourceConfig
from bridge.testing import wait_until
from bridge.upstream.pool import UpstreamKey, UpstreamPool
from bridge.upstream.subscriptions import Subscriptions


class Records:
    """(kind, symbol) -> when a record of it last reached ``on_payload``."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def __call__(self, event: str, payload: Any) -> None:
        kind = "ticker" if event == "new_token_states" else "equity"
        now = time.monotonic()
        for rec in payload if isinstance(payload, list) else []:
            if isinstance(rec, dict):
                self.last[(kind, str(rec.get("id") if kind == "ticker" else rec.get("symbol")))] \
                    = now

    def since(self, t: float) -> set[tuple[str, str]]:
        return {k for k, at in self.last.items() if at >= t}


class PoolBridge:
    """One bridge as the symbol set sees it: a pool over its keys, its subscriptions
    (pinned: the configured symbols, as the app builds them), with a short retry
    schedule and expiry loop."""

    def __init__(self, cfg: SourceConfig, keys: Sequence[UpstreamKey], leases: LeaseConfig,
                 *, retry_initial_s: float, retry_max_s: float,
                 run_interval_s: float = 0.05) -> None:
        self.cfg = cfg
        self.records = Records()
        self.pool = UpstreamPool(cfg, keys, self.records)
        self.subs = Subscriptions(self.pool, leases,
                                  pinned={k: sorted(v) for k, v in self.pool.wanted.items()},
                                  retry_initial_s=retry_initial_s, retry_max_s=retry_max_s)
        self.run_interval_s = run_interval_s
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.pool.run()),
                      asyncio.create_task(self.subs.run(self.stop, self.run_interval_s))]

    async def live(self) -> None:
        await wait_until(lambda: all(s.live for s in self.pool.sources)
                         and self.pool.pending_moves == 0,
                         self.cfg.connect_timeout_s + self.cfg.backoff.max_s, "subscribed")

    def limits(self) -> dict[str, tuple[int | None, bool]]:
        return {c.name: (c.limit, c.limit_learned) for c in self.pool.connection_snapshots()}

    async def close(self) -> None:
        self.stop.set()
        self.pool.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 10)


StartPool = Callable[..., PoolBridge]


def pool_starter(retry_initial_s: float, retry_max_s: float, run_interval_s: float = 0.05,
                 leases: LeaseConfig | None = None) -> Callable[[], AsyncIterator[StartPool]]:
    """A fixture that starts :class:`PoolBridge` objects and closes every one at the end;
    ``leases``: the lease settings of a start that names none."""
    default_leases = leases

    async def fixture() -> AsyncIterator[StartPool]:
        running: list[PoolBridge] = []

        def start(cfg: SourceConfig, keys: UpstreamKey | Sequence[UpstreamKey],
                  leases: LeaseConfig | None = None) -> PoolBridge:
            listed = [keys] if isinstance(keys, UpstreamKey) else list(keys)
            chosen = leases or default_leases or LeaseConfig()
            bridge = PoolBridge(cfg, listed, chosen, retry_initial_s=retry_initial_s,
                                retry_max_s=retry_max_s, run_interval_s=run_interval_s)
            bridge.start()
            running.append(bridge)
            return bridge

        yield start
        for bridge in running:
            await bridge.close()

    return pytest.fixture(fixture)


__all__ = ["PoolBridge", "Records", "StartPool", "pool_starter"]
