"""The canonical CloudEvents 1.0 envelope of every price update.

One :class:`Event` is made per valid upstream record (see :mod:`bridge.normalize`).
It is encoded at most once per wire format, however many routes and sinks carry it:
:meth:`Event.encoded` caches the bytes.

Formats
-------
``cloudevents-json``
    structured mode: the body is the whole envelope as JSON
    (``datacontenttype: application/json``).
``cloudevents-binary``
    binary mode: the body is ``data`` as JSON, the context attributes travel as
    :attr:`Encoded.attributes`; each driver maps them onto its bus the way the
    CloudEvents protocol binding for that bus says (Kafka ``ce_*`` headers,
    NATS ``ce-*`` headers, MQTT 5 user properties).
``raw``
    the upstream record exactly as decoded from the wire, re-serialized as JSON.

The ``id`` is ``"{kind}:{symbol}:{sentTimestampMs}"``: the same upstream record always
gets the same id, in every replica and on every retry, so it is the dedup key
downstream (JetStream ``Nats-Msg-Id``, Kafka header ``ce_id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

FORMATS: Final = ("cloudevents-json", "cloudevents-binary", "raw")
Format = Literal["cloudevents-json", "cloudevents-binary", "raw"]

SPECVERSION: Final = "1.0"
DEFAULT_SOURCE: Final = "https://pricing.aleno.ai/v1/socket"
TYPES: Final = {"ticker": "ai.aleno.ticker.v1", "equity": "ai.aleno.equity.v1"}
JSON: Final = "application/json"
CLOUDEVENTS_JSON: Final = "application/cloudevents+json"


@dataclass(slots=True)
class Encoded:
    """One event in one wire format.

    ``attributes`` holds the CloudEvents context attributes (``specversion``, ``id``,
    ``source``, ``type``, ``subject``, ``time``) in binary mode and is empty otherwise.
    ``content_type`` is the MIME type of ``body``.
    """

    body: bytes
    content_type: str
    attributes: dict[str, str]


_EMPTY: Final[dict[str, str]] = {}


class Event:
    """A validated price update, ready to be enveloped.

    ``kind`` is ``"ticker"`` or ``"equity"``; ``base``/``quote`` split a ticker symbol
    (``BTC/USD``); for an equity ``base`` is the symbol and ``quote`` is empty.
    ``data`` is the envelope's ``data`` member; ``raw`` the record as received.
    ``prices`` is what ``publish: on_change`` compares.
    """

    __slots__ = (
        "_encoded",
        "base",
        "data",
        "id",
        "kind",
        "prices",
        "quote",
        "raw",
        "received_ms",
        "sent_ms",
        "source",
        "symbol",
        "time",
    )

    def __init__(
        self,
        kind: str,
        symbol: str,
        base: str,
        quote: str,
        sent_ms: int,
        received_ms: int,
        time: str,
        data: dict[str, Any],
        raw: Any,
        prices: tuple[Any, ...],
        source: str = DEFAULT_SOURCE,
    ) -> None:
        self.kind = kind
        self.symbol = symbol
        self.base = base
        self.quote = quote
        self.sent_ms = sent_ms
        self.received_ms = received_ms
        self.time = time
        self.data = data
        self.raw = raw
        self.prices = prices
        self.source = source
        self.id = f"{kind}:{symbol}:{sent_ms}"
        self._encoded: dict[str, Encoded] = {}

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, price={self.data.get('price')!r})"

    @property
    def type(self) -> str:
        return TYPES[self.kind]

    @property
    def price(self) -> float:
        price: float = self.data["price"]
        return price

    def attributes(self) -> dict[str, str]:
        """The CloudEvents context attributes, without ``data``."""
        return {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": TYPES[self.kind],
            "subject": self.symbol,
            "time": self.time,
            "datacontenttype": JSON,
        }

    def envelope(self) -> dict[str, Any]:
        """The structured-mode envelope as a dict (the ``cloudevents-json`` body)."""
        env: dict[str, Any] = self.attributes()
        env["data"] = self.data
        return env

    def encoded(self, fmt: str) -> Encoded:
        """This event in wire format ``fmt``; computed once per format, then cached."""
        enc = self._encoded.get(fmt)
        if enc is None:
            enc = self._encoded[fmt] = _ENCODERS[fmt](self)
        return enc


def _structured(event: Event) -> Encoded:
    body = orjson.dumps({
        "specversion": SPECVERSION,
        "id": event.id,
        "source": event.source,
        "type": TYPES[event.kind],
        "subject": event.symbol,
        "time": event.time,
        "datacontenttype": JSON,
        "data": event.data,
    })
    return Encoded(body, CLOUDEVENTS_JSON, _EMPTY)


def _binary(event: Event) -> Encoded:
    attrs = event.attributes()
    del attrs["datacontenttype"]
    return Encoded(orjson.dumps(event.data), JSON, attrs)


def _raw(event: Event) -> Encoded:
    return Encoded(orjson.dumps(event.raw), JSON, _EMPTY)


_ENCODERS: Final = {
    "cloudevents-json": _structured,
    "cloudevents-binary": _binary,
    "raw": _raw,
}


def decode_structured(body: bytes | str) -> dict[str, Any]:
    """Parse a ``cloudevents-json`` body (used by consumers, tests and ``tap``)."""
    env: dict[str, Any] = orjson.loads(body)
    return env


_time_cache: dict[int, str] = {}


def iso_time(ms: int) -> str:
    """RFC 3339 UTC time with millisecond precision: ``2024-11-24T20:26:40.000Z``.

    Every record of one upstream batch carries the same ``sentTimestampMs``, so a tiny
    cache turns this into a dict look-up on the hot path.
    """
    text = _time_cache.get(ms)
    if text is None:
        if len(_time_cache) > 64:
            _time_cache.clear()
        dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
        text = _time_cache[ms] = dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return text
