"""Operations: /healthz, /readyz, /metrics, secrets, tap and top, on real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.testing import wait_until_sync
from tests.support.proc import Proc, free_port, wait_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[3]
CLI = [sys.executable, "-m", "bridge"]
API_KEY = "ops-Secret-Key-4711"
SINK_PASSWORD = "sink-Password-0815"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start_sim(port: int, tmp: Path, name: str) -> Proc:
    p = Proc([*CLI, "simulate", "--port", str(port), "--api-key", API_KEY, "--interval", "0.25"],
             tmp / f"{name}.log").start()
    wait_port(port, 20)
    return p


@pytest.fixture
def bridge_setup(tmp_path: Path) -> Iterator[dict[str, object]]:
    sim_port, http_port = free_port(), free_port()
    sim = start_sim(sim_port, tmp_path, "sim1")
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(f"""
source:
  url: http://127.0.0.1:{sim_port}
  api_key: ${{ALENO_API_KEY}}
  tickers: [BTC/USD, ETH/USD, SOL/USD]
  equities: [AAPL, MSFT]
  stale_after_s: 3
  backoff: {{initial_s: 0.2, max_s: 1}}
sinks:
  file: {{driver: jsonl, path: "{tmp_path}/out.jsonl"}}
  spare: {{driver: jsonl, path: "{tmp_path}/spare.jsonl", required: false}}
routes:
  - {{match: {{kind: ticker}}, sinks: [file, spare]}}
  - {{match: {{kind: equity}}, sinks: [file], publish: on_change}}
http: {{port: {http_port}}}
log: {{level: DEBUG, format: json}}
""")
    env = {**os.environ, "ALENO_API_KEY": API_KEY}
    bridge = Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log", env=env).start()
    state = {"sim": sim, "sim_port": sim_port, "bridge": bridge, "cfg": cfg, "tmp": tmp_path,
             "base": f"http://127.0.0.1:{http_port}"}
    try:
        wait_port(http_port, 20)
        yield state
    finally:
        bridge.stop()
        state["sim"].stop()  # type: ignore[attr-defined]


def metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(f"{base}/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
          ) -> float:
    return sum(v for (n, lbls), v in m.items()
               if n == name and all(dict(lbls).get(k) == x for k, x in labels.items()))


def test_readyz_follows_the_upstream_and_metrics_add_up(bridge_setup: dict[str, object]) -> None:
    base = str(bridge_setup["base"])
    assert get(f"{base}/healthz")[0] == 200
    wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 15, "ready while prices flow")
    time.sleep(1.0)

    sim = bridge_setup["sim"]
    sim.stop()  # type: ignore[attr-defined]
    took = wait_until_sync(lambda: get(f"{base}/readyz")[0] == 503, 3 + 5,
                           "503 after the upstream stops")
    status, body = get(f"{base}/readyz")
    assert json.loads(body)["checks"]["upstream"]["ok"] is False
    assert took <= 8
    assert get(f"{base}/healthz")[0] == 200  # alive, just not ready

    bridge_setup["sim"] = start_sim(int(bridge_setup["sim_port"]), Path(str(bridge_setup["tmp"])),
                                    "sim2")  # type: ignore[arg-type]
    wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 15, "ready again after recovery")

    m = metrics(base)
    received = total(m, "aleno_bridge_events_received_total")
    invalid = total(m, "aleno_bridge_events_invalid_total")
    filtered = total(m, "aleno_bridge_events_filtered_total")
    assert received > 0 and invalid == 0
    assert total(m, "aleno_bridge_upstream_reconnects_total") >= 1
    assert total(m, "aleno_bridge_upstream_acks_total", status="ok") >= 4
    # every received ticker goes to two sinks, every equity that passed on_change to one
    tickers = total(m, "aleno_bridge_events_received_total", kind="ticker")
    equities = total(m, "aleno_bridge_events_received_total", kind="equity")
    offered = total(m, "aleno_bridge_sink_events_offered_total")
    pending = total(m, "aleno_bridge_pipeline_dropped_total")
    assert pending == 0
    # events still between the receive loop and the router are the only slack
    assert abs(offered - (2 * tickers + equities - filtered)) <= 2 * 5
    for sink in ("file", "spare"):
        assert total(m, "aleno_bridge_sink_events_offered_total", sink=sink) == (
            total(m, "aleno_bridge_sink_events_published_total", sink=sink)
            + total(m, "aleno_bridge_sink_events_dropped_total", sink=sink)
            + total(m, "aleno_bridge_sink_events_conflated_total", sink=sink)
            + total(m, "aleno_bridge_sink_queue_depth", sink=sink)
        )
    assert total(m, "aleno_bridge_upstream_lag_seconds_count", kind="ticker") > 0
    assert total(m, "aleno_bridge_sink_publish_seconds_count", sink="file") > 0
    # no symbol label anywhere: bounded cardinality
    assert not any("symbol" in dict(lbls) for (_, lbls) in m)


def test_no_secret_in_logs_validate_or_metrics(bridge_setup: dict[str, object]) -> None:
    base = str(bridge_setup["base"])
    wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 15, "ready")
    _, text = get(f"{base}/metrics")
    _, ready = get(f"{base}/readyz")
    bridge = bridge_setup["bridge"]
    bridge.stop()  # type: ignore[attr-defined]
    out = bridge.output()  # type: ignore[attr-defined]
    assert "upstream subscribed" in out  # the log really was captured
    r = subprocess.run([*CLI, "validate", "-c", str(bridge_setup["cfg"])], capture_output=True,
                       text=True, env={**os.environ, "ALENO_API_KEY": API_KEY}, timeout=30)
    assert r.returncode == 0
    for captured in (out, text, ready, r.stdout + r.stderr):
        assert API_KEY not in captured


def test_secrets_in_sink_options_never_print(tmp_path: Path) -> None:
    """A driver's password in a broken config, a valid config and a failing run."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{api_key: "{API_KEY}", url: "http://127.0.0.1:{free_port()}", max_connect_attempts: 1,
          backoff: {{initial_s: 0.1, max_s: 0.1}}}}
sinks:
  screen: {{driver: console, style: sparkles}}
  f: {{driver: jsonl, path: /dev/null, password: "{SINK_PASSWORD}"}}
""")
    r = subprocess.run([*CLI, "validate", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "sinks.f.password: unknown option" in r.stderr
    assert SINK_PASSWORD not in r.stdout + r.stderr and API_KEY not in r.stdout + r.stderr
    cfg.write_text(cfg.read_text().replace("style: sparkles", "style: lines").replace(
        f', password: "{SINK_PASSWORD}"', ""))
    r = subprocess.run([*CLI, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "could not connect to the upstream" in r.stderr
    assert API_KEY not in r.stdout + r.stderr


def test_tap_prints_envelopes_with_their_destinations(tmp_path: Path) -> None:
    sim_port = free_port()
    sim = start_sim(sim_port, tmp_path, "sim")
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{sim_port}", api_key: "{API_KEY}", tickers: [BTC/USD],
          equities: [AAPL]}}
sinks:
  a: {{driver: jsonl, path: "{tmp_path}/a.jsonl"}}
  b: {{driver: jsonl, path: "{tmp_path}/b.jsonl"}}
routes:
  - {{name: crypto, match: {{kind: ticker}}, sinks: [a, b], topic: "t.{{base}}"}}
  - {{name: stocks, match: {{kind: equity}}, sinks: [b], topic: "e.{{symbol}}"}}
""")
        r = subprocess.run([*CLI, "tap", "-c", str(cfg), "--route", "stocks", "--limit", "3"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        assert len(lines) == 3
        for line in lines:
            assert line["envelope"]["subject"] == "AAPL"
            assert line["to"] == [{"route": "stocks", "sink": "b", "topic": "e.AAPL",
                                   "key": "AAPL"}]
        assert not (tmp_path / "b.jsonl").exists()  # a tap observes, it does not publish
        r = subprocess.run([*CLI, "tap", "-c", str(cfg), "--sink", "nope", "--limit", "1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "--sink: no sink named 'nope'" in r.stderr
    finally:
        sim.stop()


def test_top_renders_rates_of_a_running_bridge(bridge_setup: dict[str, object]) -> None:
    base = str(bridge_setup["base"])
    wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 15, "ready")
    r = subprocess.run([*CLI, "top", "--url", f"{base}/metrics", "--once", "--interval", "1"],
                       capture_output=True, text=True, timeout=30,
                       env={**os.environ, "COLUMNS": "160"})
    assert r.returncode == 0, r.stderr
    assert "upstream subscribed" in r.stdout
    for sink in ("file", "spare"):
        row = next(line for line in r.stdout.splitlines() if f" {sink} " in line)
        assert "connected" in row
    rate = float(r.stdout.split("received/s ")[1].split()[0].replace(",", ""))
    assert rate > 0


def test_readyz_follows_a_required_sink_whose_broker_dies(
    tmp_path: Path, nats_servers: object
) -> None:
    """A real run against the simulator and a real NATS server that is killed and
    restarted: /readyz 503 within stale_after_s + 5 s, 200 again after recovery."""
    nats = nats_servers(jetstream=False, name="ready")  # type: ignore[operator]
    sim_port, http_port = free_port(), free_port()
    sim = start_sim(sim_port, tmp_path, "sim")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{sim_port}", api_key: "{API_KEY}", tickers: [BTC/USD],
          stale_after_s: 3}}
sinks:
  bus: {{driver: nats, servers: "{nats.url}", ping_interval_s: 1,
         retry: {{initial_backoff_s: 0.1, max_backoff_s: 0.5}}}}
  file: {{driver: jsonl, path: "{tmp_path}/out.jsonl"}}
http: {{port: {http_port}}}
""")
    bridge = Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log").start()
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_port(http_port, 20)
        wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 15, "ready")
        nats.kill()
        took = wait_until_sync(lambda: get(f"{base}/readyz")[0] == 503, 3 + 5,
                               "503 after the broker dies")
        body = json.loads(get(f"{base}/readyz")[1])
        assert body["checks"]["sink:bus"]["ok"] is False
        assert body["checks"]["sink:file"]["ok"] is True  # the other sink keeps going
        assert took <= 8
        nats.start()
        wait_until_sync(lambda: get(f"{base}/readyz")[0] == 200, 20, "ready again after the broker")
        m = metrics(base)
        assert total(m, "aleno_bridge_sink_reconnects_total", sink="bus") >= 1
        assert total(m, "aleno_bridge_sink_events_dropped_total", sink="bus") == 0
    finally:
        bridge.stop()
        sim.stop()
