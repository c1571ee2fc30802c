"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from tests.support.proc import Proc, free_port, wait_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[3]
CLI = [sys.executable, "-m", "bridge"]


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture(scope="module")
def sim_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, int]]:
    """One simulator for the module's tests: it keeps no state between connections."""
    port = free_port()
    with Proc([*CLI, "simulate", "--port", str(port), "--api-key", "cli-key", "--interval",
               "0.2"], tmp_path_factory.mktemp("sim") / "sim.log") as p:
        wait_port(port, 20)
        yield p, port


def test_validate_every_example_config() -> None:
    configs = sorted((ROOT / "config").glob("*.yaml"))
    assert len(configs) >= 2
    # one process per file, all at once (each spends its time starting up)
    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        results = list(pool.map(lambda path: cli("validate", "-c", str(path)), configs))
    for path, r in zip(configs, results, strict=True):
        assert r.returncode == 0, f"{path.name}: {r.stdout}{r.stderr}"
        assert "valid" in r.stdout


def test_validate_prints_every_problem_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
source: {api_key: "${NOT_SET_ANYWHERE}", stale_after_s: nope}
sinks:
  f: {driver: jsonl}
  g: {driver: no-such-driver}
  h: {driver: console, style: sparkles}
routes:
  - {sinks: [f, zzz], topic: "{nope}"}
""")
    r = cli("validate", "-c", str(bad))
    assert r.returncode == 2
    for expected in ("source.api_key: environment variable NOT_SET_ANYWHERE is not set",
                     "source.stale_after_s:", "sinks.f.path: field required",
                     "sinks.g.driver: unknown sink driver 'no-such-driver'",
                     "sinks.h.style:", "routes[0].topic: unknown placeholder {nope}"):
        assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plugins_lists_the_builtin_drivers_with_their_distribution() -> None:
    r = cli("plugins")
    assert r.returncode == 0, r.stderr
    for name in ("console", "jsonl"):
        assert re.search(rf"{name}\s.*aleno-bridge", r.stdout), r.stdout


def test_bad_key_exits_non_zero_with_a_clear_message(sim_proc: tuple[Proc, int],
                                                     tmp_path: Path) -> None:
    _, port = sim_proc
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{port}", api_key: "${{KEY}}", tickers: [BTC/USD],
          max_auth_failures: 2, backoff: {{initial_s: 0.1, max_s: 0.2}}}}
sinks: {{out: {{driver: jsonl, path: {tmp_path}/out.jsonl}}}}
http: {{enabled: false}}
""")
    r = cli("run", "-c", str(cfg), env={"KEY": "definitely-wrong-key"}, timeout=30)
    assert r.returncode == 3
    assert "refused the API key" in r.stderr and "source.api_key" in r.stderr
    assert "definitely-wrong-key" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_drains_and_exits_zero(sim_proc: tuple[Proc, int], tmp_path: Path) -> None:
    _, port = sim_proc
    http_port = free_port()
    out = tmp_path / "out.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{port}", api_key: cli-key, tickers: [BTC/USD, ETH/USD],
          equities: [AAPL]}}
sinks:
  out: {{driver: jsonl, path: "{out}", batch: {{max_events: 1000, linger_ms: 300}}}}
http: {{port: {http_port}}}
log: {{format: json}}
""")
    with Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log") as bridge:
        wait_port(http_port, 20)
        deadline = time.monotonic() + 15
        while not (out.exists() and out.stat().st_size > 0):
            assert time.monotonic() < deadline, bridge.output()
            time.sleep(0.1)
        time.sleep(1.0)
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(20) == 0, bridge.output()
    log_lines = [orjson.loads(line) for line in bridge.output().splitlines()
                 if line.startswith("{")]
    drained = [x for x in log_lines if "drained" in x["msg"]]
    assert drained, bridge.output()
    published = drained[0]["published"]
    lines = out.read_bytes().splitlines()
    assert published == len(lines) > 0
    ids = [orjson.loads(x)["id"] for x in lines]
    assert len(set(ids)) == len(ids)


def test_demo_shows_ticker_and_equity_prices_within_5s() -> None:
    started = time.monotonic()
    r = subprocess.run([*CLI, "demo", "--duration", "4"], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 30
    assert re.search(r"ticker\s+BTC/USD\s+[\d,]+\.\d+", r.stdout), r.stdout
    assert re.search(r"equity\s+AAPL\s+[\d,]+\.\d+", r.stdout), r.stdout


def test_simulate_refuses_when_the_port_is_taken(sim_proc: tuple[Proc, int]) -> None:
    _, port = sim_proc
    r = cli("simulate", "--port", str(port), timeout=20)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"simulate: cannot listen on 127.0.0.1:{port}: the port is already in use" in r.stderr
    assert "--port N" in r.stderr and "ALENO_URL=" in r.stderr
    assert_one_paragraph(r.stderr)


# -- issue 19: errors users hit at the command line are one paragraph, cause and fix --


#: a program that holds a port: binds it, listens, prints "ready", sleeps until killed
HOLD_PORT = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(3600)
"""


def assert_one_paragraph(stderr: str) -> None:
    """The error is one paragraph: no traceback, no exception type, no raw errno."""
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("{")]
    assert len(lines) == 1, stderr
    for raw in ("Traceback", "OSError", "URLError", "Errno", "--debug"):
        assert raw not in stderr, stderr


@pytest.fixture
def held_port(tmp_path: Path) -> Iterator[int]:
    """A free port that another process then holds (listening) for the test."""
    port = free_port()
    with Proc([sys.executable, "-c", HOLD_PORT, str(port)], tmp_path / "holder.log"):
        wait_port(port, 20)
        yield port


@pytest.mark.parametrize("setting", ["http", "control.http"])
def test_run_names_the_setting_whose_port_is_in_use(
        held_port: int, tmp_path: Path, setting: str) -> None:
    """``run`` with ``http.port`` or ``control.http.port`` held by another process exits 1
    with one paragraph naming the setting, the port, the cause and the fix."""
    ports = {"http": free_port(), "control.http": free_port(), setting: held_port}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{free_port()}", api_key: k, tickers: [BTC/USD]}}
sinks: {{out: {{driver: jsonl, path: "{tmp_path}/out.jsonl"}}}}
http: {{port: {ports["http"]}}}
control: {{http: {{port: {ports["control.http"]}}}}}
log: {{format: json}}
""")
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"run: cannot listen on 127.0.0.1:{held_port} for " in r.stderr
    assert f"({setting}.port): the port is already in use" in r.stderr
    assert f"set {setting}.port in {cfg} to a free port" in r.stderr
    assert f"sport = :{held_port}" in r.stderr  # how to find the holder
    assert_one_paragraph(r.stderr)


def test_top_without_a_running_bridge_says_how_to_start_one() -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"
    r = cli("top", "--once", "--url", url, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"top: nothing listens at {url} (connection refused)" in r.stderr
    assert "aleno-bridge run -c CONFIG" in r.stderr and "--url http://HOST:PORT/metrics" in r.stderr
    assert_one_paragraph(r.stderr)


def test_top_against_something_else_says_it_is_not_a_bridge(
        sim_proc: tuple[Proc, int]) -> None:
    """The simulator listens but has no /metrics: an HTTP 404, named as such."""
    _, port = sim_proc
    url = f"http://127.0.0.1:{port}/metrics"
    r = cli("top", "--once", "--url", url, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"top: {url} answered HTTP 404" in r.stderr
    assert "not a bridge's metrics endpoint" in r.stderr
    assert_one_paragraph(r.stderr)


# -- issue 8: every config problem exits 2 with a path, never a traceback ----------


@pytest.mark.parametrize(("content", "key_file", "expected"), [
    (b"x: &a [1, *a]\nsinks: {s: {driver: console}}\n", None,
     "x[1]: recursive YAML alias"),
    (b"sinks: {s: {driver: console}}\n# caf\xe9\n", None,
     "<file>: not UTF-8 text (invalid byte 0xe9 at line 2, column 6)"),
    (b"source: {api_key_file: KEYFILE}\nsinks: {s: {driver: console}}\n", b"\xff\xfe\x00",
     "source.api_key_file: not UTF-8 text"),
    (b"source: {api_key_file: KEYFILE}\nsinks: {s: {driver: console}}\n",
     b"secret-part-one\nsecret-part-two\n", "source.api_key_file: the key must be one line"),
    (b"source: {url: 'http://h:99999'}\nsinks: {s: {driver: console}}\n", None,
     "source.url: the port must be a number from 1 to 65535"),
    (b"source: {url: 'http://user:pw-secret@h'}\nsinks: {s: {driver: console}}\n", None,
     "source.url: must not carry credentials"),
])
def test_validate_exits_2_with_a_path_named_problem(
        tmp_path: Path, content: bytes, key_file: bytes | None, expected: str) -> None:
    key = tmp_path / "key"
    if key_file is not None:
        key.write_bytes(key_file)
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content.replace(b"KEYFILE", str(key).encode()))
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert "secret" not in r.stderr


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x: &a [1, *a]\nsinks:\n  s: {driver: console}\n  s: {driver: console}\n")
    r = cli("run", "-c", str(cfg), timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "x[1]: recursive YAML alias" in r.stderr and "Traceback" not in r.stderr


def test_validate_prints_insecure_settings_as_warnings_and_exits_0(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
source: {url: "http://pricing.example.com", api_key: the-secret-key, tls_verify: false}
sinks: {s: {driver: console}}
""")
    r = cli("validate", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout
    assert "warning: source.url: the API key is sent unencrypted over http://" in r.stderr
    assert "warning: source.tls_verify: false:" in r.stderr
    assert "the-secret-key" not in r.stdout + r.stderr


def test_run_logs_each_insecure_setting_once(sim_proc: tuple[Proc, int], tmp_path: Path) -> None:
    _, port = sim_proc
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{port}", api_key: cli-key, tickers: [BTC/USD],
          tls_verify: false}}
sinks: {{out: {{driver: jsonl, path: "{tmp_path}/out.jsonl"}}}}
http: {{enabled: false}}
log: {{format: json}}
""")
    with Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log") as bridge:
        out = tmp_path / "out.jsonl"
        deadline = time.monotonic() + 20
        while not (out.exists() and out.stat().st_size > 0):  # running, signals handled
            assert time.monotonic() < deadline, bridge.output()
            time.sleep(0.1)
        bridge.signal(signal.SIGTERM)
        assert bridge.wait(20) == 0, bridge.output()
    lines = [orjson.loads(x) for x in bridge.output().splitlines() if x.startswith("{")]
    warned = [x for x in lines if x["logger"] == "aleno_bridge.cli"
              and "insecure setting: source.tls_verify: false:" in x["msg"]]
    assert len(warned) == 1 and warned[0]["level"].upper() == "WARNING", warned
