"""Hot reload against the real simulator: symbols change on the live connection, sinks
and routes swap, invalid or restart-only changes are refused and change nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.app import Bridge
from bridge.config import load_config
from bridge.simulator import Simulator
from bridge.testing import wait_until
from tests.support.proc import Proc, free_port, wait_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "bridge"]


def _config(sim_url: str, out: Path, tickers: list[str], *, extra_sink: str = "",
            extra_route: str = "", url: str | None = None, watch: bool = False) -> str:
    return f"""
source:
  url: {url or sim_url}
  api_key: test-key
  tickers: [{", ".join(tickers)}]
  backoff: {{initial_s: 0.1, max_s: 0.3}}
sinks:
  file: {{driver: jsonl, path: {out}, batch: {{linger_ms: 0}}}}
{extra_sink}
routes:
  - {{sinks: [file]}}
{extra_route}
http: {{enabled: false}}
reload: {{watch: {str(watch).lower()}, debounce_s: 0.2}}
shutdown_timeout_s: 3
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _symbols(path: Path) -> set[str]:
    return {e["subject"] for e in _lines(path)}


async def _run(path: Path) -> tuple[Bridge, asyncio.Event, asyncio.Task[Any]]:
    bridge = Bridge.from_settings(load_config(path))
    stop = asyncio.Event()
    return bridge, stop, asyncio.create_task(bridge.run(stop))


async def test_invalid_or_restart_only_changes_are_refused_and_change_nothing(
        simulator: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg, out = tmp_path / "bridge.yaml", tmp_path / "out.jsonl"
    cfg.write_text(_config(simulator.url, out, ["BTC/USD"]))
    bridge, stop, task = await _run(cfg)
    try:
        await wait_until(lambda: "BTC/USD" in _symbols(out), 10, task=task)
        before = bridge.settings
        cfg.write_text(_config(simulator.url, out, ["BTC/USD", "ETH/USD"])
                       + "routes_typo: 1\nsinks:\n  file: {driver: jsonl}\n")
        with caplog.at_level(logging.ERROR, "aleno_bridge.app"):
            outcome = await bridge.reload_file(str(cfg))
        assert outcome.result == "invalid"
        assert "sinks.file.path" in caplog.text or "routes_typo" in caplog.text
        assert bridge.settings is before
        cfg.write_text(_config(simulator.url, out, ["BTC/USD", "ETH/USD"],
                               url="http://127.0.0.1:1"))
        outcome = await bridge.reload_file(str(cfg))
        assert outcome.result == "refused" and outcome.changes == ["source.url"]
        assert "needs a restart" in outcome.message
        assert bridge.settings is before
        assert dict(bridge.snapshot().reloads) == {"invalid": 1, "refused": 1}
        await asyncio.sleep(0.5)
        assert "ETH/USD" not in _symbols(out)
        assert bridge.source is not None and bridge.source.stats.connects == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_reload_adds_a_sink_and_a_route_and_leaves_the_others_untouched(
        simulator: Simulator, tmp_path: Path) -> None:
    cfg, out, extra = tmp_path / "bridge.yaml", tmp_path / "out.jsonl", tmp_path / "eth.jsonl"
    cfg.write_text(_config(simulator.url, out, ["BTC/USD", "ETH/USD"]))
    bridge, stop, task = await _run(cfg)
    try:
        await wait_until(lambda: _symbols(out) == {"BTC/USD", "ETH/USD"}, 10, task=task)
        file_worker = bridge.workers["file"]
        cfg.write_text(_config(
            simulator.url, out, ["BTC/USD", "ETH/USD"],
            extra_sink=f"  eth: {{driver: jsonl, path: {extra}, batch: {{linger_ms: 0}}}}",
            extra_route="  - {match: {symbols: [ETH/*]}, sinks: [eth]}"))
        outcome = await bridge.reload_file(str(cfg))
        assert outcome.result == "applied", outcome
        assert "sink eth added" in outcome.changes and "routes" in outcome.changes
        assert bridge.workers["file"] is file_worker  # unchanged sink untouched
        await wait_until(lambda: len(_lines(extra)) >= 2, 10, task=task)
        assert _symbols(extra) == {"ETH/USD"}
        n = len(_lines(out))
        await wait_until(lambda: len(_lines(out)) >= n + 4, 10, task=task)
        # and back: the sink is drained and closed, its file stops growing
        cfg.write_text(_config(simulator.url, out, ["BTC/USD", "ETH/USD"]))
        outcome = await bridge.reload_file(str(cfg))
        assert outcome.result == "applied" and "sink eth removed" in outcome.changes
        await asyncio.sleep(0.3)
        size = len(_lines(extra))
        await asyncio.sleep(1.0)
        assert len(_lines(extra)) == size
        assert "eth" not in bridge.workers
        assert bridge.source is not None and bridge.source.stats.connects == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _gaps(events: list[dict[str, Any]], symbol: str, interval_ms: float) -> list[int]:
    sent = sorted({e["data"]["sentTimestampMs"] for e in events if e["subject"] == symbol})
    return [b - a for a, b in pairwise(sent) if b - a > 1.5 * interval_ms]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_sighup_with_100_added_symbols_subscribes_them_live(tmp_path: Path) -> None:
    """``aleno-bridge run`` in its own process, the simulator in another: SIGHUP after
    adding 100 symbols to the file subscribes them on the open connection (the
    simulator counts no new connection) and the symbols that stay miss no update."""
    port = free_port()
    universe = [f"S{i:03d}/USD" for i in range(110)]
    interval = 0.2
    with Proc([*CLI, "simulate", "--port", str(port), "--api-key", "test-key",
               "--interval", str(interval), "--admin", "--tickers", ",".join(universe),
               "--max-subscriptions", "500"], tmp_path / "sim.log") as _sim:
        wait_port(port)
        url = f"http://127.0.0.1:{port}"
        cfg, out = tmp_path / "bridge.yaml", tmp_path / "out.jsonl"
        cfg.write_text(_config(url, out, universe[:10]))
        with Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log") as bridge:
            bridge.until(lambda: len(_symbols(out)) == 10 and len(_lines(out)) >= 40, 15,
                         "the first 10 flowing")
            connects = _admin(port)["connects"]
            tmp = cfg.with_suffix(".new")
            tmp.write_text(_config(url, out, universe))
            os.replace(tmp, cfg)
            bridge.signal(signal.SIGHUP)
            bridge.until(lambda: _symbols(out) == set(universe), 15, "all 110 after SIGHUP")
            state = _admin(port)
            assert len(state["tickers"]) == 110
            assert state["connects"] == connects  # no reconnect
            n = len(_lines(out))
            bridge.until(lambda: len(_lines(out)) >= n + 5 * 110, 15, "5 more updates each")
        events = _lines(out)
        for symbol in universe[:10]:
            assert _gaps(events, symbol, interval * 1000) == [], symbol
        assert "configuration reloaded" in bridge.output()


def _admin(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/subscriptions", timeout=5) as r:
        body = orjson.loads(r.read())
    (key,) = [k for k in body["keys"].values() if k["connections"]]
    return dict(key)


def test_a_configmap_style_symlink_swap_is_reloaded_without_a_signal(tmp_path: Path) -> None:
    """Kubernetes updates a ConfigMap volume by swapping the ``..data`` symlink: the
    file itself is never written. The watch of the symlink chain sees it and the bridge
    reloads (here: one symbol added, subscribed on the open connection)."""
    port = free_port()
    with Proc([*CLI, "simulate", "--port", str(port), "--api-key", "test-key",
               "--interval", "0.2", "--admin"], tmp_path / "sim.log") as _sim:
        wait_port(port)
        url = f"http://127.0.0.1:{port}"
        mount, out = tmp_path / "mount", tmp_path / "out.jsonl"
        (mount / "..v1").mkdir(parents=True)
        (mount / "..v1" / "config.yaml").write_text(_config(url, out, ["BTC/USD"], watch=True))
        (mount / "..data").symlink_to("..v1")
        (mount / "config.yaml").symlink_to("..data/config.yaml")
        with Proc([*CLI, "run", "-c", str(mount / "config.yaml")],
                  tmp_path / "bridge.log") as bridge:
            bridge.until(lambda: _symbols(out) == {"BTC/USD"}, 15, "BTC/USD flowing")
            connects = _admin(port)["connects"]
            (mount / "..v2").mkdir()
            (mount / "..v2" / "config.yaml").write_text(
                _config(url, out, ["BTC/USD", "ETH/USD"], watch=True))
            (mount / "..data_tmp").symlink_to("..v2")
            os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
            bridge.until(lambda: "ETH/USD" in _symbols(out), 15, "ETH/USD after the swap")
            assert _admin(port)["connects"] == connects
        assert "changed: reloading" in bridge.output()


async def test_shutdown_waits_for_a_sink_a_reload_retired_within_its_deadline(
        simulator: Simulator, tmp_path: Path) -> None:
    """A sink removed by a reload drains in the background; a SIGTERM right after must
    not leave that drain running past the shutdown deadline."""
    from bridge.config import parse_config
    from bridge.sinks import Drivers
    from bridge.testing import MemorySink

    def settings(with_mem: bool) -> Any:
        mem = "  mem: {driver: memory, batch: {linger_ms: 0}}\n" if with_mem else ""
        text = f"""
source: {{url: {simulator.url}, api_key: test-key, tickers: [BTC/USD]}}
sinks:
  keep: {{driver: memory, batch: {{linger_ms: 0}}}}
{mem}http: {{enabled: false}}
reload: {{watch: false}}
shutdown_timeout_s: 2
"""
        return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))

    held = MemorySink("mem")
    bridge = Bridge(settings(True), sinks={"mem": held})
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await wait_until(lambda: len(held.received) >= 1, 10, task=task)
    held.hold()  # its bus hangs: what it holds cannot be delivered
    await wait_until(lambda: bridge.workers["mem"].depth > 0, 5, task=task)
    outcome = await bridge.reload(settings(False))
    assert outcome.result == "applied" and "sink mem removed" in outcome.changes
    assert bridge._retiring  # draining in the background
    started = time.monotonic()
    stop.set()
    lost = await asyncio.wait_for(task, 10)
    assert time.monotonic() - started < 2 + 1.5
    assert not bridge._retiring
    # what it held is accounted (issue 19), in what run() returns and on /metrics
    (gone,) = bridge.snapshot().retired_sinks
    assert lost["mem"] == gone.dropped["sink_removed"] > 0
    assert bridge.pipeline_dropped["sink_removed"] == lost["mem"]
    assert gone.offered == gone.published + sum(gone.dropped.values()) + gone.conflated
