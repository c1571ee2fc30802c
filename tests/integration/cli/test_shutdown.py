"""Shutdown through the real command line (issue 8, item 6): SIGTERM with a dead
``block`` sink under load ends within ``shutdown_timeout_s`` + 2 s, exits 0, and
every received event is accounted for in the final log line."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.proc import Proc, free_port, wait_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "bridge"]
API_KEY = "shutdown-key"
BUDGET_S = 3.0


def pipeline_dropped(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("aleno_bridge_pipeline_dropped_total"))


@pytest.mark.parametrize("dead_bus", ["refusing", "silent"])
def test_sigterm_with_a_dead_block_sink_under_load_is_bounded_and_counted(
    tmp_path: Path, dead_bus: str,
) -> None:
    """``refusing``: nothing listens on the bus port. ``silent``: the port accepts
    connections and never answers (connects hang until ``connect_timeout_s``)."""
    sim_port, http_port, dead_port = free_port(), free_port(), free_port()
    silent = None
    if dead_bus == "silent":
        silent = socket.create_server(("127.0.0.1", 0), backlog=64)
        dead_port = silent.getsockname()[1]
    tickers = [f"T{i}/USD" for i in range(100)]
    sim = Proc([*CLI, "simulate", "--port", str(sim_port), "--api-key", API_KEY,
                "--interval", "0.01", "--tickers", ",".join(tickers)],
               tmp_path / "sim.log").start()
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(f"""
source:
  url: http://127.0.0.1:{sim_port}
  api_key: {API_KEY}
  tickers: [{", ".join(tickers)}]
sinks:
  dead:
    driver: nats
    servers: nats://127.0.0.1:{dead_port}
    buffer: {{max_events: 1000, when_full: block}}
    retry: {{initial_backoff_s: 0.2, max_backoff_s: 1, connect_timeout_s: 30}}
routes:
  - sinks: [dead]
http: {{port: {http_port}}}
log: {{level: INFO, format: json}}
shutdown_timeout_s: {BUDGET_S}
""")
    log_path = tmp_path / "bridge.log"
    bridge = Proc([*CLI, "run", "-c", str(cfg)], log_path, env=dict(os.environ)).start()
    try:
        wait_port(sim_port, 20)
        wait_port(http_port, 20)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 40
        while pipeline_dropped(base) == 0:  # the intake is full: events are waiting
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert bridge.popen is not None
        started = time.monotonic()
        bridge.popen.send_signal(signal.SIGTERM)
        rc = bridge.popen.wait(timeout=30)
        took = time.monotonic() - started
        print(f"shutdown of the bridge process took {took:.2f}s")
    finally:
        bridge.stop()
        sim.stop()
        if silent is not None:
            silent.close()
    out = log_path.read_text()
    assert rc == 0, out[-3000:]
    assert took <= BUDGET_S + 2.0, f"shutdown took {took:.1f}s with shutdown_timeout_s {BUDGET_S}"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    final = next(rec for rec in lines if rec["msg"].startswith("shutdown took"))
    dead = final["sinks"]["dead"]
    assert dead["published"] == 0 and dead["depth"] == 0
    assert dead["offered"] == sum(dead["dropped"].values())
    assert dead["dropped"].get("shutdown", 0) >= 1000
    dropped = final["pipeline_dropped"]
    assert dropped.get("intake_full", 0) > 0 and dropped.get("shutdown", 0) > 0
    valid = (sum(final["events_received"].values()) - final["events_invalid"]
             - final["events_unrouted"] - final["events_filtered"])
    assert valid > 0
    assert dead["offered"] + sum(dropped.values()) == valid, final
