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

What a driver gets from the core (:mod:`bridge.sinks.worker`): a bounded buffer with the
configured ``when_full`` policy, batching, retries with capped jittered backoff,
reconnection, metrics and health.

Lifecycle promises the runner keeps:

- ``__init__`` does no I/O; it only stores the validated options.
- ``connect()`` is called before the first ``publish`` and again after a ``connect``
  that raised or a ``publish`` that raised anything but :class:`SinkRetryError` or
  :class:`SinkRejectedError`; ``close()`` is called before each reconnect.
- ``publish(batch)`` returns only once the bus accepted every message of ``batch``
  (delivery report, PUBACK, publish ack or flush) and raises otherwise. A batch that
  raised is retried whole, so a driver may deliver some messages twice, never zero
  times. Messages of one symbol are given in order and must be sent in order.
- ``close()`` is called once at shutdown and may be called again: it must be
  idempotent and must not raise on a sink that never connected.
- **Only an explicit refusal loses messages.** What ``publish`` raises decides:

  - :class:`SinkRejectedError` (or another :class:`SinkError` whose ``retriable`` is
    false): the bus refused messages for good. The refused ones are dropped (the whole
    batch unless the error says which or how many; counted as
    ``dropped{reason="rejected"}``), or handed to the sink's ``dead_letter`` sink when
    one is configured (``dropped{reason="dead_lettered"}``); the rest of the batch
    counts as published.
  - :class:`SinkRetryError`: the batch failed for a reason that does not concern the
    connection (a revoked privilege, a full table, a throttled write). The runner
    keeps the connection, backs off and publishes the same batch again; it logs the
    change to ``failing`` once, not once per attempt.
  - a retriable error (:meth:`Sink.is_retriable`: a :class:`SinkError` whose
    ``retriable`` is true, or an instance of :attr:`Sink.retriable_errors`): the
    connection is lost or the bus is down. The runner closes, backs off, reconnects
    and publishes the same batch again.
  - anything else is a bug in the driver (an exception type it did not map). The
    batch is **kept**: the connection is treated as suspect (closed, then reconnected
    after a backoff) and the same batch is published again. The failure is counted
    as ``driver_errors{error=<type>}``, its traceback is logged once per type, and the
    sink's state on ``/readyz`` reads ``driver_error: <type>: <message>`` until a
    publish succeeds. A bug that fails every time therefore holds the sink (its
    buffer's ``when_full`` policy applies to what arrives) instead of losing data
    silently: fix the driver, or map the error.

  The same holds for ``connect()``: an exception that is no I/O or bus error (not an
  :class:`OSError`, :class:`TimeoutError`, :class:`SinkError` or one of
  :attr:`Sink.retriable_errors`) is a driver bug, logged once per type with its
  traceback and shown as ``driver_error`` in the sink's state; connecting is retried
  with backoff.
- Before ``connect()`` the core sets :attr:`Sink.budget`: the seconds the worker gives
  one ``connect()`` and one ``publish()`` (the sink's ``retry.connect_timeout_s`` and
  ``retry.publish_timeout_s``). A driver bounds its own waits below them, so its own
  error (naming the cause) reaches ``/readyz`` instead of the worker's bare timeout;
  :meth:`Sink.check_budget` refuses at start-up an option that cannot fit.

Helpers for writing a driver (TLS and credential options, server lists, CloudEvents
headers, partial rejections, topic checks, timeouts) are in :mod:`bridge.sinks.kit`;
the NATS connection (options, checks, nats-py arguments) that the ``nats`` driver and
the control surface's NATS door share is :mod:`bridge.sinks.natsconn`.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict

from bridge.core.envelope import CLOUDEVENTS_JSON, Event, EventHeader

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

    ``event`` is the event's light :class:`~bridge.core.envelope.EventHeader` (``kind``,
    ``symbol``, ``base``, ``quote``, ``id``, ``sent_ms``, ``received_ms``, ``time``,
    ``price``, ``type``, ``source``), shared by every message of that event. A full
    :class:`~bridge.core.envelope.Event` given here is replaced by its header, so that a
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


class SinkRetryError(SinkError):
    """Retry this batch later; the connection is fine (retriable, no reconnect).

    For a failure that concerns the data or the destination, not the link: a revoked
    privilege on one table, a full disk or quota, a throttled write, a lock timeout.
    The runner keeps the connection, waits its backoff and publishes the same batch
    again, for as long as it takes; the sink's state changes to ``failing`` once (one
    log line, however many attempts) and back to ``connected`` when a publish succeeds.
    """


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


@dataclass(frozen=True, slots=True)
class Budget:
    """The seconds the core's worker waits for one driver call before it cancels it.

    Taken from the sink's ``retry`` section: ``publish_s`` is
    ``retry.publish_timeout_s``, ``connect_s`` is ``retry.connect_timeout_s``. A driver
    keeps its own bounds below these so that its own error, which names the cause,
    is what the operator sees.
    """

    publish_s: float = 15.0
    connect_s: float = 15.0


class Sink(ABC, Generic[OptionsT]):
    """A driver that publishes message batches to one bus.

    Class attributes a driver may override:

    ``options_model``
        the pydantic model of the driver's own options (required).
    ``retriable_errors``
        exception types after which reconnecting and retrying can succeed.
    ``formats``
        the wire formats this driver can carry; the configuration refuses others.
    ``idempotent``
        the bus drops a message it already stored, by the event id (JetStream's
        ``Nats-Msg-Id``, a database's primary key with ``ON CONFLICT DO NOTHING``): a
        retried batch makes no duplicate. The conformance suite then checks it
        (``test_a_retried_batch_makes_no_duplicate``); a probe may claim it instead,
        for a driver whose idempotence depends on its options.
    ``quiet_loggers``
        the client library's loggers; the core keeps them at WARNING or above and, unless
        the bridge logs at DEBUG, silences them (the worker reports every connection
        failure once, with its cause; a library's per-attempt errors would repeat it).

    Set by the core before ``connect()`` (a class default until then):

    ``budget``
        the worker's :class:`Budget` for one ``connect()`` and one ``publish()``.
    """

    options_model: ClassVar[type[SinkOptions]]
    retriable_errors: ClassVar[tuple[type[BaseException], ...]] = (
        ConnectionError,
        TimeoutError,
        OSError,
    )
    #: formats this driver can carry (all three by default).
    formats: ClassVar[tuple[str, ...]] = ("cloudevents-json", "cloudevents-binary", "raw")
    #: the bus deduplicates a retried batch by event id (see the class docstring)
    idempotent: ClassVar[bool] = False
    #: loggers of the client library the core quiets (see the class docstring)
    quiet_loggers: ClassVar[tuple[str, ...]] = ()
    #: the worker's time for one call; replaced per sink by the core before ``connect()``
    budget: Budget = Budget()

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
        """Make one placeholder value safe inside a topic of this bus (default: as is).

        A driver whose rule depends on its options declares a second parameter,
        ``safe_token(cls, value, options=None)``; the core then passes the sink's
        options (see :func:`topic_rules`). The one-parameter form keeps working.
        """
        return value

    @classmethod
    def check_format(cls, options: SinkOptions, fmt: str) -> str | None:
        """Why these options cannot carry wire format ``fmt`` (checked at start-up), or
        ``None``. :attr:`formats` says what the driver can carry at all; this hook is for
        what depends on the options (MQTT 3.1.1 has no properties for binary mode)."""
        return None

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        """Why ``topic`` can never be published on this bus, or ``None`` if it can.

        Like :meth:`safe_token`, a driver may declare ``check_topic(cls, topic,
        options=None)`` to receive the sink's options.
        """
        if not topic:
            return "the topic is empty"
        return None

    @classmethod
    def check_budget(cls, options: SinkOptions, budget: Budget) -> list[str]:
        """The options whose waits cannot fit in the worker's ``budget`` (default: none).

        Each item is ``option: message`` (the option's path relative to the sink's
        section); the core reports them as configuration errors at start-up. Derive
        the driver's own timeouts from :attr:`budget` at run time and use this hook to
        refuse an explicit option that exceeds it (:func:`bridge.sinks.kit.timeout_problem`).
        """
        return []

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


def is_io_error(sink: Sink[Any], exc: BaseException) -> bool:
    """Whether ``exc`` from ``connect()`` is an I/O or bus error (worth retrying
    quietly) rather than a bug in the driver."""
    return isinstance(exc, OSError | TimeoutError | SinkError) or sink.is_retriable(exc)


class TopicRules(NamedTuple):
    """A sink's :meth:`Sink.safe_token` and :meth:`Sink.check_topic`, bound to its options."""

    safe_token: Callable[[str], str]
    check_topic: Callable[[str], str | None]


def takes_options(method: Callable[..., Any]) -> bool:
    """Whether a bound ``safe_token``/``check_topic`` accepts the sink's options as a
    second argument (a parameter named ``options``, a second positional one or
    ``*args``)."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.name == "options" for p in params)


def _signature_problem(obj: type[Sink[Any]], name: str) -> str | None:
    method = getattr(obj, name)
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind("x")
    except TypeError:
        return (f"{obj.__qualname__}.{name} must take one argument, or two (the value "
                "and the sink's options)")
    if takes_options(method):
        try:
            sig.bind("x", None)
        except TypeError:
            return f"{obj.__qualname__}.{name}: its options parameter must be positional"
    return None


def topic_rules(driver: type[Sink[Any]], options: SinkOptions) -> TopicRules:
    """The driver's topic rules with ``options`` passed to those that accept them."""
    safe: Callable[..., str] = driver.safe_token
    check: Callable[..., str | None] = driver.check_topic
    safe_rule: Callable[[str], str] = (
        (lambda value: safe(value, options)) if takes_options(safe) else safe
    )
    check_rule: Callable[[str], str | None] = (
        (lambda topic: check(topic, options)) if takes_options(check) else check
    )
    return TopicRules(safe_rule, check_rule)


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
    for name in ("safe_token", "check_topic"):
        problem = _signature_problem(obj, name)
        if problem is not None:
            return problem
    loggers = getattr(obj, "quiet_loggers", ())
    if not (isinstance(loggers, tuple) and all(isinstance(n, str) for n in loggers)):
        return f"{obj.__qualname__}.quiet_loggers must be a tuple of logger names"
    return None
