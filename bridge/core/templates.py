"""Topic and key templates, and the symbol matching of a route.

Shared by the configuration (which refuses a template that can never be valid before
the bridge starts) and the router (which renders the templates at run time), so both
agree on the placeholders, the values they take and which (kind, symbol) a route
selects. Only the standard library is imported here: the schema and the router both
depend on this module, never the other way round.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Final, Protocol

#: the placeholders a topic or key template may use
PLACEHOLDERS: Final = ("kind", "symbol", "base", "quote")

#: the (kind, symbol) pairs every topic is checked with, besides the configured symbols
NEUTRAL_SAMPLES: Final = (("ticker", "BTC/USD"), ("equity", "AAPL"),
                          ("status", "BTC/USD"), ("status", "AAPL"), ("status", "upstream"))


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


def placeholder_values(kind: str, symbol: str) -> dict[str, str]:
    """``{kind}``, ``{symbol}``, ``{base}``, ``{quote}`` of a (kind, symbol).

    A ticker ``BTC/USD`` has base ``BTC`` and quote ``USD``; an equity ``AAPL`` has
    base ``AAPL`` and an empty quote.
    """
    base, sep, quote = symbol.partition("/")
    if not sep:
        base, quote = symbol, ""
    return {"kind": kind, "symbol": symbol, "base": base, "quote": quote}


def matches(match: SymbolMatch, kind: str, symbol: str) -> bool:
    """Whether a route's ``match`` selects this (kind, symbol); globs are shell-style."""
    if match.kind != kind and (match.kind != "*" or kind == "status"):
        return False  # ``*`` is every price kind; status events only by ``kind: status``
    symbol = symbol.upper()  # ``upstream``, the subject of down/up, matches UPSTREAM
    if not any(fnmatchcase(symbol, p.strip().upper()) for p in match.symbols):
        return False
    return not any(fnmatchcase(symbol, p.strip().upper()) for p in match.exclude)


def render(template: str, kind: str, symbol: str, safe_token: Callable[[str], str]) -> str:
    """``template`` for (kind, symbol), every placeholder value passed through
    ``safe_token`` (a driver's rule for characters its bus forbids in a topic)."""
    values = {k: safe_token(v) for k, v in placeholder_values(kind, symbol).items()}
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
    "NEUTRAL_SAMPLES",
    "PLACEHOLDERS",
    "SymbolMatch",
    "matches",
    "placeholder_values",
    "render",
    "template_problem",
    "topic_problem",
]
