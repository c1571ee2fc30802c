"""``aleno-bridge tap``: watch the envelopes a configuration produces, live.

It runs the configured source and routes in this process and prints one JSON line
per event: the envelope and where it goes (route, sink, topic, key). By default it
only observes: every sink is replaced by one that discards, so a tap never writes to
a bus; ``--publish`` keeps the real sinks.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from bridge import logs
from bridge.config import Settings, load_config
from bridge.envelope import Event
from bridge.routing import Router
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


class Tap:
    """Prints the events that pass the ``route`` / ``sink`` filters."""

    def __init__(self, router: Router, route: str | None, sink: str | None,
                 limit: int | None, out: Any = None) -> None:
        self.router = router
        self.route = route
        self.sink = sink
        self.limit = limit
        self.count = 0
        self.done = asyncio.Event()
        self.out = out or sys.stdout

    def __call__(self, event: Event) -> None:
        if self.done.is_set():
            return
        targets = [
            {"route": hit.route, "sink": t.worker.name, "topic": t.topic, "key": t.key}
            for hit in self.router.hits(event.kind, event.symbol)
            for t in hit.targets
            if (self.route is None or hit.route == self.route)
            and (self.sink is None or t.worker.name == self.sink)
        ]
        if not targets and (self.route or self.sink):
            return
        line = orjson.dumps({"to": targets, "envelope": event.envelope()})
        self.out.write(line.decode() + "\n")
        self.out.flush()
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            self.done.set()


def _check_filters(settings: Settings, route: str | None, sink: str | None) -> None:
    from bridge.config import ConfigError

    names = [r.name or f"route{i}" for i, r in enumerate(settings.routes)]
    problems = []
    if route is not None and route not in names:
        problems.append(f"--route: no route named {route!r} (routes: {', '.join(names)})")
    if sink is not None and sink not in settings.sinks:
        problems.append(f"--sink: no sink named {sink!r} (sinks: {', '.join(settings.sinks)})")
    if problems:
        raise ConfigError(problems, "tap filter")


def run_tap(args: argparse.Namespace) -> int:
    from bridge.app import Bridge

    settings = load_config(args.config)
    _check_filters(settings, args.route, args.sink)
    logs.add_secrets(settings.secrets())
    logs.setup("WARNING", "text")

    async def main() -> int:
        sinks = None if args.publish else {n: DiscardSink(n, _DiscardOptions())
                                           for n in settings.sinks}
        bridge = Bridge(settings, sinks=sinks)
        tap = Tap(bridge.router, args.route, args.sink, args.limit)
        bridge.add_tap(tap)
        stop = asyncio.Event()
        from bridge.cli import _install_signals

        _install_signals(stop)

        async def stop_when_done() -> None:
            await tap.done.wait()
            stop.set()

        watcher = asyncio.create_task(stop_when_done())
        # a tap runs beside the real bridge: never take its HTTP port
        settings.config.http.enabled = False
        try:
            await bridge.run(stop)
        finally:
            watcher.cancel()
        return 0

    return asyncio.run(main())
