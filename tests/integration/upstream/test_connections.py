"""A bridge with two API keys: readiness and metrics per connection, and status
events per connection, against the real simulator."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.simulator import Simulator
from bridge.sinks import Drivers
from bridge.testing import MemorySink, wait_until

pytestmark = pytest.mark.integration


async def test_two_keys_report_readiness_metrics_and_status_per_connection() -> None:
    async with Simulator(port=0, api_keys=["key-a", "key-b"], limits={"key-a": 2, "key-b": 2},
                         interval=0.1, seed=5) as sim:
        text = f"""
source:
  url: {sim.url}
  api_keys:
    - {{name: alpha, key: key-a, limit: 2}}
    - {{name: beta, key: key-b, limit: 2}}
  tickers: [{", ".join(sim.tickers[:4])}]
  backoff: {{initial_s: 0.1, max_s: 0.3}}
sinks:
  mem: {{driver: memory, batch: {{linger_ms: 0}}}}
routes:
  - {{sinks: [mem]}}
  - {{match: {{kind: status}}, sinks: [mem], topic: "status.{{symbol}}"}}
http: {{enabled: false}}
shutdown_timeout_s: 3
"""
        settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
        assert "key-a" in settings.secrets() and "key-b" in settings.secrets()
        sink = MemorySink("mem")
        bridge = Bridge(settings, sinks={"mem": sink})
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            await wait_until(lambda: bridge.readiness()[0], 10, task=task)
            ok, checks = bridge.readiness()
            assert checks["upstream:alpha"]["ok"] and checks["upstream:beta"]["ok"]
            assert checks["upstream:alpha"]["symbols"] == 2
            assert checks["upstream:beta"]["limit"] == 2
            metrics = _metrics(bridge)
            assert metrics[("aleno_bridge_upstream_connection_up", "alpha")] == 1.0
            assert metrics[("aleno_bridge_upstream_connection_symbols", "beta")] == 2.0
            assert "key-a" not in repr(checks) and "key-b" not in repr(checks)

            await sim.kick("key-a")
            await wait_until(lambda: _statuses(sink) == ["down", "up"], 10, task=task)
            down, up = _status_events(sink)
            assert down["data"]["connection"] == "alpha" == up["data"]["connection"]
            assert down["id"].startswith("status:down:upstream:alpha:")
            assert sim.connects["key-b"] == 1  # beta never reconnected
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def _status_events(sink: MemorySink) -> list[dict[str, Any]]:
    return [orjson.loads(m.body) for m in list(sink.received) if m.event.kind == "status"]


def _statuses(sink: MemorySink) -> list[str]:
    return [e["data"]["status"] for e in _status_events(sink)]


def _metrics(bridge: Bridge) -> dict[tuple[str, str], float]:
    out = {}
    for family in bridge.registry.collect():
        for sample in family.samples:
            if "connection" in sample.labels:
                out[(sample.name, sample.labels["connection"])] = sample.value
    return out
