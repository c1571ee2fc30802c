"""The disk spool's cost and drain rate (issue 22): ``aleno-bridge run`` into NATS with and
without ``buffer.disk``, in the same run, on the same broker.

Every process is our own, on free ports of 127.0.0.1: a private nats-server (core
publish + flush, the e2e benchmark's NATS sink), the simulator (``bench/_e2e_support.py
simulate``: ``rate x interval`` generated tickers every ``interval`` s, one line per tick in
a ticks file), the bridge as a child process, and a nats-py core subscriber that records
every envelope id (the loss count) and its latency.

Part 1, live: ``--rate`` events/s (default 10,000) for a ``--window`` of seconds after a
warm-up, memory buffer only vs the same with a spool (``buffer.disk``, default
``fsync_interval_ms``), alternating, ``--repeat`` times each. Reported per run: delivery
(ids sent in the window that arrived), the bridge's CPU seconds per 1,000 events
(psutil, every thread of the process: the spool's writer included) and the spool's
backlog (events read back from disk: 0 when the sink keeps up). The ratio is the median
CPU per event with the spool over the median without.

Part 2, drain: the spool on, the bridge publishing through a TCP fault proxy (a child
process running :class:`bridge.testing.FaultProxy`); the proxy refuses connections for
``--outage`` seconds while the feed goes on at the live rate L, then passes again. The
backlog B is what the spool holds when the bus comes back; the drain time T runs until
the spool holds nothing on disk only (live events keep arriving meanwhile), from the
first publish after the bus is back (the sink's reconnect backoff is reported apart).
Reported:
B / T (the backlog's drain rate), its ratio to L, the total publish rate during the
drain, and delivery over the whole run. Run at ``--drain-rates`` (default 2,000, 5,000
and 10,000 events/s).

    .venv/bin/python bench/spool.py                  # both parts (about 3 minutes)
    .venv/bin/python bench/spool.py --quick          # shorter windows, one repeat
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import psutil  # noqa: E402
from _e2e_support import NatsCoreConsumer, Recorder, symbols  # noqa: E402
from _soak_support import NatsJs, kill_group, scrape  # noqa: E402

from tests.support.proc import Proc, free_port, venv_bin, wait_port  # noqa: E402

SUPPORT = str(ROOT / "bench" / "_e2e_support.py")
SUBJECTS = "spoolbench.>"


@dataclass
class Live:
    label: str
    spool: bool
    offered: float = 0.0  # events/s the simulator sent in the window
    delivered: float = 0.0  # fraction of the window's ids that arrived
    published: float = 0.0
    cpu_s: float = 0.0
    backlog_max: float = 0.0
    p99_ms: float = math.nan
    error: str | None = None

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.cpu_s / self.published if self.published else math.nan


@dataclass
class Drain:
    live_rate: float
    outage_s: float
    backlog: float = 0.0
    reconnect_s: float = math.nan
    drain_s: float = math.nan
    cores: float = math.nan  # the bridge's CPU during the drain, in cores
    published_rate: float = 0.0
    delivered: float = 0.0
    missing: int = 0
    duplicates: int = 0
    error: str | None = None

    @property
    def drain_rate(self) -> float:
        return self.backlog / self.drain_s if self.drain_s else math.nan


@dataclass
class Run:
    """One simulator + bridge pair and what they need."""

    dir: Path
    rate: float
    interval: float
    spool: bool
    nats_port: int
    procs: list[Proc] = field(default_factory=list)
    sim_port: int = 0
    http_port: int = 0
    syms: list[str] = field(default_factory=list)

    @property
    def ticks_file(self) -> Path:
        return self.dir / "ticks.txt"

    def config(self) -> dict[str, Any]:
        sink: dict[str, Any] = {"driver": "nats",
                                "servers": f"nats://127.0.0.1:{self.nats_port}",
                                "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1,
                                          "connect_timeout_s": 2, "publish_timeout_s": 5}}
        if self.spool:
            sink["buffer"] = {"max_events": 10_000, "when_full": "block",
                              "disk": {"path": str(self.dir / "spool"), "max_bytes": "4GiB"}}
        return {
            "source": {"url": f"http://127.0.0.1:{self.sim_port}", "api_key": "demo-key",
                       "tickers": self.syms},
            "sinks": {"bus": sink},
            "routes": [{"match": {"kind": "ticker"}, "sinks": ["bus"],
                        "topic": "spoolbench.{kind}.{base}"}],
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "reload": {"watch": False},
            "log": {"level": "WARNING", "format": "text"},
        }

    async def start(self) -> Proc:
        n = max(1, round(self.rate * self.interval))
        self.syms = symbols(n)
        self.sim_port, self.http_port = free_port(), free_port()
        sim = Proc([sys.executable, SUPPORT, "simulate", "--port", str(self.sim_port),
                    "--interval", str(self.interval), "--count", str(n),
                    "--ticks-file", str(self.ticks_file)], self.dir / "simulator.log", cwd=ROOT)
        sim.start()
        self.procs.append(sim)
        await asyncio.to_thread(wait_port, self.sim_port, 30)
        (self.dir / "bridge.yaml").write_text(json.dumps(self.config()))
        exe = venv_bin("aleno-bridge") or "aleno-bridge"
        bridge = Proc([exe, "run", "-c", str(self.dir / "bridge.yaml")], self.dir / "bridge.log")
        bridge.start()
        self.procs.append(bridge)
        deadline = time.monotonic() + 60
        while True:
            if not bridge.alive():
                raise RuntimeError("the bridge exited: " + bridge.output()[-1500:])
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge published nothing within 60 s")
            with contextlib.suppress(Exception):
                m = await asyncio.to_thread(scrape, self.http_port)
                if m.get("aleno_bridge_sink_events_published_total", sink="bus") > 0:
                    return bridge
            await asyncio.sleep(0.3)

    def delivery(self, rec: Recorder, t0: float, t1: float) -> tuple[int, int]:
        """Events the simulator sent from ``t0`` to ``t1`` (wall clock), and how many of
        them the consumer never received."""
        ticks = []
        for line in self.ticks_file.read_text().split("\n"):
            if line.strip():
                ms, count = line.split()
                if t0 * 1000 <= int(ms) < t1 * 1000:
                    ticks.append((int(ms), int(count)))
        return sum(c for _, c in ticks), rec.ledger.missing(ms for ms, _ in ticks)

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            await asyncio.to_thread(kill_group, proc)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="aleno-spool-bench-"))
        self.runs = 0
        self.t_start = time.monotonic()
        self.live: list[Live] = []
        self.drains: list[Drain] = []

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextlib.asynccontextmanager
    async def attempt(self, run: Run, res: Live | Drain) -> AsyncIterator[None]:
        """One run: a failure is recorded in ``res``, the processes are always stopped."""
        try:
            yield
        except Exception as exc:
            res.error = str(exc)[:300]
        finally:
            self.consumer.rec = None
            await run.stop()

    def rundir(self, label: str) -> Path:
        self.runs += 1
        d = self.workdir / f"run{self.runs:02d}-{label}"
        d.mkdir()
        return d

    async def live_run(self, spool: bool) -> Live:
        a = self.args
        label = "spool" if spool else "memory"
        res = Live(label, spool)
        run = Run(self.rundir(label), a.rate, a.interval, spool, self.nats.port)
        async with self.attempt(run, res):
            bridge = await run.start()
            rec = Recorder("nats", run.syms)
            self.consumer.rec = rec
            ps = psutil.Process(bridge.pid)
            await asyncio.sleep(a.warmup)
            m0 = await asyncio.to_thread(scrape, run.http_port)
            cpu0 = ps.cpu_times()
            t0 = time.time()
            rec.open(t0, t0 + a.window)
            end = time.monotonic() + a.window
            while time.monotonic() < end:
                await asyncio.sleep(0.5)
                m = await asyncio.to_thread(scrape, run.http_port)
                res.backlog_max = max(res.backlog_max,
                                      m.get("aleno_bridge_spool_backlog_events", sink="bus"))
            t1 = time.time()
            cpu1 = ps.cpu_times()
            m1 = await asyncio.to_thread(scrape, run.http_port)
            res.cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            name = "aleno_bridge_sink_events_published_total"
            res.published = m1.get(name, sink="bus") - m0.get(name, sink="bus")
            await asyncio.sleep(2)  # the window's last events reach the consumer
            expected, lost = run.delivery(rec, t0, t1)
            res.offered = expected / (t1 - t0)
            res.delivered = 1 - lost / expected if expected else math.nan
            lat = sorted(rec.latencies)
            res.p99_ms = lat[int(0.99 * (len(lat) - 1))] if lat else math.nan
        self.say(f"live {label}: offered {res.offered:,.0f}/s, delivered {res.delivered:.4%}, "
                 f"CPU {res.cpu_per_1k:.4f} s/1k, p99 {res.p99_ms:,.0f} ms, disk backlog max "
                 f"{res.backlog_max:,.0f}" + (f" FAILED {res.error}" if res.error else ""))
        return res

    async def drain_run(self, rate: float) -> Drain:
        a = self.args
        res = Drain(rate, a.outage)
        proxy_port = free_port()
        d = self.rundir(f"drain{int(rate)}")
        proxy = Proc([sys.executable, __file__, "proxy", "--port", str(proxy_port),
                      "--target", str(self.nats.port)], d / "proxy.log").start()
        run = Run(d, rate, a.interval, True, proxy_port)
        run.procs.append(proxy)
        async with self.attempt(run, res):
            await asyncio.to_thread(wait_port, proxy_port, 20)
            ps = psutil.Process((await run.start()).pid)
            rec = Recorder("nats", run.syms)
            self.consumer.rec = rec
            await asyncio.sleep(a.warmup)
            t_first = time.time()
            proxy.signal(signal.SIGUSR1)  # refuse
            await asyncio.sleep(a.outage)
            m = await asyncio.to_thread(scrape, run.http_port)
            proxy.signal(signal.SIGUSR2)  # pass
            back = time.monotonic()
            name = "aleno_bridge_sink_events_published_total"
            p0 = m.get(name, sink="bus")
            # the drain starts with the first publish (the sink reconnects after its backoff)
            while True:
                m = await asyncio.to_thread(scrape, run.http_port)
                if m.get(name, sink="bus") > p0:
                    break
                if time.monotonic() - back > 30:
                    raise RuntimeError("the sink did not reconnect within 30 s")
                await asyncio.sleep(0.02)
            resumed = time.monotonic()
            cpu0 = ps.cpu_times()
            res.reconnect_s = resumed - back
            res.backlog = m.get("aleno_bridge_spool_events", sink="bus")
            p0 = m.get(name, sink="bus")
            while True:
                await asyncio.sleep(0.05)
                m = await asyncio.to_thread(scrape, run.http_port)
                if m.get("aleno_bridge_spool_backlog_events", sink="bus") == 0 and m.get(
                        "aleno_bridge_spool_events", sink="bus") < rate:
                    break
                if time.monotonic() - back > 300:
                    raise RuntimeError("the backlog did not drain within 300 s")
            res.drain_s = time.monotonic() - resumed
            cpu1 = ps.cpu_times()
            res.cores = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / res.drain_s
            res.published_rate = (m.get(name, sink="bus") - p0) / res.drain_s
            await asyncio.sleep(2)
            t_last = time.time() - 1
            expected, res.missing = run.delivery(rec, t_first, t_last)
            res.delivered = 1 - res.missing / expected if expected else math.nan
            res.duplicates = rec.ledger.duplicates()
        self.say(f"drain at {rate:,.0f}/s: reconnected after {res.reconnect_s:.2f}s, "
                 f"backlog {res.backlog:,.0f} drained in "
                 f"{res.drain_s:.1f}s = {res.drain_rate:,.0f}/s ({res.drain_rate / rate:.1f}x "
                 f"the live rate), publishing {res.published_rate:,.0f}/s on "
                 f"{res.cores:.2f} core(s); delivered "
                 f"{res.delivered:.4%}, duplicates {res.duplicates:,}"
                 + (f" FAILED {res.error}" if res.error else ""))
        return res

    async def main(self) -> None:
        a = self.args
        self.nats = NatsJs(self.workdir / "nats")
        await asyncio.to_thread(self.nats.start)
        self.consumer = NatsCoreConsumer(self.nats.url, SUBJECTS)
        await self.consumer.start()
        try:
            if not a.skip_live:
                for _ in range(a.repeat):
                    self.live.append(await self.live_run(False))
                    self.live.append(await self.live_run(True))
            if not a.skip_drain:
                for rate in (float(r) for r in a.drain_rates.split(",")):
                    self.drains.append(await self.drain_run(rate))
        finally:
            await self.consumer.close()
            await asyncio.to_thread(self.nats.stop)
        self.report()
        if not a.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def report(self) -> None:
        a = self.args
        print(f"\n## bench/spool.py ({platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, load {os.getloadavg()[0]:.2f})\n")
        if self.live:
            print(f"### Live: {a.rate:,.0f} events/s into NATS (core publish + flush), "
                  f"{a.window:g} s window\n")
            print("| run | offered ev/s | delivered | bridge CPU s / 1k events | "
                  "p99 sent -> consumer ms | events read back from disk (max) |")
            print("|---|---:|---:|---:|---:|---:|")
            for r in self.live:
                print(f"| {r.label} | {r.offered:,.0f} | {r.delivered:.3%} | "
                      f"{r.cpu_per_1k:.4f} | {r.p99_ms:,.0f} | "
                      f"{r.backlog_max:,.0f} |" + (f" FAILED: {r.error}" if r.error else ""))
            mem = [r.cpu_per_1k for r in self.live if not r.spool and not r.error]
            spo = [r.cpu_per_1k for r in self.live if r.spool and not r.error]
            if mem and spo:
                ratio = statistics.median(spo) / statistics.median(mem)
                print(f"\nCPU per event, spool / memory only (medians): **{ratio:.2f}** "
                      f"(goal <= 1.5)")
        if self.drains:
            print(f"\n### Drain: the bus refused for {a.outage:g} s, then back; the live feed "
                  "goes on\n")
            print("| live rate ev/s | backlog events | reconnect s | drain time s | "
                  "backlog drain ev/s | drain / live | publish rate during drain ev/s | "
                  "bridge CPU during drain (cores) | delivered | duplicates |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for d in self.drains:
                print(f"| {d.live_rate:,.0f} | {d.backlog:,.0f} | {d.reconnect_s:.2f} | "
                      f"{d.drain_s:.1f} | "
                      f"{d.drain_rate:,.0f} | {d.drain_rate / d.live_rate:.1f}x | "
                      f"{d.published_rate:,.0f} | {d.cores:.2f} | {d.delivered:.3%} | "
                      f"{d.duplicates:,} |"
                      + (f" FAILED: {d.error}" if d.error else ""))


def run_proxy(args: argparse.Namespace) -> None:
    """Child process: a FaultProxy to the broker; SIGUSR1 refuses, SIGUSR2 passes."""
    from bridge.testing import FaultProxy

    async def main() -> None:
        async with FaultProxy("127.0.0.1", args.target, port=args.port) as proxy:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            loop.add_signal_handler(signal.SIGUSR1, proxy.set_mode, "refuse")
            loop.add_signal_handler(signal.SIGUSR2, proxy.set_mode, "pass")
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()

    asyncio.run(main())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    px = sub.add_parser("proxy")
    px.add_argument("--port", type=int, required=True)
    px.add_argument("--target", type=int, required=True)
    ap.add_argument("--rate", type=float, default=10_000.0, help="live events/s (10,000)")
    ap.add_argument("--interval", type=float, default=0.1, help="simulator interval (0.1)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration (3)")
    ap.add_argument("--outage", type=float, default=10.0, help="bus outage of the drain, s")
    ap.add_argument("--drain-rates", default="2000,5000,10000",
                    help="live rates of the drain runs (2000,5000,10000)")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-drain", action="store_true")
    ap.add_argument("--quick", action="store_true", help="5 s windows, one repeat")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.window, args.repeat, args.outage, args.warmup = 5.0, 1, 5.0, 2.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cmd == "proxy":
        run_proxy(args)
        return
    asyncio.run(Bench(args).main())


if __name__ == "__main__":
    main()
