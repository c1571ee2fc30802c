"""The base of the conformance suite's test groups: its settings and helpers.

:class:`SuiteBase` holds what a driver author sets on a
:class:`~bridge.testing.conformance.SinkConformance` subclass (the driver, the sizes
and timeouts, the ``secret_values`` fixture, :meth:`SuiteBase.secret_options`) and the
helpers every test group (``suite_contract``, ``suite_bus``, ``suite_delivery``,
``suite_faults``) uses. Not a test class: pytest collects its tests through
``SinkConformance`` subclasses only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import orjson
import pytest

from bridge.config.schema import SinkCommon, SinkSpec
from bridge.sinks import Message, Sink
from bridge.sinks.worker import SinkWorker
from bridge.testing.probe import BusProbe, Received
from bridge.testing.proxy import FaultProxy

T = TypeVar("T")


@dataclass
class _Route:
    """The options a test's sink uses, and the proxy in its path (if the probe allows)."""

    options: dict[str, Any]
    proxy: FaultProxy | None = None
    covers_publish: bool = False


class SuiteBase:
    """The settings of the suite (overridden by a driver's
    :class:`~bridge.testing.conformance.SinkConformance` subclass) and its helpers."""

    driver: ClassVar[type[Sink[Any]]]
    batch_size: ClassVar[int] = 40
    timeout_s: ClassVar[float] = 20.0
    format: ClassVar[str] = "cloudevents-json"
    #: the runner's default ``batch.max_events``
    large_batch: ClassVar[int] = 500
    #: ``close()`` must return within this, on a healthy and on a hung bus
    close_within_s: ClassVar[float] = 3.0
    #: ``connect``/``publish`` must give up within this on a hung bus (the timeouts
    #: :meth:`BusProbe.options_via` configures, plus slack)
    hung_within_s: ClassVar[float] = 10.0
    #: how long to keep listening for duplicates once every message arrived
    settle_s: ClassVar[float] = 0.5
    #: connect/close cycles of the leak test
    reconnect_cycles: ClassVar[int] = 5
    #: how long the fault tests wait for the worker to deliver once the bus is back
    #: (``None``: three times :attr:`timeout_s`)
    recover_within_s: ClassVar[float | None] = None

    @property
    def recovery_s(self) -> float:
        return self.recover_within_s if self.recover_within_s is not None else 3 * self.timeout_s

    @pytest.fixture
    def secret_values(self) -> list[str]:
        return []

    def secret_options(self, sentinel: str) -> dict[str, Any] | None:
        """Options that put ``sentinel`` in the driver's password (or token) option, to
        add to ``options``; ``None`` (default): the secrets test is skipped."""
        return None

    def make(self, options: Mapping[str, Any], name: str = "conformance") -> Sink[Any]:
        opts = self.driver.options_model.model_validate(dict(options))
        return self.driver(name, opts)

    # -- helpers ---------------------------------------------------------------------

    async def _call(self, aw: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """Await one driver call; a call that hangs fails naming it (not a bare
        ``TimeoutError``)."""
        limit = self.timeout_s if timeout is None else timeout
        start = time.monotonic()
        try:
            return await asyncio.wait_for(aw, limit)
        except TimeoutError as exc:
            if time.monotonic() - start < limit * 0.95:
                raise  # the driver's own timeout: its error, as it raised it
            msg = (f"{what} did not return within {limit}s: a driver bounds its own waits "
                   "(below Sink.budget), so that its own error names the cause")
            raise AssertionError(msg) from exc

    async def _publish(self, sink: Sink[Any], batch: Sequence[Message],
                       what: str = "publish()") -> None:
        await self._call(sink.publish(batch), f"{what} of {len(batch)} message(s)")

    def _worker(self, options: Mapping[str, Any], sink: Sink[Any] | None = None) -> SinkWorker:
        name = "conformance"
        common = SinkCommon(
            driver=name,
            format=self.format,
            batch={"max_events": 10, "linger_ms": 0},
            retry={"initial_backoff_s": 0.1, "max_backoff_s": 1.0,
                   "publish_timeout_s": 5.0, "connect_timeout_s": 5.0},
        )
        if sink is None:
            sink = self.make(options, name)
        return SinkWorker(SinkSpec(name, common, self.driver, sink.options), sink)

    @contextlib.asynccontextmanager
    async def _connected(self, options: Mapping[str, Any]) -> AsyncIterator[Sink[Any]]:
        sink = self.make(options)
        try:
            await self._call(sink.connect(), "connect()")
            yield sink
        finally:
            await sink.close()

    @contextlib.asynccontextmanager
    async def _route(
        self, options: Mapping[str, Any], probe: BusProbe, *, require: bool = False,
        publish: bool = False, direct: bool = False,
    ) -> AsyncIterator[_Route]:
        """Options through a :class:`FaultProxy` when the probe allows it; else as they
        are (``require``: skip instead; ``publish``: the proxy must carry publishes;
        ``direct``: no proxy)."""
        address = None if direct else probe.bus_address()
        via = None
        proxy = None
        if address is not None and (probe.proxy_covers_publish or not publish):
            proxy = FaultProxy(*address)
            await proxy.start()
            via = probe.options_via(options, proxy.host, proxy.port)
        if via is None or proxy is None:
            if proxy is not None:
                await proxy.close()
            if require:
                what = "publishes" if publish else "connections"
                pytest.skip(f"this probe cannot route the driver's {what} through a "
                            "FaultProxy (BusProbe.bus_address + options_via)")
            yield _Route(dict(options))
            return
        try:
            yield _Route(via, proxy, probe.proxy_covers_publish)
        finally:
            await proxy.close()

    async def _settled(self, probe: BusProbe, count: int) -> list[Received]:
        """What arrived, ``count`` or more, once :attr:`settle_s` brought no more."""
        await probe.received(count, self.timeout_s)
        got = await probe.received(count + 1, self.settle_s)
        return got

    @staticmethod
    def _assert_exactly(
        sent: Sequence[Message], got: Sequence[Received], probe: BusProbe,
    ) -> None:
        """Each of ``sent`` arrived once, on its topic, with its key and its body."""
        by_id = {m.id: m for m in sent}
        counts = Counter(r.envelope()["id"] for r in got)
        twice = [i for i, n in counts.items() if n > 1]
        assert not twice, (f"{len(twice)} of {len(sent)} message(s) delivered more than once: "
                           f"{twice[:3]}")
        missing = [i for i in by_id if i not in counts]
        assert not missing, (f"{len(sent) - len(missing)} of {len(sent)} message(s) arrived; "
                             f"first missing: {missing[:3]}")
        extra = [i for i in counts if i not in by_id]
        assert not extra, f"{len(extra)} message(s) arrived that were not sent: {extra[:3]}"
        reported = any(r.key is not None for r in got)
        keyed = sum(1 for m in sent if m.key is not None)
        if probe.delivers_keys is None and keyed and not reported:
            raise AssertionError(
                f"{keyed} of {len(sent)} message(s) were sent with a key and none arrived "
                "with one: the driver drops keys, or the probe cannot see them (then set "
                "BusProbe.delivers_keys = False)")
        check_keys = probe.delivers_keys is not False or reported
        for r in got:
            m = by_id[r.envelope()["id"]]
            assert r.topic == m.topic, f"{m.id} sent to {m.topic!r} arrived on {r.topic!r}"
            if check_keys:
                assert r.key == m.key, f"{m.id}: key {m.key!r} arrived as {r.key!r}"
            if probe.exact_bodies:
                assert r.body == m.body, f"the body of {m.id} was changed"
            else:
                assert r.envelope() == orjson.loads(m.body), f"the body of {m.id} was changed"

    @staticmethod
    async def _timed_close(sink: Sink[Any]) -> float:
        start = time.monotonic()
        await asyncio.wait_for(sink.close(), 30)
        return time.monotonic() - start


class _Capture(logging.Handler):
    """Every log record as text (message, arguments and traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.texts.append(self.format(record) + repr(record.args))


def _worker_detail(worker: SinkWorker) -> Callable[[], str]:
    """What a worker did, for the message of a wait that timed out."""
    def detail() -> str:
        st = worker.stats
        text = (f"published {st.published} of {st.offered} offered; state {worker.state}; "
                f"connects {st.connects}, failed publishes {st.failed_batches}")
        if st.dropped:
            text += f"; dropped {dict(st.dropped)}"
        if st.driver_errors:
            text += f"; driver errors {dict(st.driver_errors)}"
        if st.last_error:
            text += f"; last error: {st.last_error[:300]}"
        return text
    return detail


def _assert_clean_failure_path(worker: SinkWorker) -> None:
    """A bus failure is an I/O or bus error, never a driver bug, and loses nothing."""
    st = worker.stats
    assert not st.driver_errors, (
        f"on the failure path the driver raised what no bus raises: {dict(st.driver_errors)} "
        f"(last error: {st.last_error}); map the client library's errors to SinkError "
        "types or add them to Sink.retriable_errors")
    assert st.dropped == {}, f"the worker dropped events: {dict(st.dropped)}"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _count_connects(sink: Sink[Any]) -> list[int]:
    """Count the ``connect()`` calls of ``sink`` (in the returned cell)."""
    calls = [0]
    connect = sink.connect

    async def counted() -> None:
        calls[0] += 1
        await connect()

    setattr(sink, "connect", counted)  # noqa: B010 - an instance attribute shadows the method
    return calls


def _open_fds() -> int | None:
    """How many file descriptors this process holds (``None`` where unknown)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


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
