"""Dead letters on a real bus (issue 8): a NATS server whose ``max_payload`` is too
small for ticker envelopes refuses them for good; the bridge hands them, with the
reason, the sink and the error, to the configured dead-letter sink (a real jsonl
file), counts them, and delivers what the bus accepts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nats
import nats.aio.msg
import orjson
import pytest

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.testing import sample_events, wait_until
from tests.support.nats import NatsServer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary"])
async def test_what_nats_refuses_as_too_large_goes_to_the_dead_letter_sink(
    tmp_path: Path, nats_servers: Callable[..., NatsServer], fmt: str,
) -> None:
    # a ticker envelope is ~450 bytes, an equity ~300: tickers can never be published
    server = nats_servers(jetstream=False, config="max_payload: 400\n")
    dlq_path = tmp_path / "dead-letters.jsonl"
    settings = parse_config(f"""
sinks:
  bus:
    driver: nats
    servers: {server.url}
    format: {fmt}
    dead_letter: dlq
    batch: {{linger_ms: 0}}
    retry: {{initial_backoff_s: 0.1, max_backoff_s: 0.5}}
  dlq: {{driver: jsonl, path: "{dlq_path}"}}
routes:
  - {{match: {{kind: ticker}}, sinks: [bus], topic: "prices.{{kind}}.{{base}}"}}
http: {{enabled: false}}
shutdown_timeout_s: 5
""", env={})
    bridge = Bridge(settings, with_source=False)
    await bridge.start()
    tickers = sample_events(symbols=4, updates=3)
    bridge.ingest(tickers)
    bus, dlq = bridge.workers["bus"], bridge.workers["dlq"]
    await wait_until(lambda: dlq.stats.published == len(tickers), 15.0)
    await bridge.shutdown()

    assert bus.stats.published == 0
    assert bus.stats.dropped == {"dead_lettered": len(tickers)}
    assert bus.stats.rejections >= 1 and "max_payload" in (bus.stats.last_rejection or "")
    lines = [orjson.loads(line) for line in dlq_path.read_bytes().splitlines()]
    # jsonl writes the body; binary-mode attributes are not part of a jsonl line, so
    # the structured case is where the envelope itself carries the extension attributes
    assert len(lines) == len(tickers)
    if fmt == "cloudevents-json":
        assert [env["id"] for env in lines] == [ev.id for ev in tickers]
        for env in lines:
            assert env["deadletterreason"] == "rejected"
            assert env["deadlettersink"] == "bus"
            assert "max_payload" in env["deadlettererror"]
            assert env["data"]["kind"] == "ticker"
    else:
        assert [d["symbol"] for d in lines] == [ev.symbol for ev in tickers]


async def test_binary_dead_letters_carry_the_attributes_as_nats_headers(
    nats_servers: Callable[..., NatsServer],
) -> None:
    small = nats_servers(jetstream=False, config="max_payload: 300\n", name="small")
    spare = nats_servers(jetstream=False, name="spare")
    nc = await nats.connect(spare.url)
    got: list[nats.aio.msg.Msg] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        got.append(msg)

    await nc.subscribe("prices.>", cb=on_msg)
    await nc.flush()
    settings = parse_config(f"""
sinks:
  bus: {{driver: nats, servers: {small.url}, format: cloudevents-binary, dead_letter: dlq,
         batch: {{linger_ms: 0}}}}
  dlq: {{driver: nats, servers: {spare.url}, format: cloudevents-binary}}
routes:
  - {{match: {{kind: ticker}}, sinks: [bus], topic: "prices.{{kind}}.{{base}}"}}
http: {{enabled: false}}
""", env={})
    bridge = Bridge(settings, with_source=False)
    await bridge.start()
    tickers = sample_events(symbols=3, updates=2)
    bridge.ingest(tickers)
    try:
        await wait_until(lambda: len(got) == len(tickers), 15.0)
    finally:
        await bridge.shutdown()
        await nc.close()
    assert bridge.workers["bus"].stats.dropped == {"dead_lettered": len(tickers)}
    for msg, ev in zip(got, tickers, strict=True):
        h = msg.headers or {}
        assert h["ce-id"] == ev.id and h["ce-deadletterreason"] == "rejected"
        assert h["ce-deadlettersink"] == "bus" and "max_payload" in h["ce-deadlettererror"]
        assert orjson.loads(msg.data)["symbol"] == ev.symbol
        assert msg.subject == f"prices.ticker.{ev.base}"
