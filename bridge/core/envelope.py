"""The canonical CloudEvents 1.0 envelope of every price update.

One :class:`Event` is made per valid upstream record (see :mod:`bridge.pipeline.normalize`).
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

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

from bridge.core.kinds import TYPES

FORMATS: Final = ("cloudevents-json", "cloudevents-binary", "raw")
Format = Literal["cloudevents-json", "cloudevents-binary", "raw"]

SPECVERSION: Final = "1.0"
DEFAULT_SOURCE: Final = "https://pricing.aleno.ai/v1/socket"
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

#: ``(kind, raw record, received_ms, source) -> data``: how the deprecated header
#: accessors rebuild ``data`` from a ``raw`` body. :mod:`bridge.pipeline.normalize` installs its
#: validation here when it is imported (it imports this module, so this module does not
#: import it back); every event is made by its ``Normalizer``, so it is installed
#: whenever a ``raw`` body exists.
_raw_to_data: Callable[[str, Any, int, str], dict[str, Any]] | None = None


def install_raw_decoder(decode: Callable[[str, Any, int, str], dict[str, Any]]) -> None:
    """Set how a ``raw`` body is turned back into ``data`` (see :data:`_raw_to_data`)."""
    global _raw_to_data
    _raw_to_data = decode


class EventHeader:
    """The light part of an event: what a sink buffer keeps next to the encoded bytes.

    A :class:`~bridge.sinks.Message` carries this as ``message.event``: one header is
    shared by every message of one event (one per sink and topic), and it holds no
    reference to the event's ``data``/``raw`` trees, so a buffered message costs its
    encoded body plus about 300 bytes, not the whole decoded record.

    Attributes: ``kind``, ``symbol``, ``base``, ``quote``, ``id``, ``sent_ms``,
    ``received_ms``, ``time``, ``price``, ``source``; ``type`` is the CloudEvents type.
    :meth:`attributes` gives the CloudEvents context attributes.

    ``data``, ``raw``, ``prices`` and :meth:`envelope` are still answered, for plugins
    written against the full :class:`Event`, but they are decoded again from the
    encoded body on each access and emit a :class:`DeprecationWarning`: read the
    message's ``body`` (or the fields above) instead.
    """

    __slots__ = (
        "_body",
        "_format",
        "base",
        "id",
        "kind",
        "price",
        "quote",
        "received_ms",
        "sent_ms",
        "source",
        "symbol",
        "time",
    )

    kind: str
    symbol: str
    base: str
    quote: str
    id: str
    sent_ms: int
    received_ms: int
    time: str
    price: float
    source: str
    _body: bytes | None
    _format: str | None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, price={self.price!r})"

    @property
    def type(self) -> str:
        return TYPES[self.kind]

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

    # -- deprecated: decoded again from the encoded body -------------------------

    def _decoded_data(self) -> dict[str, Any]:
        body, fmt = self._body, self._format
        if body is None:
            msg = f"{self!r} has no encoded body to decode data from"
            raise AttributeError(msg)
        if fmt == "cloudevents-json":
            data: dict[str, Any] = orjson.loads(body)["data"]
            return data
        if fmt == "cloudevents-binary":
            data = orjson.loads(body)
            return data
        if _raw_to_data is None:
            msg = (f"{self!r}: a raw body is decoded by bridge.pipeline.normalize, "
                   "which is not loaded")
            raise AttributeError(msg)
        return _raw_to_data(self.kind, orjson.loads(body), self.received_ms, self.source)

    @property
    def data(self) -> dict[str, Any]:
        """Deprecated on a message's header: decode ``message.body`` instead."""
        _deprecated("data")
        return self._decoded_data()

    @property
    def raw(self) -> Any:
        """Deprecated on a message's header. The upstream record when the body is in
        ``raw`` format, else a record rebuilt from the validated ``data``."""
        _deprecated("raw")
        if self._format == "raw" and self._body is not None:
            return orjson.loads(self._body)
        data = self._decoded_data()
        if self.kind == "equity":
            return {"sentTimestampMs": data["sentTimestampMs"], "symbol": data["symbol"],
                    "price": data["price"]}
        out = {"id": data["symbol"]}
        out.update({k: data[k] for k in ("aggregated", "cex", "dex") if data.get(k) is not None})
        out["sentTimestampMs"] = data["sentTimestampMs"]
        return out

    @property
    def prices(self) -> tuple[Any, ...]:
        """Deprecated on a message's header (what ``publish: on_change`` compares)."""
        _deprecated("prices")
        data = self._decoded_data()
        if self.kind == "equity":
            return (data["price"],)
        cex, dex = data.get("cex"), data.get("dex")
        return (data["price"], cex["price"] if cex else None, dex["price"] if dex else None)

    def envelope(self) -> dict[str, Any]:
        """Deprecated on a message's header: the structured-mode envelope as a dict."""
        _deprecated("envelope()")
        env: dict[str, Any] = self.attributes()
        env["data"] = self._decoded_data()
        return env


def _deprecated(what: str) -> None:
    warnings.warn(
        f"message.event.{what} is deprecated: a buffered message keeps only a light event "
        "header, so this is decoded again from the body on every access; read "
        "message.body, or the header fields (kind, symbol, price, time, id...)",
        DeprecationWarning,
        stacklevel=3,
    )


_new_header: Final = object.__new__


class Event(EventHeader):
    """A validated price update, ready to be enveloped.

    ``kind`` is ``"ticker"`` or ``"equity"``; ``base``/``quote`` split a ticker symbol
    (``BTC/USD``); for an equity ``base`` is the symbol and ``quote`` is empty.
    ``data`` is the envelope's ``data`` member; ``raw`` the record as received.
    ``prices`` is what ``publish: on_change`` compares.

    An event lives only until it is routed: the messages handed to sinks keep its
    encoded bytes and its light :attr:`header`, not the event itself.
    """

    __slots__ = ("_encoded", "_header", "data", "prices", "raw")

    _header: EventHeader

    data: dict[str, Any]
    raw: Any
    prices: tuple[Any, ...]

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
        self.price = price = data["price"]
        self.id = eid = f"{kind}:{symbol}:{sent_ms}"
        self._encoded: dict[str, Encoded] = {}
        self._body = None
        self._format = None
        # the header is built here, from locals, where it is cheapest (hot path)
        h = self._header = _new_header(EventHeader)
        h.kind = kind
        h.symbol = symbol
        h.base = base
        h.quote = quote
        h.id = eid
        h.sent_ms = sent_ms
        h.received_ms = received_ms
        h.time = time
        h.price = price
        h.source = source
        h._body = None
        h._format = None

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, price={self.data.get('price')!r})"

    @property
    def header(self) -> EventHeader:
        """The light header of this event, made once and shared by all its messages.

        It keeps the first encoded body (the same bytes object the messages carry),
        from which the deprecated ``data``/``raw`` accessors decode.
        """
        h = self._header
        if h._body is None:
            enc = self._encoded
            if not enc:
                self.encoded("cloudevents-json")
            fmt, first = next(iter(enc.items()))
            h._body = first.body
            h._format = fmt
        return h

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


def _exact(body: bytes) -> bytes:
    """``body`` in a bytes object of its own size.

    ``orjson.dumps`` returns its 4 KiB output buffer without shrinking it, so a
    400-byte envelope would keep 4 KiB alive in every sink buffer that holds it
    (measured: 4,098 bytes per ``dumps`` of a 408-byte body). The copy costs about
    75 ns; it is what makes a buffered event cost ~0.8 KB instead of ~4.5 KB.
    """
    return memoryview(body).tobytes()


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
    return Encoded(_exact(body), CLOUDEVENTS_JSON, _EMPTY)


def _binary(event: Event) -> Encoded:
    attrs = event.attributes()
    del attrs["datacontenttype"]
    return Encoded(_exact(orjson.dumps(event.data)), JSON, attrs)


def _raw(event: Event) -> Encoded:
    return Encoded(_exact(orjson.dumps(event.raw)), JSON, _EMPTY)


_ENCODERS: Final = {
    "cloudevents-json": _structured,
    "cloudevents-binary": _binary,
    "raw": _raw,
}


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
