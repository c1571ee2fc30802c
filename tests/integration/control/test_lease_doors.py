"""Leases through the control surface's two doors, end to end: a real simulator, a real
upstream pool, real leases, a real nats-server and a real HTTP server.

A :class:`Node` is one bridge process as the doors see it: the upstream pool feeds a
real :class:`~bridge.pipeline.normalize.Normalizer` whose events fill the last-value cache, and
:class:`~bridge.upstream.subscriptions.Subscriptions` drives the pool. What the upstream holds
is read from the simulator itself (``subscriptions_by_key``), never from the bridge.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
import pytest
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from bridge.config import HttpConfig, Settings, parse_config
from bridge.config.settings import upstream_keys
from bridge.control.core import Control, NatsControl, start_nats_control
from bridge.control.http import HttpServer, serve_http
from bridge.pipeline.market import LastValues
from bridge.pipeline.normalize import Normalizer
from bridge.simulator import LIMIT_REACHED, Simulator
from bridge.sinks import Drivers
from bridge.testing import MemorySink, wait_until
from bridge.upstream.pool import UpstreamPool
from bridge.upstream.sharding import shard_of
from bridge.upstream.subscriptions import Subscriptions

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[3] / "docs" / "control-api.md"


class Node:
    """One bridge process: pool -> normalizer -> last values; leases; both doors."""

    def __init__(self, settings: Settings, api_key: str) -> None:
        self.settings = settings
        cfg = settings.config.source
        self.last_values = LastValues()
        self.normalizer = Normalizer(cfg.endpoint)
        self.pool = UpstreamPool(cfg, upstream_keys(cfg, api_key), self.on_payload)
        self.subscriptions = Subscriptions(self.pool, cfg.leases,
                                           pinned={k: set(v) for k, v in self.pool.wanted.items()})
        self.control = Control.of(self)
        self.registry = CollectorRegistry()
        self.http: HttpServer | None = None
        self.nats: NatsControl | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # what the HTTP server reads
    @property
    def http_config(self) -> HttpConfig:
        return self.settings.config.http

    def alive(self) -> bool:
        return True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def on_payload(self, event: str, payload: Any) -> None:
        if event == "new_token_states":
            events = self.normalizer.tickers(payload, self.pool.wanted["ticker"])
        elif event == "new_equity_states":
            events = self.normalizer.equities(payload, self.pool.wanted["equity"])
        else:
            return
        for ev in events:
            self.last_values.put(ev)

    def received_since(self, kind: str, symbol: str, t: float) -> bool:
        lv = self.last_values.get(kind, symbol)
        return lv is not None and lv.received_monotonic >= t

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.pool.run()),
                       asyncio.create_task(self.subscriptions.run(self._stop, 0.1))]
        self.http = await serve_http(self)
        cfg = self.settings.config.control.nats
        assert cfg is not None
        self.nats = await start_nats_control(self.control, cfg)
        await self.nats.wait_ready(15)

    async def close(self) -> None:
        if self.nats is not None:
            await self.nats.close()
        if self.http is not None:
            await self.http.cleanup()
        self._stop.set()
        self.pool.stop()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)

    async def http_call(self, method: str, path: str,
                        body: dict[str, Any] | None = None) -> tuple[int, Any]:
        assert self.http is not None
        url = f"http://127.0.0.1:{self.http.port}{path}"
        async with aiohttp.ClientSession() as session, \
                session.request(method, url, json=body) as resp:
            data = await resp.read()
            return resp.status, json.loads(data) if data else None


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node(nats_url: str) -> AsyncIterator[StartNode]:
    nodes: list[Node] = []

    async def start(sim: Simulator, prefix: str, api_key: str = "test-key",
                    tickers: list[str] | None = None, shard: str = "",
                    leases: str = "enabled: true, default_ttl_s: 5, max_ttl_s: 30, "
                                  "grace_s: 0.3") -> Node:
        text = f"""
source:
  url: {sim.url}
  api_key: {api_key}
  tickers: {json.dumps(tickers or [])}
  backoff: {{initial_s: 0.05, max_s: 0.3}}
  leases: {{{leases}}}
  {shard}
sinks: {{mem: {{driver: memory}}}}
routes: [{{sinks: [mem]}}]
http: {{port: 0}}
control:
  nats: {{servers: ["{nats_url}"], subject_prefix: {prefix}, name: {prefix.replace('.', '-')}}}
"""
        settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
        node = Node(settings, api_key)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in nodes:
        await node.close()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = Client()
    await nc.connect(nats_url, allow_reconnect=False)
    yield nc
    await nc.close()


def unique() -> str:
    return f"test.lease.{uuid.uuid4().hex[:10]}"


def upstream(sim: Simulator, key: str, kind: str = "ticker") -> set[str]:
    return sim.subscriptions_by_key().get(key, {}).get(kind, set())


async def ask(nc: Client, subject: str, body: dict[str, Any],
              timeout: float = 5) -> tuple[str | None, Any]:
    """A request; returns (error code or None, JSON body)."""
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    code = msg.headers.get("Nats-Service-Error-Code") if msg.headers else None
    return code, json.loads(msg.data)


async def test_lease_renew_release_over_nats_and_http(
    simulator: Simulator, start_node: StartNode, client: Client,
) -> None:
    prefix = unique()
    pinned, t1, t2 = simulator.tickers[0], simulator.tickers[1], simulator.tickers[2]
    e1 = simulator.equities[0]
    node = await start_node(simulator, prefix, tickers=[pinned])
    await wait_until(lambda: upstream(simulator, "test-key") == {pinned}, 10, "pinned")

    # discovery lists the lease endpoints
    info = json.loads((await client.request(f"$SRV.INFO.{prefix.replace('.', '-')}", b"",
                                            timeout=5)).data)
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert endpoints["subscribe"]["subject"] == f"{prefix}.subscribe"
    assert endpoints["subscribe"]["queue_group"] == "q"
    assert endpoints["renew"]["subject"] == f"{prefix}.renew"
    assert endpoints["release"]["subject"] == f"{prefix}.release"
    assert endpoints["renew"]["queue_group"] == f"lease-{node.control.instance}"

    # NATS: lease -> accepted and subscribed upstream; the first update arrives
    t0 = time.monotonic()
    code, doc = await ask(client, f"{prefix}.subscribe",
                          {"kind": "ticker", "symbols": [t1.lower()], "ttl_s": 1.0,
                           "holder": "nats-client"})
    assert code is None, doc
    assert doc["symbols"][t1]["status"] == "accepted" and doc["holder"] == "nats-client"
    lease = doc["lease"]
    assert lease.startswith(f"0.{node.control.instance}.")
    assert t1 in upstream(simulator, "test-key")
    await wait_until(lambda: node.received_since("ticker", t1, t0), 2.5, "first update")
    # renew extends past the first TTL; the reply carries the cached price
    await asyncio.sleep(0.5)
    code, doc = await ask(client, f"{prefix}.renew", {"lease": lease, "ttl_s": 2.0})
    assert code is None, doc
    assert doc["lease"] == lease and 1.9 < doc["expiresInS"] <= 2.0
    assert doc["symbols"][t1]["event"]["subject"] == t1
    assert doc["symbols"][t1]["ageMs"] >= 0
    await asyncio.sleep(0.8)  # past the first TTL (1.0 s), and its grace
    assert t1 in upstream(simulator, "test-key")
    # release -> gone upstream after the grace period; the pinned symbol stays
    code, doc = await ask(client, f"{prefix}.release", {"lease": lease})
    assert code is None and doc == {"lease": lease, "released": True}
    await wait_until(lambda: t1 not in upstream(simulator, "test-key"), 5, "t1 unsubscribed")
    assert upstream(simulator, "test-key") == {pinned}
    code, doc = await ask(client, f"{prefix}.renew", {"lease": lease})
    assert code == "404" and doc["parameter"] == "lease"
    # a lease id of no live process: nobody answers
    with pytest.raises(nats.errors.TimeoutError):
        await client.request(f"{prefix}.renew", json.dumps({"lease": "0.00000000.x"}).encode(),
                             timeout=0.5)
    code, doc = await ask(client, f"{prefix}.subscribe", {"kind": "ticker", "symbols": "X"})
    assert code == "400" and doc["parameter"] == "symbols"

    # HTTP: lease, renew over NATS (same process, either door), release -> 204
    status, doc = await node.http_call("POST", "/v1/subscriptions",
                                       {"kind": "equity", "symbols": [e1], "ttl_s": 10})
    assert status == 200 and doc["symbols"][e1]["status"] == "accepted"
    assert e1 in upstream(simulator, "test-key", "equity")
    code, renewed = await ask(client, f"{prefix}.renew", {"lease": doc["lease"], "ttl_s": 3})
    assert code is None and renewed["ttlS"] == 3.0
    status, renewed = await node.http_call("POST", f"/v1/subscriptions/{doc['lease']}/renew",
                                           {"ttl_s": 4})
    assert status == 200 and renewed["ttlS"] == 4.0
    status, _ = await node.http_call("DELETE", f"/v1/subscriptions/{doc['lease']}")
    assert status == 204
    await wait_until(lambda: e1 not in upstream(simulator, "test-key", "equity"), 5,
                     "e1 unsubscribed")
    status, _ = await node.http_call("DELETE", f"/v1/subscriptions/{doc['lease']}")
    assert status == 404

    # a lease nobody renews expires, and its symbol goes upstream
    status, doc = await node.http_call("POST", "/v1/subscriptions",
                                       {"kind": "ticker", "symbols": [t2], "ttl_s": 0.4})
    assert status == 200 and t2 in upstream(simulator, "test-key")
    await wait_until(lambda: t2 not in upstream(simulator, "test-key"), 5, "t2 expired")
    status, _ = await node.http_call("POST", f"/v1/subscriptions/{doc['lease']}/renew")
    assert status == 404
    assert upstream(simulator, "test-key") == {pinned}


async def test_a_lease_beyond_the_limit_is_refused_and_the_rest_keeps_flowing(
    start_node: StartNode, client: Client,
) -> None:
    async with Simulator(port=0, api_keys=["small"], limits={"small": 3}, interval=0.2,
                         seed=5) as sim:
        prefix = unique()
        pinned = sim.tickers[:2]
        node = await start_node(sim, prefix, api_key="small", tickers=pinned)
        await wait_until(lambda: upstream(sim, "small") == set(pinned), 10, "pinned")
        extra, over = sim.tickers[2], sim.tickers[3]
        code, doc = await ask(client, f"{prefix}.subscribe",
                              {"kind": "ticker", "symbols": [extra], "ttl_s": 10})
        assert code is None and doc["symbols"][extra]["status"] == "accepted", doc
        # the key is full: the upstream refuses the request with its limit error
        code, doc = await ask(client, f"{prefix}.subscribe",
                              {"kind": "ticker", "symbols": [over, extra], "ttl_s": 10})
        assert code is None, doc
        assert doc["symbols"][over] == {"status": "limit", "error": LIMIT_REACHED,
                                        "event": None, "ageMs": None}
        # a symbol already subscribed costs no request: held by this lease too
        assert doc["symbols"][extra]["status"] == "accepted"
        assert doc["lease"] is not None
        # only the accepted symbol was added; nothing subscribed before moved
        assert upstream(sim, "small") == {*pinned, extra}
        t0 = time.monotonic()
        await wait_until(lambda: all(node.received_since("ticker", s, t0)
                                     for s in (*pinned, extra)), 3, "all three flowing")
        # full: a lease of only new symbols holds nothing, over HTTP too
        status, doc = await node.http_call("POST", "/v1/subscriptions",
                                           {"kind": "ticker", "symbols": [over]})
        assert status == 200 and doc["lease"] is None
        assert doc["symbols"][over]["status"] == "limit"
        assert upstream(sim, "small") == {*pinned, extra}


def recipe() -> dict[str, Any]:
    """The lease client program of ``docs/control-api.md``, run as is."""
    doc = DOCS.read_text(encoding="utf-8")
    block = doc.split("### Leasing over every shard, renewing and releasing", 1)[1]
    code = block.split("```python\n", 1)[1].split("\n```", 1)[0]
    code = code.replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/control-api.md (lease_all)", "exec"), namespace)
    return namespace


async def test_two_shards_each_lease_their_own_symbols(
    simulator: Simulator, start_node: StartNode, client: Client,
) -> None:
    prefix = unique()
    keys = {0: "test-key", 1: "other-key"}
    nodes = {i: await start_node(simulator, prefix, api_key=keys[i],
                                 shard=f"shard: {{index: {i}, count: 2}}") for i in (0, 1)}
    symbols = simulator.tickers[:8]
    owner = {s: shard_of("ticker", s, 2) for s in symbols}
    assert set(owner.values()) == {0, 1}
    snippet = recipe()
    answers, leases = await snippet["lease_all"](client, "ticker", symbols, ttl_s=5,
                                                 holder="multi", prefix=prefix)
    assert {s: a["status"] for s, a in answers.items()} == dict.fromkeys(symbols, "accepted")
    assert sorted(int(lease.split(".")[0]) for lease in leases) == [0, 1]
    for s, i in owner.items():  # each symbol on its own shard's connection only
        assert s in upstream(simulator, keys[i]) and s not in upstream(simulator, keys[1 - i])
    assert await snippet["renew_all"](client, leases, ttl_s=5, prefix=prefix) == []
    # one shard's own subject, and HTTP (one pod): other shards' symbols say where to go
    theirs = next(s for s in symbols if owner[s] == 1)
    code, doc = await ask(client, f"{prefix}.subscribe.0", {"kind": "ticker",
                                                             "symbols": [theirs]})
    assert code is None and doc["lease"] is None and doc["shard"] == {"index": 0, "count": 2}
    assert doc["symbols"][theirs]["error"] == "owned by shard 1 of 2"
    status, doc = await nodes[0].http_call("POST", "/v1/subscriptions",
                                           {"kind": "ticker", "symbols": [theirs]})
    assert status == 200 and doc["symbols"][theirs]["status"] == "error"
    status, doc = await nodes[0].http_call(
        "DELETE", f"/v1/subscriptions/{next(x for x in leases if x.startswith('1.'))}")
    assert status == 404 and "shard 1 of 2" in doc["error"]
    await snippet["release_all"](client, leases, prefix=prefix)
    await wait_until(lambda: not upstream(simulator, "test-key") and
                     not upstream(simulator, "other-key"), 5, "all released")
    assert await snippet["renew_all"](client, leases, prefix=prefix, timeout=1.0) == leases


async def test_a_real_bridge_leases_over_nats_and_delivers_through_its_routes(
    simulator: Simulator, run_bridge: Any, client: Client, nats_url: str,
) -> None:
    """The wiring of :class:`bridge.app.Bridge`: its ``subscriptions`` reach the doors,
    and a leased symbol's updates go through the routes to the sink."""
    prefix = unique()
    pinned, leased = simulator.tickers[0], simulator.tickers[5]
    text = f"""
source:
  url: {simulator.url}
  api_key: test-key
  tickers: [{pinned}]
  backoff: {{initial_s: 0.05, max_s: 0.3}}
  leases: {{enabled: true, default_ttl_s: 5, max_ttl_s: 30, grace_s: 0.3}}
sinks: {{mem: {{driver: memory}}}}
routes: [{{sinks: [mem]}}]
http: {{enabled: false}}
shutdown_timeout_s: 5
control:
  nats: {{servers: ["{nats_url}"], subject_prefix: {prefix}, name: {prefix.replace('.', '-')}}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    running = run_bridge(settings)
    await running.until(lambda: upstream(simulator, "test-key") == {pinned})
    deadline = time.monotonic() + 10
    while True:  # the door connects in the background
        try:
            code, doc = await ask(client, f"{prefix}.subscribe",
                                  {"kind": "ticker", "symbols": [leased], "ttl_s": 5}, 1)
            break
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            assert time.monotonic() < deadline, "the NATS door never answered"
    assert code is None and doc["symbols"][leased]["status"] == "accepted", doc
    assert leased in upstream(simulator, "test-key")

    def delivered() -> bool:
        return any(json.loads(m.body)["subject"] == leased for m in running.sink.received)

    await running.until(delivered, 2.5)
    code, doc = await ask(client, f"{prefix}.release", {"lease": doc["lease"]})
    assert code is None and doc["released"] is True
    await running.until(lambda: leased not in upstream(simulator, "test-key"), 5)
    assert upstream(simulator, "test-key") == {pinned}
