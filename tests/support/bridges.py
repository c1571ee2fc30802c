"""In-process bridges for integration tests: a real source, a memory sink, one fixture."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Settings
from bridge.source import AlenoSource
from bridge.testing import MemorySink


class Running:
    """A bridge running as a task, with the memory sink that receives its messages."""

    def __init__(self, bridge: Bridge, sink: MemorySink, task: asyncio.Task[Any],
                 stop: asyncio.Event) -> None:
        self.bridge, self.sink, self.task, self.stop = bridge, sink, task, stop

    @property
    def source(self) -> AlenoSource:
        assert self.bridge.source is not None
        return self.bridge.source

    async def until(self, cond: Callable[[], bool], timeout: float = 10.0) -> float:
        """Wait until ``cond()`` holds; fail if the bridge ended or time ran out."""
        start = time.monotonic()
        while not cond():
            if self.task.done():
                self.task.result()
            assert time.monotonic() - start < timeout, "condition not met in time"
            await asyncio.sleep(0.02)
        return time.monotonic() - start


@pytest.fixture
async def run_bridge() -> AsyncIterator[Callable[[Settings], Running]]:
    """Start bridges whose sink ``mem`` is a :class:`MemorySink`; all stopped at the end."""
    started: list[Running] = []

    def start(s: Settings) -> Running:
        sink = MemorySink("mem")
        bridge = Bridge(s, sinks={"mem": sink})
        stop = asyncio.Event()
        r = Running(bridge, sink, asyncio.create_task(bridge.run(stop)), stop)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop.set()
        await asyncio.wait_for(asyncio.gather(r.task, return_exceptions=True), 20)
