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

Beyond that, every promise of the :class:`~bridge.sinks.Sink` contract has a test that
fails when a driver breaks it: each message of a mixed batch arrives exactly once, on
its own topic, with its own key and its body unchanged; per-symbol order holds across
batches of every size (none, one, the runner's default 500); a partly refused batch
reports exactly how many were refused; every format the driver declares carries the
CloudEvents attributes per the bus's binding; hostile symbols make valid topics;
``close()`` is quick; reconnecting many times leaks no connection, task or file
descriptor; a cancelled ``publish`` leaves the driver usable; secrets stay out of
``repr``, errors and logs.

Since suite v3 it also checks what a database-like sink promises: a worker that
meets an outage or a dropped connection must see only I/O or bus errors (a
``driver_error``, such as a ``connect()`` that raises ``TypeError`` on its failure
path, fails the test) and drop nothing; keys are checked whenever the probe reports
any; a driver that claims to deduplicate gets a retried batch and must store it once.
A wait that times out says what it waited for, how many arrived and the first missing
ids; a driver call that hangs says which call.

Optional capabilities are opt-in, each test that needs one skips with the reason when
it is missing: on the probe, :attr:`BusProbe.delivers_keys` (``False`` opts out of the
key checks), :attr:`BusProbe.exact_bodies`, :attr:`BusProbe.idempotent` (or
:attr:`~bridge.sinks.Sink.idempotent` on the driver), :meth:`BusProbe.refusing` (make
the bus refuse some messages; may be async), :meth:`BusProbe.attributes`, and
:meth:`BusProbe.bus_address` + :meth:`BusProbe.options_via`, which route the driver
through a :class:`~bridge.testing.proxy.FaultProxy` so that outages, dropped
connections and a hung bus are tested without killing the bus; on the suite,
:meth:`SinkConformance.secret_options`.

To prove the suite catches a broken driver, run it against deliberately broken
subclasses with :func:`bridge.testing.mutants.run_mutants`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
import pytest
from pydantic import ValidationError

from bridge.config.schema import SinkCommon, SinkSpec
from bridge.sinks import Message, Sink, SinkOptions, SinkRejectedError, check_driver
from bridge.sinks.worker import SinkWorker
from bridge.testing.proxy import FaultProxy
from bridge.testing.sample import messages, sample_events
from bridge.testing.wait import wait_until

T = TypeVar("T")

#: symbols with every character some bus treats specially in a topic
HOSTILE_SYMBOLS = (
    "BRK.B", "BTC/USD", "A*B", "A>B", "A+B", "A#B", "A B", "..", ".", "/", "*", ">", "+",
    "#", " ", "Ünïcødé€", "日本株/円", "X.Y/Z*>+# W",
)


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


#: what :meth:`BusProbe.refusing` returns: the batch to send and the refused indices
Refusal = tuple[list[Message], list[int]] | None


class BusProbe(ABC):
    """An independent consumer of the bus under test.

    The words of this API come from buses with topics; on a bus without them they
    mean what the driver maps them to, and the probe maps them back:

    - a **topic** is where a message goes, as the driver names it from the route's
      topic template: a subject (NATS), a topic (Kafka, MQTT), a table (a database), a
      stream or a queue, a file, an URL path. :meth:`subscribe` starts watching that
      place; :attr:`Received.topic` is the place the message was found in, named the
      way the driver was given it (a probe reading table ``prices_btc`` reports the
      topic that the driver turned into that table).
    - a **key** is the message's partitioning or identity value where the bus has one
      (Kafka's record key, a NATS header, an MQTT user property, a column); a bus
      without any sets :attr:`delivers_keys` to ``False``.
    - a **body** is the bytes the driver stored for the message (a row's JSON column,
      a file line); the suite decodes it as the envelope.
    """

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

    # -- optional capabilities (new tests skip, naming the missing one) --------------

    #: whether :attr:`Received.key` reports the message's key. Left unset (``None``),
    #: keys are checked: a batch sent with keys of which none arrives with one fails
    #: (the driver drops keys, or this probe cannot see them: then say ``False``).
    #: ``False`` opts out, but keys the probe does report are still checked; ``True``
    #: checks every key.
    delivers_keys: bool | None = None
    #: the bus keeps one copy of a message published twice (by the event id): the
    #: suite checks it with a retried batch (``test_a_retried_batch_makes_no_duplicate``).
    #: Claim it here when the driver's idempotence depends on its options (JetStream
    #: on, a key column); a driver that is always idempotent sets ``Sink.idempotent``.
    idempotent: bool = False
    #: :attr:`Received.body` holds the exact bytes sent (else bodies are compared as JSON)
    exact_bodies: bool = False
    #: :meth:`bus_address` is also the address the driver publishes to (``False`` for a
    #: bus whose clients are redirected after bootstrap, like Kafka's metadata)
    proxy_covers_publish: bool = True

    def refusing(
        self, batch: Sequence[Message],
    ) -> Refusal | Awaitable[Refusal]:
        """A copy of ``batch`` in which the bus will refuse some messages for good (too
        large, forbidden topic, a row violating a constraint...), and the indices of
        those; ``None``: cannot (the partial-rejection test is then skipped).

        May be a coroutine (``async def refusing``) to prepare the bus first: revoke a
        privilege, create a table with a ``CHECK`` constraint, set a topic's limit."""
        return None

    def attributes(self, received: Received) -> Mapping[str, str] | None:
        """The CloudEvents attributes of a ``cloudevents-binary`` message, names without
        prefix; ``None`` when the probe cannot see them. Default: the headers with the
        prefix ``ce_`` (Kafka), ``ce-`` (NATS, HTTP) or none (MQTT user properties)."""
        headers = {k.lower(): v for k, v in received.headers.items()}
        for prefix in ("ce_", "ce-", ""):
            if f"{prefix}id" in headers:
                return {k[len(prefix):]: v for k, v in headers.items() if k.startswith(prefix)}
        return None

    def bus_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the bus's TCP endpoint, to put a
        :class:`~bridge.testing.proxy.FaultProxy` in front of it; ``None``: no proxy
        tests (hung bus, outages and dropped connections without ``stop_bus`` or
        ``drop_connections``)."""
        return None

    def options_via(
        self, options: Mapping[str, Any], host: str, port: int,
    ) -> dict[str, Any] | None:
        """``options`` changed to reach the bus through ``host:port`` (the proxy). Also
        the place to shorten the driver's timeouts, so that the hung-bus tests are quick."""
        return None


def refusing_every_third(
    batch: Sequence[Message], change: Callable[[Message], Message],
) -> tuple[list[Message], list[int]]:
    """A :meth:`BusProbe.refusing` answer: a copy of ``batch`` in which every third
    message (from the second) is replaced by ``change(message)``, one the bus refuses
    (too large, a forbidden topic...), and the indices of those."""
    out, refused = list(batch), list(range(1, len(batch), 3))
    for i in refused:
        out[i] = change(out[i])
    return out, refused


def unique_topic() -> str:
    """A topic name valid on Kafka, NATS and MQTT alike, unique per test."""
    return f"aleno-conformance-{uuid.uuid4().hex[:12]}"


@dataclass
class _Route:
    """The options a test's sink uses, and the proxy in its path (if the probe allows)."""

    options: dict[str, Any]
    proxy: FaultProxy | None = None
    covers_publish: bool = False


class SinkConformance:
    """Subclass and set :attr:`driver`; provide the ``options`` and ``probe`` fixtures.

    Optional: ``secret_values`` fixture (values that must never appear in ``repr``);
    :meth:`secret_options`; :attr:`batch_size`, :attr:`timeout_s`, :attr:`format`,
    :attr:`large_batch`, :attr:`close_within_s`, :attr:`hung_within_s`,
    :attr:`settle_s`, :attr:`reconnect_cycles`.
    """

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

    # -- every message once, where it belongs ----------------------------------------

    async def test_each_message_arrives_once_on_its_topic_with_its_key_and_body(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """One batch mixing three topics, per-message keys and no key."""
        base = unique_topic()
        topics = [f"{base}-a", f"{base}-b", f"{base}-c"]
        for t in topics:
            await probe.subscribe(t)
        batch = []
        for i, ev in enumerate(sample_events(symbols=6, updates=3)):
            enc = ev.encoded(self.format)
            key = None if i % 5 == 4 else f"k{i}-{ev.symbol}"
            batch.append(Message(topics[i % 3], key, enc.body, enc.content_type, ev.header,
                                 enc.attributes))
        async with self._connected(options) as sink:
            await self._publish(sink, batch)
            got = await self._settled(probe, len(batch))
        self._assert_exactly(batch, got, probe)

    async def test_order_per_symbol_across_batches_of_every_size(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """Batches of 0, 1, 7, :attr:`large_batch` and 3 messages, one after the other."""
        topic = unique_topic()
        await probe.subscribe(topic)
        symbols = 10
        sizes = [0, 1, 7, self.large_batch, 3]
        rounds = -(-sum(sizes) // symbols)
        events = sample_events(symbols=symbols, updates=rounds)[: sum(sizes)]
        all_messages = messages(events, topic, self.format)
        async with self._connected(options) as sink:
            start = 0
            for size in sizes:
                chunk = all_messages[start:start + size]
                start += size
                await self._publish(sink, chunk)
            got = await self._settled(probe, len(all_messages))
        self._assert_exactly(all_messages, got, probe)
        per_symbol: dict[str, list[int]] = defaultdict(list)
        for r in got:
            data = r.envelope()["data"]
            per_symbol[data["symbol"]].append(data["sentTimestampMs"])
        for symbol, stamps in per_symbol.items():
            assert stamps == sorted(stamps), f"order of {symbol} not kept across batches"

    async def test_refused_messages_are_counted_exactly(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        topic = unique_topic()
        await probe.subscribe(topic)
        good = messages(sample_events(symbols=4, updates=3), topic, self.format)
        answer = probe.refusing(good)
        plan = await answer if inspect.isawaitable(answer) else answer
        if plan is None:
            pytest.skip("this probe cannot make the bus refuse messages (BusProbe.refusing)")
        batch, refused = plan
        assert 0 < len(refused) < len(batch), "refusing() must refuse some, not all"
        async with self._connected(options) as sink:
            with pytest.raises(SinkRejectedError) as caught:
                await self._publish(sink, batch)
            delivered = [m for i, m in enumerate(batch) if i not in set(refused)]
            got = await self._settled(probe, len(delivered))
        err = caught.value
        assert err.rejected == len(refused), (
            f"{len(refused)} of {len(batch)} refused, the error says {err.rejected} "
            "(None means the whole batch)")
        if err.refused is not None:
            said = {i if isinstance(i, int) else batch.index(i) for i in err.refused}
            assert said == set(refused), "SinkRejectedError.refused names other messages"
        self._assert_exactly(delivered, got, probe)

    async def test_a_retried_batch_makes_no_duplicate(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """For a driver that deduplicates (``Sink.idempotent`` or
        ``BusProbe.idempotent``): a batch is published, the connection is cut (its
        acknowledgement lost, as far as the runner knows), the same batch is published
        again after a reconnect, then a batch half old and half new: each message is
        stored once."""
        if not (self.driver.idempotent or probe.idempotent):
            pytest.skip("the driver does not claim to deduplicate (Sink.idempotent or "
                        "BusProbe.idempotent)")
        topic = unique_topic()
        await probe.subscribe(topic)
        first = messages(sample_events(symbols=4, updates=5, start_ms=1_780_000_000_000),
                         topic, self.format)
        more = messages(sample_events(symbols=4, updates=3, start_ms=1_781_000_000_000),
                        topic, self.format)
        async with self._route(options, probe, publish=True) as route:
            sink = self.make(route.options)
            try:
                await self._call(sink.connect(), "connect()")
                await self._publish(sink, first)
                if route.proxy is not None:
                    route.proxy.drop_all()  # the connection is cut
                await sink.close()  # what the runner does after a failed publish
                await self._call(sink.connect(), "connect() after the cut")
                await self._publish(sink, first, "publish() of the same batch again")
                half = first[len(first) // 2:]
                await self._publish(sink, [*half, *more], "publish() of half old, half new")
                got = await self._settled(probe, len(first) + len(more))
            finally:
                await sink.close()
        self._assert_exactly([*first, *more], got, probe)

    @pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary", "raw"])
    async def test_format(
        self, fmt: str, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """The body per format; in binary mode the attributes per the bus's binding."""
        if fmt not in self.driver.formats:
            pytest.skip(f"{self.driver.__name__} does not declare {fmt}")
        parsed = self.driver.options_model.model_validate(dict(options))
        why = self.driver.check_format(parsed, fmt)
        if why is not None:
            pytest.skip(f"{fmt} with these options: {why}")
        topic = unique_topic()
        await probe.subscribe(topic)
        batch = messages(sample_events(symbols=3, updates=2, kind="ticker")
                         + sample_events(symbols=2, updates=1, kind="equity"), topic, fmt)
        async with self._connected(options) as sink:
            await self._publish(sink, batch)
            got = await probe.received(len(batch), self.timeout_s)
        by_body = {orjson.dumps(orjson.loads(m.body), option=orjson.OPT_SORT_KEYS): m
                   for m in batch}
        assert len(by_body) == len(batch)
        seen: dict[str, Received] = {}
        for r in got:
            m = by_body.get(orjson.dumps(orjson.loads(r.body), option=orjson.OPT_SORT_KEYS))
            assert m is not None, f"{fmt}: a body that was never sent arrived: {r.body[:200]!r}"
            assert m.id not in seen, f"{fmt}: {m.id} arrived twice"
            seen[m.id] = r
            if probe.exact_bodies:
                assert r.body == m.body, f"{fmt}: the body of {m.id} was changed"
        unseen = [m.id for m in batch if m.id not in seen]
        assert not unseen, (f"{fmt}: {len(seen)} of {len(batch)} arrived within "
                            f"{self.timeout_s}s; first missing: {unseen[:3]}")
        if fmt != "cloudevents-binary":
            return
        for m in batch:
            attrs = probe.attributes(seen[m.id])
            if attrs is None:
                pytest.skip("this probe cannot see binary-mode attributes (BusProbe.attributes)")
            wrong = {k: attrs.get(k) for k, v in m.attributes.items() if attrs.get(k) != v}
            assert not wrong, f"binary-mode attributes of {m.id} missing or changed: {wrong}"

    # -- topics ---------------------------------------------------------------------

    def test_hostile_symbols_make_valid_topics(self) -> None:
        for value in HOSTILE_SYMBOLS:
            safe = self.driver.safe_token(value)
            assert isinstance(safe, str)
            assert self.driver.safe_token(safe) == safe, f"safe_token({value!r}) not idempotent"
            topic = f"aleno.{safe}.x"
            why = self.driver.check_topic(topic)
            assert why is None, f"safe_token({value!r}) = {safe!r} makes an invalid topic: {why}"
        assert self.driver.check_topic("") is not None, "check_topic must refuse ''"

    async def test_hostile_symbols_on_the_bus(
        self, options: Mapping[str, Any], probe: BusProbe
    ) -> None:
        """Each safe-made symbol reaches exactly its own topic."""
        base = unique_topic()
        values = ("BRK.B", "X.Y/Z*>+# W", "Ünïcødé€/日本")
        topics = [f"{base}-{self.driver.safe_token(v)}" for v in values]
        for t in topics:
            assert self.driver.check_topic(t) is None, t
            await probe.subscribe(t)
        events = sample_events(symbols=len(topics), updates=1)
        batch = [messages([ev], t, self.format)[0] for ev, t in zip(events, topics, strict=True)]
        async with self._connected(options) as sink:
            await self._publish(sink, batch)
            got = await self._settled(probe, len(batch))
        self._assert_exactly(batch, got, probe)

    # -- failures, resources, secrets -----------------------------------------------

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
