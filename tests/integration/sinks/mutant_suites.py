"""Conformance suites the mutation tests run that are not part of the normal run
(this module's name keeps pytest from collecting it; the mutant runner names it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.testing.conformance import BusProbe
from tests.drivers.nats.test_nats import (
    CoreProbe,
    NatsServer,
    TestNatsCoreConformance,
)
from tests.drivers.nats.test_nats import broker as broker  # the suite's fixture


class UnsetKeyFlagProbe(CoreProbe):
    """Reports :attr:`Received.key` like :class:`CoreProbe`, but leaves
    ``delivers_keys`` unset, as a probe written before the flag existed."""

    delivers_keys = None


class TestNatsCoreUnsetKeyFlag(TestNatsCoreConformance):
    @pytest.fixture
    async def probe(
        self, broker: tuple[str, NatsServer | None],
    ) -> AsyncIterator[BusProbe]:
        p = UnsetKeyFlagProbe(*broker)
        yield p
        await p.close()
