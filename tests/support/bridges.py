"""In-process bridges for integration tests: a real source, a memory sink, one fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bridge.app import Bridge
from bridge.config import Settings
from bridge.testing import MemorySink, wait_until
from bridge.upstream.client import AlenoSource


def config_text(sim_url: str, sinks: str, routes: str, tickers: str = "[BTC/USD, ETH/USD]",
                equities: str = "[AAPL]") -> str:
    """A configuration file's text: the simulator at ``sim_url``, these sinks and routes
    (YAML lines, indented by the caller), no HTTP, a short shutdown."""
    return f"""
source:
  url: {sim_url}
  api_key: test-key
  tickers: {tickers}
  equities: {equities}
sinks:
{sinks}
routes:
{routes}
http: {{enabled: false}}
shutdown_timeout_s: 5
"""


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
        return await wait_until(cond, timeout, task=self.task)


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
