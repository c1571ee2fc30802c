"""WebSocket permessage-deflate between the source and the simulator, both ways."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.simulator import Simulator
from bridge.upstream.client import WS_DEFLATE_BITS
from tests.integration.upstream.test_source import settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("offered", "mode", "negotiated"),
    [
        (True, "auto", WS_DEFLATE_BITS),  # the default pair: compressed
        (True, "off", 0),  # the bridge declines
        (False, "auto", 0),  # the server does not offer it
    ],
)
async def test_prices_flow_with_and_without_deflate(
    offered: bool, mode: str, negotiated: int, run_bridge: Any,
) -> None:
    async with Simulator(port=0, api_keys=["test-key"], interval=0.1, seed=3,
                         compression=offered) as sim:
        r = run_bridge(settings(sim, extra_source=f"compression: {mode}"))
        await r.until(lambda: {m.event.symbol for m in r.sink.received}
                      >= {"BTC/USD", "ETH/USD", "AAPL"}, 5)
        # both ends agree on what the handshake settled
        assert sim.ws_compression == [negotiated]
        assert r.bridge.source.stats.compression == negotiated
        assert r.bridge.source.stats.bad_packets == {}
        price = next(m.event for m in r.sink.received if m.event.symbol == "BTC/USD")
        assert price.price > 0


async def test_deflate_is_renegotiated_on_every_reconnect(run_bridge: Any) -> None:
    async with Simulator(port=0, api_keys=["test-key"], interval=0.1, seed=3) as sim:
        r = run_bridge(settings(sim))
        await r.until(lambda: r.bridge.source.stats.connects == 1 and r.sink.received, 5)
        await sim.kick()
        await r.until(lambda: r.bridge.source.stats.connects == 2, 5)
        seen = len(r.sink.received)
        await r.until(lambda: len(r.sink.received) > seen, 5)
        assert sim.ws_compression == [WS_DEFLATE_BITS, WS_DEFLATE_BITS]
