"""The independent consumer the conformance suite reads the bus with, and its helpers.

A driver author implements a :class:`BusProbe` for the bus under test and hands it to
the suite (:class:`~bridge.testing.conformance.SinkConformance`) as its ``probe``
fixture. Everything here is re-exported by :mod:`bridge.testing.conformance`.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from bridge.sinks import Message

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
