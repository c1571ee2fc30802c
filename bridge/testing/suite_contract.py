"""The conformance suite's tests of the driver's contract (no bus) and of its topics.

Test groups of :class:`~bridge.testing.conformance.SinkConformance` (mixins, not
collected on their own: their names do not start with ``Test``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.sinks import SinkOptions, check_driver
from bridge.testing.probe import HOSTILE_SYMBOLS, BusProbe, unique_topic
from bridge.testing.sample import messages, sample_events
from bridge.testing.suite_support import SuiteBase


class ContractTests(SuiteBase):
    """Options, ``__init__``, ``close()``, ``repr`` and the topic rule, without a bus."""

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


class TopicTests(SuiteBase):
    """Symbols with every character some bus treats specially make valid topics."""

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
