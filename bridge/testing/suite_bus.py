"""The conformance suite's tests on the real bus: the round trip, a dropped connection
and an outage, through the core's worker.

A test group of :class:`~bridge.testing.conformance.SinkConformance` (a mixin, not
collected on its own: its name does not start with ``Test``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pytest

from bridge.testing.probe import BusProbe, unique_topic
from bridge.testing.sample import messages, sample_events
from bridge.testing.suite_support import (
    SuiteBase,
    _assert_clean_failure_path,
    _count_connects,
    _missing,
    _worker_detail,
)
from bridge.testing.wait import wait_until


class BusTests(SuiteBase):
    """A batch makes the round trip; the worker reconnects after a drop and retries
    through an outage."""

    async def test_round_trip_and_order(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        events = sample_events(symbols=4, updates=self.batch_size // 4)
        batch = messages(events, topic, self.format)
        sink = self.make(options)
        try:
            await self._call(sink.connect(), "connect()")
            await self._publish(sink, batch)
            got = await probe.received(len(batch), self.timeout_s)
        finally:
            await sink.close()
            await sink.close()
        ids = [r.envelope()["id"] for r in got]
        missing = [m.id for m in batch if m.id not in set(ids)]
        assert not missing, (f"{len(batch) - len(missing)} of {len(batch)} messages arrived "
                             f"within {self.timeout_s}s; first missing: {missing[:3]}")
        assert set(ids) == {m.id for m in batch}, "messages arrived that were not sent"
        wrong = [(r.envelope()["id"], r.topic) for r in got if r.topic != topic]
        assert not wrong, f"sent to {topic!r}, arrived elsewhere: {wrong[:3]}"
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
        async with self._route(options, probe) as route:
            worker = self._worker(route.options)
            worker.start()
            first = messages(sample_events(symbols=2, updates=5), topic, self.format)
            second = messages(sample_events(symbols=2, updates=5, start_ms=1_800_000_000_000),
                              topic, self.format)
            try:
                for m in first:
                    worker.offer(m)
                await wait_until(lambda: worker.stats.published == len(first), self.timeout_s,
                                 f"the worker published {len(first)} before the drop",
                                 detail=_worker_detail(worker))
                if not await probe.drop_connections():
                    if route.proxy is None or not route.covers_publish:
                        pytest.skip("this probe cannot make the bus drop connections "
                                    "(drop_connections, or bus_address + options_via)")
                    route.proxy.set_mode("reset")
                for m in second:
                    worker.offer(m)
                await wait_until(lambda: worker.stats.published >= len(first) + len(second),
                                 self.recovery_s,
                                 f"the worker published {len(second)} more after the drop",
                                 detail=_worker_detail(worker))
                # a broker that loses its data on restart may lose ``first``: wait for
                # ``second`` (published after the drop) only
                missing = await _missing(probe, second, len(first) + len(second),
                                         self.timeout_s)
            finally:
                await worker.stop(5.0)
        assert not missing, (f"{len(missing)} message(s) published after the drop never "
                             f"arrived; first missing: {sorted(missing)[:3]}")
        _assert_clean_failure_path(worker)

    async def test_publishing_during_an_outage_is_retried_until_the_bus_is_back(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """The outage lasts until the worker called ``connect()`` on the still-down bus.

        A probe that can stop the bus (``stop_bus``) gets the driver connected to the
        bus itself: a proxy in front of a stopped bus still accepts TCP connections,
        which a driver that only checks reachability would take for a bus that is up.
        """
        topic = unique_topic()
        await probe.subscribe(topic)
        stops = type(probe).stop_bus is not BusProbe.stop_bus
        async with self._route(options, probe, direct=stops) as route:
            sink = self.make(route.options, "conformance")
            connects = _count_connects(sink)
            worker = self._worker(route.options, sink)
            worker.start()
            warm = messages(sample_events(symbols=1, updates=1), topic, self.format)
            during = messages(sample_events(symbols=2, updates=5, start_ms=1_900_000_000_000),
                              topic, self.format)
            try:
                worker.offer(warm[0])  # connected and publishing before the outage starts
                await wait_until(lambda: worker.stats.published == 1, self.timeout_s,
                                 "the worker published before the outage",
                                 detail=_worker_detail(worker))
                before = connects[0]
                failures, connected = worker.stats.connect_failures, worker.stats.connects
                stopped = await probe.stop_bus()
                if not stopped and (route.proxy is None or not route.covers_publish):
                    pytest.skip("this probe cannot take the bus down "
                                "(stop_bus, or bus_address + options_via)")
                if route.proxy is not None:
                    # a proxy in front of a stopped bus would still accept connections:
                    # refuse them, as the bus itself would
                    route.proxy.set_mode("refuse")
                try:
                    for m in during:
                        worker.offer(m)
                    # the driver must fail (not hang, not pretend) while the bus is down
                    await wait_until(
                        lambda: worker.stats.failed_batches >= 1 or not worker.connected,
                        self.timeout_s, "publishing failed while the bus is down",
                        detail=_worker_detail(worker))
                    assert worker.stats.published < 1 + len(during), (
                        "publish reported success while the bus was down")
                    await wait_until(lambda: connects[0] > before, self.timeout_s,
                                     "connect() called again while the bus is still down",
                                     detail=_worker_detail(worker))
                    # ... and that call over (failed, or returned on a lazy client)
                    await wait_until(
                        lambda: (worker.stats.connect_failures > failures
                                 or worker.stats.connects > connected), self.timeout_s,
                        "connect() on the bus still down returned or failed",
                        detail=_worker_detail(worker))
                    # the failure path itself must not be a bug (a connect() that raises
                    # TypeError on every failure passes every other test: it is retried)
                    _assert_clean_failure_path(worker)
                finally:
                    if stopped:
                        await probe.start_bus()
                    if route.proxy is not None:
                        route.proxy.set_mode("pass")
                await wait_until(lambda: worker.stats.published >= 1 + len(during),
                                 self.recovery_s, "everything published once the bus is back",
                                 detail=_worker_detail(worker))
                missing = await _missing(probe, during, 1 + len(during), self.timeout_s)
            finally:
                await worker.stop(5.0)
        assert not missing, (f"{len(missing)} message(s) published during the outage are lost; "
                             f"first missing: {sorted(missing)[:3]}")
        _assert_clean_failure_path(worker)
        assert worker.stats.reconnects >= 1 or worker.stats.failed_batches >= 1
