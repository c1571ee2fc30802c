"""The bars' clock: the task that makes bars final on time, and their wiring.

The builder (:mod:`bridge.pipeline.bars`) is pure; :class:`BarClock` owns it for a
running bridge. The dispatcher adds the price events to it (and the status events, for
upstream outages) on its path; the clock wakes when the next bar's ``end + grace_ms``
has passed on the wall clock (the clock of ``sentTimestampMs``), finalizes the bars that
are due, keeps each as the last bar of its (symbol, interval) in the last-value cache
(``/v1/snapshot?kind=bar``) and hands them to the intake like the status events, so they
are routed in order with everything else (``match: {kind: bar}``).

Shutdown: the clock stops first; bars not final yet are not published (they did not see
their whole interval, and a bridge that starts again must not publish a second, different
final bar of the same id: its first bar of each symbol is a gap instead). They are
counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

from bridge.config.schema_bars import BarsConfig
from bridge.core.envelope import DEFAULT_SOURCE, Event
from bridge.pipeline.bars import (
    CLOSE,
    FEED,
    INTERVAL,
    START,
    STRUCTURED,
    SYMBOL,
    BarBuilder,
    BarEvent,
    bar_key,
    final_body,
)
from bridge.pipeline.lastvalues import Entry, monotonic_ms

log = logging.getLogger("aleno_bridge.app")

#: the clock looks at least this often (a wall clock that jumps is followed)
MAX_SLEEP_S: Final = 1.0


class Cadence(Protocol):
    """What the hole threshold is made of (:class:`bridge.pipeline.market.MarketState`:
    a reload of ``source.update_interval_s`` / ``symbol_stale_after_s`` changes them)."""

    @property
    def gap_ms(self) -> float: ...
    @property
    def stale_after_s(self) -> float: ...


class BarCache(Protocol):
    """Where the last final bars are kept (:class:`bridge.pipeline.lastvalues.LastValues`)."""

    def put_bar_entry(self, key: str, entry: Entry) -> None: ...


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class BarClock:
    """Finalizes the bars of ``builder`` on time: each final bar goes to ``cache`` and
    then, all of one wake-up together, to ``emit`` (the intake)."""

    def __init__(self, builder: BarBuilder, emit: Callable[[list[Event]], None],
                 cache: BarCache, clock: Callable[[], int] = wall_ms) -> None:
        self.builder = builder
        self._emit = emit
        self._cache = cache
        self._clock = clock
        #: ``(feed, symbol, interval) ->`` whether a final bar of them goes anywhere
        #: (set by the dispatcher: a route selects it, or a tap watches); one that goes
        #: nowhere is only cached, never made an event. ``None``: emit every bar.
        self.routed: Callable[[str, str, str], bool] | None = None
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, config: BarsConfig, cadence: Cadence, emit: Callable[[list[Event]], None],
           cache: BarCache, source: str = DEFAULT_SOURCE,
           clock: Callable[[], int] = wall_ms) -> BarClock:
        """The clock of the ``bars`` section, its hole threshold read from ``cadence``."""
        builder = BarBuilder(
            config.lengths(), grace_ms=config.grace_ms, now_ms=clock(),
            hole_ms=lambda: min(cadence.gap_ms, cadence.stale_after_s * 1000.0),
            kinds=config.kinds, symbols=config.symbols, partial=config.partial,
            source=source)
        return cls(builder, emit, cache, clock)

    def tick(self) -> list[BarEvent]:
        """Finalize what is due now; cache them and emit those that go somewhere
        (:attr:`routed`). Returns the final bar events emitted."""
        now_ms = self._clock()
        done = self.builder.close_bars(now_ms)
        events: list[BarEvent] = []
        if done:
            now = monotonic_ms()
            put = self._cache.put_bar_entry
            routed = self.routed
            source = self.builder.source
            for bar in done:
                symbol, interval = bar[SYMBOL], bar[INTERVAL]
                if routed is None or routed(bar[FEED], symbol, interval):
                    # encoded once, for the cache and (the same bytes) the sinks
                    ev = BarEvent(bar, True, now_ms, source)
                    body = ev.encoded(STRUCTURED).body
                    events.append(ev)
                else:  # only cached: the same bytes, without making the event
                    body = final_body(bar, source)
                put(bar_key(symbol, interval), (body, bar[START], now, bar[CLOSE]))
            if events:
                self._emit([*events])
        return events

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # the clock must outlive a bug in one tick
                log.exception("bars: finalizing failed")
            delay = (self.builder.due_ms() - self._clock()) / 1000.0
            await asyncio.sleep(min(MAX_SLEEP_S, max(0.001, delay)))

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="bar-clock")

    async def stop(self) -> None:
        """Stop finalizing; the bars still open are counted and dropped (see the module)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self.builder.open_bars()
        if left:
            log.info("bars: %d bar(s) not final at shutdown were not published", left,
                     extra={"bars_open": left})


__all__ = ["MAX_SLEEP_S", "BarCache", "BarClock", "Cadence", "wall_ms"]
