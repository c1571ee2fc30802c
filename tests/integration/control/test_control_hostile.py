"""The measured attacks on the control surface, reproduced against a real
``aleno-bridge run``: the probes keep answering within 1 s, the bridge's memory stays
under the Helm chart's limit (256 MiB) and the data path loses nothing.

- slow clients that hold partial headers and reopen as soon as they are closed, on the
  probes' listener (70 of them, over its cap of 64);
- 64 clients that ask for a full snapshot of 10,000 symbols and never read it;
- thousands of lease requests, and leases of junk symbols.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.control import (
    TOKENS,
    Reply,
    Running,
    call,
    control_bridge,
    metric,
    sim_subscriptions,
    timed_get,
    tokens_yaml,
)

pytestmark = pytest.mark.integration

#: the chart's memory limit (helm/aleno-bridge/values.yaml resources.limits.memory)
CHART_LIMIT = 256 * 2**20
PROBE_DEADLINE_S = 1.0


class Attackers:
    """``n`` sockets in a thread of their own, each sending ``payload`` and then nothing;
    a closed one is reopened at once (``reopen``)."""

    def __init__(self, port: int, n: int, payload: bytes, *, reopen: bool = True,
                 rcvbuf: int | None = None) -> None:
        self.port, self.n, self.payload, self.reopen, self.rcvbuf = port, n, payload, reopen, rcvbuf
        self.opened = 0
        self.closed_by_peer = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Attackers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        if self.rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        try:
            s.connect(("127.0.0.1", self.port))
            s.sendall(self.payload)
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        socks: set[socket.socket] = set()
        try:
            while not self._stop.is_set():
                while len(socks) < self.n and not self._stop.is_set():
                    s = self._open()
                    if s is None:
                        time.sleep(0.01)
                        break
                    socks.add(s)
                    # only to learn of a close: never read an answer (rcvbuf fills)
                    sel.register(s, selectors.EVENT_READ)
                for key, _ in sel.select(0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        peeked = s.recv(1, socket.MSG_PEEK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        peeked = b""
                    if peeked and not self.reopen:
                        sel.unregister(s)  # it has data: leave it unread
                        continue
                    if peeked:
                        sel.unregister(s)
                        continue
                    self.closed_by_peer += 1
                    sel.unregister(s)
                    socks.discard(s)
                    s.close()
                    if not self.reopen:
                        self.n -= 1
        finally:
            for s in socks:
                with contextlib.suppress(Exception):
                    s.close()
            sel.close()


def _probe_for(port: int, seconds: float, path: str = "/readyz") -> list[tuple[int, float]]:
    """Probe every 0.25 s for ``seconds``: ``(status, latency)`` of each."""
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        results.append(timed_get(port, path, timeout=5.0))
        time.sleep(0.25)
    return results


def _no_loss(running: Running) -> None:
    text = running.metrics()
    assert metric(text, "aleno_bridge_pipeline_dropped_total") == 0
    assert metric(text, "aleno_bridge_payloads_shed_total") == 0
    assert metric(text, "aleno_bridge_sink_events_dropped_total") == 0


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """10,000 symbols at one update a second, a full snapshot of ~6 MB."""
    tmp = tmp_path_factory.mktemp("hostile")
    universe = [f"T{i:05d}/USD" for i in range(10_000)]
    tokens = tokens_yaml({"reader": "scopes: [snapshot]",
                          "leaser": "scopes: [snapshot, lease], max_symbols: 50"})
    control = f"""  auth:
    tokens:
{tokens}
"""
    with control_bridge(tmp, tickers=universe, universe=universe, control=control,
                        leases=", max_leases: 200, max_symbols: 200",
                        http=", max_connections: 64, idle_timeout_s: 10",
                        sim_args=["--max-subscriptions", "20000"],
                        extra="intake_max_events: 50000",
                        ready_timeout=60) as running:
        running.wait(lambda: call(running.control_port, "GET", "/v1/snapshot?limit=1",
                                  token=TOKENS["reader"]).status == 200, 30, "snapshot")
        running.wait(lambda: metric(running.metrics(), "aleno_bridge_last_values") >= 10_000,
                     60, "10,000 last values")
        yield running


def test_slow_clients_reopening_on_the_probes_port_do_not_starve_the_probes(
        big: Running) -> None:
    with Attackers(big.http_port, 70, b"GET /readyz HTTP/1.1\r\nHost: x\r\n") as attack:
        time.sleep(1.0)
        results = _probe_for(big.http_port, 8.0)
        opened = attack.opened
    assert opened >= 64, "the attack did not fill the listener"
    slow = [r for r in results if r[0] != 200 or r[1] > PROBE_DEADLINE_S]
    assert not slow, f"{len(slow)} of {len(results)} probes failed or were slow: {slow[:5]}"
    _no_loss(big)


def test_64_clients_that_never_read_a_full_snapshot_pin_no_memory(big: Running) -> None:
    request = (f"GET /v1/snapshot HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               f"{TOKENS['reader']}\r\n\r\n").encode()
    before = big.rss()
    peak = before
    with Attackers(big.control_port, 64, request, reopen=False, rcvbuf=4096):
        deadline = time.monotonic() + 6.0
        results = []
        while time.monotonic() < deadline:
            results.append(timed_get(big.http_port, "/readyz", 5.0))
            peak = max(peak, big.rss())
            time.sleep(0.2)
        # the listener still serves a client that reads (after the send timeout at
        # the latest, the non-readers are cut off)
        big.wait(lambda: call(big.control_port, "GET", "/v1/snapshot", token=TOKENS["reader"],
                              timeout=30).status == 200, 30, "a reading client is served")
    assert peak < CHART_LIMIT, f"RSS {peak / 2**20:.0f} MiB (was {before / 2**20:.0f})"
    slow = [r for r in results if r[0] != 200 or r[1] > PROBE_DEADLINE_S]
    assert not slow, f"{len(slow)} of {len(results)} probes failed or were slow: {slow[:5]}"
    _no_loss(big)


def _post(conn: http.client.HTTPConnection, path: str, token: str, body: bytes) -> Reply:
    """One request on ``conn``, kept alive (``http.client`` opens a new connection after
    a reply that closed it)."""
    conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def test_thousands_of_lease_requests_hit_the_caps_with_bounded_memory(big: Running) -> None:
    """3,000 lease requests one after another, on a connection kept alive (with a fresh
    connection each, opening and closing them cost the bridge's control loop about as
    much as the requests, and the 3,000 took most of a minute on a loaded 2-core
    machine)."""
    port = big.control_port
    statuses: dict[int, int] = {}
    leases: list[str] = []
    before = big.rss()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        for i in range(3000):
            symbols = [f"T{(i * 7 + j) % 10_000:05d}/USD" for j in range(3)]
            body = orjson.dumps({"kind": "ticker", "symbols": symbols, "ttl_s": 60,
                                 "holder": f"h{i}"})
            reply = _post(conn, "/v1/subscriptions", TOKENS["leaser"], body)
            statuses[reply.status] = statuses.get(reply.status, 0) + 1
            if reply.status == 200 and reply.json()["lease"]:
                leases.append(reply.json()["lease"])
            if i % 500 == 0:
                status, took = timed_get(big.http_port, "/readyz", 5.0)
                assert status == 200 and took < PROBE_DEADLINE_S
    finally:
        conn.close()
    after = big.rss()
    assert statuses.get(429, 0) >= 2900, statuses
    assert len(leases) <= 200
    assert after < CHART_LIMIT
    assert after - before < 32 * 2**20, f"{(after - before) / 2**20:.0f} MiB for 3,000 requests"
    for lease in leases:
        call(port, "DELETE", f"/v1/subscriptions/{lease}", token=TOKENS["leaser"])
    _no_loss(big)


def test_junk_symbol_leases_cost_the_upstream_a_bounded_rate(tmp_path: Path) -> None:
    control = f"""  auth:
    tokens:
{tokens_yaml({"leaser": "scopes: [lease], max_symbols: 100000"})}
"""
    with control_bridge(tmp_path, tickers=["S000/USD"], universe=["S000/USD", "S001/USD"],
                        control=control,
                        leases=", max_leases: 100000, max_symbols: 100000",
                        extra="") as running:
        port = running.control_port
        started = time.monotonic()
        before = sim_subscriptions(running.sim_port)
        n = 0
        probes: list[tuple[int, float]] = []
        while time.monotonic() - started < 6.0:
            symbols = [f"JUNK{n}-{j}/USD" for j in range(50)]
            reply = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"],
                         body=orjson.dumps({"kind": "ticker", "symbols": symbols}))
            assert reply.status in (200, 429), reply.body
            n += 1
            if n % 5 == 0:
                probes.append(timed_get(running.http_port, "/readyz", 5.0))
        elapsed = time.monotonic() - started
        assert running.rss() < CHART_LIMIT
        assert all(status == 200 and took < PROBE_DEADLINE_S for status, took in probes), probes
        _no_loss(running)
        after = sim_subscriptions(running.sim_port)
        text = running.metrics()
    requests = after["subscribe_requests"] - before["subscribe_requests"]
    # source.max_subscribe_requests_per_s defaults to 5 (burst 10), however many
    # requests the clients make
    assert requests <= 5 * elapsed + 10, (requests, elapsed)
    assert n >= 3
    assert metric(text, "aleno_bridge_upstream_rejected_symbols") <= 10_000
    # the configured symbol kept flowing meanwhile
    assert metric(text, "aleno_bridge_events_received_total") > 0
