"""A damaged spool on real processes: ``aleno-bridge run`` fills a spool while its bus
is down, the test flips bytes in one record and cuts the last segment in the middle of
a record, ``aleno-bridge spool verify`` exits 1 and ``inspect`` counts the damage, and
the bridge started again on it counts the corruption and delivers every intact record.
A second bridge on the same spool is refused while the first runs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.cli.main import main
from bridge.simulator import Simulator
from bridge.sinks.spool_format import parse, segment_paths
from bridge.testing import wait_until
from tests.support.proc import Proc, free_port, wait_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "bridge"]
API_KEY = "spool-test-key"
TICKERS = ["BTC/USD", "ETH/USD", "SOL/USD", "ADA/USD", "XRP/USD"]


def config(tmp: Path, sim_port: int, http_port: int, sink: dict[str, Any]) -> Path:
    cfg = {
        "source": {"url": f"http://127.0.0.1:{sim_port}", "api_key": API_KEY,
                   "tickers": TICKERS, "equities": [],
                   "backoff": {"initial_s": 0.2, "max_s": 1}},
        "sinks": {"bus": {**sink, "buffer": {
            "max_events": 50, "disk": {"path": str(tmp / "spool"), "max_bytes": "2MiB",
                                       "fsync_interval_ms": 100}},
            "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 0.5,
                      "connect_timeout_s": 1}}},
        "routes": [{"sinks": ["bus"]}],
        "http": {"host": "127.0.0.1", "port": http_port},
        "reload": {"watch": False},
        "shutdown_timeout_s": 3,
    }
    path = tmp / f"bridge-{sink['driver']}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def spool_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``aleno-bridge spool ...`` (in this process: it only reads files)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["spool", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{"):
                return float(line.rpartition(" ")[2])
    raise AssertionError(f"{name} not exported")


async def test_a_damaged_spool_is_reported_counted_and_its_intact_records_delivered(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    async with Simulator(port=0, api_keys=[API_KEY], interval=0.05, seed=5) as sim:
        http_port = free_port()
        # a bus that is down: nothing listens on its port
        down = config(tmp_path, sim.port, http_port,
                      {"driver": "nats", "servers": f"nats://127.0.0.1:{free_port()}"})
        with Proc([*CLI, "run", "-c", str(down)], tmp_path / "fill.log") as bridge:
            wait_port(http_port, 30)
            await wait_until(lambda: metric(http_port, "aleno_bridge_spool_events") > 300, 30,
                             what="the spool fills while the bus is down")
            # a second bridge on the same spool is refused, naming the cause
            other = config(tmp_path, sim.port, free_port(), {"driver": "console"})
            second = await asyncio.to_thread(
                subprocess.run, [*CLI, "run", "-c", str(other)], capture_output=True,
                text=True, timeout=60, check=False)
            assert second.returncode != 0
            assert "is in use by another process" in second.stderr
            assert f"pid {bridge.pid}" in second.stderr
            # inspect works beside the running bridge
            live = spool_cli("inspect", str(tmp_path), "--json")
            assert live.returncode == 0 and json.loads(live.stdout)["in_use_by_pid"] == bridge.pid
            assert bridge.stop(15) == 0  # a clean stop keeps what the spool holds
        sim.pause()

        ok = spool_cli("verify", str(spool))
        assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stdout + ok.stderr
        before = json.loads(spool_cli("inspect", str(spool), "--json").stdout)
        assert before["events"] > 300 and before["corrupt_records"] == 0
        assert before["sink"] == "bus" and before["in_use_by_pid"] is None
        assert before["oldest_event_time"] <= before["newest_event_time"]

        # damage: flip bytes inside one record, cut the last segment mid-record
        ids: list[str] = []
        segments = [p for _, p in segment_paths(spool)]
        assert len(segments) >= 2
        for p in segments:
            ids += [orjson.loads(r.meta)[8] for r in parse(p.read_bytes()).records]
        assert len(ids) == before["events"]
        first = segments[0]
        data = bytearray(first.read_bytes())
        hit = parse(bytes(data)).records[3]
        data[hit.start + 40: hit.start + 44] = b"\x00\xff\x00\xff"
        first.write_bytes(bytes(data))
        last = segments[-1]
        tail = parse(last.read_bytes()).records[-1]
        os.truncate(last, tail.end - 7)
        damaged = {orjson.loads(hit.meta)[8], orjson.loads(tail.meta)[8]}

        bad = spool_cli("verify", str(tmp_path))
        assert bad.returncode == 1 and bad.stdout.startswith("CORRUPT: "), bad.stdout
        report = json.loads(spool_cli("inspect", str(spool), "--json").stdout)
        assert report["corrupt_records"] == 2 and report["events"] == len(ids) - 2

        # started again, now on a bus that works (a file): every intact record arrives
        out = tmp_path / "out.jsonl"
        http_port = free_port()
        up = config(tmp_path, sim.port, http_port, {"driver": "jsonl", "path": str(out)})
        with Proc([*CLI, "run", "-c", str(up)], tmp_path / "recover.log") as bridge:
            wait_port(http_port, 30)

            def delivered() -> list[str]:
                if not out.exists():
                    return []
                return [json.loads(line)["id"] for line in out.read_text().splitlines()]

            await wait_until(lambda: len(delivered()) >= len(ids) - 2, 30,
                             what="the intact records are delivered")
            assert metric(http_port, "aleno_bridge_spool_corrupt_records_total") == 2
            assert metric(http_port, "aleno_bridge_spool_restored_events_total") == len(ids) - 2
            await asyncio.sleep(0.5)
            assert delivered() == [i for i in ids if i not in damaged]
            assert bridge.stop(15) == 0
        repaired = spool_cli("verify", str(spool))
        assert repaired.returncode == 0, repaired.stdout
