"""Declarative routing: which sinks get an event, under which topic and key.

Routes are compiled once. The first event of a (kind, symbol) computes its targets
(matching routes, rendered topic and key per sink, with the sink driver's safe-token
rule applied to every placeholder value); every later event of that pair costs one
dict look-up. Per-route gates (``publish: on_change``, ``min_interval_s``) keep their
state per (route, kind, symbol). A bar's targets are computed per (feed, symbol,
interval), its topic may name both (``{feed}``, ``{interval}``), and its gates are kept
per interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from bridge.config.schema import RouteConfig
from bridge.core.envelope import Event
from bridge.core.kinds import BAR_KIND
from bridge.core.state import RouterSnapshot, frozen_counts
from bridge.core.templates import matches, placeholder_values, route_values
from bridge.pipeline.bars import BarEvent
from bridge.sinks import Message


class Offer(Protocol):
    """What the router hands messages to (a sink worker)."""

    @property
    def name(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def safe_token(self) -> Callable[[str], str]: ...

    def offer(self, message: Message) -> Any: ...


@dataclass(slots=True)
class Gate:
    """``publish: on_change`` and ``min_interval_s`` state of one route for one symbol."""

    on_change: bool
    min_interval_ms: float
    last_prices: tuple[Any, ...] | None = None
    last_sent_ms: int | None = None

    def admit(self, event: Event) -> str | None:
        """``None`` to let the event pass, else the reason it is filtered."""
        if self.on_change and event.prices == self.last_prices:
            return "unchanged"
        if (
            self.min_interval_ms
            and self.last_sent_ms is not None
            and event.sent_ms - self.last_sent_ms < self.min_interval_ms
        ):
            return "min_interval"
        self.last_prices = event.prices
        self.last_sent_ms = event.sent_ms
        return None


@dataclass(slots=True)
class Target:
    worker: Offer
    topic: str
    key: str | None


@dataclass(slots=True)
class RouteHit:
    """One matching route for one (kind, symbol): its gate and its sink targets."""

    route: str
    gate: Gate | None
    targets: list[Target] = field(default_factory=list)


class Router:
    """Compiled routes over a set of sink workers."""

    def __init__(self, routes: Sequence[RouteConfig], workers: Mapping[str, Offer]) -> None:
        self.routes = list(routes)
        self.names = [r.name or f"route{i}" for i, r in enumerate(self.routes)]
        self.workers = workers
        self._cache: dict[tuple[str, str], list[RouteHit]] = {}
        #: the bars' targets: (feed, symbol) -> interval -> hits
        self._bars: dict[tuple[str, str], dict[str, list[RouteHit]]] = {}
        #: events that matched no route, and events a gate filtered, by route and reason
        self.unrouted = 0
        self.filtered: dict[tuple[str, str], int] = {}

    def snapshot(self) -> RouterSnapshot:
        """Events unrouted and filtered so far, for operator code."""
        return RouterSnapshot(self.unrouted, frozen_counts(self.filtered))

    def hits(self, kind: str, symbol: str) -> list[RouteHit]:
        key = (kind, symbol)
        hits = self._cache.get(key)
        if hits is None:
            hits = self._cache[key] = self._compile(kind, symbol)
        return hits

    def forget(self, kind: str, symbols: Iterable[str]) -> None:
        """Drop what the router keeps per symbol (its matched routes and their
        ``on_change`` / ``min_interval_s`` gates) for symbols no longer subscribed:
        a symbol subscribed again starts afresh, and the cache holds only what flows."""
        cache, bars = self._cache, self._bars
        for s in symbols:
            cache.pop((kind, s), None)
            bars.pop((kind, s), None)

    def bar_hits(self, feed: str, symbol: str, interval: str) -> list[RouteHit]:
        """The routes of the bars of (feed, symbol) of one interval."""
        by_interval = self._bars.get((feed, symbol))
        if by_interval is None:
            by_interval = self._bars[(feed, symbol)] = {}
        hits = by_interval.get(interval)
        if hits is None:
            hits = by_interval[interval] = self._compile(BAR_KIND, symbol, feed, interval)
        return hits

    def _compile(self, kind: str, symbol: str, feed: str | None = None,
                 interval: str = "") -> list[RouteHit]:
        values = route_values(kind, symbol, feed, interval)
        out = []
        for name, route in zip(self.names, self.routes, strict=True):
            if not matches(route.match, kind, symbol):
                continue
            gate = None
            if route.publish == "on_change" or route.min_interval_s:
                gate = Gate(route.publish == "on_change", route.min_interval_s * 1000.0)
            hit = RouteHit(name, gate)
            for sink in route.sinks:
                worker = self.workers[sink]
                safe = {k: worker.safe_token(v) for k, v in values.items()}
                topic = route.topic.format(**safe)
                # keys are opaque bytes on every bus: no safe-token rule applies
                key = route.key.format(**values) if route.key else None
                hit.targets.append(Target(worker, topic, key))
            out.append(hit)
        return out

    def dispatch(self, event: Event) -> list[Any]:
        """Offer ``event`` to every sink its routes select.

        Returns what the workers' ``offer`` returned that is awaitable (only sinks
        whose buffer is full under ``when_full: block`` return one).
        """
        if event.kind == BAR_KIND:
            bar = cast(BarEvent, event)
            hits = self.bar_hits(bar.feed, bar.symbol, bar.interval)
        else:
            hits = self.hits(event.kind, event.symbol)
        if not hits:
            if event.kind != "status":  # status events are routed only where asked for
                self.unrouted += 1
            return []
        pending = []
        for hit in hits:
            if hit.gate is not None:
                reason = hit.gate.admit(event)
                if reason is not None:
                    k = (hit.route, reason)
                    self.filtered[k] = self.filtered.get(k, 0) + 1
                    continue
            for t in hit.targets:
                enc = event.encoded(t.worker.format)
                waiter = t.worker.offer(
                    Message(t.topic, t.key, enc.body, enc.content_type, event.header,
                            enc.attributes)
                )
                if waiter is not None:
                    pending.append(waiter)
        return pending


# ``placeholder_values`` and ``matches`` live in bridge.core.templates (shared with the
# configuration's topic checks) and stay importable from here
__all__ = ["Gate", "Offer", "RouteHit", "Router", "Target", "matches", "placeholder_values"]
