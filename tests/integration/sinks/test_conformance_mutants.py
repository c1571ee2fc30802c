"""Mutation tests of the conformance suite: a driver with one defect must fail it.

Each mutant subclasses a built-in driver and overrides one thing.
:func:`bridge.testing.mutants.run_mutants` (the runner plugin authors use too) runs
the driver's own :class:`~bridge.testing.conformance.SinkConformance` class (same
fixtures, same probe as its passing run) against each mutant, in a pytest process of
its own, the test expected to catch it first; a mutant that passes every test, or
that another test catches first, fails here. The healthy drivers pass the same suite
in their own test modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from aleno_bridge_plugins.kafka import KafkaSink
from aleno_bridge_plugins.mqtt import MqttSink
from aleno_bridge_plugins.nats import NatsSink

import tests.drivers.kafka.test_kafka as kafka_tests
import tests.drivers.mqtt.test_mqtt as mqtt_tests
import tests.drivers.nats.test_nats as nats_tests
from bridge.sinks import Message, SinkRejectedError
from bridge.testing.mutants import Mutant, assert_killed, run_mutants
from tests.integration.sinks import mutant_suites

# (suites by module: a Test* class imported here would be collected here too)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: every mutant's run is bounded: a healthy driver delivers within this
TIMEOUT_S = 3.0
#: one child process, suite start-up included
LIMIT_S = 150.0
#: children at once: after its start-up (CPU) a child mostly waits on its broker and on
#: ``TIMEOUT_S``, so more than one per core keeps both cores busy
JOBS = 4
#: the suites use no Hypothesis: without its pytest plugin a child starts ~0.8 s sooner
CHILD_ARGS = ("-p", "no:hypothesispytest")


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


class ConnectBugOnFailure(NatsSink):
    """A bug on the failure path: every failed connect becomes a TypeError (the core
    retries connects anyway, so only a suite that looks can tell)."""

    async def connect(self) -> None:
        try:
            await super().connect()
        except Exception as exc:
            raise TypeError(f"cannot format the error: {exc!r}") from exc


class JetStreamWithoutMsgId(NatsSink):
    """Claims idempotence (its probe does) but sends no Nats-Msg-Id: a retried batch is
    stored twice."""

    def _headers(self, m: Message, jetstream: bool) -> dict[str, str]:
        headers = super()._headers(m, jetstream)
        headers.pop("Nats-Msg-Id", None)
        return headers


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
# each suite against its mutants

EACH_ONCE = "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"
ORDER = "test_order_per_symbol_across_batches_of_every_size"
OUTAGE = "test_publishing_during_an_outage_is_retried_until_the_bus_is_back"

NATS_MUTANTS = [
    Mutant(PublishesTwice, EACH_ONCE),
    Mutant(FirstTopicOnly, EACH_ONCE),
    Mutant(DropsKey, EACH_ONCE),
    Mutant(ForgetsClient, "test_reconnecting_leaks_no_connection_task_or_fd"),
    Mutant(SlowClose, "test_close_is_quick"),
    Mutant(PartOfLargeBatch, ORDER),
    Mutant(SwallowsErrors, "test_hung_bus_publish_fails_in_time_and_close_is_quick"),
    Mutant(ReversesBatch, ORDER),
    Mutant(HalfThenRejectsAll, "test_refused_messages_are_counted_exactly"),
    Mutant(ConnectBugOnFailure, OUTAGE),
]


def test_nats_mutants_fail_the_suite() -> None:
    results = run_mutants(nats_tests.TestNatsCoreConformance, NATS_MUTANTS, timeout_s=TIMEOUT_S,
                          limit_s=LIMIT_S, jobs=JOBS, pytest_args=CHILD_ARGS)
    assert_killed(results)
    # the runner's own promise: a mutant caught by its first test costs seconds
    slow = [r for r in results if r.seconds > 60]
    assert not slow, f"mutants that took over a minute: {[str(r) for r in slow]}"


def test_a_key_dropping_driver_fails_with_a_probe_that_leaves_delivers_keys_unset() -> None:
    """The probe reports keys but was written before ``delivers_keys`` existed."""
    results = run_mutants(mutant_suites.TestNatsCoreUnsetKeyFlag, [Mutant(DropsKey, EACH_ONCE)],
                          timeout_s=TIMEOUT_S, limit_s=LIMIT_S, pytest_args=CHILD_ARGS)
    assert_killed(results)
    assert "none arrived with one" in results[0].message, results[0]


def test_a_jetstream_driver_without_msg_id_fails_the_idempotence_test() -> None:
    results = run_mutants(nats_tests.TestNatsJetStreamConformance,
                          [Mutant(JetStreamWithoutMsgId,
                                  "test_a_retried_batch_makes_no_duplicate")],
                          timeout_s=TIMEOUT_S, limit_s=LIMIT_S, pytest_args=CHILD_ARGS)
    assert_killed(results)
    assert "more than once" in results[0].message, results[0]


def test_kafka_and_mqtt_mutants_fail_the_suite() -> None:
    # the two suites' children run side by side (each mutant in a process of its own)
    with ThreadPoolExecutor(max_workers=2) as pool:
        kafka = pool.submit(run_mutants, kafka_tests.TestKafkaConformance,
                            [Mutant(KafkaDropsKey, EACH_ONCE)], timeout_s=TIMEOUT_S,
                            limit_s=LIMIT_S, pytest_args=CHILD_ARGS)
        mqtt = pool.submit(run_mutants, mqtt_tests.TestMqttConformance,
                           [Mutant(MqttReversesBatch, ORDER),
                            Mutant(MqttPublishesTwice, EACH_ONCE)],
                           timeout_s=TIMEOUT_S, limit_s=LIMIT_S, jobs=2, pytest_args=CHILD_ARGS)
        results = [*kafka.result(), *mqtt.result()]
    assert_killed(results)
