"""A driver's bugs and non-connection failures never lose data (real runner, real NATS).

The sink is the built-in NATS driver with one unmapped failure added, run by the
core's :class:`~bridge.sinks.worker.SinkWorker`; what arrived is read by an independent
nats-py subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from aleno_bridge_plugins.nats import NatsOptions, NatsSink

from bridge.config import SinkCommon, SinkSpec
from bridge.core.state import SinkState
from bridge.sinks import Message, SinkRetryError
from bridge.sinks.worker import SinkWorker
from bridge.testing.conformance import unique_topic
from bridge.testing.sample import messages, sample_events
from bridge.testing.wait import until
from tests.drivers.nats.test_nats import CoreProbe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class InternalClientError(Exception):
    """What a client library raises after a server-side session kill: a type the
    driver never mapped to a SinkError."""


class KilledSession(NatsSink):
    """Every third publish delivers half the batch, then fails with an exception
    type the driver does not map (a bug in its error mapping)."""

    def __init__(self, name: str, options: NatsOptions) -> None:
        super().__init__(name, options)
        self.calls = 0

    async def publish(self, batch: Sequence[Message]) -> None:
        self.calls += 1
        if self.calls % 3 == 0 and batch:
            await super().publish(batch[: len(batch) // 2])
            msg = "cannot switch to state 15; another operation is in progress"
            raise InternalClientError(msg)
        await super().publish(batch)


class RevokedWrite(NatsSink):
    """While :attr:`revoked`, every publish fails with :class:`SinkRetryError`: the
    destination refuses writes for now (a revoked privilege), the link is fine."""

    revoked = False

    def __init__(self, name: str, options: NatsOptions) -> None:
        super().__init__(name, options)
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        await super().connect()

    async def publish(self, batch: Sequence[Message]) -> None:
        if self.revoked:
            raise SinkRetryError(self.name, f"INSERT on {batch[0].topic} not allowed")
        await super().publish(batch)


def worker_for(sink: NatsSink, **common: Any) -> SinkWorker:
    spec = SinkCommon.model_validate({
        "driver": "nats", "batch": {"max_events": 10, "linger_ms": 0},
        "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0,
                  "publish_timeout_s": 5.0, "connect_timeout_s": 5.0},
        **common,
    })
    return SinkWorker(SinkSpec(sink.name, spec, NatsSink, sink.options), sink)


@pytest.fixture
async def probe(nats_url: str) -> AsyncIterator[CoreProbe]:
    p = CoreProbe(nats_url)
    yield p
    await p.close()


def options(url: str) -> NatsOptions:
    return NatsOptions.model_validate({"servers": url, "connect_timeout_s": 2.0,
                                       "flush_timeout_s": 3.0})


async def test_an_unmapped_exception_loses_nothing_under_block(
    nats_url: str, probe: CoreProbe, caplog: pytest.LogCaptureFixture,
) -> None:
    topic = unique_topic()
    await probe.subscribe(topic)
    sink = KilledSession("pg-like", options(nats_url))
    worker = worker_for(sink, buffer={"max_events": 50, "when_full": "block"})
    caplog.set_level(logging.INFO, "aleno_bridge.runner")
    batch = messages(sample_events(symbols=5, updates=60), topic)
    worker.start()
    try:
        for m in batch:  # under ``block`` an offer waits for room: nothing is shed
            waiting = worker.offer(m)
            if waiting is not None:
                await asyncio.wait_for(waiting, 30)
        await until(lambda: worker.stats.published == len(batch), 60, "every event published",
                    detail=lambda: f"{worker.stats.published} of {len(batch)}")
        missing = {m.id for m in batch}
        deadline = time.monotonic() + 10
        while missing and time.monotonic() < deadline:
            got = await probe.received(len(batch), 0.5)
            missing -= {r.envelope()["id"] for r in got}
    finally:
        await worker.stop(5.0)
    assert not missing, f"{len(missing)} event(s) lost: {sorted(missing)[:3]}"
    stats = worker.stats
    assert stats.dropped == {}, stats.dropped
    bugs = stats.driver_errors.get("InternalClientError", 0)
    assert bugs >= len(batch) // 10 // 3 - 1 and set(stats.driver_errors) == {
        "InternalClientError"}
    traces = [r for r in caplog.records
              if r.exc_info is not None and "bug in the driver" in r.getMessage()]
    assert len(traces) == 1, f"{len(traces)} tracebacks for {bugs} failures of one type"
    assert isinstance(traces[0].exc_info[1], InternalClientError)  # type: ignore[index]
    assert stats.reconnects >= bugs, "a driver error makes the connection suspect"


async def test_a_retry_error_keeps_the_connection_and_logs_one_state_change(
    nats_url: str, probe: CoreProbe, caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes refused for 15 s: one connect, one ``failing`` line, then delivered."""
    topic = unique_topic()
    await probe.subscribe(topic)
    sink = RevokedWrite("table", options(nats_url))
    worker = worker_for(sink)
    caplog.set_level(logging.INFO, "aleno_bridge.runner")
    batch = messages(sample_events(symbols=2, updates=5), topic)
    worker.start()
    try:
        worker.offer(batch[0])
        await until(lambda: worker.stats.published == 1, 10, "published before the refusal")
        sink.revoked = True
        for m in batch[1:]:
            worker.offer(m)
        await until(lambda: worker.stats.failed_batches >= 1, 10, "the refusal seen")
        start = time.monotonic()
        await asyncio.sleep(15)
        failures = worker.stats.failed_batches
        snap = worker.snapshot()
        sink.revoked = False
        await until(lambda: worker.stats.published == len(batch), 10, "published after it",
                    detail=lambda: f"{worker.stats.published} of {len(batch)}")
        took = time.monotonic() - start
        got = await probe.received(len(batch), 10)
    finally:
        await worker.stop(5.0)
    assert snap.state == SinkState.FAILING and not snap.ready
    assert (snap.last_error or "").startswith("SinkRetryError")
    assert failures >= 10, f"only {failures} attempts in {took:.0f}s"
    assert sink.connects == 1 and worker.stats.reconnects == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "aleno_bridge.runner"]
    assert len([ln for ln in lines if "is failing" in ln]) == 1, lines
    assert len([ln for ln in lines if "is connected" in ln]) == 2, lines  # start, recovery
    assert {r.envelope()["id"] for r in got} == {m.id for m in batch}
    assert worker.stats.dropped == {}
