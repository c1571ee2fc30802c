"""The control surface guarded like a service other teams call (issue: authenticated,
authorized and bounded): a real ``aleno-bridge run``, the simulator and a real
nats-server, every request on the wire.

One bridge serves most of these tests (module fixture): two listeners, four tokens
(``reader``: snapshot; ``leaser``: snapshot and lease; ``small``: lease, at most 3
symbols; ``other``: lease), the NATS door on the test server, leases capped at 12 live
leases and 40 leased symbols in the whole process.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.control import (
    CLI,
    TOKENS,
    Running,
    call,
    control_bridge,
    metric,
    tokens_yaml,
)

pytestmark = pytest.mark.integration

UNIVERSE = [f"S{i:03d}/USD" for i in range(120)]
PINNED = UNIVERSE[:10]
PREFIX = "sec.bridge"


def _lease_body(symbols: list[str], **extra: Any) -> bytes:
    return orjson.dumps({"kind": "ticker", "symbols": symbols, "ttl_s": 30, **extra})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("guarded")
    control = f"""  auth:
    tokens:
{tokens_yaml({"reader": "scopes: [snapshot]", "leaser": "scopes: [snapshot, lease]",
              "small": "scopes: [lease], max_symbols: 3", "other": "scopes: [lease]"})}
  nats: {{servers: ["{nats_url}"], subject_prefix: {PREFIX}, name: sec-bridge}}
"""
    with control_bridge(tmp, tickers=PINNED, universe=UNIVERSE, control=control,
                        leases=", max_leases: 12, max_symbols: 40",
                        sim_args=["--max-subscriptions", "500"]) as running:
        running.wait(lambda: call(running.control_port, "GET", "/v1/snapshot",
                                  token=TOKENS["reader"]).json()["count"] == len(PINNED),
                     20, "every pinned symbol has a last value")
        yield running
    # no token in anything the bridge wrote, whatever the tests did
    output = running.bridge.output()
    for token in TOKENS.values():
        assert token not in output


def test_probes_and_v1_listen_apart(guarded: Running) -> None:
    assert call(guarded.http_port, "GET", "/healthz").status == 200
    moved = call(guarded.http_port, "GET", "/v1/snapshot", token=TOKENS["reader"])
    assert moved.status == 404
    assert "control.http" in moved.json()["error"]
    assert call(guarded.control_port, "GET", "/healthz").status == 404
    assert call(guarded.control_port, "GET", "/metrics").status == 404


def test_anonymous_and_wrong_tokens_are_401_with_a_challenge(guarded: Running) -> None:
    for token in (None, "not-a-configured-token-at-all", TOKENS["reader"] + "x"):
        for method, path, body in (("GET", "/v1/snapshot", None),
                                   ("POST", "/v1/subscriptions", _lease_body(["S050/USD"])),
                                   ("DELETE", "/v1/subscriptions/0.a.b", None)):
            reply = call(guarded.control_port, method, path, token=token, body=body)
            assert reply.status == 401, (token, path, reply.body)
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert reply.json()["parameter"] == "Authorization"
    scheme = call(guarded.control_port, "GET", "/v1/snapshot",
                  headers={"Authorization": f"Basic {TOKENS['reader']}"})
    assert scheme.status == 401


def test_a_token_without_the_scope_is_403(guarded: Running) -> None:
    reply = call(guarded.control_port, "POST", "/v1/subscriptions", token=TOKENS["reader"],
                 body=_lease_body(["S050/USD"]))
    assert reply.status == 403 and "lease" in reply.json()["error"]
    snap = call(guarded.control_port, "GET", "/v1/snapshot", token=TOKENS["small"])
    assert snap.status == 403 and "snapshot" in snap.json()["error"]
    ok = call(guarded.control_port, "GET", "/v1/snapshot?kind=ticker&limit=2",
              token=TOKENS["reader"])
    assert ok.status == 200 and ok.json()["count"] == 2


def test_a_lease_belongs_to_the_token_that_made_it(guarded: Running) -> None:
    port = guarded.control_port
    made = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"],
                body=_lease_body(["S060/USD"], holder="someone-else"))
    assert made.status == 200, made.body
    reply = made.json()
    lease = reply["lease"]
    assert reply["owner"] == "leaser" and reply["holder"] == "someone-else"
    assert reply["symbols"]["S060/USD"]["status"] in ("accepted", "pending")
    for token in (TOKENS["other"], None):
        renew = call(port, "POST", f"/v1/subscriptions/{lease}/renew", token=token,
                     body=b'{"ttl_s": 30}')
        assert renew.status in (401, 404), renew.body
        gone = call(port, "DELETE", f"/v1/subscriptions/{lease}", token=token)
        assert gone.status in (401, 404), gone.body
    assert call(port, "DELETE", f"/v1/subscriptions/{lease}",
                token=TOKENS["other"]).status == 404
    renew = call(port, "POST", f"/v1/subscriptions/{lease}/renew", token=TOKENS["leaser"])
    assert renew.status == 200 and renew.json()["lease"] == lease
    assert call(port, "DELETE", f"/v1/subscriptions/{lease}",
                token=TOKENS["leaser"]).status == 204
    assert call(port, "DELETE", f"/v1/subscriptions/{lease}",
                token=TOKENS["leaser"]).status == 404


def test_max_symbols_counts_per_token_whatever_holder_says(guarded: Running) -> None:
    port = guarded.control_port
    first = call(port, "POST", "/v1/subscriptions", token=TOKENS["small"],
                 body=_lease_body(["S070/USD", "S071/USD"], holder="a"))
    assert first.status == 200, first.body
    second = call(port, "POST", "/v1/subscriptions", token=TOKENS["small"],
                  body=_lease_body(["S072/USD"], holder="b"))
    assert second.status == 200, second.body
    over = call(port, "POST", "/v1/subscriptions", token=TOKENS["small"],
                body=_lease_body(["S073/USD"], holder="c-a-new-name"))
    assert over.status == 429, over.body
    assert "max_symbols" in over.json()["error"]
    # a symbol it holds already costs nothing more
    again = call(port, "POST", "/v1/subscriptions", token=TOKENS["small"],
                 body=_lease_body(["S070/USD"], holder="d"))
    assert again.status == 200, again.body
    for reply in (first, second, again):
        call(port, "DELETE", f"/v1/subscriptions/{reply.json()['lease']}",
             token=TOKENS["small"])


def test_the_global_lease_caps_answer_429_naming_the_cap(guarded: Running) -> None:
    port = guarded.control_port
    made: list[str] = []
    refused: list[dict[str, Any]] = []
    try:
        for i in range(20):
            reply = call(port, "POST", "/v1/subscriptions", token=TOKENS["other"],
                         body=_lease_body([PINNED[i % len(PINNED)]]))
            if reply.status == 200:
                made.append(reply.json()["lease"])
            else:
                assert reply.status == 429, reply.body
                refused.append(reply.json())
        assert len(made) <= 12 and len(refused) >= 8
        assert all("source.leases.max_leases" in r["error"] for r in refused)
    finally:
        for lease in made:
            call(port, "DELETE", f"/v1/subscriptions/{lease}", token=TOKENS["other"])


def test_strict_requests(guarded: Running) -> None:
    port = guarded.control_port
    body = _lease_body(["S080/USD"])
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", None):
        reply = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"], body=body,
                     content_type=content_type)
        assert reply.status == 415, (content_type, reply.body)
    for limit in ("%C2%B2", "1" * 5000, "0", "-1", "1e3", "%EF%BC%91", "99999999"):
        reply = call(port, "GET", f"/v1/snapshot?limit={limit}", token=TOKENS["reader"])
        assert reply.status == 400, (limit[:20], reply.body[:200])
        assert reply.json()["parameter"] == "limit"
    evil = call(port, "GET", "/v1/snapshot", token=TOKENS["reader"],
                headers={"Origin": "https://evil.example"})
    assert evil.status == 403 and evil.json()["parameter"] == "Origin"
    preflight = call(port, "OPTIONS", "/v1/subscriptions",
                     headers={"Origin": "https://evil.example",
                              "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403
    huge = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"],
                body=b'{"kind": "ticker", "symbols": ["' + b"A" * 70_000 + b'"]}')
    assert huge.status == 413


def test_the_nats_door_takes_the_same_tokens(guarded: Running, nats_url: str) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(nats_url)
        try:
            async def ask(subject: str, body: bytes, token: str | None) -> Any:
                headers = {"Authorization": f"Bearer {token}"} if token else None
                return await nc.request(f"{PREFIX}.{subject}", body, timeout=5,
                                        headers=headers)

            for token in (None, "wrong-token-wrong-token"):
                msg = await ask("snapshot", b"{}", token)
                assert msg.headers["Nats-Service-Error-Code"] == "401"
            msg = await ask("subscribe", _lease_body(["S090/USD"]), TOKENS["reader"])
            assert msg.headers["Nats-Service-Error-Code"] == "403"
            msg = await ask("snapshot", b'{"limit": 1}', TOKENS["reader"])
            assert not msg.headers or "Nats-Service-Error" not in msg.headers
            assert orjson.loads(msg.data)["count"] == 1
            msg = await ask("subscribe", _lease_body(["S091/USD"], holder="x"),
                            TOKENS["leaser"])
            reply = orjson.loads(msg.data)
            assert reply["owner"] == "leaser"
            lease = reply["lease"]
            release = orjson.dumps({"lease": lease})
            msg = await ask("release", release, TOKENS["other"])
            assert msg.headers["Nats-Service-Error-Code"] == "404"
            msg = await ask("release", release, None)
            assert msg.headers["Nats-Service-Error-Code"] == "401"
            msg = await ask("release", release, TOKENS["leaser"])
            assert orjson.loads(msg.data)["released"] is True
        finally:
            await nc.close()

    asyncio.run(main())


def test_no_token_in_any_output(guarded: Running) -> None:
    seen = [
        call(guarded.http_port, "GET", "/readyz").body,
        call(guarded.http_port, "GET", "/metrics").body,
        call(guarded.control_port, "GET", "/v1/snapshot?limit=5", token=TOKENS["reader"]).body,
        call(guarded.control_port, "GET", "/v1/snapshot", token="wrong" * 5).body,
        guarded.bridge.output().encode(),
    ]
    validated = subprocess.run([*CLI, "validate", "-c", str(guarded.config)],
                               capture_output=True, timeout=60, check=False)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    seen += [validated.stdout, validated.stderr]
    for token in TOKENS.values():
        for blob in seen:
            assert token.encode() not in blob


def _validate(tmp: Path, control: str, http: str = "127.0.0.1") -> subprocess.CompletedProcess[str]:
    cfg = tmp / "v.yaml"
    cfg.write_text(f"""
source: {{api_key: k, tickers: [BTC/USD]}}
sinks: {{c: {{driver: console}}}}
http: {{host: {http}}}
control:
{control}
""")
    return subprocess.run([*CLI, "validate", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_validate_refuses_an_exposed_door_without_tokens(tmp_path: Path) -> None:
    open_door = _validate(tmp_path, "  http: {host: 0.0.0.0}")
    assert open_door.returncode == 2
    assert "control.http.host" in open_door.stdout + open_door.stderr
    nats_door = _validate(tmp_path, "  http: {host: 127.0.0.1}\n"
                          "  nats: {servers: [nats://10.1.2.3:4222]}")
    assert nats_door.returncode == 2
    assert "control.nats.servers" in nats_door.stdout + nats_door.stderr
    explicit = _validate(tmp_path, "  http: {host: 0.0.0.0}\n  auth: {anonymous: [snapshot]}")
    assert explicit.returncode == 0, explicit.stdout + explicit.stderr
    token = _validate(tmp_path, "  http: {host: 0.0.0.0}\n  auth: {tokens: [{name: a, "
                      f"token: {TOKENS['reader']}, scopes: [snapshot]}}]}}")
    assert token.returncode == 0, token.stdout + token.stderr
    weak = _validate(tmp_path, "  auth: {tokens: [{name: a, token: short, scopes: [lease]}]}")
    assert weak.returncode == 2 and "at least 16" in weak.stdout + weak.stderr
    loopback = _validate(tmp_path, "  http: {host: 127.0.0.1}")
    assert loopback.returncode == 0, loopback.stdout + loopback.stderr


def test_explicit_anonymous_snapshot_only(tmp_path: Path) -> None:
    control = f"""  auth:
    anonymous: [snapshot]
    tokens:
{tokens_yaml({"leaser": "scopes: [snapshot, lease]"})}
"""
    with control_bridge(tmp_path, tickers=PINNED[:2], universe=UNIVERSE,
                        control=control) as running:
        port = running.control_port
        assert call(port, "GET", "/v1/snapshot").status == 200
        anon = call(port, "POST", "/v1/subscriptions", body=_lease_body(["S050/USD"]))
        assert anon.status == 401 and "lease" in anon.json()["error"]
        wrong = call(port, "GET", "/v1/snapshot", token="not-the-token-not-the-token")
        assert wrong.status == 401
        ok = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"],
                  body=_lease_body(["S050/USD"]))
        assert ok.status == 200 and ok.json()["owner"] == "leaser"


def test_v1_on_a_loopback_probes_listener_still_works_deprecated(tmp_path: Path) -> None:
    """A configuration from before the split (no control.http, loopback http) keeps
    /v1 on the probes' listener, marked deprecated."""
    from tests.support.proc import Proc, free_port, wait_port

    sim_port, http_port = free_port(), free_port()
    cfg = tmp_path / "old.yaml"
    cfg.write_text(f"""
source: {{url: "http://127.0.0.1:{sim_port}", api_key: test-key, tickers: [BTC/USD]}}
sinks: {{c: {{driver: jsonl, path: {tmp_path / "o.jsonl"}}}}}
http: {{host: 127.0.0.1, port: {http_port}}}
""")
    with Proc([*CLI, "simulate", "--port", str(sim_port), "--api-key", "test-key",
               "--interval", "0.5"], tmp_path / "sim.log"):
        wait_port(sim_port)
        with Proc([*CLI, "run", "-c", str(cfg)], tmp_path / "bridge.log") as bridge:
            wait_port(http_port, 30)
            reply = call(http_port, "GET", "/v1/snapshot")
            assert reply.status == 200 and reply.headers.get("deprecation") == "true"
            assert "deprecated" in bridge.output()
            assert metric(call(http_port, "GET", "/metrics").body.decode(),
                          "aleno_bridge_events_received_total") >= 0


def test_configured_symbols_evict_leased_ones(tmp_path: Path) -> None:
    """A key limit of 60 with 40 configured symbols: leases get the 20 left; a reload
    (SIGHUP) that configures 5 more subscribes all 5 by evicting 5 leased symbols, and
    the lease's holder sees them ``evicted`` on its next renew."""
    import signal

    from tests.support.control import sim_subscriptions

    pinned = UNIVERSE[:40]
    control = f"""  auth:
    tokens:
{tokens_yaml({"leaser": "scopes: [snapshot, lease], max_symbols: 100"})}
"""
    with control_bridge(tmp_path, tickers=pinned, universe=UNIVERSE, control=control,
                        sim_args=["--key-limit", "test-key=60"]) as running:
        port = running.control_port
        # one symbol per request: the upstream refuses a whole request that would
        # exceed the key's limit
        leases: dict[str, str] = {}
        statuses: dict[str, Any] = {}
        for symbol in UNIVERSE[40:70]:
            reply = call(port, "POST", "/v1/subscriptions", token=TOKENS["leaser"],
                         body=_lease_body([symbol]))
            assert reply.status == 200, reply.body
            statuses[symbol] = reply.json()["symbols"][symbol]
            if reply.json()["lease"] is not None:
                leases[symbol] = reply.json()["lease"]
        held = [s for s, a in statuses.items() if a["status"] in ("accepted", "pending")]
        limited = [s for s, a in statuses.items() if a["status"] == "limit"]
        assert len(held) == 20 and len(limited) == 10, statuses
        assert len(sim_subscriptions(running.sim_port)["tickers"]) == 60
        added = UNIVERSE[100:105]
        text = running.config.read_text()
        running.config.write_text(text.replace(
            f"tickers: [{', '.join(pinned)}]", f"tickers: [{', '.join(pinned + added)}]"))
        running.bridge.signal(signal.SIGHUP)
        running.wait(lambda: set(added) <= set(sim_subscriptions(running.sim_port)["tickers"]),
                     20, "the 5 configured symbols are subscribed")
        upstream = set(sim_subscriptions(running.sim_port)["tickers"])
        assert set(pinned) <= upstream and len(upstream) <= 60
        evicted: dict[str, Any] = {}
        for lease in leases.values():
            renewed = call(port, "POST", f"/v1/subscriptions/{lease}/renew",
                           token=TOKENS["leaser"])
            assert renewed.status == 200, renewed.body
            evicted.update({s: a for s, a in renewed.json()["symbols"].items()
                            if a["status"] == "evicted"})
        assert len(evicted) == 5, evicted
        assert set(evicted) == set(held[-5:])  # the most recently leased go first
        assert not set(evicted) & upstream
        assert all(a["error"] for a in evicted.values())
