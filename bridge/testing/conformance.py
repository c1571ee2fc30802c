"""The reusable conformance suite for sink drivers (pytest + pytest-asyncio).

A driver author subclasses :class:`SinkConformance` in a test module, names the
driver, and provides two fixtures: ``options`` (a dict of the driver's options that
reach a real, running bus) and ``probe`` (a :class:`BusProbe`: an independent
consumer on that bus, built with the bus's own client library, not with the driver)::

    from bridge.testing.conformance import BusProbe, Received, SinkConformance

    class TestWebhook(SinkConformance):
        driver = WebhookSink

        @pytest.fixture
        def options(self, server):
            return {"url": server.url}

        @pytest.fixture
        async def probe(self, server):
            yield MyProbe(server)

The suite checks what the core relies on: unknown options are refused, ``__init__``
does no I/O, ``close()`` is idempotent, secrets stay out of ``repr``, a batch makes
the round trip through the real bus, per-symbol order is kept, after the bus drops
the connection the core's worker reconnects the driver and delivers again, and (with
a probe that implements ``stop_bus``/``start_bus``) what is published while the bus is
down fails, is retried and arrives once it is back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import pytest
from pydantic import ValidationError

from bridge.config import SinkCommon, SinkSpec
from bridge.runner import SinkWorker
from bridge.sinks import Message, Sink, SinkOptions, check_driver
from bridge.testing.sample import messages, sample_events
from bridge.testing.wait import wait_until


@dataclass
class Received:
    """One message as an independent consumer saw it on the bus."""

    topic: str
    body: bytes
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def envelope(self) -> dict[str, Any]:
        env: dict[str, Any] = orjson.loads(self.body)
        return env


class BusProbe(ABC):
    """An independent consumer of the bus under test."""

    @abstractmethod
    async def subscribe(self, topic: str) -> None:
        """Start receiving ``topic``; called before anything is published to it."""

    @abstractmethod
    async def received(self, count: int, timeout: float) -> list[Received]:
        """Wait until ``count`` messages arrived (or ``timeout``); return all so far."""

    async def drop_connections(self) -> bool:
        """Make the bus drop the sink's connection (restart the broker, kick clients).

        Return ``False`` if this bus cannot do it: the reconnect test is then skipped.
        """
        return False

    async def stop_bus(self) -> bool:
        """Take the bus down and keep it down until :meth:`start_bus` (kill a broker the
        test started, stop a server). Return ``False`` if this bus cannot: the outage
        test is then skipped."""
        return False

    async def start_bus(self) -> None:  # noqa: B027 - optional hook
        """Bring the bus back after :meth:`stop_bus`; return once the probe receives
        again."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the probe's own connection."""


def unique_topic() -> str:
    """A topic name valid on Kafka, NATS and MQTT alike, unique per test."""
    return f"aleno-conformance-{uuid.uuid4().hex[:12]}"


class SinkConformance:
    """Subclass and set :attr:`driver`; provide the ``options`` and ``probe`` fixtures.

    Optional: ``secret_values`` fixture (values that must never appear in ``repr``);
    :attr:`batch_size`, :attr:`timeout_s`, :attr:`format`.
    """

    driver: ClassVar[type[Sink[Any]]]
    batch_size: ClassVar[int] = 40
    timeout_s: ClassVar[float] = 20.0
    format: ClassVar[str] = "cloudevents-json"

    @pytest.fixture
    def secret_values(self) -> list[str]:
        return []

    def make(self, options: Mapping[str, Any], name: str = "conformance") -> Sink[Any]:
        opts = self.driver.options_model.model_validate(dict(options))
        return self.driver(name, opts)

    # -- contract ----------------------------------------------------------------

    def test_driver_is_valid(self) -> None:
        assert check_driver(self.driver) is None, check_driver(self.driver)
        assert issubclass(self.driver.options_model, SinkOptions)

    def test_unknown_option_is_refused(self, options: Mapping[str, Any]) -> None:
        with pytest.raises(ValidationError):
            self.driver.options_model.model_validate({**options, "no_such_option": 1})

    async def test_init_does_no_io_and_close_is_idempotent(
        self, options: Mapping[str, Any]
    ) -> None:
        sink = self.make(options)
        await sink.close()
        await sink.close()

    def test_secrets_not_in_repr(
        self, options: Mapping[str, Any], secret_values: list[str]
    ) -> None:
        sink = self.make(options)
        text = repr(sink) + str(sink.options) + repr(sink.options)
        for secret in secret_values:
            assert secret not in text

    def test_topic_rule_is_safe(self) -> None:
        for value in ("BTC/USD", "BRK.B", "A B", "X+#>*", ""):
            safe = self.driver.safe_token(value)
            assert isinstance(safe, str)
            assert self.driver.safe_token(safe) == safe, "safe_token must be idempotent"

    # -- the real bus ------------------------------------------------------------

    async def test_round_trip_and_order(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        events = sample_events(symbols=4, updates=self.batch_size // 4)
        batch = messages(events, topic, self.format)
        sink = self.make(options)
        try:
            await asyncio.wait_for(sink.connect(), self.timeout_s)
            await asyncio.wait_for(sink.publish(batch), self.timeout_s)
            got = await probe.received(len(batch), self.timeout_s)
        finally:
            await sink.close()
            await sink.close()
        assert len(got) >= len(batch), f"{len(got)} of {len(batch)} messages arrived"
        ids = [r.envelope()["id"] for r in got]
        assert set(ids) == {m.id for m in batch}
        assert all(r.topic == topic for r in got)
        per_symbol: dict[str, list[int]] = defaultdict(list)
        for r in got:
            data = r.envelope()["data"]
            per_symbol[data["symbol"]].append(data["sentTimestampMs"])
        for symbol, stamps in per_symbol.items():
            assert stamps == sorted(stamps), f"order of {symbol} not kept: {stamps}"

    async def test_reconnect_after_the_bus_drops(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        worker = self._worker(options)
        worker.start()
        first = messages(sample_events(symbols=2, updates=5), topic, self.format)
        second = messages(sample_events(symbols=2, updates=5, start_ms=1_800_000_000_000),
                          topic, self.format)
        try:
            for m in first:
                worker.offer(m)
            await wait_until(lambda: worker.stats.published == len(first), self.timeout_s)
            if not await probe.drop_connections():
                pytest.skip("this probe cannot make the bus drop connections")
            for m in second:
                worker.offer(m)
            await wait_until(lambda: worker.stats.published >= len(first) + len(second), 60.0)
            # a broker that loses its data on restart may lose ``first``: wait for
            # ``second`` (published after the drop) only
            missing = await _missing(probe, second, len(first) + len(second), self.timeout_s)
        finally:
            await worker.stop(5.0)
        assert not missing, f"{len(missing)} message(s) published after the drop never arrived"
        assert worker.stats.dropped.get("rejected", 0) == 0

    async def test_publishing_during_an_outage_is_retried_until_the_bus_is_back(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        worker = self._worker(options)
        worker.start()
        warm = messages(sample_events(symbols=1, updates=1), topic, self.format)
        during = messages(sample_events(symbols=2, updates=5, start_ms=1_900_000_000_000),
                          topic, self.format)
        try:
            worker.offer(warm[0])  # connected and publishing before the outage starts
            await wait_until(lambda: worker.stats.published == 1, self.timeout_s)
            if not await probe.stop_bus():
                pytest.skip("this probe cannot take the bus down")
            try:
                for m in during:
                    worker.offer(m)
                # the driver must fail (not hang, not pretend) while the bus is down
                await wait_until(lambda: worker.stats.failed_batches >= 1 or not worker.connected,
                             self.timeout_s)
                assert worker.stats.published < 1 + len(during)
            finally:
                await probe.start_bus()
            await wait_until(lambda: worker.stats.published >= 1 + len(during), 60.0)
            missing = await _missing(probe, during, 1 + len(during), self.timeout_s)
        finally:
            await worker.stop(5.0)
        assert not missing, f"{len(missing)} message(s) published during the outage are lost"
        assert worker.stats.dropped == {}
        assert worker.stats.reconnects >= 1 or worker.stats.failed_batches >= 1

    def _worker(self, options: Mapping[str, Any]) -> SinkWorker:
        name = "conformance"
        common = SinkCommon(
            driver=name,
            format=self.format,
            batch={"max_events": 10, "linger_ms": 0},
            retry={"initial_backoff_s": 0.1, "max_backoff_s": 1.0,
                   "publish_timeout_s": 5.0, "connect_timeout_s": 5.0},
        )
        sink = self.make(options, name)
        return SinkWorker(SinkSpec(name, common, self.driver, sink.options), sink)


async def _missing(
    probe: BusProbe, wanted: list[Message], count: int, timeout: float
) -> set[str]:
    """Ids of ``wanted`` the probe has not received within ``timeout`` (``count`` is
    how many messages the probe may hold in all)."""
    ids = {m.id for m in wanted}
    deadline = time.monotonic() + timeout
    while True:
        got = await probe.received(count, 0.5)
        missing = ids - {r.envelope()["id"] for r in got}
        if not missing or time.monotonic() >= deadline:
            return missing
