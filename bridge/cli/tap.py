"""``aleno-bridge tap``: watch the envelopes a configuration produces, live.

It runs the configured source and routes in this process and prints one JSON line
per event: the envelope and where it goes (route, sink, topic, key). By default it
only observes: every sink is replaced by one that discards, so a tap never writes to
a bus; ``--publish`` keeps the real sinks. A tap never serves the HTTP endpoints: it
runs beside the real bridge and must not take its port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from bridge.app import Bridge, serve
from bridge.config import ConfigError, Settings, load_config
from bridge.core import logs
from bridge.core.envelope import Event
from bridge.core.state import Destination
from bridge.sinks import Message, Sink, SinkOptions


class _DiscardOptions(SinkOptions):
    pass


class DiscardSink(Sink[_DiscardOptions]):
    """Accepts everything, keeps nothing (what ``tap`` puts in place of real sinks)."""

    options_model = _DiscardOptions

    async def connect(self) -> None:
        return None

    async def publish(self, batch: Sequence[Message]) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class TapOptions:
    """What a tap shows, and whether the real sinks publish too."""

    #: only events of this route (its name, or ``routeN``)
    route: str | None = None
    #: only events routed to this sink
    sink: str | None = None
    #: stop after this many envelopes
    limit: int | None = None
    #: also publish to the configured sinks (default: observe only)
    publish: bool = False

    def check(self, settings: Settings) -> None:
        """Raise :class:`ConfigError` when a filter names no route or sink of ``settings``."""
        names = [r.name or f"route{i}" for i, r in enumerate(settings.routes)]
        problems = []
        if self.route is not None and self.route not in names:
            problems.append(f"--route: no route named {self.route!r} "
                            f"(routes: {', '.join(names)})")
        if self.sink is not None and self.sink not in settings.sinks:
            problems.append(f"--sink: no sink named {self.sink!r} "
                            f"(sinks: {', '.join(settings.sinks)})")
        if problems:
            raise ConfigError(problems, "tap filter")


#: where the events of a (kind, symbol) go (:meth:`bridge.app.Bridge.destinations`)
Destinations = Callable[[str, str], Sequence[Destination]]


class Tap:
    """Prints the events that pass the ``route`` / ``sink`` filters, with where they go
    (``destinations``); calls ``on_done`` once ``limit`` envelopes were printed."""

    def __init__(self, options: TapOptions, destinations: Destinations, out: Any = None,
                 on_done: Callable[[], None] | None = None) -> None:
        self.options = options
        self.destinations = destinations
        self.count = 0
        self.finished = False
        self.out = out or sys.stdout
        self._on_done = on_done

    def __call__(self, event: Event) -> None:
        if self.finished:
            return
        route, sink = self.options.route, self.options.sink
        targets = [
            {"route": d.route, "sink": d.sink, "topic": d.topic, "key": d.key}
            for d in self.destinations(event.kind, event.symbol)
            if (route is None or d.route == route) and (sink is None or d.sink == sink)
        ]
        if not targets and (route or sink):
            return
        line = orjson.dumps({"to": targets, "envelope": event.envelope()})
        self.out.write(line.decode() + "\n")
        self.out.flush()
        self.count += 1
        limit = self.options.limit
        if limit is not None and self.count >= limit:
            self.finished = True
            if self._on_done is not None:
                self._on_done()


def without_spools(settings: Settings) -> Settings:
    """``settings`` with every sink's buffer in memory only (no ``buffer.disk``)."""
    sinks = {}
    for name, spec in settings.sinks.items():
        buffer = spec.common.buffer.model_copy(update={"disk": None})
        sinks[name] = dataclasses.replace(
            spec, common=spec.common.model_copy(update={"buffer": buffer}))
    return dataclasses.replace(settings, sinks=sinks)


def run_tap(config: str, options: TapOptions) -> int:
    """Tap the bridge the configuration file ``config`` describes until the limit or
    SIGINT/SIGTERM; 0 when it ends."""
    settings = load_config(config)
    options.check(settings)
    logs.setup("WARNING", "text", secrets=settings.secrets())

    async def main() -> int:
        stop = asyncio.Event()
        sinks = None if options.publish else {n: DiscardSink(n, _DiscardOptions())
                                              for n in settings.sinks}
        # an observing tap never opens the sinks' disk spools: it would take them from
        # the running bridge, or hand what they hold to a sink that discards it
        tapped = settings if options.publish else without_spools(settings)
        bridge = Bridge.from_settings(tapped, sinks=sinks, http=False)
        bridge.add_tap(Tap(options, bridge.destinations, on_done=stop.set))
        await serve(bridge, stop)
        return 0

    return asyncio.run(main())


__all__ = ["DiscardSink", "Tap", "TapOptions", "run_tap", "without_spools"]
