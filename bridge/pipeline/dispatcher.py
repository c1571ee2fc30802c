"""The dispatcher: the one task that routes the intake to the sink workers.

A batch of the intake (:mod:`bridge.pipeline.intake`) is validated, encoded and
routed in chunks of :data:`~bridge.sinks.worker.DISPATCH_CHUNK` records: normalize ->
market (the last values and the status events they cause) -> bars (with a ``bars``
section: :mod:`bridge.pipeline.barclock`) -> taps -> router ->
:meth:`~bridge.sinks.worker.SinkWorker.offer`. Before each chunk the dispatcher waits
while every connected non-``block`` sink is saturated, and after each it yields to the
event loop, so the sink workers and the Socket.IO reader keep their share of the CPU
(see "Overload" in ``docs/operations.md``). A ``block`` sink makes it wait on the
offer itself.

The routing state (the workers and the router) is swapped whole by a reload
(:meth:`Dispatcher.use`); the router is read once per chunk, so a reload takes effect
between two chunks, never in the middle of an event's targets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Final

from bridge.core.envelope import Event
from bridge.core.kinds import PRICE_KINDS
from bridge.pipeline.barclock import BarClock
from bridge.pipeline.drain import Deadline
from bridge.pipeline.intake import Intake
from bridge.pipeline.market import STATUS_KIND, MarketState
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks.worker import DISPATCH_CHUNK, SinkWorker

#: the longest the dispatcher waits for a saturated sink before it looks again
ROOM_POLL_S: Final = 0.05

#: sees every event before it is routed (``aleno-bridge tap``, tests)
Tap = Callable[[Event], None]


class Dispatcher:
    """Routes the batches of ``intake`` to ``workers`` through ``router``.

    ``wanted`` gives the subscribed symbols by kind (``None``: no source, take all):
    records of a symbol no longer subscribed are dropped by the normalizer. ``bars``:
    the OHLC bars' clock, fed on the path and run beside it (``None``: no bars).
    """

    def __init__(self, intake: Intake, normalizer: Normalizer, market: MarketState,
                 workers: dict[str, SinkWorker], router: Router,
                 wanted: Callable[[], Mapping[str, frozenset[str]] | None],
                 bars: BarClock | None = None) -> None:
        self.bars = bars
        self.intake = intake
        self.normalizer = normalizer
        self.market = market
        self._wanted = wanted
        self.workers = workers
        self.router = router
        #: the sinks whose fullness holds the dispatcher back (not ``block``: those
        #: make it wait already)
        self._elastic = [w for w in workers.values() if w.policy != "block"]
        self.taps: list[Tap] = []
        self.task: asyncio.Task[None] | None = None
        if bars is not None:
            bars.routed = self.bar_routed

    def use(self, workers: dict[str, SinkWorker], router: Router) -> None:
        """Route to ``workers`` through ``router`` from the next chunk on (a reload)."""
        self.workers = workers
        self._elastic = [w for w in workers.values() if w.policy != "block"]
        self.router = router

    def bar_routed(self, feed: str, symbol: str, interval: str) -> bool:
        """Whether the final bars of (feed, symbol, interval) go anywhere (a route of
        the router now selects them, or a tap watches): the bars' clock makes events
        only of those; the others are only cached, and counted as unrouted here as the
        router would have counted them."""
        if self.taps or self.router.bar_hits(feed, symbol, interval):
            return True
        self.router.unrouted += 1
        return False

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="dispatcher")
        if self.bars is not None:
            self.bars.start()

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def saturated(self) -> SinkWorker | None:
        """A sink the dispatcher waits for: when every connected non-``block`` sink is
        :attr:`~bridge.sinks.worker.SinkWorker.saturated`, routing more would only make them
        drop what they hold (``buffer_full``), after paying for its validation and
        encoding. One sink with room (or none connected) lets the dispatcher go on."""
        found = None
        for w in self._elastic:
            if w.connected:
                if not w.saturated:
                    return None
                found = w
        return found

    async def run(self) -> None:
        """Route the intake in order until :meth:`stop` closes it; what is left then
        (or when this task is cancelled) is counted as dropped (``shutdown``).

        Meanwhile newer payloads queue up in the intake, where the oldest are shed
        whole when it is full (:meth:`~bridge.pipeline.intake.Intake.admit`).
        """
        intake = self.intake
        batches = intake.batches
        drop = intake.drop
        observe = self.market.observe
        bars = self.bars.builder if self.bars is not None else None
        while True:
            if not batches:
                intake.idle.set()
                if intake.overloaded_since is not None:
                    intake.check_recovered()
                if intake.closing:
                    return
                intake.ready.clear()
                await intake.ready.wait()
                continue
            if intake.closing:
                intake.discard()
                return
            batch = batches.popleft()
            size = batch.size
            intake.queued_events -= size
            done = 0  # records of the batch validated (and routed, or being routed)
            routed_all = True
            try:
                while done < size:
                    while (full := self.saturated()) is not None and not intake.closing:
                        await full.wait_room(ROOM_POLL_S)
                    if intake.closing:
                        routed_all = False
                        break
                    end = min(size, done + DISPATCH_CHUNK)
                    if batch.records is not None:
                        wanted = self._wanted()
                        events = self.normalizer.validate(
                            batch.kind, batch.records[done:end], batch.received_ms,
                            wanted[batch.kind] if wanted else None)
                    else:
                        assert batch.events is not None
                        events = batch.events[done:end]
                    chunk = end - done
                    done = end
                    if batch.kind in PRICE_KINDS:
                        # the last values, and the status events they cause (fresh, gap)
                        statuses = observe(batch.kind, events)
                        if bars is not None:
                            partial = bars.add(batch.kind, events)
                            if partial:
                                events = events + partial
                        if statuses:
                            events = events + statuses
                    elif bars is not None and batch.kind == STATUS_KIND:
                        bars.statuses(events)  # an upstream outage is a hole
                    for tap in self.taps:
                        for ev in events:
                            tap(ev)
                    routed = 0
                    # read per chunk: a reload swaps the router between two chunks
                    dispatch = self.router.dispatch
                    try:
                        for ev in events:
                            waiters = dispatch(ev)
                            routed += 1
                            if waiters:
                                for waiter in waiters:
                                    await waiter
                                if intake.closing:
                                    break
                    except asyncio.CancelledError:
                        # the event being offered may not have reached every sink
                        routed -= 1
                        raise
                    finally:
                        intake.events -= chunk
                        if routed < len(events):
                            drop("shutdown", len(events) - routed)
                            routed_all = False
                    if not routed_all:
                        break
                    await asyncio.sleep(0)  # the sinks and the reader get their turn
            finally:
                rest = size - done
                if rest:
                    intake.events -= rest
                    drop("shutdown", rest)

    async def stop(self, deadline: Deadline) -> None:
        """Route what the intake holds until the drain's deadline, then close it: what
        it still holds is counted, offers still waiting on a ``block`` sink are
        released (each sink counts them), and the dispatcher ends (cancelled if it
        does not end in time)."""
        if self.bars is not None:
            await self.bars.stop()  # nothing becomes final during the drain
        task = self.task
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.intake.flush(), deadline.left())
        # from here on nothing new is routed: what the intake still holds is counted,
        # offers still waiting on a ``block`` sink are released and counted by it
        self.intake.close()
        for w in self.workers.values():
            w.begin_stop()
        if task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task),
                                       min(0.5, max(0.01, deadline.left(deadline.end))))
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 0.1)
        self.intake.discard()  # ingested after the dispatcher ended, if anything
