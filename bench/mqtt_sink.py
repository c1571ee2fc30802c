"""MQTT sink micro-benchmark: the ``mqtt`` driver against raw paho-mqtt, same broker, same run.

Starts a private broker on a free port (Mosquitto; amqtt's MQTT 3.1.1 broker when
Mosquitto is not installed), then for QoS 0, 1 and 2 publishes the same N pre-encoded
CloudEvents envelopes (about 540 bytes, one topic per symbol) three ways:

``raw``
    plain paho-mqtt 2.x with its own network thread (``loop_start``), publishing as
    fast as ``publish()`` accepts, then waiting until every message completed
    (PUBACK for QoS 1, PUBCOMP for QoS 2, written to the socket for QoS 0). Its
    in-flight window is the sink's (``max_inflight`` lowered to the broker's Receive
    Maximum), so both run under the same flow control.
``sink``
    :class:`MqttSink` driven the way the runner drives it: ``await sink.publish(batch)``
    with batches of ``--batch`` messages, one after the other.
``worker``
    (with ``--worker``) the same through a :class:`~bridge.sinks.worker.SinkWorker`: offer
    every message, wait until the worker confirmed them all.

For each it prints messages/s, CPU seconds per 1,000 messages (the whole process,
paho's thread included) and the ratio to raw; for ``sink``, the p50/p99 time of one
``publish(batch)``. Every figure is the best of ``--repeat`` runs.

    python bench/mqtt_sink.py                 # full run (about 30 s)
    python bench/mqtt_sink.py --quick         # smoke run
    python bench/mqtt_sink.py --qos 1 -n 50000 --worker
    MQTT_BENCH_EXTRA="set_tcp_nodelay true" python bench/mqtt_sink.py   # extra
                                              # mosquitto.conf lines, ';'-separated

Goal (issue 11, item 2): sink >= 70% of raw paho per QoS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from aleno_bridge_plugins.mqtt import MqttOptions, MqttSink
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import parse_config
from bridge.sinks import Message
from bridge.sinks.worker import SinkWorker
from bridge.testing.sample import sample_events

#: extra mosquitto.conf lines (";"-separated), e.g. "set_tcp_nodelay true"
EXTRA = [x for x in os.environ.get("MQTT_BENCH_EXTRA", "").split(";") if x]


@dataclass
class Result:
    mode: str
    qos: int
    n: int
    wall_s: float
    cpu_s: float
    batch_p50_ms: float | None = None
    batch_p99_ms: float | None = None

    @property
    def rate(self) -> float:
        return self.n / self.wall_s

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_s / self.n * 1000


# ---------------------------------------------------------------------------
# Broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.3):
            return
        time.sleep(0.05)
    msg = f"broker did not listen on {port} within {timeout}s"
    raise TimeoutError(msg)


@contextlib.contextmanager
def broker(workdir: Path) -> Iterator[tuple[int, str, str]]:
    """(port, kind, protocol) of a private broker on a free port."""
    port = _free_port()
    binary = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is not None:
        conf = workdir / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {port} 127.0.0.1", f"user {getpass.getuser()}",
            "allow_anonymous true", "log_dest none", *EXTRA,
        ]) + "\n")
        argv, kind, protocol = [binary, "-c", str(conf)], "mosquitto", "5"
    else:
        amqtt = Path(sys.executable).with_name("amqtt")
        if not amqtt.exists():
            sys.exit("neither mosquitto nor amqtt is installed")
        conf = workdir / "amqtt.yaml"
        conf.write_text("\n".join([
            "listeners:", "  default:", "    type: tcp", f"    bind: 127.0.0.1:{port}",
            "plugins:", "  amqtt.plugins.authentication.AnonymousAuthPlugin:",
            "    allow_anonymous: true",
        ]) + "\n")
        argv, kind, protocol = [str(amqtt), "-c", str(conf)], "amqtt", "3.1.1"
    with open(workdir / "broker.log", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_port(port)
        yield port, kind, protocol
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------
# Messages


def make_messages(n: int, symbols: int = 1000) -> list[Message]:
    """``n`` cloudevents-json ticker envelopes, one topic per symbol."""
    events = sample_events(symbols=symbols, updates=-(-n // symbols))[:n]
    out = []
    for ev in events:
        enc = ev.encoded("cloudevents-json")
        topic = f"aleno/{ev.kind}/{MqttSink.safe_token(ev.base)}/{MqttSink.safe_token(ev.quote)}"
        out.append(Message(topic, None, enc.body, enc.content_type, ev.header))
    return out


# ---------------------------------------------------------------------------
# Raw paho


def receive_maximum(port: int, protocol: str) -> int:
    """The broker's Receive Maximum (65535 when it announces none)."""
    found: list[int] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, _rc: Any, props: Any) -> None:
        found.append(int(getattr(props, "ReceiveMaximum", 65535) or 65535))
        done.set()

    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2,
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(10)
    c.disconnect()
    c.loop_stop()
    return found[0] if found else 65535


def run_raw(port: int, protocol: str, qos: int, msgs: list[Message], inflight: int) -> Result:
    v5 = protocol == "5"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{os.getpid()}",
                    protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    finished = threading.Event()
    count = [0]
    n = len(msgs)

    def on_connect(*_a: Any) -> None:
        connected.set()

    def on_publish(*_a: Any) -> None:
        count[0] += 1
        if count[0] == n:
            finished.set()

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect("127.0.0.1", port, 60)
    c.loop_start()
    if not connected.wait(10):
        sys.exit("raw paho: no CONNACK")
    props: Properties | None = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = msgs[0].content_type
        props.PayloadFormatIndicator = 1
    wall0, cpu0 = time.perf_counter(), time.process_time()
    publish = c.publish
    for m in msgs:
        publish(m.topic, m.body, qos, False, props)
    if not finished.wait(120):
        sys.exit(f"raw paho: only {count[0]} of {n} completed")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    return Result("raw", qos, n, wall, cpu)


# ---------------------------------------------------------------------------
# The driver


def sink_options(port: int, protocol: str, qos: int) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "protocol": protocol, "qos": qos,
            "client_id": f"bench-sink-{os.getpid()}"}


async def _run_sink(port: int, protocol: str, qos: int, msgs: list[Message],
                    batch: int) -> Result:
    sink = MqttSink("bench", MqttOptions.model_validate(sink_options(port, protocol, qos)))
    await sink.connect()
    times: list[float] = []
    try:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(msgs), batch):
            t0 = time.perf_counter()
            await sink.publish(msgs[i:i + batch])
            times.append(time.perf_counter() - t0)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await sink.close()
    times.sort()
    return Result("sink", qos, len(msgs), wall, cpu, statistics.median(times) * 1000,
                  times[min(len(times) - 1, int(len(times) * 0.99))] * 1000)


async def _run_worker(port: int, protocol: str, qos: int, msgs: list[Message],
                      batch: int) -> Result:
    opts = sink_options(port, protocol, qos)
    inline = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                       for k, v in opts.items())
    settings = parse_config(f"""
sinks:
  bus: {{driver: mqtt, {inline}, buffer: {{max_events: {len(msgs) + 1}}},
         batch: {{max_events: {batch}}}}}
routes:
  - sinks: [bus]
    topic: "aleno/{{kind}}/{{base}}/{{quote}}"
""", env={})
    worker = SinkWorker(settings.sinks["bus"])
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not worker.connected:
            if time.monotonic() > deadline:
                sys.exit("worker: not connected")
            await asyncio.sleep(0.01)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for m in msgs:
            worker.offer(m)
        n = len(msgs)
        while worker.stats.published < n:  # noqa: ASYNC110 (a counter, no event to await)
            await asyncio.sleep(0.001)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await worker.stop(5.0)
    return Result("worker", qos, len(msgs), wall, cpu)


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=20_000, help="messages per run (default 20000)")
    ap.add_argument("--qos", type=int, action="append", choices=(0, 1, 2),
                    help="QoS to measure (repeatable; default 0, 1 and 2)")
    ap.add_argument("--batch", type=int, default=500, help="batch size (default 500)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts")
    ap.add_argument("--worker", action="store_true", help="also through a SinkWorker")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeat = 2_000, 1
    qoses: list[int] = args.qos or [0, 1, 2]
    msgs = make_messages(args.n)
    with tempfile.TemporaryDirectory() as tmp, broker(Path(tmp)) as (port, kind, protocol):
        recv_max = receive_maximum(port, protocol) if protocol == "5" else 65535
        inflight = min(MqttOptions.model_fields["max_inflight"].default, recv_max)
        print(f"broker: {kind} (MQTT {protocol}) on 127.0.0.1:{port}, Receive Maximum "
              f"{recv_max}; {args.n} messages of {len(msgs[0].body)} bytes, batches of "
              f"{args.batch}, in-flight window {inflight}, best of {args.repeat}")
        modes = ["raw", "sink"] + (["worker"] if args.worker else [])
        best: dict[tuple[str, int], Result] = {}
        for qos in qoses:
            for _ in range(args.repeat):
                for mode in modes:
                    if mode == "raw":
                        r = run_raw(port, protocol, qos, msgs, inflight)
                    elif mode == "sink":
                        r = asyncio.run(_run_sink(port, protocol, qos, msgs, args.batch))
                    else:
                        r = asyncio.run(_run_worker(port, protocol, qos, msgs, args.batch))
                    key = (mode, qos)
                    if key not in best or r.rate > best[key].rate:
                        best[key] = r
    print(f"\n{'qos':>3} {'mode':<7} {'msgs/s':>9} {'CPU s/1k':>9} {'vs raw':>7}"
          f" {'batch p50':>10} {'batch p99':>10}")
    for qos in qoses:
        raw = best[("raw", qos)]
        for mode in modes:
            r = best[(mode, qos)]
            p50 = f"{r.batch_p50_ms:.1f} ms" if r.batch_p50_ms is not None else ""
            p99 = f"{r.batch_p99_ms:.1f} ms" if r.batch_p99_ms is not None else ""
            print(f"{qos:>3} {mode:<7} {r.rate:>9,.0f} {r.cpu_per_1k:>9.4f}"
                  f" {r.rate / raw.rate:>6.0%} {p50:>10} {p99:>10}")


if __name__ == "__main__":
    main()
