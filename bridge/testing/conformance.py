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

from bridge.testing.probe import (
    HOSTILE_SYMBOLS,
    BusProbe,
    Received,
    Refusal,
    refusing_every_third,
    unique_topic,
)
from bridge.testing.suite_bus import BusTests
from bridge.testing.suite_contract import ContractTests, TopicTests
from bridge.testing.suite_delivery import DeliveryTests
from bridge.testing.suite_faults import FaultTests
from bridge.testing.suite_support import T as T

__all__ = [
    "HOSTILE_SYMBOLS",
    "BusProbe",
    "Received",
    "Refusal",
    "SinkConformance",
    "refusing_every_third",
    "unique_topic",
]


# pytest runs the tests a class inherits base class first (the reverse of the MRO): the
# groups are listed last to first, so that they run in this order: contract, the real
# bus, delivery, topics, failures
class SinkConformance(FaultTests, TopicTests, DeliveryTests, BusTests, ContractTests):
    """Subclass and set :attr:`driver`; provide the ``options`` and ``probe`` fixtures.

    Optional: ``secret_values`` fixture (values that must never appear in ``repr``);
    :meth:`secret_options`; :attr:`batch_size`, :attr:`timeout_s`, :attr:`format`,
    :attr:`large_batch`, :attr:`close_within_s`, :attr:`hung_within_s`,
    :attr:`settle_s`, :attr:`reconnect_cycles`.

    The settings and helpers are those of
    :class:`~bridge.testing.suite_support.SuiteBase`; the tests come in groups, one
    mixin each: :class:`~bridge.testing.suite_contract.ContractTests`,
    :class:`~bridge.testing.suite_bus.BusTests`,
    :class:`~bridge.testing.suite_delivery.DeliveryTests`,
    :class:`~bridge.testing.suite_contract.TopicTests` and
    :class:`~bridge.testing.suite_faults.FaultTests`.
    """
