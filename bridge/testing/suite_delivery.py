"""The conformance suite's delivery tests: every message once, where it belongs, in
order, in every format; refusals counted exactly; no duplicate on a retry.

A test group of :class:`~bridge.testing.conformance.SinkConformance` (a mixin, not
collected on its own: its name does not start with ``Test``).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from bridge.sinks import Message, SinkRejectedError
from bridge.testing.probe import BusProbe, Received, unique_topic
from bridge.testing.sample import messages, sample_events
from bridge.testing.suite_support import SuiteBase


class DeliveryTests(SuiteBase):
    """Each message arrives once, on its topic, with its key and body, in order."""

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
