"""The bar consumers of ``docs/consuming-prices.md`` ("Bars (OHLC)", "Consumers"), run as
they are written, each in a process of its own, against a bridge that publishes 1 s
bars of the real simulator to a real NATS server, Kafka-protocol broker and MQTT broker.
Only the addresses and the topic prefix are changed (so that tests sharing a broker do
not meet). Each program must print final bars, and the three buses must carry the same
bars.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import uuid
from pathlib import Path

import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.simulator import Simulator
from tests.support.mqtt import MqttBroker

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[3] / "docs" / "consuming-prices.md"
GRACE_MS = 200
#: what each program prints per final bar
LINE = re.compile(r"^[A-Z/]+ 1s \d{13} O=\S+ H=\S+ L=\S+ C=\S+ n=\d+( GAP)?$")


def programs() -> dict[str, str]:
    """The three consumer programs of the docs, by bus, in the order they appear."""
    section = DOCS.read_text(encoding="utf-8").split("## Bars (OHLC)", 1)[1]
    section = section.split("### Consumers", 1)[1]
    blocks = [b.split("\n```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 3, "three consumer programs: NATS, Kafka, MQTT"
    return dict(zip(("nats", "kafka", "mqtt"), blocks, strict=True))


async def lines_of(proc: asyncio.subprocess.Process, out: list[str]) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        out.append(line.decode().rstrip("\n"))


async def test_the_documented_consumers_print_the_same_bars_from_every_bus(
        simulator: Simulator, nats_url: str, kafka_bootstrap: str, mqtt_broker: MqttBroker,
        tmp_path: Path) -> None:
    p = f"t{uuid.uuid4().hex[:8]}"
    code = programs()
    code["nats"] = code["nats"].replace("nats://127.0.0.1:4222", nats_url) \
        .replace('"aleno.bar.>"', f'"{p}.bar.>"')
    code["kafka"] = code["kafka"].replace("127.0.0.1:9092", kafka_bootstrap) \
        .replace('"aleno.bars"', f'"{p}.bars"').replace('"bar-reader"', f'"{p}-reader"')
    code["mqtt"] = code["mqtt"].replace('"127.0.0.1", 1883',
                                        f'"{mqtt_broker.host}", {mqtt_broker.port}') \
        .replace('"aleno/bar/#"', f'"{p}/bar/#"')
    if mqtt_broker.protocol != "5":
        code["mqtt"] = code["mqtt"].replace("MQTTv5", "MQTTv311")
    config = f"""
source:
  url: {simulator.url}
  api_key: test-key
  tickers: [BTC/USD, ETH/USD]
  equities: [AAPL]
  update_interval_s: {simulator.interval}
sinks:
  nats: {{driver: nats, servers: ["{nats_url}"]}}
  kafka: {{driver: kafka, bootstrap_servers: "{kafka_bootstrap}", create_topics: true}}
  mqtt: {{driver: mqtt, host: {mqtt_broker.host}, port: {mqtt_broker.port},
          protocol: "{mqtt_broker.protocol}"}}
bars: {{intervals: [1s], grace_ms: {GRACE_MS}}}
routes:
  - {{match: {{kind: bar}}, sinks: [nats], topic: "{p}.bar.{{feed}}.{{interval}}.{{symbol}}"}}
  - {{match: {{kind: bar}}, sinks: [kafka], topic: "{p}.bars", key: "{{symbol}}"}}
  - {{match: {{kind: bar}}, sinks: [mqtt], topic: "{p}/bar/{{feed}}/{{interval}}/{{symbol}}"}}
http: {{enabled: false}}
shutdown_timeout_s: 3
"""
    procs: dict[str, asyncio.subprocess.Process] = {}
    printed: dict[str, list[str]] = {bus: [] for bus in code}
    readers = []
    stop = asyncio.Event()
    task = None
    try:
        for bus, text in code.items():
            path = tmp_path / f"bars_{bus}.py"
            path.write_text(text, encoding="utf-8")
            procs[bus] = await asyncio.create_subprocess_exec(
                sys.executable, "-u", str(path), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            readers.append(asyncio.create_task(lines_of(procs[bus], printed[bus])))
        bridge = Bridge.from_settings(parse_config(config, env={}), http=False)
        task = asyncio.create_task(bridge.run(stop))

        def common() -> set[str]:
            return set(printed["nats"]) & set(printed["kafka"]) & set(printed["mqtt"])

        # bars of three whole seconds reach every bus (the Kafka consumer reads from the
        # beginning, so it may join its group late)
        deadline = asyncio.get_running_loop().time() + 30
        while len(common()) < 3 * 3:
            for bus, proc in procs.items():
                if proc.returncode is not None:
                    assert proc.stderr is not None
                    err = (await proc.stderr.read()).decode()[-2000:]
                    pytest.fail(f"the {bus} consumer ended: {err}")
            assert not task.done(), "the bridge ended"
            assert asyncio.get_running_loop().time() < deadline, printed
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 20)
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        for reader in readers:
            reader.cancel()
    for bus, lines in printed.items():
        assert lines and all(LINE.match(line) for line in lines), (bus, lines)
    whole = [line for line in common() if not line.endswith(" GAP")]
    assert whole, "every bus printed only gaps"
