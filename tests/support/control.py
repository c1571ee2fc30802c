"""A real ``aleno-bridge run`` with a guarded control surface, for the security tests.

:func:`control_bridge` starts the simulator (``aleno-bridge simulate``) and the bridge
(``aleno-bridge run -c``) in processes of their own, on free ports, with the control
listener apart from the probes' listener, and yields a :class:`Running` that knows
their ports and how to call them (:func:`call`, plain ``http.client``: no client
library between the test and the wire).
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tests.support.proc import Proc, free_port, wait_port

CLI = [sys.executable, "-m", "bridge"]

#: bearer tokens of the tests (secrets: no output of the bridge may show them)
TOKENS: Mapping[str, str] = {
    "reader": "reader-token-0f3a9c1e7b5d2a48",
    "leaser": "leaser-token-6e1d0b9f4c2a7e35",
    "small": "small-token-9b7c5a3e1f0d8c62",
    "other": "other-token-2d4f6a8c0e1b3d57",
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def call(port: int, method: str, path: str, *, token: str | None = None,
         body: bytes | None = None, content_type: str | None = "application/json",
         headers: Mapping[str, str] | None = None, timeout: float = 10.0) -> Reply:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent: dict[str, str] = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None and content_type is not None:
            sent["Content-Type"] = content_type
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def timed_get(port: int, path: str, timeout: float) -> tuple[int, float]:
    """``(status, seconds)`` of one GET; status 0 when it failed or timed out."""
    start = time.monotonic()
    try:
        status = call(port, "GET", path, timeout=timeout).status
    except (OSError, http.client.HTTPException):
        status = 0
    return status, time.monotonic() - start


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples of ``name`` whose labels contain ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Running:
    bridge: Proc
    simulator: Proc
    http_port: int
    control_port: int
    sim_port: int
    config: Path

    def metrics(self) -> str:
        return call(self.http_port, "GET", "/metrics").body.decode()

    def rss(self) -> int:
        """The bridge's resident memory, bytes."""
        return self.bridge.rss()

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        self.bridge.until(cond, timeout, what)


def tokens_yaml(spec: Mapping[str, str]) -> str:
    """``control.auth.tokens`` entries: name -> the rest of the entry (YAML flow)."""
    return "\n".join(f"      - {{name: {name}, token: {TOKENS[name]}, {rest}}}"
                     for name, rest in spec.items())


@contextlib.contextmanager
def control_bridge(tmp: Path, *, tickers: list[str], control: str = "",
                   leases: str = "", http: str = "", extra: str = "",
                   sim_args: list[str] | None = None, universe: list[str] | None = None,
                   ready_timeout: float = 30.0) -> Iterator[Running]:
    """The simulator and ``aleno-bridge run`` (see the module); ``control`` is the
    body of the ``control:`` section (indented by four), the others are inserted as
    given."""
    sim_port, http_port, control_port = free_port(), free_port(), free_port()
    sim = [*CLI, "simulate", "--port", str(sim_port), "--api-key", "test-key",
           "--interval", "0.5", "--admin", *(sim_args or [])]
    if universe is not None:
        sim += ["--tickers", ",".join(universe)]
    out = tmp / "out.jsonl"
    cfg = tmp / "bridge.yaml"
    cfg.write_text(f"""
source:
  url: http://127.0.0.1:{sim_port}
  api_key: test-key
  tickers: [{", ".join(tickers)}]
  backoff: {{initial_s: 0.1, max_s: 0.5}}
  update_interval_s: 0.5
  leases: {{enabled: true, grace_s: 0.5{leases}}}
sinks:
  file: {{driver: jsonl, path: {out}, batch: {{linger_ms: 5}}}}
http: {{host: 127.0.0.1, port: {http_port}{http}}}
control:
  http: {{host: 127.0.0.1, port: {control_port}}}
{control}
reload: {{watch: false}}
log: {{format: text}}
shutdown_timeout_s: 3
{extra}
""")
    with Proc(sim, tmp / "sim.log") as simulator:
        wait_port(sim_port)
        with Proc([*CLI, "run", "-c", str(cfg)], tmp / "bridge.log") as bridge:
            running = Running(bridge, simulator, http_port, control_port, sim_port, cfg)
            wait_port(http_port, ready_timeout)
            wait_port(control_port, ready_timeout)
            running.wait(lambda: call(http_port, "GET", "/readyz").status == 200,
                         ready_timeout, "the bridge is ready")
            yield running


def sim_subscriptions(port: int) -> dict[str, Any]:
    """The simulator's admin view of the subscriptions of ``test-key``."""
    reply = call(port, "GET", "/admin/subscriptions")
    body = reply.json()
    (key,) = [k for k in body["keys"].values() if k["connections"]]
    return dict(key)


__all__ = ["CLI", "TOKENS", "Reply", "Running", "call", "control_bridge", "metric",
           "sim_subscriptions", "timed_get", "tokens_yaml"]
