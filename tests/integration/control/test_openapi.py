"""What a real bridge answers on ``/v1`` is what ``bridge/openapi.json`` says.

A real bridge (:class:`~bridge.app.Bridge`, its control listener on a free port, bearer
tokens with scopes) on a real simulator. Every reply of every request below is checked
against the document: its status must be one the operation lists, its body must
validate (JSON Schema 2020-12, ``$ref`` resolved against the document) against the
schema of that status, with no member the schema does not name, and the headers the
document requires (``WWW-Authenticate`` on a 401) must be there with a valid value.

Covered: snapshot 200/400/401/403 and 503 (a client that does not read its reply holds
the only snapshot slot); lease 200/400/401/403/413/415/429 and 409 (a bridge with leases
off); renew 200/400/401/403/404/409/413/415; release 204/400/401/403/404/409;
``/v1/openapi.json`` is the file, byte for byte, without a token. Each test checks at
the end that every one of those (operation, status) pairs was actually seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from multidict import CIMultiDictProxy
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yarl import URL

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.pipeline.normalize import Normalizer
from bridge.simulator import Simulator
from bridge.sinks import Drivers
from bridge.testing import MemorySink, wait_until
from bridge.testing.sample import T0_MS, ticker_record

pytestmark = pytest.mark.integration

DOCUMENT = Path(__file__).resolve().parents[3] / "bridge" / "openapi.json"
BASE = "urn:aleno-bridge:openapi"
#: bearer tokens: ``full`` may snapshot and lease (at most MAX_SYMBOLS symbols),
#: ``reader`` may only snapshot, ``leaser`` may only lease
TOKENS = {"full": "f" * 24, "reader": "r" * 24, "leaser": "l" * 24}
MAX_SYMBOLS = 3
ALLOWED_ORIGIN = "https://dashboard.example"
SNAPSHOT = ("get", "/v1/snapshot")
LEASE = ("post", "/v1/subscriptions")
RENEW = ("post", "/v1/subscriptions/{lease}/renew")
RELEASE = ("delete", "/v1/subscriptions/{lease}")
OPENAPI = ("get", "/v1/openapi.json")


# -- the document as a validator ----------------------------------------------------


def escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def strict(node: Any) -> Any:
    """A copy of the document in which an object schema that leaves
    ``additionalProperties`` open admits no member it does not name: the document lets
    replies grow, this test wants to see every member the server sends today."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if isinstance(node.get("properties"), dict) and not (
            {"additionalProperties", "unevaluatedProperties"} & node.keys()):
        out["unevaluatedProperties"] = False
    return out


class Document:
    """The OpenAPI document, and how to check a reply against it."""

    def __init__(self) -> None:
        self.raw = DOCUMENT.read_bytes()
        self.doc: dict[str, Any] = json.loads(self.raw)
        strict_doc = strict(self.doc)
        # the document of the served ``openapi.json`` itself is open by nature
        strict_doc["paths"]["/v1/openapi.json"]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"].pop("unevaluatedProperties", None)
        self.registry: Registry[Any] = Registry().with_resource(
            BASE, Resource.from_contents(strict_doc, default_specification=DRAFT202012))

    def pointer(self, ref: str) -> Any:
        node: Any = self.doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def resolve(self, node: Any, at: str) -> tuple[Any, str]:
        """``node`` (found at pointer ``at``) with its ``$ref`` followed, and where it is."""
        while isinstance(node, dict) and "$ref" in node:
            at = node["$ref"]
            node = self.pointer(at)
        return node, at

    def validator(self, at: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"{BASE}{at}"}, registry=self.registry,
                                    format_checker=Draft202012Validator.FORMAT_CHECKER)


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    """A client of one bridge's control listener that checks every reply."""

    bridge: Bridge
    port: int
    session: aiohttp.ClientSession
    document: Document
    #: the (operation, status) pairs checked so far
    seen: set[tuple[tuple[str, str], int]] = field(default_factory=set)

    async def call(self, op: tuple[str, str], path: str, *, token: str | None = "full",
                   query: str = "", json_body: Any = None, data: bytes | None = None,
                   content_type: str | None = None, headers: dict[str, str] | None = None,
                   ) -> Reply:
        """``op``'s request to ``path`` (``query`` already encoded) with the named
        token (``None``: no ``Authorization``), checked against the document."""
        method = op[0]
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
        if json_body is not None:
            data = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type is not None:
            sent["Content-Type"] = content_type
        url = URL(f"http://127.0.0.1:{self.port}{path}{'?' + query if query else ''}",
                  encoded=True)
        async with self.session.request(method.upper(), url, data=data,
                                        headers=sent) as resp:
            reply = Reply(resp.status, resp.headers, await resp.read())
        self.check(op, reply)
        return reply

    def check(self, op: tuple[str, str], reply: Reply) -> None:
        method, template = op
        where = f"{method.upper()} {template} -> {reply.status}"
        at = f"#/paths/{escape(template)}/{method}/responses"
        responses = self.document.pointer(at)
        status = str(reply.status)
        assert status in responses, \
            f"{where}: a status the document does not list; body {reply.body[:300]!r}"
        response, at = self.document.resolve(responses[status], f"{at}/{status}")
        content = response.get("content")
        if content is None:
            assert reply.body == b"", f"{where}: a body the document does not describe"
        else:
            media = reply.headers.get("Content-Type", "").split(";")[0].strip()
            assert media in content, f"{where}: Content-Type {media!r}, not {list(content)}"
            body = json.loads(reply.body)
            errors = sorted(self.document.validator(
                f"{at}/content/{escape(media)}/schema").iter_errors(body), key=str)
            assert not errors, (f"{where}: the body does not match the document: "
                                + "; ".join(f"{list(e.absolute_path)}: {e.message}"
                                            for e in errors[:5])
                                + f"\nbody: {reply.body[:600]!r}")
        for name, header in response.get("headers", {}).items():
            header, header_at = self.document.resolve(header, f"{at}/headers/{escape(name)}")
            value = reply.headers.get(name)
            if value is None:
                assert not header.get("required"), f"{where}: no {name} header"
                continue
            typed: Any = int(value) if header["schema"].get("type") == "integer" else value
            bad = [e.message for e in
                   self.document.validator(f"{header_at}/schema").iter_errors(typed)]
            assert not bad, f"{where}: header {name}: {bad}"
        self.seen.add((op, reply.status))

    def missing(self, wanted: dict[tuple[str, str], set[int]]) -> set[tuple[Any, int]]:
        return {(op, s) for op, statuses in wanted.items() for s in statuses} - self.seen


def settings_text(simulator_url: str, pinned: list[str], equities: list[str],
                  leases: str, listener: str = "") -> str:
    return f"""
source:
  url: {simulator_url}
  api_key: test-key
  tickers: {json.dumps(pinned)}
  equities: {json.dumps(equities)}
  backoff: {{initial_s: 0.05, max_s: 0.3}}
  leases: {{{leases}}}
sinks: {{mem: {{driver: memory}}}}
routes: [{{sinks: [mem]}}]
http: {{host: 127.0.0.1, port: 0}}
control:
  http: {{host: 127.0.0.1, port: 0, allowed_origins: ["{ALLOWED_ORIGIN}"]{listener}}}
  auth:
    tokens:
      - {{name: full, token: "{TOKENS['full']}", scopes: [snapshot, lease],
         max_symbols: {MAX_SYMBOLS}}}
      - {{name: reader, token: "{TOKENS['reader']}", scopes: [snapshot]}}
      - {{name: leaser, token: "{TOKENS['leaser']}", scopes: [lease]}}
shutdown_timeout_s: 5
"""


@contextlib.asynccontextmanager
async def serving(text: str, **bridge_args: Any) -> AsyncIterator[Api]:
    """A bridge of ``text`` running, and a checking client of its control listener."""
    settings = parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))
    bridge = Bridge(settings, sinks={"mem": MemorySink("mem")}, **bridge_args)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await wait_until(lambda: bridge.control_port is not None, 15,
                         "the control listener", task=task)
        assert bridge.control_port is not None
        async with aiohttp.ClientSession() as session:
            yield Api(bridge, bridge.control_port, session, Document())
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def q(**params: Any) -> str:
    return urlencode(params, safe="/*,:")


def parameters_of(reply: Reply) -> Any:
    return reply.json()["parameter"]


# -- a bridge with leases ------------------------------------------------------------


async def test_every_reply_matches_the_document(simulator: Simulator) -> None:
    tickers = simulator.tickers
    pinned, extra = tickers[:2], simulator.equities[:1]
    leased, spare = tickers[2], tickers[3:3 + MAX_SYMBOLS + 1]
    text = settings_text(simulator.url, pinned, extra,
                         "enabled: true, default_ttl_s: 10, max_ttl_s: 30, grace_s: 0.3")
    async with serving(text) as api:
        # -- GET /v1/openapi.json: the file, without a token
        got = await api.call(OPENAPI, "/v1/openapi.json", token=None)
        assert got.status == 200 and got.body == api.document.raw

        # -- GET /v1/snapshot
        async def items() -> int:
            reply = await api.call(SNAPSHOT, "/v1/snapshot")
            assert reply.status == 200, reply.body
            return int(reply.json()["count"])
        await wait_until(items, 15, "prices in the snapshot")
        await wait_until(lambda: _count_at_least(api, 3), 15, "all pinned symbols cached")

        got = await api.call(SNAPSHOT, "/v1/snapshot",
                             query=q(kind="ticker", symbols=f"{pinned[0]},{pinned[1]}"))
        assert got.status == 200 and got.json()["count"] == 2
        assert [i["event"]["subject"] for i in got.json()["items"]] == sorted(pinned)
        page = await api.call(SNAPSHOT, "/v1/snapshot", query=q(limit=1),
                              token="reader")
        assert page.status == 200 and page.json()["count"] == 1
        cursor = page.json()["next"]
        assert cursor is not None
        rest = await api.call(SNAPSHOT, "/v1/snapshot", query=q(after=cursor, limit=10))
        assert rest.status == 200 and rest.json()["count"] == 2
        assert rest.json()["next"] is None
        # the equity's envelope is the equity schema's
        assert rest.json()["items"][-1]["event"]["data"]["kind"] == "equity"

        for query, parameter in [
            ("foo=1", "foo"),
            ("kind=bond", "kind"),
            ("limit=0", "limit"),
            ("limit=%C2%B2", "limit"),          # '²' is a digit to str.isdigit
            ("limit=-1", "limit"),
            ("limit=1.5", "limit"),
            ("limit=" + "9" * 5000, "limit"),
            ("limit=1000001", "limit"),
            ("limit=1&limit=2", "limit"),
            ("after=nope", "after"),
            ("symbols=BTC/USD,,ETH/USD", "symbols"),
        ]:
            got = await api.call(SNAPSHOT, "/v1/snapshot", query=query)
            assert got.status == 400, (query, got.status, got.body)
            assert parameters_of(got) == parameter, (query, got.body)
        got = await api.call(SNAPSHOT, "/v1/snapshot", query="limit=1000000")
        assert got.status == 200, got.body

        await _refusals(api, SNAPSHOT, "/v1/snapshot", allowed="full", denied="leaser")

        # -- POST /v1/subscriptions
        got = await api.call(LEASE, "/v1/subscriptions",
                             json_body={"kind": "ticker", "symbols": [f" {leased.lower()} "],
                                        "ttl_s": 8, "holder": "a label"})
        assert got.status == 200, got.body
        doc = got.json()
        assert doc["owner"] == "full" and doc["kind"] == "ticker"
        assert doc["symbols"][leased]["status"] == "accepted", doc
        lease = doc["lease"]
        assert isinstance(lease, str) and 7 < doc["expiresInS"] <= 8

        # every symbol refused: still a 200, without a lease
        got = await api.call(LEASE, "/v1/subscriptions", token="leaser",
                             json_body={"kind": "ticker", "symbols": ["NOPE/USD"]})
        assert got.status == 200, got.body
        assert got.json()["lease"] is None and got.json()["expiresInS"] is None
        assert got.json()["owner"] == "leaser"
        assert got.json()["symbols"]["NOPE/USD"]["status"] in ("rejected", "error")

        good = json.dumps({"kind": "ticker", "symbols": [spare[0]]}).encode()
        for media in ("text/plain", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", "application/octet-stream"):
            got = await api.call(LEASE, "/v1/subscriptions", data=good, content_type=media)
            assert got.status == 415, (media, got.status, got.body)
        got = await api.call(LEASE, "/v1/subscriptions", data=good)  # no Content-Type
        assert got.status == 415, got.body

        for body, parameter in [
            ({"kind": "ticker", "symbols": [spare[0]], "foo": 1}, "foo"),
            ({"kind": "bond", "symbols": [spare[0]]}, "kind"),
            ({"kind": "ticker", "symbols": ["BTC/*"]}, "symbols"),
            ({"kind": "ticker", "symbols": []}, "symbols"),
            ({"kind": "ticker", "symbols": "BTC/USD"}, "symbols"),
            ({"kind": "ticker", "symbols": [f"S{i}/USD" for i in range(257)]}, "symbols"),
            ({"kind": "ticker", "symbols": [spare[0]], "ttl_s": 0}, "ttl_s"),
            ({"kind": "ticker", "symbols": [spare[0]], "ttl_s": "60"}, "ttl_s"),
            ({"kind": "ticker", "symbols": [spare[0]], "holder": "x" * 65}, "holder"),
            ([spare[0]], "body"),
        ]:
            got = await api.call(LEASE, "/v1/subscriptions", json_body=body)
            assert got.status == 400, (body, got.status, got.body)
            assert parameters_of(got) == parameter, (body, got.body)
        got = await api.call(LEASE, "/v1/subscriptions", data=b"{not json",
                             content_type="application/json")
        assert got.status == 400 and parameters_of(got) == "body", got.body

        huge = {"kind": "ticker", "symbols": [spare[0]], "holder": "x" * (70 * 1024)}
        got = await api.call(LEASE, "/v1/subscriptions", json_body=huge)
        assert got.status == 413, (got.status, got.body)

        # the token's max_symbols, whatever holder says: 1 held + 4 asked > 3
        over = {"kind": "ticker", "symbols": spare, "holder": "someone else"}
        got = await api.call(LEASE, "/v1/subscriptions", json_body=over)
        assert got.status == 429, (got.status, got.body)
        assert "max_symbols" in got.json()["error"], got.body

        await _refusals(api, LEASE, "/v1/subscriptions", allowed="leaser", denied="reader",
                        json_body={"kind": "ticker", "symbols": [spare[0]]})

        # -- POST /v1/subscriptions/{lease}/renew
        renew = f"/v1/subscriptions/{lease}/renew"
        got = await api.call(RENEW, renew, json_body={"ttl_s": 20})
        assert got.status == 200, got.body
        assert got.json()["lease"] == lease and 19 < got.json()["expiresInS"] <= 20
        assert got.json()["owner"] == "full"
        await wait_until(lambda: _has_event(api, renew), 15, "the leased symbol's event")
        got = await api.call(RENEW, renew)  # no body: the default TTL
        assert got.status == 200 and 9 < got.json()["expiresInS"] <= 10, got.body
        got = await api.call(RENEW, renew, data=b"", content_type="application/json")
        assert got.status == 200, got.body

        # another token's lease does not exist for it
        got = await api.call(RENEW, renew, token="leaser", json_body={"ttl_s": 20})
        assert got.status == 404 and parameters_of(got) == "lease", got.body
        got = await api.call(RENEW, "/v1/subscriptions/0.deadbeef.nope/renew")
        assert got.status == 404, got.body

        got = await api.call(RENEW, renew, data=b'{"ttl_s": 20}', content_type="text/plain")
        assert got.status == 415, got.body
        for body, parameter in [({"ttl_s": 0}, "ttl_s"), ({"ttl_s": True}, "ttl_s"),
                                ({"bogus": 1}, "bogus"), ([], "body")]:
            got = await api.call(RENEW, renew, json_body=body)
            assert got.status == 400, (body, got.status, got.body)
            assert parameters_of(got) == parameter, (body, got.body)
        got = await api.call(RENEW, renew, json_body={"ttl_s": 20, "pad": "x" * (70 * 1024)})
        assert got.status == 413, (got.status, got.body)
        await _refusals(api, RENEW, renew, allowed=None, denied="reader")

        # -- DELETE /v1/subscriptions/{lease}
        release = f"/v1/subscriptions/{lease}"
        got = await api.call(RELEASE, release, token="leaser")
        assert got.status == 404, got.body  # not its lease ...
        got = await api.call(RENEW, renew)
        assert got.status == 200, got.body  # ... which lives on
        got = await api.call(RELEASE, "/v1/subscriptions/" + "x" * 200)
        assert got.status == 400 and parameters_of(got) == "lease", got.body
        await _refusals(api, RELEASE, release, allowed=None, denied="reader")
        got = await api.call(RELEASE, release)
        assert got.status == 204, got.body
        got = await api.call(RELEASE, release)
        assert got.status == 404, got.body
        got = await api.call(RENEW, renew)
        assert got.status == 404, got.body

        missing = api.missing({
            SNAPSHOT: {200, 400, 401, 403},
            LEASE: {200, 400, 401, 403, 413, 415, 429},
            RENEW: {200, 400, 401, 403, 404, 413, 415},
            RELEASE: {204, 400, 401, 403, 404},
            OPENAPI: {200},
        })
        assert not missing, missing


async def _count_at_least(api: Api, n: int) -> bool:
    reply = await api.call(SNAPSHOT, "/v1/snapshot")
    return reply.status == 200 and int(reply.json()["count"]) >= n


async def _has_event(api: Api, renew: str) -> bool:
    reply = await api.call(RENEW, renew, json_body={"ttl_s": 20})
    assert reply.status == 200, reply.body
    return all(s["event"] is not None for s in reply.json()["symbols"].values())


async def _refusals(api: Api, op: tuple[str, str], path: str, *, allowed: str | None,
                    denied: str, json_body: Any = None) -> None:
    """401 without a token or with a wrong one (with the challenge); 403 for a token
    without the scope, and for a browser ``Origin`` not allowed."""
    for token in (None, "w" * 24, TOKENS["full"][:-1]):
        got = await api.call(op, path, token=token, json_body=json_body)
        assert got.status == 401, (op, token, got.status, got.body)
        assert got.headers["WWW-Authenticate"].startswith('Bearer realm="aleno-bridge"')
        assert TOKENS["full"] not in got.body.decode()
    got = await api.call(op, path, token=None, json_body=json_body,
                         headers={"Authorization": f"Basic {TOKENS['full']}"})
    assert got.status == 401, (op, got.status, got.body)
    got = await api.call(op, path, token=denied, json_body=json_body)
    assert got.status == 403, (op, denied, got.status, got.body)
    got = await api.call(op, path, token="full", json_body=json_body,
                         headers={"Origin": "https://evil.example"})
    assert got.status == 403, (op, got.status, got.body)
    if allowed is not None:
        got = await api.call(op, path, token=allowed, json_body=json_body,
                             headers={"Origin": ALLOWED_ORIGIN})
        assert got.status == 200, (op, got.status, got.body)


# -- a bridge without leases, whose snapshot door is busy --------------------------------


#: symbols cached for the busy test: a snapshot of them (~15 MB) is far more than the
#: socket buffers hold, so a client that does not read keeps its reply in flight
BUSY_SYMBOLS = 25_000


async def test_leases_off_and_a_busy_snapshot_door_are_as_documented(
    simulator: Simulator,
) -> None:
    text = settings_text(simulator.url, simulator.tickers[:1], [], "enabled: false",
                         ", max_concurrent_snapshots: 1, send_timeout_s: 10")
    async with serving(text) as api:
        # -- 409 on every lease operation
        got = await api.call(LEASE, "/v1/subscriptions",
                             json_body={"kind": "ticker", "symbols": [simulator.tickers[1]]})
        assert got.status == 409 and parameters_of(got) is None, got.body
        got = await api.call(RENEW, "/v1/subscriptions/0.deadbeef.x/renew")
        assert got.status == 409, got.body
        got = await api.call(RELEASE, "/v1/subscriptions/0.deadbeef.x")
        assert got.status == 409, got.body
        # the document is served whatever the leases
        got = await api.call(OPENAPI, "/v1/openapi.json", token=None)
        assert got.status == 200 and got.body == api.document.raw

        # -- 503 with Retry-After: the one snapshot slot is held by a client that does
        # not read its (large) reply
        norm = Normalizer(clock=lambda: T0_MS + 5)
        for ev in norm.tickers([ticker_record(f"B{i:05d}/USD", 1.0 + i, T0_MS)
                                for i in range(BUSY_SYMBOLS)]):
            api.bridge.last_values.put(ev)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", api.port))
            await loop.sock_sendall(sock, (
                "GET /v1/snapshot HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKENS['reader']}\r\n\r\n").encode())
            # its reply has begun: the slot is taken (and stays so: it reads no more)
            head = await asyncio.wait_for(loop.sock_recv(sock, 64), 10)
            assert head.startswith(b"HTTP/1.1 200"), head

            async def busy() -> bool:
                reply = await api.call(SNAPSHOT, "/v1/snapshot", query=q(limit=1))
                return reply.status == 503
            await wait_until(busy, 10, "a 503 while the slot is held")
        finally:
            sock.close()

        # the slot is given back once the client is gone
        async def free() -> bool:
            reply = await api.call(SNAPSHOT, "/v1/snapshot", query=q(limit=1))
            return reply.status == 200
        await wait_until(free, 15, "the snapshot slot freed")

        missing = api.missing({LEASE: {409}, RENEW: {409}, RELEASE: {409}, OPENAPI: {200},
                               SNAPSHOT: {200, 503}})
        assert not missing, missing


def test_the_strict_reading_refuses_an_unknown_member() -> None:
    """The strictness the tests above rely on: a reply with one member too many fails."""
    document = Document()
    error = document.validator("#/components/schemas/Error")
    assert error.is_valid({"error": "x", "parameter": None})
    assert not error.is_valid({"error": "x", "parameter": None, "token": "t"})
    snapshot = document.validator("#/components/schemas/Snapshot")
    assert not snapshot.is_valid({"shard": None, "count": 0, "items": [], "next": None,
                                  "extra": 1})
    # the document itself stays as written: only this test's reading is strict
    assert document.doc == json.loads(DOCUMENT.read_bytes())
    assert "unevaluatedProperties" not in document.doc["components"]["schemas"]["Snapshot"]
