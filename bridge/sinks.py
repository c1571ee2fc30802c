"""The sink plugin contract and driver discovery.

A sink driver is a subclass of :class:`Sink` registered under the entry-point group
``bridge.sinks`` (``kafka = "my_dist.module:KafkaSink"``). The core never imports a
driver by name: built-in drivers are registered exactly like a third party's.

What a driver writes::

    class EchoOptions(SinkOptions):
        url: str

    class EchoSink(Sink[EchoOptions]):
        options_model = EchoOptions

        async def connect(self) -> None: ...
        async def publish(self, batch: Sequence[Message]) -> None: ...
        async def close(self) -> None: ...

What a driver gets from the core (:mod:`bridge.runner`): a bounded buffer with the
configured ``when_full`` policy, batching, retries with capped jittered backoff,
reconnection, metrics and health.

Lifecycle promises the runner keeps:

- ``__init__`` does no I/O; it only stores the validated options.
- ``connect()`` is called before the first ``publish`` and again after a ``connect``
  that raised or a ``publish`` that raised a retriable error; ``close()`` is called
  before each reconnect.
- ``publish(batch)`` returns only once the bus accepted every message of ``batch``
  (delivery report, PUBACK, publish ack or flush) and raises otherwise. A batch that
  raised a retriable error is retried whole, so a driver may deliver some messages twice, never zero
  times. Messages of one symbol are given in order and must be sent in order.
- ``close()`` is called once at shutdown and may be called again: it must be
  idempotent and must not raise on a sink that never connected.
- A retriable exception (:meth:`Sink.is_retriable`: a :class:`SinkError` whose
  ``retriable`` is true, or an instance of :attr:`Sink.retriable_errors`) makes the
  runner reconnect and retry. A :class:`SinkRejectedError` drops the refused messages
  (the whole batch unless the error says which or how many; counted as
  ``dropped{reason="rejected"}``) because retrying them can never succeed, or hands
  them to the sink's ``dead_letter`` sink when one is configured (counted as
  ``dropped{reason="dead_lettered"}``); the rest of the batch counts as published.
  Any other exception is a driver bug: the batch is dropped as ``driver_error`` and
  logged with its traceback, so a bug can neither wedge the sink nor hide.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict

from bridge.envelope import CLOUDEVENTS_JSON, Event, EventHeader

ENTRY_POINT_GROUP = "bridge.sinks"


class SinkOptions(BaseModel):
    """Base of every driver's options model: unknown keys are errors, not ignored.

    Declare passwords and tokens as :class:`pydantic.SecretStr` so they never print.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


OptionsT = TypeVar("OptionsT", bound=SinkOptions)


@dataclass(slots=True, init=False)
class Message:
    """One envelope addressed to one topic of one sink.

    ``topic`` is the route's topic template rendered with placeholder values already
    made safe by the driver's :meth:`Sink.safe_token`; ``key`` is the route's key
    template rendered with the values as they are (keys are opaque on every bus: no
    safe-token rule applies), or ``None`` when the route has no key. ``attributes`` holds
    the CloudEvents context attributes in ``cloudevents-binary`` format (empty in
    the other formats); ``content_type`` is the MIME type of ``body``.

    ``event`` is the event's light :class:`~bridge.envelope.EventHeader` (``kind``,
    ``symbol``, ``base``, ``quote``, ``id``, ``sent_ms``, ``received_ms``, ``time``,
    ``price``, ``type``, ``source``), shared by every message of that event. A full
    :class:`~bridge.envelope.Event` given here is replaced by its header, so that a
    buffered message holds its encoded bytes and not the decoded record trees.
    """

    topic: str
    key: str | None
    body: bytes
    content_type: str
    event: EventHeader
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __init__(
        self,
        topic: str,
        key: str | None,
        body: bytes,
        content_type: str,
        event: EventHeader,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        # written out (no __post_init__): this runs once per event and sink
        self.topic = topic
        self.key = key
        self.body = body
        self.content_type = content_type
        if type(event) is not EventHeader and isinstance(event, Event):
            event = event.header
        self.event = event
        self.attributes = {} if attributes is None else attributes

    @property
    def id(self) -> str:
        return self.event.id

    def with_extensions(self, extensions: Mapping[str, str]) -> Message:
        """A copy carrying extra CloudEvents extension attributes.

        A structured (``application/cloudevents+json``) body gets them inside its
        envelope; any other body (binary mode, raw) gets them in :attr:`attributes`,
        which drivers put in headers / user properties.
        """
        if self.content_type == CLOUDEVENTS_JSON:
            env = orjson.loads(self.body)
            if isinstance(env, dict):
                env.update(extensions)
                return Message(self.topic, self.key, orjson.dumps(env), self.content_type,
                               self.event, self.attributes)
        return Message(self.topic, self.key, self.body, self.content_type, self.event,
                       {**self.attributes, **extensions})


class SinkError(Exception):
    """A sink failed; ``retriable`` tells the runner whether to reconnect and retry."""

    retriable: ClassVar[bool] = True

    def __init__(self, sink: str, message: str) -> None:
        super().__init__(f"sink {sink!r}: {message}")
        self.sink = sink


class SinkConnectionError(SinkError, ConnectionError):
    """The bus is unreachable or dropped the connection (retriable)."""


class SinkRejectedError(SinkError):
    """The bus refused messages for good (too large, invalid topic, not authorized...).

    ``rejected`` is how many messages of the batch were refused when the driver
    delivered the others (they count as published); ``None`` means the whole batch.

    ``refused`` (optional) says *which* messages were refused: the messages
    themselves or their indices in the batch. The runner needs it to send exactly
    those to the sink's ``dead_letter`` sink; when a driver gives only a count smaller
    than the batch, the runner cannot tell the refused ones from the delivered ones
    and drops them as ``rejected`` without dead-lettering them (and logs why).

    ``reason`` is a short machine-readable cause (``too_large``, ``invalid_topic``,
    ``not_authorized``...; default ``rejected``), carried by dead-lettered events in
    their ``deadletterreason`` attribute.
    """

    retriable = False

    def __init__(
        self,
        sink: str,
        message: str,
        rejected: int | None = None,
        *,
        refused: Sequence[int | Message] | None = None,
        reason: str = "rejected",
    ) -> None:
        super().__init__(sink, message)
        if rejected is None and refused is not None:
            rejected = len(refused)
        self.rejected = rejected
        self.refused = refused
        self.reason = reason


class Sink(ABC, Generic[OptionsT]):
    """A driver that publishes message batches to one bus.

    Class attributes a driver may override:

    ``options_model``
        the pydantic model of the driver's own options (required).
    ``retriable_errors``
        exception types after which reconnecting and retrying can succeed.
    ``formats``
        the wire formats this driver can carry; the configuration refuses others.
    """

    options_model: ClassVar[type[SinkOptions]]
    retriable_errors: ClassVar[tuple[type[BaseException], ...]] = (
        ConnectionError,
        TimeoutError,
        OSError,
    )
    #: formats this driver can carry (all three by default).
    formats: ClassVar[tuple[str, ...]] = ("cloudevents-json", "cloudevents-binary", "raw")

    def __init__(self, name: str, options: OptionsT) -> None:
        self.name = name
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise if the bus cannot be reached."""

    @abstractmethod
    async def publish(self, batch: Sequence[Message]) -> None:
        """Deliver every message of ``batch``; return only once the bus accepted all."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection. Idempotent; never raises for a sink never connected."""

    @classmethod
    def safe_token(cls, value: str) -> str:
        """Make one placeholder value safe inside a topic of this bus (default: as is)."""
        return value

    @classmethod
    def check_format(cls, options: SinkOptions, fmt: str) -> str | None:
        """Why these options cannot carry wire format ``fmt`` (checked at start-up), or
        ``None``. :attr:`formats` says what the driver can carry at all; this hook is for
        what depends on the options (MQTT 3.1.1 has no properties for binary mode)."""
        return None

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        """Why ``topic`` can never be published on this bus, or ``None`` if it can."""
        if not topic:
            return "the topic is empty"
        return None

    @classmethod
    def security_warnings(cls, options: SinkOptions) -> list[str]:
        """The valid but insecure settings in ``options`` (default: none).

        Override it to warn about what works but exposes secrets or data: a password
        sent without TLS, certificate or host-name verification turned off. Each item
        is ``option: message``, the option's path relative to the sink's section (the
        core prefixes ``sinks.<name>.``), for example ``"tls_verify: false: the
        broker's certificate is not checked"``. Never include a secret value.
        ``aleno-bridge validate`` prints the warnings and still exits 0; ``run`` logs
        each once at WARNING. Called once at start-up, after the options validated;
        it must not do I/O.
        """
        return []

    def is_retriable(self, exc: BaseException) -> bool:
        if isinstance(exc, SinkError):
            return exc.retriable
        return isinstance(exc, self.retriable_errors)


def replace_chars(pattern: str, replacement: str) -> Callable[[str], str]:
    """A :meth:`Sink.safe_token` rule that replaces every match of ``pattern``."""
    rx = re.compile(pattern)

    def rule(value: str) -> str:
        return rx.sub(replacement, value)

    return rule


# ---------------------------------------------------------------------------
# Discovery


@dataclass(frozen=True, slots=True)
class DriverInfo:
    """What ``aleno-bridge plugins`` shows about one entry point."""

    name: str
    target: str
    distribution: str
    version: str
    driver: type[Sink[Any]] | None
    error: str | None


class UnknownDriverError(LookupError):
    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = list(available)
        names = ", ".join(self.available) or "none"
        super().__init__(
            f"unknown sink driver {name!r}; available drivers: {names} "
            "(install the plugin that provides it, then check `aleno-bridge plugins`)"
        )


class DriverLoadError(ImportError):
    def __init__(self, name: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"sink driver {name!r} failed to load: {reason}")


class Drivers:
    """The sink drivers available to this process.

    By default they come from the ``bridge.sinks`` entry points through stevedore;
    tests pass ``injected`` drivers instead, like stevedore's ``make_test_instance``.
    A driver that fails to import is recorded with its reason and does not hide the
    others; asking for it raises :class:`DriverLoadError`.
    """

    def __init__(self, injected: Mapping[str, type[Sink[Any]]] | None = None) -> None:
        self._infos: dict[str, DriverInfo] = {}
        if injected is not None:
            for name, cls in injected.items():
                self._infos[name] = _info(name, cls, f"{cls.__module__}:{cls.__qualname__}", "", "")
        else:
            self._discover()

    def _discover(self) -> None:
        from stevedore import ExtensionManager

        failures: dict[str, str] = {}

        def on_failure(_mgr: Any, ep: Any, exc: BaseException) -> None:
            failures[ep.name] = f"{type(exc).__name__}: {exc}"

        mgr = ExtensionManager(
            namespace=ENTRY_POINT_GROUP,
            invoke_on_load=False,
            on_load_failure_callback=on_failure,
        )
        loaded = {ext.name: ext for ext in mgr.extensions}
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            dist_version = dist.version if dist is not None else "?"
            if ep.name in loaded:
                self._infos[ep.name] = _info(
                    ep.name, loaded[ep.name].plugin, ep.value, dist_name, dist_version
                )
            else:
                reason = failures.get(ep.name, "not loaded")
                self._infos[ep.name] = DriverInfo(
                    ep.name, ep.value, dist_name, dist_version, None, reason
                )

    def names(self) -> list[str]:
        return sorted(n for n, i in self._infos.items() if i.driver is not None)

    def infos(self) -> list[DriverInfo]:
        return [self._infos[n] for n in sorted(self._infos)]

    def get(self, name: str) -> type[Sink[Any]]:
        info = self._infos.get(name)
        if info is None:
            raise UnknownDriverError(name, self.names())
        if info.driver is None:
            raise DriverLoadError(name, info.error or "unknown reason")
        return info.driver


def _info(name: str, obj: Any, target: str, dist: str, version: str) -> DriverInfo:
    problem = check_driver(obj)
    if problem is not None:
        return DriverInfo(name, target, dist, version, None, problem)
    return DriverInfo(name, target, dist, version, obj, None)


def check_driver(obj: Any) -> str | None:
    """Why ``obj`` is not a usable sink driver class, or ``None`` (checked at load)."""
    if not (isinstance(obj, type) and issubclass(obj, Sink)):
        return f"{obj!r} is not a subclass of bridge.sinks.Sink"
    if getattr(obj, "__abstractmethods__", None):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        return f"{obj.__qualname__} does not implement: {missing}"
    model = getattr(obj, "options_model", None)
    if not (isinstance(model, type) and issubclass(model, SinkOptions)):
        return f"{obj.__qualname__}.options_model must be a subclass of SinkOptions"
    return None
