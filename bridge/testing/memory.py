"""An in-memory sink driver for unit tests of the core (never for what a real bus
delivers). Every failure mode of a real bus can be switched on and off."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pydantic import Field

from bridge.sinks import Message, Sink, SinkOptions


class MemoryOptions(SinkOptions):
    latency_ms: float = Field(0.0, ge=0)


class MemorySink(Sink[MemoryOptions]):
    """Keeps what it receives in :attr:`received`.

    Knobs: :attr:`down` makes ``connect`` and ``publish`` raise ``ConnectionError``;
    :meth:`fail_next` makes the next ``n`` publishes raise ``exc``; :meth:`hold`
    makes ``publish`` wait until :meth:`release` (a slow or hung bus).
    """

    options_model = MemoryOptions

    def __init__(self, name: str = "memory", options: MemoryOptions | None = None) -> None:
        super().__init__(name, options or MemoryOptions())
        self.received: list[Message] = []
        self.batches: list[int] = []
        self.connected = False
        self.down = False
        self.connects = 0
        self.closes = 0
        self._fail: list[BaseException] = []
        self._open = asyncio.Event()
        self._open.set()

    def fail_next(self, n: int = 1, exc: BaseException | None = None) -> None:
        self._fail += [exc or ConnectionError("injected failure")] * n

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def connect(self) -> None:
        if self.down:
            msg = f"sink {self.name!r}: bus is down"
            raise ConnectionError(msg)
        self.connected = True
        self.connects += 1

    async def publish(self, batch: Sequence[Message]) -> None:
        await self._open.wait()
        if self.down or not self.connected:
            msg = f"sink {self.name!r}: not connected"
            raise ConnectionError(msg)
        if self._fail:
            raise self._fail.pop(0)
        if self.options.latency_ms:
            await asyncio.sleep(self.options.latency_ms / 1000)
        self.received.extend(batch)
        self.batches.append(len(batch))

    async def close(self) -> None:
        self.connected = False
        self.closes += 1
