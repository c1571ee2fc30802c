"""Pieces of ``bench/e2e.py``: the simulator launcher, the raw-client baselines and the
latency-recording consumers.

Run as a script it is one of two child processes of the benchmark:

- ``simulate``: the project's :class:`bridge.simulator.Simulator` with a generated
  ticker universe (``S00000/USD`` ...). ``aleno-bridge simulate --tickers`` cannot take
  50,000 symbols (one argv string is capped at 128 KiB on Linux), so the benchmark
  starts the same server class through this launcher. It appends one line per tick,
  ``sentTimestampMs records``, to ``--ticks-file``: what was offered to the bridge.
- ``raw``: a publisher with the raw client library (aiokafka ``acks=all``, nats-py
  publish + flush per batch, paho-mqtt QoS 1), sending pre-encoded envelopes made by the
  bridge's own encoder as fast as it can for ``--seconds``; prints one JSON line
  ``{"messages", "seconds", "cpu_s"}`` (CPU of the publishing loop only).

Nothing here imports the bridge's drivers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import orjson  # noqa: E402
from _soak_support import Ledger  # noqa: E402

from tests.support.mqtt import MqttBroker, MqttConsumer  # noqa: E402


async def run_json_child(what: str, *args: str) -> dict[str, Any]:
    """Run ``python *args`` and return the JSON object on the last line it prints;
    a :class:`RuntimeError` naming ``what`` and the end of its stderr when it fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        msg = f"{what} failed: {err.decode()[-2000:]}"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def symbols(n: int) -> list[str]:
    return [f"S{i:05d}/USD" for i in range(n)]


# ---------------------------------------------------------------------------
# What one consumer saw in one run


class Recorder:
    """Per bus and per run: receipts in the measuring window, latencies
    (receipt - ``data.sentTimestampMs``) of events sent in the window, and the envelope
    ids (a :class:`Ledger`) for the loss count."""

    def __init__(self, name: str, syms: list[str]) -> None:
        self.ledger = Ledger(name, syms)
        self.window: tuple[float, float] | None = None  # wall-clock seconds
        self.window_ms: tuple[int, int] = (0, 0)
        self.received = 0  # every message (raw baseline messages included)
        self.in_window = 0  # messages received inside the window
        self.latencies: list[float] = []  # ms, events sent inside the window
        self.last_at = time.monotonic()

    def open(self, t0: float, t1: float) -> None:
        self.window = (t0, t1)
        self.window_ms = (int(t0 * 1000), int(t1 * 1000))

    def body(self, body: bytes) -> None:
        now = time.time()
        self.received += 1
        self.last_at = time.monotonic()
        w = self.window
        if w is not None and w[0] <= now < w[1]:
            self.in_window += 1
        try:
            env = orjson.loads(body)
            eid = env["id"]
            sent = env["data"]["sentTimestampMs"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        self.ledger.add(eid)
        if self.window_ms[0] <= sent < self.window_ms[1]:
            self.latencies.append(now * 1000.0 - sent)


class NatsCoreConsumer:
    """nats-py core subscription on ``subject`` (slow-consumer limits raised)."""

    def __init__(self, url: str, subject: str) -> None:
        self.url, self.subject = url, subject
        self.rec: Recorder | None = None
        self.nc: Any = None

    async def start(self) -> None:
        import nats

        async def quiet(*_a: Any) -> None:
            pass

        self.nc = await nats.connect(self.url, error_cb=quiet, disconnected_cb=quiet,
                                     closed_cb=quiet, reconnected_cb=quiet)

        async def cb(msg: Any) -> None:
            if self.rec is not None:
                self.rec.body(msg.data)

        await self.nc.subscribe(self.subject, cb=cb, pending_msgs_limit=5_000_000,
                                pending_bytes_limit=4 << 30)
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


class KafkaTailConsumer:
    """aiokafka without a group, every partition of ``topic`` from its end."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.bootstrap, self.topic, self.partitions = bootstrap, topic, partitions
        self.rec: Recorder | None = None
        self.consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="latest", fetch_max_wait_ms=20, fetch_max_bytes=16 << 20,
            max_partition_fetch_bytes=8 << 20, request_timeout_ms=10000)
        await asyncio.wait_for(self.consumer.start(), 20)
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self._task = asyncio.create_task(self._run(), name="kafka-consumer")

    async def _run(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=50_000)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.2)
                continue
            rec = self.rec
            if rec is None:
                continue
            for msgs in batches.values():
                for m in msgs:
                    rec.body(m.value or b"")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer.stop(), 5)


class MqttLatencyConsumer(MqttConsumer):
    """The tests' paho subscriber (own network thread), recording instead of keeping."""

    def __init__(self, broker: MqttBroker) -> None:
        super().__init__(broker, client_id="e2e-reader")
        self.rec: Recorder | None = None

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        rec = self.rec
        if rec is not None:
            rec.body(bytes(msg.payload))


# ---------------------------------------------------------------------------
# Child process: the simulator


def run_simulator(args: argparse.Namespace) -> None:
    from bridge.simulator import Simulator

    ticks = open(args.ticks_file, "a", buffering=1)  # noqa: SIM115 - lives as long as we do

    class CountingSimulator(Simulator):
        last_ms = 0

        def ticker_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
            self.last_ms = sent_ms
            return super().ticker_state(symbol, sent_ms)

        async def _tick(self) -> None:
            records = sum(len(c.tickers) for c in self._clients.values())
            await super()._tick()
            if records:
                ticks.write(f"{self.last_ms} {records}\n")

    async def main() -> None:
        sim = CountingSimulator(host="127.0.0.1", port=args.port, interval=args.interval,
                                max_subscriptions=args.count + 10,
                                tickers=symbols(args.count), equities=[], seed=11)
        await sim.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await sim.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Child process: the raw-client baselines


def envelopes(n: int = 1000) -> list[tuple[str, bytes]]:
    """(symbol, body) of ``n`` ticker envelopes made by the bridge's own encoder."""
    from bridge.pipeline.normalize import Normalizer
    from bridge.testing.sample import ticker_record

    now = int(time.time() * 1000)
    recs = [ticker_record(s, 100.0 + i * 0.37, now) for i, s in enumerate(symbols(n))]
    out = []
    for ev in Normalizer().tickers(recs):
        out.append((ev.symbol, ev.encoded("cloudevents-json").body))
    return out


BATCH = 1000


async def raw_nats(url: str, seconds: float) -> tuple[int, float, float]:
    import nats

    msgs = [(f"e2e.raw.{s.split('/')[0]}", b) for s, b in envelopes()]
    nc = await nats.connect(url)
    sent = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for subject, body in msgs[:BATCH]:
            await nc.publish(subject, body)
        await nc.flush(timeout=10)
        sent += BATCH
    t1, c1 = time.perf_counter(), time.process_time()
    await nc.close()
    return sent, t1 - t0, c1 - c0


async def raw_kafka(bootstrap: str, topic: str, seconds: float) -> tuple[int, float, float]:
    from aiokafka import AIOKafkaProducer

    msgs = [(s.encode(), b) for s, b in envelopes()]
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await p.start()
    sent = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        futs = [await p.send(topic, body, key=key) for key, body in msgs[:BATCH]]
        await asyncio.gather(*futs)
        sent += BATCH
    t1, c1 = time.perf_counter(), time.process_time()
    await p.stop()
    return sent, t1 - t0, c1 - c0


def raw_mqtt(host: str, port: int, protocol: str, seconds: float) -> tuple[int, float, float]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    msgs = [(f"e2e/raw/{s.split('/')[0]}", b) for s, b in envelopes()]
    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-raw",
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    c.max_inflight_messages_set(1000)
    acked = 0
    cond = threading.Condition()

    def on_publish(*_a: Any) -> None:
        nonlocal acked
        with cond:
            acked += 1
            cond.notify_all()

    c.on_publish = on_publish
    c.connect(host, port, 30)
    c.loop_start()
    time.sleep(0.5)
    sent = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for topic, body in msgs[:BATCH]:
            c.publish(topic, body, qos=1)
        sent += BATCH
        with cond:  # at most two batches outstanding: a bounded queue, like the sink
            cond.wait_for(lambda s=sent: acked >= s - BATCH, timeout=30)  # type: ignore[misc]
    with cond:
        cond.wait_for(lambda: acked >= sent, timeout=30)
    t1, c1 = time.perf_counter(), time.process_time()
    c.loop_stop()
    c.disconnect()
    return acked, t1 - t0, c1 - c0


def run_raw(args: argparse.Namespace) -> None:
    if args.bus == "nats":
        n, s, cpu = asyncio.run(raw_nats(args.target, args.seconds))
    elif args.bus == "kafka":
        n, s, cpu = asyncio.run(raw_kafka(args.target, args.topic, args.seconds))
    else:
        host, _, port = args.target.rpartition(":")
        n, s, cpu = raw_mqtt(host, int(port), args.protocol, args.seconds)
    print(json.dumps({"messages": n, "seconds": s, "cpu_s": cpu}), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sim = sub.add_parser("simulate")
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--interval", type=float, required=True)
    sim.add_argument("--count", type=int, required=True)
    sim.add_argument("--ticks-file", required=True)
    raw = sub.add_parser("raw")
    raw.add_argument("--bus", choices=["kafka", "nats", "mqtt"], required=True)
    raw.add_argument("--target", required=True, help="nats URL, kafka bootstrap, host:port")
    raw.add_argument("--topic", default="e2e.prices")
    raw.add_argument("--protocol", default="5")
    raw.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.cmd == "simulate":
        run_simulator(args)
    else:
        run_raw(args)


if __name__ == "__main__":
    main()
