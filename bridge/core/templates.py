"""Topic and key templates, and the symbol matching of a route.

Shared by the configuration (which refuses a template that can never be valid before
the bridge starts) and the router (which renders the templates at run time), so both
agree on the placeholders, the values they take and which (kind, symbol) a route
selects. Only the standard library is imported here: the schema and the router both
depend on this module, never the other way round.

``{feed}`` is the price feed (``ticker`` / ``equity``) of a price or a bar, and
``{interval}`` the interval of a bar (``1m``); a route whose events have no such value
cannot use it (:func:`kind_placeholder_problem`).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Final, Protocol

# the kinds' names of bridge.core.kinds, spelled here because this module imports
# nothing of the bridge (tests/unit/pipeline/test_bars.py checks they agree)
PRICE_KINDS: Final = ("ticker", "equity")
BAR_KIND: Final = "bar"

#: the placeholders a topic or key template may use
PLACEHOLDERS: Final = ("kind", "symbol", "base", "quote", "feed", "interval")
#: the placeholders only some kinds of events have, and the route kinds that have them
#: (``*`` is every price kind)
KIND_PLACEHOLDERS: Final = {"feed": (*PRICE_KINDS, "*", BAR_KIND), "interval": (BAR_KIND,)}
#: the interval a bar topic is checked with (every interval renders the same characters)
SAMPLE_INTERVAL: Final = "1m"

#: the (kind, symbol) pairs every topic is checked with, besides the configured symbols
NEUTRAL_SAMPLES: Final = (("ticker", "BTC/USD"), ("equity", "AAPL"),
                          ("status", "BTC/USD"), ("status", "AAPL"), ("status", "upstream"),
                          (BAR_KIND, "BTC/USD"), (BAR_KIND, "AAPL"))


class SymbolMatch(Protocol):
    """What :func:`matches` reads of a route's ``match`` (``bridge.config.schema.Match``)."""

    @property
    def kind(self) -> str: ...
    @property
    def symbols(self) -> Sequence[str]: ...
    @property
    def exclude(self) -> Sequence[str]: ...


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a valid topic/key template, or ``None``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"invalid template {template!r}: {exc}"
    for _, field_name, spec, conv in parsed:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            return f"unknown placeholder {{{field_name}}} in {template!r}; use {allowed}"
        if spec or conv:
            return f"placeholder {{{field_name}}} in {template!r} takes no format spec"
    return None


def kind_placeholder_problem(template: str, kind: str) -> str | None:
    """Why ``template`` cannot be rendered for the events of a route of ``kind`` (a
    placeholder they have no value for), or ``None``. ``template`` must have passed
    :func:`template_problem`."""
    for _, field_name, _, _ in string.Formatter().parse(template):
        kinds = KIND_PLACEHOLDERS.get(field_name or "")
        if kinds is not None and kind not in kinds:
            return (f"{{{field_name}}} in {template!r}: only "
                    + " and ".join(k if k != "*" else "prices" for k in kinds[-2:])
                    + f" events have it, not {'prices' if kind == '*' else kind}")
    return None


def placeholder_values(kind: str, symbol: str) -> dict[str, str]:
    """``{kind}``, ``{symbol}``, ``{base}``, ``{quote}`` of a (kind, symbol).

    A ticker ``BTC/USD`` has base ``BTC`` and quote ``USD``; an equity ``AAPL`` has
    base ``AAPL`` and an empty quote.
    """
    base, sep, quote = symbol.partition("/")
    if not sep:
        base, quote = symbol, ""
    return {"kind": kind, "symbol": symbol, "base": base, "quote": quote}


def route_values(kind: str, symbol: str, feed: str | None = None,
                 interval: str = "") -> dict[str, str]:
    """Every placeholder's value for an event of (kind, symbol): those of
    :func:`placeholder_values`, ``{feed}`` (the kind of a price; ``feed`` must be given
    for a bar) and ``{interval}`` (a bar's)."""
    values = placeholder_values(kind, symbol)
    values["feed"] = feed if feed is not None else kind if kind in PRICE_KINDS else ""
    values["interval"] = interval
    return values


def matches(match: SymbolMatch, kind: str, symbol: str) -> bool:
    """Whether a route's ``match`` selects this (kind, symbol); globs are shell-style."""
    if match.kind != kind and (match.kind != "*" or kind not in PRICE_KINDS):
        # ``*`` is every price kind; status events and bars only by their own kind
        return False
    symbol = symbol.upper()  # ``upstream``, the subject of down/up, matches UPSTREAM
    if not any(fnmatchcase(symbol, p.strip().upper()) for p in match.symbols):
        return False
    return not any(fnmatchcase(symbol, p.strip().upper()) for p in match.exclude)


def render(template: str, kind: str, symbol: str, safe_token: Callable[[str], str]) -> str:
    """``template`` for (kind, symbol), every placeholder value passed through
    ``safe_token`` (a driver's rule for characters its bus forbids in a topic). A bar
    is rendered with :data:`SAMPLE_INTERVAL` and the feed its symbol suggests."""
    if kind == BAR_KIND:
        feed = "ticker" if "/" in symbol else "equity"
        raw = route_values(kind, symbol, feed, SAMPLE_INTERVAL)
    else:
        raw = route_values(kind, symbol)
    values = {k: safe_token(v) for k, v in raw.items()}
    return template.format(**values)


def topic_problem(
    template: str,
    match: SymbolMatch,
    samples: Iterable[tuple[str, str]],
    safe_token: Callable[[str], str],
    check_topic: Callable[[str], str | None],
) -> tuple[str, str, str] | None:
    """The first sample (kind, symbol) selected by ``match`` whose rendered topic
    ``check_topic`` refuses, as ``(symbol, topic, problem)``; ``None`` if every one can
    be published. ``template`` must have passed :func:`template_problem`."""
    for kind, symbol in samples:
        if not matches(match, kind, symbol):
            continue
        topic = render(template, kind, symbol, safe_token)
        problem = check_topic(topic)
        if problem:
            return symbol, topic, problem
    return None


__all__ = [
    "KIND_PLACEHOLDERS",
    "NEUTRAL_SAMPLES",
    "PLACEHOLDERS",
    "SAMPLE_INTERVAL",
    "SymbolMatch",
    "kind_placeholder_problem",
    "matches",
    "placeholder_values",
    "render",
    "route_values",
    "template_problem",
    "topic_problem",
]
