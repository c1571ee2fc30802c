"""What OHLC bars cost: CPU per event of a bridge with bars against the same bridge
without them, in the same run, at the same rate.

Three bridges (:class:`bridge.app.Bridge`, each in a child process of its own, into a
sink that counts and keeps nothing) are fed by one real simulator (a child process,
``bench/_e2e_support.py simulate``) at the same time, so whatever else the machine does
weighs on the three alike:

- ``off``: no ``bars`` section (the baseline);
- ``on``: ``bars`` with four intervals (``--intervals``, default 1s, 1m, 5m, 1h) and a
  route that publishes the final bars to the same sink;
- ``built``: the same bars built, no route for them (the builder's own cost).

Each bridge warms up ``--warm`` seconds (every interval's first bars open, the 1 s bars
finalizing), then measures a whole number of upstream ticks, about ``--seconds`` (the
window opens and closes right after a tick was routed): its process's CPU time (user +
system) over the upstream records it received. Printed: CPU per event per phase and
round, and the ratio of ``on`` and ``built`` to ``off`` (the median over the rounds).
Two workloads by default, both 10,000 events/s: 10,000 symbols at the upstream's real
cadence (1 s: every update opens a new 1 s bar, and makes one final bar a second later)
and 1,000 symbols every 0.1 s.

``--path`` measures the dispatcher's path alone, in this process, without sockets: each
upstream tick of ``N`` records is run through three pipelines in turn (normalizer,
market state, bars, router into a sink's offer), with the bars' clock ticking once per
tick on a simulated clock; the order rotates every tick, so slow spells of the machine
fall on the three alike.

    python bench/bars.py                          # both workloads, 3 rounds, 8 s each
    python bench/bars.py --workloads 10000x1.0 --rounds 5
    python bench/bars.py --path                   # the dispatcher's path alone
    python bench/bars.py --intervals 1m,5m,15m,1h # other intervals

Goal (issue 23): CPU per event grows by at most 15% with four intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _e2e_support import run_json_child  # noqa: E402

SUPPORT = str(ROOT / "bench" / "_e2e_support.py")
PHASES = ("off", "on", "built")
T0 = 1_732_480_020_000


def symbols(n: int) -> list[str]:
    return [f"S{i:05d}/USD" for i in range(n)]


def config(port: int, n: int, interval: float, phase: str,
           intervals: list[str]) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [{"sinks": ["count"], "topic": "p.{symbol}"}]
    cfg: dict[str, Any] = {
        "source": {"url": f"http://127.0.0.1:{port}", "api_key": "demo-key",
                   "tickers": symbols(n), "update_interval_s": interval},
        "sinks": {"count": {"driver": "memory", "buffer": {"max_events": 100_000}}},
        "routes": routes,
        "http": {"enabled": False},
        "intake_max_events": 100_000,
    }
    if phase != "off":
        cfg["bars"] = {"intervals": intervals}
    if phase == "on":
        routes.append({"match": {"kind": "bar"}, "sinks": ["count"],
                       "topic": "b.{interval}.{symbol}"})
    return cfg


# -- one bridge (a child process) -----------------------------------------------------


async def measure(args: argparse.Namespace) -> dict[str, float]:
    """Run one bridge of ``args.phase`` and measure it (see the module)."""
    from bridge.app import Bridge, tune_gc
    from bridge.config import parse_config
    from bridge.sinks import Drivers, Message
    from bridge.testing import MemorySink, until

    class CountingSink(MemorySink):
        """Counts what it is given and keeps nothing (a bus that always accepts)."""

        count = 0

        async def publish(self, batch: Sequence[Message]) -> None:
            self.count += len(batch)

    cfg = config(args.port, args.symbols, args.interval, args.phase,
                 args.intervals.split(","))
    settings = parse_config(json.dumps(cfg), env={},
                            drivers=Drivers(injected={"memory": MemorySink}))
    sink = CountingSink("count")
    bridge = Bridge.from_settings(settings, sinks={"count": sink}, http=False)
    tune_gc()  # as `aleno-bridge run` does (bridge.app.serve)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await until(lambda: len(bridge.last_values) >= args.symbols, 60,
                    "every symbol cached", interval=0.1, task=task,
                    detail=lambda: len(bridge.last_values))
        await asyncio.sleep(args.warm)
        ticks = max(1, round(args.seconds / args.interval))
        await _tick_routed(bridge, task)
        received0 = bridge.normalizer.received["ticker"]
        published0 = sink.count
        shed0 = sum(bridge.pipeline_dropped.values())
        cpu0, wall0 = time.process_time(), time.monotonic()
        for _ in range(ticks):
            await _tick_routed(bridge, task)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        received = bridge.normalizer.received["ticker"] - received0
        published = sink.count - published0
        shed = sum(bridge.pipeline_dropped.values()) - shed0
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
    clock = bridge.dispatcher.bars
    # updates that came after their bar was final (grace_ms below the upstream's lag):
    # they make no bar, so they lower the cost of bars; the whole run, every interval
    late = sum(clock.builder.counts()["late"].values()) if clock is not None else 0
    return {"cpu_us": cpu / max(1, received) * 1e6, "rate": received / wall,
            "published": published / wall, "cpu_share": cpu / wall, "shed": shed,
            "late": late}


async def _tick_routed(bridge: Any, task: asyncio.Task[Any]) -> None:
    """Return once the next upstream tick has arrived and the intake is empty again."""
    before = bridge.normalizer.received["ticker"]
    while bridge.normalizer.received["ticker"] == before or bridge.intake_events:
        if task.done():
            task.result()
        await asyncio.sleep(0.002)


async def _child(phase: str, port: int, n: int, interval: float,
                 args: argparse.Namespace) -> dict[str, Any]:
    return await run_json_child(
        f"the {phase} bridge", __file__, "child", "--phase", phase, "--port", str(port),
        "--symbols", str(n), "--interval", str(interval), "--intervals", args.intervals,
        "--warm", str(args.warm), "--seconds", str(args.seconds))


async def workload(n: int, interval: float, args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.proc import free_port, wait_port

    work = Path(tempfile.mkdtemp(prefix="bench-bars-"))
    port = free_port()
    sim = await asyncio.create_subprocess_exec(
        sys.executable, SUPPORT, "simulate", "--port", str(port), "--interval",
        str(interval), "--count", str(n), "--ticks-file", str(work / "ticks.txt"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PHASES}
    try:
        await asyncio.to_thread(wait_port, port)
        for r in range(args.rounds):
            got = await asyncio.gather(*(_child(p, port, n, interval, args)
                                         for p in PHASES))
            for phase, one in zip(PHASES, got, strict=True):
                runs[phase].append(one)
                print(f"  {n}x{interval:g}s round {r + 1} {phase:<6} "
                      f"{one['cpu_us']:7.2f} us/event  {one['rate']:8,.0f} ev/s in  "
                      f"{one['published']:8,.0f} msg/s out  CPU {one['cpu_share']:5.1%}  "
                      f"shed {one['shed']:.0f}  late {one.get('late', 0):.0f}", flush=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            sim.terminate()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sim.wait(), 10)
    return {"workload": f"{n}x{interval:g}s", "runs": runs}


# -- the dispatcher's path alone --------------------------------------------------


def path_workload(n: int, interval: float, args: argparse.Namespace) -> dict[str, Any]:
    """The dispatcher's path alone, the three pipelines in turn on every tick."""
    import orjson

    from bridge.config import parse_config
    from bridge.config.schema_bars import interval_ms
    from bridge.core.envelope import Event
    from bridge.pipeline.barclock import BarClock
    from bridge.pipeline.bars import BarBuilder
    from bridge.pipeline.market import MarketState
    from bridge.pipeline.normalize import Normalizer
    from bridge.pipeline.routing import Router
    from bridge.sinks import Drivers, Message
    from bridge.testing import MemorySink
    from bridge.testing.sample import ticker_record

    class Offer:
        name = "count"
        format = "cloudevents-json"
        count = 0

        @staticmethod
        def safe_token(v: str) -> str:
            return v

        def offer(self, m: Message) -> None:
            self.count += 1

    step = int(interval * 1000)
    clock = [T0]
    intervals = [(label, interval_ms(label)) for label in args.intervals.split(",")]

    class Pipeline:
        def __init__(self, phase: str) -> None:
            cfg = config(1, 1, interval, phase, args.intervals.split(","))
            settings = parse_config(json.dumps(cfg), env={},
                                    drivers=Drivers(injected={"memory": MemorySink}))
            self.offer = Offer()
            self.router = Router(settings.routes, {"count": self.offer})
            self.norm = Normalizer(clock=lambda: clock[0] + 5)
            self.market = MarketState(lambda _e: None, stale_after_s=10 * interval,
                                      update_interval_s=interval, clock=lambda: clock[0])
            market = self.market
            self.bars = None if phase == "off" else BarBuilder(
                intervals, grace_ms=500, now_ms=T0,
                hole_ms=lambda: min(market.gap_ms, market.stale_after_s * 1000))
            self.finals: list[Event] = []
            # the clock as the bridge wires it: emits only the bars a route selects
            self.clock = None if self.bars is None else BarClock(
                self.bars, self.finals.extend, market.values, clock=lambda: clock[0] + 5)
            if self.clock is not None:
                self.clock.routed = lambda f, s, i: bool(self.router.bar_hits(f, s, i))
            self.cpu = 0.0

        def tick(self, records: list[Any], now: int) -> None:
            evs = self.norm.validate("ticker", records, now + 5)
            out: list[Event] = list(evs)
            statuses = self.market.observe("ticker", evs)
            if self.bars is not None and self.clock is not None:
                out += self.bars.add("ticker", evs) or []
                self.clock.tick()
                out += self.finals
                self.finals.clear()
            out += statuses or []
            dispatch = self.router.dispatch
            for ev in out:
                dispatch(ev)

    pipes = {p: Pipeline(p) for p in PHASES}
    names = symbols(n)
    ticks = max(1, round(args.seconds / interval))
    order = list(PHASES)
    for k in range(2 * ticks):  # the first half warms up
        now = T0 + k * step
        clock[0] = now
        text = orjson.dumps([ticker_record(s, 100.0 + (i + k) % 7, now)
                             for i, s in enumerate(names)])
        order = order[1:] + order[:1]
        for phase in order:
            records = orjson.loads(text)
            started = time.process_time()
            pipes[phase].tick(records, now)
            if k >= ticks:
                pipes[phase].cpu += time.process_time() - started
    runs = {p: [{"cpu_us": pipes[p].cpu / (ticks * n) * 1e6}] for p in PHASES}
    print(f"  {n}x{interval:g}s " + "  ".join(
        f"{p} {runs[p][0]['cpu_us']:.2f} us/event ({pipes[p].offer.count} offered)"
        for p in PHASES), flush=True)
    return {"workload": f"{n}x{interval:g}s", "runs": runs}


# -- the report -----------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    from bridge.app import tune_gc

    tune_gc()
    where = "the dispatcher's path, no sockets" if args.path else "each bridge's process"
    print(f"bars {args.intervals}: CPU per upstream event, {where}, python "
          f"{sys.version.split()[0]}; {args.rounds} round(s) of about {args.seconds:g}s")
    results = []
    for spec in args.workloads.split(","):
        n, _, interval = spec.partition("x")
        if args.path:
            for _ in range(args.rounds):
                one = path_workload(int(n), float(interval), args)
                if results and results[-1]["workload"] == one["workload"]:
                    for p in PHASES:
                        results[-1]["runs"][p] += one["runs"][p]
                else:
                    results.append(one)
        else:
            results.append(await workload(int(n), float(interval), args))
    print()
    header = (f"{'workload':<12}{'off us/ev':>11}{'on us/ev':>11}{'built us/ev':>13}"
              f"{'on/off':>9}{'built/off':>11}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for r in results:
        runs = r["runs"]
        # the median over the rounds of each round's ratio: the three ran side by side
        on = statistics.median(a["cpu_us"] / b["cpu_us"]
                               for a, b in zip(runs["on"], runs["off"], strict=True))
        built = statistics.median(a["cpu_us"] / b["cpu_us"]
                                  for a, b in zip(runs["built"], runs["off"], strict=True))
        med = {p: statistics.median(x["cpu_us"] for x in runs[p]) for p in PHASES}
        worst = max(worst, on)
        print(f"{r['workload']:<12}{med['off']:>11.2f}{med['on']:>11.2f}{med['built']:>13.2f}"
              f"{on:>9.3f}{built:>11.3f}")
    print(f"\nworst on/off: {worst:.3f} (goal: <= 1.15, {args.intervals}, bars published)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--phase", choices=PHASES, required=True)
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--symbols", type=int, required=True)
        ap.add_argument("--interval", type=float, required=True)
        ap.add_argument("--intervals", required=True)
        ap.add_argument("--warm", type=float, required=True)
        ap.add_argument("--seconds", type=float, required=True)
        child = ap.parse_args(argv[1:])
        print(json.dumps(asyncio.run(measure(child))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="10000x1.0,1000x0.1",
                    help="comma-separated SYMBOLSxINTERVAL_S (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warm", type=float, default=3.0)
    ap.add_argument("--intervals", default="1s,1m,5m,1h")
    ap.add_argument("--path", action="store_true",
                    help="the dispatcher's path alone, in this process (no sockets)")
    args = ap.parse_args(argv)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
