"""Shared fixtures. Broker fixtures live in tests/support/<bus>.py and are imported here.

Brokers: a test uses the broker named by its environment variable, else one already
listening on the standard port of 127.0.0.1, else it starts its own from a
pip-installable package on a free port. ALENO_BRIDGE_TEST_OWN_BROKERS=1 skips the
first two steps (what a fresh machine does). Tests that kill or restart a broker
always start their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.simulator import Simulator
from tests.support.bridges import run_bridge  # noqa: F401

# broker fixtures (one import line per bus)
from tests.support.kafka import kafka_bootstrap, kafka_broker, kafka_reader  # noqa: F401
from tests.support.mqtt import mqtt_broker, mqtt_brokers  # noqa: F401
from tests.support.nats import nats_js_url, nats_servers, nats_url  # noqa: F401


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """A real Aleno-compatible server on a free port, fast interval, fixed seed."""
    async with Simulator(port=0, api_keys=["test-key", "other-key"], interval=0.2, seed=7) as sim:
        yield sim
