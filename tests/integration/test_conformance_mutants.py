"""Mutation tests of the conformance suite: a driver with one defect must fail it.

Each mutant subclasses a built-in driver and overrides one thing. :func:`run_suite`
runs the :class:`~bridge.testing.conformance.SinkConformance` tests of the driver's own
test class (same options, same probe as its passing run) against the mutant, the test
expected to catch it first, then the others until one fails; a mutant that passes every
test fails here. The healthy drivers pass the same suite in their own test modules.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from aleno_bridge_plugins.kafka_sink import KafkaSink
from aleno_bridge_plugins.mqtt_sink import MqttSink
from aleno_bridge_plugins.nats_sink import NatsSink

import tests.integration.test_kafka as kafka_tests
import tests.integration.test_mqtt as mqtt_tests
import tests.integration.test_nats as nats_tests
from bridge.sinks import Message, Sink, SinkRejectedError
from bridge.testing.conformance import BusProbe, SinkConformance
from tests.support.mqtt import MqttBroker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ProbeFactory = Callable[[], Awaitable[BusProbe]]


def _with(m: Message, *, topic: str | None = None, key: str | bool | None = False) -> Message:
    return Message(m.topic if topic is None else topic, m.key if key is False else key,  # type: ignore[arg-type]
                   m.body, m.content_type, m.event, m.attributes)


# ---------------------------------------------------------------------------
# the mutants: one defect each


class PublishesTwice(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(batch)
        await super().publish(batch)


class FirstTopicOnly(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish([_with(m, topic=batch[0].topic) for m in batch] if batch else [])


class DropsKey(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish([_with(m, key=None) for m in batch])


class ForgetsClient(NatsSink):
    async def connect(self) -> None:
        self._nc = None  # the previous client is neither closed nor reachable any more
        await super().connect()


class SlowClose(NatsSink):
    async def close(self) -> None:
        await super().close()
        await asyncio.sleep(4)


class PartOfLargeBatch(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(batch[:100])


class SwallowsErrors(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        try:
            await super().publish(batch)
        except Exception:
            pass


class ReversesBatch(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(list(reversed(batch)))


class HalfThenRejectsAll(NatsSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(batch[: len(batch) // 2])
        if batch:
            raise SinkRejectedError(self.name, "refused")  # rejected=None: the whole batch


class KafkaDropsKey(KafkaSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish([_with(m, key=None) for m in batch])


class MqttReversesBatch(MqttSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(list(reversed(batch)))


class MqttPublishesTwice(MqttSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(batch)
        await super().publish(batch)


# ---------------------------------------------------------------------------
# running the suite programmatically


def suite_tests(suite: type[SinkConformance]) -> list[str]:
    return sorted(n for n in dir(suite) if n.startswith("test_"))


async def run_suite(
    suite: type[SinkConformance], mutant: type[Sink[Any]], options: dict[str, Any],
    probe: ProbeFactory, first: Sequence[str],
) -> dict[str, str]:
    """Run the suite's tests (``first`` first) against ``mutant`` until one fails;
    return ``{test: "passed" | "skipped" | "FAILED: why"}``."""
    # a healthy driver delivers within a second here: waiting 3 s for what never comes
    # keeps the run short
    cls = type(f"Mutant{mutant.__name__}", (suite,), {"driver": mutant, "timeout_s": 3.0})
    instance: Any = cls()
    order = [*first, *(n for n in suite_tests(suite) if n not in first)]
    outcomes: dict[str, str] = {}
    for name in order:
        method = getattr(instance, name)
        params = inspect.signature(method).parameters
        for fmt in (("cloudevents-json", "cloudevents-binary", "raw") if "fmt" in params
                    else (None,)):
            label = name if fmt is None else f"{name}[{fmt}]"
            kwargs: dict[str, Any] = {}
            p = await probe() if "probe" in params else None
            if p is not None:
                kwargs["probe"] = p
            if "options" in params:
                kwargs["options"] = options
            if "secret_values" in params:
                kwargs["secret_values"] = []
            if fmt is not None:
                kwargs["fmt"] = fmt
            try:
                result = method(**kwargs)
                if inspect.isawaitable(result):
                    await result
                outcomes[label] = "passed"
            except pytest.skip.Exception:
                outcomes[label] = "skipped"
            except Exception as exc:
                outcomes[label] = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                if p is not None:
                    await p.close()
            if outcomes[label].startswith("FAILED"):
                return outcomes
    return outcomes


def assert_caught(outcomes: dict[str, str], expected: str) -> None:
    failed = [n for n, o in outcomes.items() if o.startswith("FAILED")]
    assert failed, f"the mutant passed the whole suite: {outcomes}"
    assert failed[0].split("[")[0] == expected, (
        f"caught by {failed[0]}, not by {expected}: {outcomes[failed[0]]}")


NATS_MUTANTS = [
    (PublishesTwice, "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"),
    (FirstTopicOnly, "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"),
    (DropsKey, "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"),
    (ForgetsClient, "test_reconnecting_leaks_no_connection_task_or_fd"),
    (SlowClose, "test_close_is_quick"),
    (PartOfLargeBatch, "test_order_per_symbol_across_batches_of_every_size"),
    (SwallowsErrors, "test_hung_bus_publish_fails_in_time_and_close_is_quick"),
    (ReversesBatch, "test_order_per_symbol_across_batches_of_every_size"),
    (HalfThenRejectsAll, "test_refused_messages_are_counted_exactly"),
]


@pytest.mark.parametrize(("mutant", "catcher"), NATS_MUTANTS,
                         ids=[m.__name__ for m, _ in NATS_MUTANTS])
async def test_nats_mutant_fails_the_suite(
    mutant: type[Sink[Any]], catcher: str, nats_url: str,
) -> None:
    async def probe() -> BusProbe:
        return nats_tests.CoreProbe(nats_url)

    options = {"servers": nats_url, **nats_tests.FAST}
    outcomes = await run_suite(nats_tests.TestNatsCoreConformance, mutant, options, probe,
                               [catcher])
    assert_caught(outcomes, catcher)


async def test_kafka_mutant_fails_the_suite(kafka_bootstrap: str) -> None:
    async def probe() -> BusProbe:
        return kafka_tests.conformance_probe(kafka_bootstrap)

    catcher = "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"
    options = {"bootstrap_servers": kafka_bootstrap, "request_timeout_ms": 5000}
    outcomes = await run_suite(kafka_tests.TestKafkaConformance, KafkaDropsKey, options,
                               probe, [catcher])
    assert_caught(outcomes, catcher)


@pytest.mark.parametrize(("mutant", "catcher"), [
    (MqttReversesBatch, "test_order_per_symbol_across_batches_of_every_size"),
    (MqttPublishesTwice, "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"),
], ids=["MqttReversesBatch", "MqttPublishesTwice"])
async def test_mqtt_mutant_fails_the_suite(
    mutant: type[Sink[Any]], catcher: str, mqtt_broker: MqttBroker,
) -> None:
    client_id = "conformance-mutant"

    async def probe() -> BusProbe:
        return mqtt_tests.conformance_probe(mqtt_broker, client_id)

    options = mqtt_broker.options(client_id=client_id, connect_timeout_s=5)
    outcomes = await run_suite(mqtt_tests.TestMqttConformance, mutant, options, probe,
                               [catcher])
    assert_caught(outcomes, catcher)
