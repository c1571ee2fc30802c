"""Safe reloads and their accounting (issue 19) on real processes: ``aleno-bridge run``
(``python -m bridge run -c``) against ``python -m bridge simulate``.

- a log file written into the configuration's directory triggers nothing, not even a
  log line;
- a file rewritten in place in two writes is never applied half-written;
- 50 SIGHUPs in 5 s at 2,000 symbols and 8,000 events/s lose no event and keep
  ``/healthz`` answering within a second;
- a FIFO, a symlink to ``/dev/zero`` or a 300 MB file at the path is an ``invalid``
  reload naming why, never a hang nor a jump in memory;
- a sink a reload removes with events buffered is accounted on ``/metrics`` and in
  the last log line.

Every wait is derived from the configured times: the reload debounce, the
simulator's interval, ``shutdown_timeout_s``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.control import call, metric, timed_get
from tests.support.proc import Proc, free_port, wait_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not hasattr(signal, "SIGHUP") or sys.platform != "linux",
                       reason="SIGHUP, FIFOs, /dev/zero and /proc are Linux's"),
]

CLI = [sys.executable, "-m", "bridge"]
#: the longest a process takes to start and connect on a loaded 2-core machine
START_S = 30.0
#: what a loaded machine adds to any wait below (thread hops, scheduling)
SLACK_S = 5.0
#: ``/healthz`` must answer within this, always
HEALTHZ_S = 1.0


def _settled_within(debounce_s: float) -> float:
    """A watched change is applied after the watch's step, two reads one debounce
    apart (three when the first read saw it half-written), and the reload."""
    return 3 * debounce_s + SLACK_S


@dataclass
class Bridge:
    proc: Proc
    http_port: int
    sim_port: int
    config: Path

    def metrics(self) -> str:
        return call(self.http_port, "GET", "/metrics", timeout=10).body.decode()

    def metric(self, name: str, labels: str = "") -> float:
        return metric(self.metrics(), name, labels)

    def reloads(self, result: str) -> int:
        return int(self.metric("aleno_bridge_config_reloads_total", f'result="{result}"'))

    def rss(self) -> int:
        return self.proc.rss()

    def wait(self, cond: Any, timeout: float, what: str) -> None:
        self.proc.until(cond, timeout, what)


def _config(sim_port: int, http_port: int, out: Path, tickers: list[str], *,
            watch: bool = True, debounce_s: float = 1.0, level: str = "INFO",
            shutdown_s: float = 3, sinks: str = "") -> str:
    """A configuration whose ticker list comes last, one per line: cut anywhere
    between two lines, it is still a valid file with fewer tickers (what a reader of
    a half-written file sees)."""
    listed = "".join(f"    - {t}\n" for t in tickers)
    return f"""\
shutdown_timeout_s: {shutdown_s}
sinks:
  file: {{driver: jsonl, path: {out}, batch: {{linger_ms: 0}}}}
{sinks}http: {{port: {http_port}}}
log: {{level: {level}}}
reload: {{watch: {str(watch).lower()}, debounce_s: {debounce_s}}}
source:
  url: http://127.0.0.1:{sim_port}
  api_key: test-key
  backoff: {{initial_s: 0.1, max_s: 0.3}}
  tickers:
{listed}"""


def _replace(path: Path, text: str) -> None:
    """Write ``path`` the safe way: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def running(tmp: Path, tickers: list[str], *, interval: float = 0.2,
            universe: list[str] | None = None, conf_dir: Path | None = None,
            **config: Any) -> Iterator[Bridge]:
    sim_port, http_port = free_port(), free_port()
    sim_args = [*CLI, "simulate", "--port", str(sim_port), "--api-key", "test-key",
                "--interval", str(interval), "--admin", "--max-subscriptions", "5000"]
    if universe is not None:
        sim_args += ["--tickers", ",".join(universe)]
    conf_dir = conf_dir or tmp / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    cfg = conf_dir / "config.yaml"
    cfg.write_text(_config(sim_port, http_port, tmp / "out.jsonl", tickers, **config))
    with Proc(sim_args, tmp / "sim.log") as _sim:
        wait_port(sim_port, START_S)
        with Proc([*CLI, "run", "-c", str(cfg)], tmp / "bridge.log") as proc:
            bridge = Bridge(proc, http_port, sim_port, cfg)
            wait_port(http_port, START_S)
            bridge.wait(lambda: call(http_port, "GET", "/readyz").status == 200, START_S,
                        "ready: subscribed and prices flowing")
            yield bridge


def _subscribed(sim_port: int) -> int:
    body = orjson.loads(call(sim_port, "GET", "/admin/subscriptions").body)
    return sum(len(k["tickers"]) for k in body["keys"].values() if k["connections"])


# -- the watch ---------------------------------------------------------------------------


def test_a_log_file_beside_the_config_triggers_no_reload_and_no_log_line(
        tmp_path: Path) -> None:
    """At DEBUG, 20 appends a second to a log file (and other files created and
    removed) in the configuration's directory: no reload, no line about it. Then the
    file itself is replaced: one reload (the watch works)."""
    debounce = 0.2
    with running(tmp_path, ["BTC/USD"], debounce_s=debounce, level="DEBUG") as bridge:
        before = bridge.proc.output()
        log_file = bridge.config.with_name("bridge.log")
        deadline = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < deadline:
            with log_file.open("a") as fh:
                fh.write(f"{time.time()} line {i}\n")
            if i % 10 == 0:
                other = bridge.config.with_name(f"other-{i}.yaml")
                other.write_text("x: 1\n")
                other.unlink()
            i += 1
            time.sleep(0.05)
        time.sleep(_settled_within(debounce))
        assert sum(bridge.reloads(r) for r in
                   ("applied", "unchanged", "invalid", "refused", "failed")) == 0
        during = bridge.proc.output()[len(before):]
        noisy = [line for line in during.splitlines()
                 if "change" in line or "watchfiles" in line or "reload" in line]
        assert noisy == [], noisy[:5]

        url = f"http://127.0.0.1:{bridge.sim_port}"
        text = bridge.config.read_text().replace("    - BTC/USD\n",
                                                 "    - BTC/USD\n    - ETH/USD\n")
        assert url in text
        _replace(bridge.config, text)
        bridge.wait(lambda: bridge.reloads("applied") == 1, _settled_within(debounce),
                    "the file's own change is applied")
        assert "changed: reloading" in bridge.proc.output()


def test_a_file_rewritten_in_place_in_two_writes_is_never_applied_half_written(
        tmp_path: Path) -> None:
    """100 tickers, the file rewritten in place (truncated, half written, the rest
    0.1-0.3 s later): each round is applied once, whole; the half (50 tickers, a valid
    file) never is."""
    debounce = 1.0
    universe = [f"S{i:03d}/USD" for i in range(100)]
    with running(tmp_path, universe, universe=universe, debounce_s=debounce) as bridge:
        bridge.wait(lambda: _subscribed(bridge.sim_port) == 100, START_S, "100 subscribed")
        head = bridge.config.read_text()
        for n, gap in enumerate((0.1, 0.2, 0.3), start=1):
            assert gap < debounce
            text = head.replace("shutdown_timeout_s: 3", f"shutdown_timeout_s: {3 + n}")
            cut = text.index("    - S050/USD")  # the half: a valid file of 50 tickers
            with bridge.config.open("w") as fh:
                fh.write(text[:cut])
                fh.flush()
                time.sleep(gap)
                fh.write(text[cut:])
            bridge.wait(lambda n=n: bridge.reloads("applied") == n,
                        _settled_within(debounce) + gap, f"round {n} applied")
            assert _subscribed(bridge.sim_port) == 100
        time.sleep(_settled_within(debounce))
        assert bridge.reloads("applied") == 3
        assert bridge.reloads("invalid") == bridge.reloads("failed") == 0
        assert bridge.metric("aleno_bridge_configured_symbols") == 100
        assert bridge.metric("aleno_bridge_status_events_total", 'status="gap"') == 0
        output = bridge.proc.output()
    changes = [line for line in output.splitlines() if "configuration reloaded" in line]
    assert len(changes) == 3 and not any("ticker" in line for line in changes), changes


# -- signals at a high event rate ---------------------------------------------------------


class Prober(threading.Thread):
    """GET ``/healthz`` every 0.1 s; keeps every status and the slowest answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.statuses: list[int] = []
        self.slowest = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status, seconds = timed_get(self.port, "/healthz", timeout=HEALTHZ_S * 5)
            self.statuses.append(status)
            self.slowest = max(self.slowest, seconds)
            self.done.wait(0.1)


def _losses(bridge: Bridge) -> dict[str, float]:
    text = bridge.metrics()
    return {
        "intake_full": metric(text, "aleno_bridge_pipeline_dropped_total",
                              'reason="intake_full"'),
        "pipeline": metric(text, "aleno_bridge_pipeline_dropped_total"),
        "shed": metric(text, "aleno_bridge_payloads_shed_total"),
        "sink_dropped": metric(text, "aleno_bridge_sink_events_dropped_total"),
        "watchdog": metric(text, "aleno_bridge_upstream_watchdog_restarts_total"),
        "reconnects": metric(text, "aleno_bridge_upstream_reconnects_total"),
    }


def test_50_sighups_at_2000_symbols_and_8000_events_per_s_lose_nothing(
        tmp_path: Path) -> None:
    """50 SIGHUPs in 5 s, the file alternating between two versions: reloads are read
    and parsed off the data path and merged, so no event is shed or dropped, the
    upstream never looks silent, and ``/healthz`` answers within a second."""
    interval = 0.25
    universe = [f"S{i:04d}/USD" for i in range(2000)]  # 2,000 / 0.25 s = 8,000 events/s
    with running(tmp_path, universe, universe=universe, interval=interval,
                 watch=False) as bridge:
        bridge.wait(lambda: _subscribed(bridge.sim_port) == 2000, START_S, "subscribed")
        time.sleep(10 * interval)  # a few rounds at full rate first
        assert all(v == 0 for v in _losses(bridge).values()), _losses(bridge)
        # two versions that differ in their routes: each reload swaps the router
        text = bridge.config.read_text()
        routes = "routes:\n  - {match: {kind: ticker}, sinks: [file]}\n"
        versions = [text, text.replace("http: {port", routes + "http: {port")]
        prober = Prober(bridge.http_port)
        prober.start()
        try:
            for i in range(50):
                _replace(bridge.config, versions[(i + 1) % 2])
                bridge.proc.signal(signal.SIGHUP)
                time.sleep(0.1)
            time.sleep(10 * interval + 1.0)  # the last reloads end, data keeps flowing
        finally:
            prober.done.set()
            prober.join()
        assert 1 <= bridge.reloads("applied") <= 50
        assert bridge.reloads("invalid") == bridge.reloads("failed") == 0
        losses = _losses(bridge)
        assert all(v == 0 for v in losses.values()), losses
        assert prober.statuses and set(prober.statuses) == {200}, prober.statuses
        assert prober.slowest < HEALTHZ_S, prober.slowest
        received = bridge.metric("aleno_bridge_events_received_total")
        assert received >= 10 * len(universe)


# -- what is at the path ------------------------------------------------------------------


def test_a_fifo_dev_zero_or_a_huge_file_at_the_path_is_an_invalid_reload(
        tmp_path: Path) -> None:
    """Swapped in at the configuration's path, each is refused as ``invalid`` naming
    why, by the watch and on SIGHUP, at once: nothing hangs, memory does not jump,
    the data keeps flowing; a good file afterwards is applied."""
    debounce = 0.2
    with running(tmp_path, ["BTC/USD"], debounce_s=debounce) as bridge:
        good = bridge.config.read_text()
        rss = bridge.rss()
        invalid = 0
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        zero = tmp_path / "zero"
        zero.symlink_to("/dev/zero")
        huge = tmp_path / "huge"
        with huge.open("wb") as fh:
            fh.truncate(300 * 1024 * 1024)
        for thing, why in ((fifo, "not a regular file (a FIFO)"),
                           (zero, "not a regular file (a device)"),
                           (huge, "larger than 4 MiB")):
            os.replace(thing, bridge.config)
            invalid += 1  # the watch
            bridge.wait(lambda n=invalid: bridge.reloads("invalid") == n,
                        _settled_within(debounce), f"{why}: invalid (watch)")
            invalid += 1  # and SIGHUP
            bridge.proc.signal(signal.SIGHUP)
            bridge.wait(lambda n=invalid: bridge.reloads("invalid") == n, SLACK_S,
                        f"{why}: invalid (SIGHUP)")
            status, seconds = timed_get(bridge.http_port, "/healthz", timeout=5)
            assert status == 200 and seconds < HEALTHZ_S
            assert why in bridge.proc.output()
        assert bridge.rss() - rss < 50 * 1024 * 1024
        assert bridge.reloads("applied") == 0
        assert bridge.metric("aleno_bridge_upstream_reconnects_total") == 0
        _replace(bridge.config, good.replace("    - BTC/USD\n", "    - BTC/USD\n    - ETH/USD\n"))
        bridge.wait(lambda: bridge.reloads("applied") == 1, _settled_within(debounce),
                    "a good file again")


# -- accounting -----------------------------------------------------------------------------


def test_a_removed_sinks_buffered_events_are_accounted_on_metrics_and_at_the_end(
        tmp_path: Path) -> None:
    """A sink whose bus is unreachable holds 20,000 events when a reload removes it:
    after its drain deadline (``shutdown_timeout_s``) they are counted as
    ``sink_removed`` on ``/metrics`` (its counters stay there), and the last log line
    says so; the replaced ``file`` sink's counters go on from where they were."""
    shutdown_s = 1.0
    universe = [f"S{i:03d}/USD" for i in range(500)]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the sink wants a directory\n")
    dead = (f"  dead: {{driver: jsonl, path: {blocker}/out.jsonl, required: false, "
            "buffer: {max_events: 20000}}\n")
    # 10,000 events/s: the dead sink's buffer is full within 2 s
    with running(tmp_path, universe, universe=universe, interval=0.05, watch=False,
                 shutdown_s=shutdown_s, sinks=dead) as bridge:
        bridge.wait(lambda: bridge.metric("aleno_bridge_sink_queue_depth", 'sink="dead"')
                    == 20_000, START_S, "the dead sink holds 20,000 events")
        published = bridge.metric("aleno_bridge_sink_events_published_total", 'sink="file"')
        assert published > 0
        text = bridge.config.read_text()
        _replace(bridge.config, text.replace(dead, "").replace("linger_ms: 0", "linger_ms: 1"))
        bridge.proc.signal(signal.SIGHUP)
        bridge.wait(lambda: bridge.reloads("applied") == 1, SLACK_S, "applied")
        bridge.wait(lambda: bridge.metric("aleno_bridge_pipeline_dropped_total",
                                          'reason="sink_removed"') > 0,
                    shutdown_s + SLACK_S, "the removed sink's drain ended")
        m = bridge.metrics()
        lost = metric(m, "aleno_bridge_pipeline_dropped_total", 'reason="sink_removed"')
        assert lost == 20_000
        assert metric(m, "aleno_bridge_sink_events_dropped_total",
                      'reason="sink_removed",sink="dead"') == 20_000
        assert metric(m, "aleno_bridge_sink_events_offered_total", 'sink="dead"') >= 20_000
        assert 'aleno_bridge_sink_up{sink="dead"}' not in m
        assert metric(m, "aleno_bridge_sink_events_published_total",
                      'sink="file"') >= published  # replaced: not back to 0
        bridge.proc.stop()
        output = bridge.proc.output()
    assert "(20000 by sinks a reload replaced or removed)" in output
    last = re.findall(r"aleno-bridge stopped; undelivered events: (\d+)", output)
    assert last and int(last[-1]) >= 20_000, output[-2000:]
