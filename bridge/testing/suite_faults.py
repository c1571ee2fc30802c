"""The conformance suite's failure tests: a quick ``close()``, a hung bus, a cancelled
``publish``, leaks on reconnect, secrets in errors and logs.

A test group of :class:`~bridge.testing.conformance.SinkConformance` (a mixin, not
collected on its own: its name does not start with ``Test``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from bridge.testing.probe import BusProbe, unique_topic
from bridge.testing.sample import messages, sample_events
from bridge.testing.suite_support import SuiteBase, _Capture, _chain, _missing, _open_fds
from bridge.testing.wait import wait_until


class FaultTests(SuiteBase):
    """Failures, resources and secrets."""

    async def test_close_is_quick(self, options: Mapping[str, Any], probe: BusProbe) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        sink = self.make(options)
        await self._call(sink.connect(), "connect()")
        try:
            await self._publish(sink, messages(sample_events(1, 1), topic))
        finally:
            took = await self._timed_close(sink)
        assert took < self.close_within_s, f"close() took {took:.1f}s"
        assert await self._timed_close(sink) < self.close_within_s

    async def test_hung_bus_connect_gives_up_in_time(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """TCP open, nothing answers: ``connect`` returns or fails within its timeout."""
        async with self._route(options, probe, require=True) as route:
            assert route.proxy is not None
            route.proxy.set_mode("stall")
            sink = self.make(route.options)
            start = time.monotonic()
            try:
                await asyncio.wait_for(sink.connect(), self.hung_within_s + 5)
            except TimeoutError as exc:
                if time.monotonic() - start >= self.hung_within_s + 4:
                    msg = f"connect() hung on a bus that does not answer ({self.hung_within_s}s)"
                    raise AssertionError(msg) from exc
                assert sink.is_retriable(exc)
            except Exception as exc:  # the driver's own error: must be retriable
                assert sink.is_retriable(exc), f"not retriable: {exc!r}"
            took = time.monotonic() - start
            close_took = await self._timed_close(sink)
        assert took < self.hung_within_s, f"connect() took {took:.1f}s on a hung bus"
        assert close_took < self.close_within_s, f"close() took {close_took:.1f}s"

    async def test_hung_bus_publish_fails_in_time_and_close_is_quick(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        async with self._route(options, probe, require=True, publish=True) as route:
            assert route.proxy is not None
            sink = self.make(route.options)
            await self._call(sink.connect(), "connect()")
            await self._publish(sink, messages(sample_events(1, 1), topic))
            route.proxy.set_mode("stall")
            batch = messages(sample_events(2, 3, start_ms=1_750_000_000_000), topic)
            start = time.monotonic()
            error: BaseException | None = None
            try:
                await asyncio.wait_for(sink.publish(batch), self.hung_within_s + 5)
            except Exception as exc:
                error = exc
            took = time.monotonic() - start
            close_took = await self._timed_close(sink)
        assert error is not None, "publish() reported success on a bus that does not answer"
        assert took < self.hung_within_s, f"publish() took {took:.1f}s on a hung bus"
        assert sink.is_retriable(error), f"a hung bus must be retriable: {error!r}"
        assert close_took < self.close_within_s, f"close() took {close_took:.1f}s, bus hung"

    async def test_cancelled_publish_leaves_the_driver_usable(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """A ``publish`` cancelled by the runner's timeout, then ``close()`` +
        ``connect()``: the driver publishes again."""
        topic = unique_topic()
        await probe.subscribe(topic)
        after = messages(sample_events(3, 2, start_ms=1_760_000_000_000), topic, self.format)
        async with self._route(options, probe, publish=True) as route:
            sink = self.make(route.options)
            await self._call(sink.connect(), "connect()")
            big = messages(sample_events(10, self.large_batch // 10), topic, self.format)
            if route.proxy is not None:
                route.proxy.set_mode("stall")
            task = asyncio.ensure_future(sink.publish(big))
            await asyncio.sleep(0.3 if route.proxy is not None else 0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if route.proxy is not None:
                route.proxy.set_mode("pass")
            try:
                await asyncio.wait_for(sink.close(), self.close_within_s)
                await self._call(sink.connect(), "connect()")
                await self._publish(sink, after)
            finally:
                await sink.close()
            missing = await _missing(probe, after, len(big) + len(after), self.timeout_s)
        assert not missing, (f"{len(missing)} of {len(after)} message(s) published after the "
                             f"cancel are lost; first missing: {sorted(missing)[:3]}")

    async def test_reconnecting_leaks_no_connection_task_or_fd(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """``connect()`` again on a connected sink replaces its connection; after
        ``close()`` nothing stays open."""
        topic = unique_topic()
        await probe.subscribe(topic)
        async with self._route(options, probe) as route:
            counted = route.proxy if route.covers_publish else None
            sink = self.make(route.options)
            await self._call(sink.connect(), "connect()")  # warm: lazy imports...
            await sink.close()
            await asyncio.sleep(0.1)
            fds, tasks = _open_fds(), len(asyncio.all_tasks())
            for i in range(self.reconnect_cycles):
                await self._call(sink.connect(), "connect()")
                await self._call(sink.connect(), "connect()")
                await self._publish(sink, messages(
                    sample_events(1, 1, start_ms=1_770_000_000_000 + i * 1000), topic,
                    self.format))
                if counted is not None:
                    assert counted.active <= 2, (
                        f"{counted.active} connections open after connect() twice: the "
                        "previous one was not closed")
                await sink.close()
            if counted is not None:
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: counted.active == 0, 2.0)
                assert counted.active == 0, f"{counted.active} connection(s) left open"
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: len(asyncio.all_tasks()) <= tasks, 2.0)
            assert len(asyncio.all_tasks()) <= tasks + 1, "tasks left running after close()"
            if fds is not None:
                now = _open_fds()
                assert now is not None and now <= fds + 2, f"file descriptors: {fds} -> {now}"

    async def test_secrets_stay_out_of_errors_and_logs(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """A sentinel password, a failed connect: not in repr, errors or log records."""
        sentinel = f"Sentinel-Pw-{uuid.uuid4().hex[:12]}"
        secret = self.secret_options(sentinel)
        if secret is None:
            pytest.skip("no secret option to test (SinkConformance.secret_options)")
        texts: list[str] = []
        records = _Capture()
        root = logging.getLogger()
        level = root.level
        root.addHandler(records)
        root.setLevel(logging.DEBUG)
        try:
            async with self._route(options, probe) as route:
                if route.proxy is not None:
                    route.proxy.set_mode("refuse")
                sink = self.make({**route.options, **secret})
                texts += [repr(sink), str(sink.options), repr(sink.options)]
                for step in (sink.connect, lambda: sink.publish([])):
                    try:
                        await asyncio.wait_for(step(), self.hung_within_s)
                    except Exception as exc:
                        texts.append("".join(traceback.format_exception(exc)))
                        texts += [str(e) for e in _chain(exc)]
                await sink.close()
        finally:
            root.removeHandler(records)
            root.setLevel(level)
        texts += records.texts
        leaks = [t for t in texts if sentinel in t]
        assert not leaks, f"the password appears in: {leaks[0][:500]}"
