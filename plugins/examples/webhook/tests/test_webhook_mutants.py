"""Prove the conformance suite: deliberately broken webhook drivers must fail it.

Each mutant below is the webhook driver with one defect. ``run_mutants`` runs
:class:`test_webhook_conformance.TestWebhookConformance` against each one, in a pytest
process of its own with short waits, the test expected to catch it first;
``assert_killed`` fails when a mutant passes the suite (a hole in the suite or the
probe) or is caught by another test than the one named.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import test_webhook_conformance as suite  # the module, not the class: see the guide
from aleno_bridge_webhook import WebhookSink

from bridge.sinks import Message
from bridge.testing.mutants import Mutant, assert_killed, run_mutants


class PublishesTwice(WebhookSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        await super().publish(batch)
        await super().publish(batch)


class SwallowsErrors(WebhookSink):
    async def publish(self, batch: Sequence[Message]) -> None:
        with contextlib.suppress(Exception):
            await super().publish(batch)


class ConnectBugOnFailure(WebhookSink):
    """A bug on the failure path: the core retries connects anyway, so only a suite
    that looks at the worker's errors tells."""

    async def connect(self) -> None:
        try:
            await super().connect()
        except Exception as exc:
            raise TypeError(f"cannot format {exc!r}") from exc


def test_the_suite_catches_every_mutant() -> None:
    results = run_mutants(suite.TestWebhookConformance, [
        Mutant(PublishesTwice,
               "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"),
        Mutant(SwallowsErrors, "test_hung_bus_publish_fails_in_time_and_close_is_quick"),
        Mutant(ConnectBugOnFailure,
               "test_publishing_during_an_outage_is_retried_until_the_bus_is_back"),
    ], timeout_s=3.0, jobs=2)
    assert_killed(results)
