"""The control surface's two doors against a real nats-server and a real HTTP server:
``$SRV`` discovery finds the service, a snapshot over NATS (all pages) equals the one
over HTTP, every shard answers, and the door connects late without leaking secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.control.core import Control, NatsControl, start_nats_control
from bridge.control.http import HttpServer, serve_http
from bridge.pipeline.normalize import Normalizer
from bridge.sinks import Drivers
from bridge.testing import MemorySink
from bridge.testing.sample import T0_MS, equity_record, ticker_record
from bridge.upstream.sharding import shard_of
from tests.support.nats import NatsServer

pytestmark = pytest.mark.integration

TICKERS = [f"SYM{i:03d}/USD" for i in range(120)]
EQUITIES = [f"EQ{i:02d}" for i in range(30)]
DOCS = Path(__file__).resolve().parents[3] / "docs" / "control-api.md"


def recipe() -> Callable[..., Any]:
    """The multi-shard client program of ``docs/control-api.md``, run as is."""
    doc = DOCS.read_text(encoding="utf-8")
    block = doc.split("### Every snapshot page of every shard", 1)[1]
    code = block.split("```python\n", 1)[1].split("\n```", 1)[0]
    code = code.replace("asyncio.run(main())", "")
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/control-api.md (full_snapshot)", "exec"), namespace)
    fn: Callable[..., Any] = namespace["full_snapshot"]
    return fn


class Door:
    """One bridge with its two doors."""

    def __init__(self, bridge: Bridge, http: HttpServer, nats: NatsControl) -> None:
        self.bridge, self.http, self.nats = bridge, http, nats

    async def get(self, query: str = "") -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.http.port}/v1/snapshot{query}"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, json.loads(await resp.read())


@pytest.fixture
async def doors(nats_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start bridges (no upstream; events are ingested) with HTTP and NATS doors."""
    started: list[Door] = []

    async def start(prefix: str, name: str, shard: str = "", page_bytes: int = 4096,
                    symbols: tuple[list[str], list[str]] = (TICKERS, EQUITIES)) -> Door:
        text = f"""
source: {{{shard}}}
sinks: {{mem: {{driver: memory}}}}
routes: [{{sinks: [mem]}}]
http: {{port: 0}}
control:
  nats: {{servers: ["{nats_url}"], subject_prefix: {prefix}, name: {name},
          snapshot_page_bytes: {page_bytes}}}
"""
        settings = parse_config(text, env={},
                                drivers=Drivers(injected={"memory": MemorySink}))
        bridge = Bridge(settings, with_source=False)
        if getattr(bridge, "control", None) is None:  # until app.py builds it itself
            bridge.control = Control.of(bridge)
        await bridge.start()
        norm = Normalizer(clock=lambda: T0_MS + 9)
        tickers, equities = symbols
        bridge.ingest(norm.tickers([ticker_record(s, 10.0 + i, T0_MS)
                                    for i, s in enumerate(tickers)]))
        bridge.ingest(norm.equities([equity_record(s, 5.0 + i, T0_MS)
                                     for i, s in enumerate(equities)]))
        await bridge.flush_intake()
        http = await serve_http(bridge)
        cfg = settings.config.control.nats
        assert cfg is not None
        nats = await start_nats_control(bridge.control, cfg, bridge.redact)
        door = Door(bridge, http, nats)
        started.append(door)
        await nats.wait_ready(15)
        return door

    yield start
    for door in started:
        await door.nats.close()
        await door.http.cleanup()
        await door.bridge.shutdown()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    nc = Client()
    await nc.connect(nats_url, allow_reconnect=False)
    yield nc
    await nc.close()


def unique() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"test.control.{tag}", f"bridge-{tag}"


async def test_srv_discovery_finds_the_service(doors: Any, client: Client) -> None:
    prefix, name = unique()
    door = await doors(prefix, name)
    ping = json.loads((await client.request(f"$SRV.PING.{name}", b"", timeout=5)).data)
    assert ping["name"] == name
    assert ping["id"] == door.nats.service_id
    assert ping["type"] == "io.nats.micro.v1.ping_response"
    info = json.loads((await client.request(f"$SRV.INFO.{name}", b"", timeout=5)).data)
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert endpoints["snapshot"]["subject"] == f"{prefix}.snapshot"
    assert endpoints["snapshot"]["queue_group"] == "q"
    assert info["metadata"]["shard"] == "none"
    # the plain $SRV.PING (every service on the bus) finds it too
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish("$SRV.PING", b"", reply=inbox)
    ids = set()
    try:
        while door.nats.service_id not in ids:
            ids.add(json.loads((await sub.next_msg(timeout=5)).data)["id"])
    finally:
        await sub.unsubscribe()


async def test_snapshot_over_nats_equals_snapshot_over_http(doors: Any, client: Client) -> None:
    prefix, name = unique()
    door = await doors(prefix, name, page_bytes=4096)
    status, http_doc = await door.get()
    assert status == 200
    assert http_doc["count"] == len(TICKERS) + len(EQUITIES)
    # every page fits the configured 4 KiB, so the snapshot takes many pages
    first = await client.request(f"{prefix}.snapshot", b"", timeout=5)
    assert len(first.data) <= 4096
    assert json.loads(first.data)["next"] is not None
    items = await recipe()(client, prefix=prefix)
    assert [i["event"] for i in items] == [i["event"] for i in http_doc["items"]]
    assert all(isinstance(i["ageMs"], int) and i["ageMs"] >= 0 for i in items)
    # the same query through both doors
    _, http_q = await door.get("?kind=ticker&symbols=SYM00*,sym011/usd")
    nats_q = await recipe()(client, prefix=prefix,
                            query={"kind": "ticker", "symbols": ["SYM00*", "sym011/usd"]})
    assert [i["event"]["subject"] for i in nats_q] == \
        [i["event"]["subject"] for i in http_q["items"]]
    assert len(nats_q) == 11
    # a malformed query: an error reply naming the parameter, through both doors
    reply = await client.request(f"{prefix}.snapshot", b'{"kind": "bond"}', timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    assert json.loads(reply.data)["parameter"] == "kind"
    status, body = await door.get("?kind=bond")
    assert (status, body["parameter"]) == (400, "kind")


async def test_every_shard_answers_once(doors: Any, client: Client) -> None:
    prefix, name = unique()
    shards = []
    for index in (0, 1):
        mine = ([s for s in TICKERS if shard_of("ticker", s, 2) == index],
                [s for s in EQUITIES if shard_of("equity", s, 2) == index])
        # two replicas of shard 0: still one answer from shard 0
        for _ in range(2 if index == 0 else 1):
            shards.append(await doors(prefix, name, f"shard: {{index: {index}, count: 2}}",
                                      page_bytes=8192, symbols=mine))
    # one request on the shared subject: exactly one reply per shard
    inbox = client.new_inbox()
    sub = await client.subscribe(inbox)
    await client.publish(f"{prefix}.snapshot", b'{"limit": 1}', reply=inbox)
    answered = []
    with pytest.raises(TimeoutError):
        while True:
            answered.append(json.loads((await sub.next_msg(timeout=1.0)).data)["shard"])
    await sub.unsubscribe()
    assert sorted(a["index"] for a in answered) == [0, 1]
    assert all(a["count"] == 2 for a in answered)
    # the documented recipe collects every shard's pages: all symbols, each once
    items = await recipe()(client, prefix=prefix)
    subjects = [i["event"]["subject"] for i in items]
    assert sorted(subjects) == sorted(TICKERS + EQUITIES)
    # HTTP answers for its own shard only
    _, doc = await shards[-1].get()
    assert doc["shard"] == {"index": 1, "count": 2}
    assert {i["event"]["subject"] for i in doc["items"]} < set(subjects)


async def test_connects_late_and_never_logs_the_token(
    nats_servers: Callable[..., NatsServer], caplog: pytest.LogCaptureFixture,
) -> None:
    token = "s3cret-token-" + uuid.uuid4().hex
    server = nats_servers(jetstream=False, config=f"authorization {{ token: {token} }}\n")
    server.kill()
    text = f"""
sinks: {{mem: {{driver: memory}}}}
http: {{enabled: false}}
control:
  nats: {{servers: ["{server.url}"], token: "{token}", connect_timeout_s: 1,
          backoff: {{initial_s: 0.1, max_s: 0.3}}}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, with_source=False)
    ctl = Control.of(bridge)
    cfg = settings.config.control.nats
    assert cfg is not None
    caplog.set_level(logging.DEBUG, logger="aleno_bridge.control")
    door = await start_nats_control(ctl, cfg, bridge.redact)
    try:
        # the bus is down: the door retries in the background, the caller is not held
        for _ in range(100):
            if door.attempts >= 2:
                break
            await asyncio.sleep(0.1)
        assert not door.ready.is_set()
        assert door.attempts >= 2
        assert door.last_error is not None
        server.start()
        await door.wait_ready(15)
        nc = Client()
        await nc.connect(server.url, token=token, allow_reconnect=False)
        reply = json.loads((await nc.request("aleno.bridge.snapshot", b"", timeout=5)).data)
        assert reply == {"shard": None, "count": 0, "items": [], "next": None}
        # the server restarts: nats-py's reconnection brings the service back
        server.restart()
        for _ in range(100):
            try:
                await nc.close()
                nc = Client()
                await nc.connect(server.url, token=token, allow_reconnect=False)
                await nc.request("aleno.bridge.snapshot", b"", timeout=1)
                break
            except Exception:
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the control service did not come back after a server restart")
        await nc.close()
    finally:
        await door.close()
        await door.close()  # twice is fine
    assert caplog.records, "the failed attempts were logged"
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_wrong_token_is_explained_without_the_token(
    nats_servers: Callable[..., NatsServer], caplog: pytest.LogCaptureFixture,
) -> None:
    server = nats_servers(jetstream=False, config="authorization { token: right-token-1234 }\n")
    wrong = "wrong-token-" + uuid.uuid4().hex
    text = f"""
sinks: {{mem: {{driver: memory}}}}
http: {{enabled: false}}
control:
  nats: {{servers: ["{server.url}"], token: "{wrong}", connect_timeout_s: 1,
          backoff: {{initial_s: 0.2, max_s: 0.5}}}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, with_source=False)
    cfg = settings.config.control.nats
    assert cfg is not None
    caplog.set_level(logging.DEBUG)
    door = await start_nats_control(Control.of(bridge), cfg, bridge.redact)
    try:
        # the server may reset an attempt before its -ERR is read: the door retries,
        # and an attempt that reads it explains it
        seen: list[str] = []
        for _ in range(100):
            if door.last_error is not None:
                seen.append(door.last_error)
                if re.search("refused the credentials|Authorization", door.last_error):
                    break
            await asyncio.sleep(0.1)
        assert seen and re.search("refused the credentials|Authorization", seen[-1]), seen
        assert not door.ready.is_set()
    finally:
        await door.close()
    assert all(wrong not in r.getMessage() for r in caplog.records)
    assert wrong not in (door.last_error or "")


async def test_the_deprecated_username_still_connects(
    nats_servers: Callable[..., NatsServer],
) -> None:
    """``control.nats.username`` (deprecated alias of ``user``) still logs in."""
    password = "pw-" + uuid.uuid4().hex
    server = nats_servers(jetstream=False,
                          config=f'authorization {{ user: alice, password: "{password}" }}\n')
    text = f"""
sinks: {{mem: {{driver: memory}}}}
http: {{enabled: false}}
control:
  nats: {{servers: ["{server.url}"], username: alice, password: "{password}",
          connect_timeout_s: 1, backoff: {{initial_s: 0.1, max_s: 0.3}}}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    assert "control.nats.username: deprecated, use control.nats.user" in settings.warnings
    cfg = settings.config.control.nats
    assert cfg is not None and cfg.user == "alice"
    bridge = Bridge(settings, with_source=False)
    door = await start_nats_control(Control.of(bridge), cfg, bridge.redact)
    try:
        await door.wait_ready(15)
        nc = Client()
        await nc.connect(server.url, user="alice", password=password, allow_reconnect=False)
        reply = json.loads((await nc.request("aleno.bridge.snapshot", b"", timeout=5)).data)
        assert reply["items"] == []
        await nc.close()
    finally:
        await door.close()


async def test_tls_asked_for_but_the_server_has_none_is_refused(nats_url: str) -> None:
    """Like the ``nats`` sink: with a ``tls_*`` option the door never falls back to
    plain text."""
    text = f"""
sinks: {{mem: {{driver: memory}}}}
http: {{enabled: false}}
control:
  nats: {{servers: ["{nats_url}"], tls_verify: false, connect_timeout_s: 1,
          backoff: {{initial_s: 0.2, max_s: 0.5}}}}
"""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    cfg = settings.config.control.nats
    assert cfg is not None
    bridge = Bridge(settings, with_source=False)
    door = await start_nats_control(Control.of(bridge), cfg, bridge.redact)
    try:
        for _ in range(100):
            if door.last_error is not None:
                break
            await asyncio.sleep(0.1)
        assert door.last_error is not None and "does not require TLS" in door.last_error
        assert not door.ready.is_set()
    finally:
        await door.close()
