"""The ``bars`` section of the configuration schema: the OHLC bars the bridge builds from
the prices (:mod:`bridge.pipeline.bars`), and the checks that tie it to the routes and
sinks. Part of :mod:`bridge.config.schema`, which re-exports every name here.

An interval is a number and a unit (``500ms``, ``1s``, ``90s``, ``1m``, ``5m``, ``1h``,
``1d``); it is kept in its canonical spelling, the largest unit that divides it
(``60s`` is ``1m``), because the label is part of every bar's id and topic: two spellings
of one interval must not make two streams.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Protocol

from pydantic import AfterValidator, Field, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from bridge.config.schema_base import _Model
from bridge.core.kinds import BAR_KIND, PriceKind
from bridge.core.templates import kind_placeholder_problem

#: the units of an interval, in milliseconds, the largest first (the canonical spelling)
UNITS: Final = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
#: the shortest and the longest interval
MIN_INTERVAL_MS: Final = 100
MAX_INTERVAL_MS: Final = 86_400_000
#: at most this many intervals (each costs one dictionary update per record)
MAX_INTERVALS: Final = 16
DEFAULT_INTERVALS: Final = ("1s", "1m", "5m", "1h")
_INTERVAL: Final = re.compile(r"^\s*([0-9]{1,9})\s*(ms|s|m|h|d)\s*$")


def interval_ms(text: str) -> int:
    """The length of an interval (``"5m"`` -> 300000); ``ValueError`` with the rule."""
    m = _INTERVAL.match(text) if isinstance(text, str) else None
    if m is None:
        msg = (f"{text!r} is not an interval: a whole number and a unit, one of ms, s, m, "
               "h, d (1s, 1m, 5m, 1h)")
        raise ValueError(msg)
    ms = int(m.group(1)) * UNITS[m.group(2)]
    if not MIN_INTERVAL_MS <= ms <= MAX_INTERVAL_MS:
        msg = f"{text!r}: an interval must be from {MIN_INTERVAL_MS}ms to 1d"
        raise ValueError(msg)
    return ms


def interval_label(ms: int) -> str:
    """The canonical spelling of an interval of ``ms`` milliseconds (60000 -> ``1m``)."""
    for unit, size in UNITS.items():
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"  # pragma: no cover - "ms" divides every whole number


def _canonical(text: str) -> str:
    return interval_label(interval_ms(text))


Interval = Annotated[str, AfterValidator(_canonical)]


def _every_feed() -> list[PriceKind]:
    return ["ticker", "equity"]


class BarsConfig(_Model):
    """``bars``: OHLC bars by event time (``sentTimestampMs``), aligned to UTC, published
    as ``ai.aleno.bar.v1`` events (kind ``bar``). See "Bars" in
    ``docs/consuming-prices.md`` for what a bar promises."""

    #: the bar lengths, canonical and shortest first
    intervals: list[Interval] = Field(default_factory=lambda: list(DEFAULT_INTERVALS),
                                      min_length=1, max_length=MAX_INTERVALS)
    #: a bar is final when the bridge's clock passes its end plus this
    grace_ms: int = Field(500, ge=0, le=600_000)
    #: the price feeds bars are built for
    kinds: list[PriceKind] = Field(default_factory=lambda: _every_feed(), min_length=1)
    #: shell-style globs of the symbols bars are built for (case-insensitive)
    symbols: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    #: also publish the bar in progress (``final: false``) after each update
    partial: bool = False

    @field_validator("intervals")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for label in v:
            if label in seen:
                msg = f"{label} is listed twice (intervals are compared in their canonical " \
                      "spelling: 60s is 1m)"
                raise ValueError(msg)
            seen.add(label)
        return sorted(v, key=interval_ms)

    @field_validator("symbols")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        out = [s.strip().upper() for s in v]
        if any(not s for s in out):
            msg = "an empty pattern; use \"*\" for every symbol"
            raise ValueError(msg)
        return out

    def lengths(self) -> list[tuple[str, int]]:
        """``(label, milliseconds)`` of each interval, shortest first."""
        return [(label, interval_ms(label)) for label in self.intervals]


# -- what the bars section means for the routes ---------------------------------------


class _Match(Protocol):
    @property
    def kind(self) -> str: ...


class _Route(Protocol):
    @property
    def match(self) -> _Match: ...
    @property
    def sinks(self) -> Sequence[str]: ...
    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> str: ...


class _Buffer(Protocol):
    @property
    def when_full(self) -> str: ...


class _Sink(Protocol):
    @property
    def buffer(self) -> _Buffer: ...


def _problem(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("bars", message), loc=loc, input=value)


def bar_route_problems(bars: BarsConfig | None, routes: Sequence[_Route],
                       sinks: Mapping[str, _Sink]) -> list[InitErrorDetails]:
    """What the routes ask of bars that cannot be: a ``kind: bar`` route without a
    ``bars`` section (it would never carry anything), a bar route to a sink that
    conflates (``when_full: conflate`` keeps one message per symbol and topic: a final
    bar still queued would be replaced by the next one), and ``{interval}`` / ``{feed}``
    in a route whose events have none. Each problem is located at its path."""
    out: list[InitErrorDetails] = []
    for i, route in enumerate(routes):
        kind = route.match.kind
        for field in ("topic", "key"):
            template = getattr(route, field)
            problem = kind_placeholder_problem(template, kind)
            if problem is not None:
                out.append(_problem(("routes", i, field), problem, template))
        if kind != BAR_KIND:
            continue
        if bars is None:
            out.append(_problem(("routes", i, "match", "kind"),
                                "bars are built only when the configuration has a bars "
                                "section (bars: {} for the defaults)", kind))
        for j, name in enumerate(route.sinks):
            sink = sinks.get(name)
            if sink is not None and sink.buffer.when_full == "conflate":
                out.append(_problem(
                    ("routes", i, "sinks", j),
                    f"sink {name!r} conflates (buffer.when_full: conflate): it keeps one "
                    "message per symbol and topic, so a final bar still queued would be "
                    "replaced by the next bar; send bars to a sink that does not conflate",
                    name))
    return out


__all__ = [
    "DEFAULT_INTERVALS",
    "MAX_INTERVALS",
    "MAX_INTERVAL_MS",
    "MIN_INTERVAL_MS",
    "UNITS",
    "BarsConfig",
    "bar_route_problems",
    "interval_label",
    "interval_ms",
]
