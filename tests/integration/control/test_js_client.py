"""The simulator against the reference JavaScript socket.io-client (Node.js).

Node.js and npm are not among the README's prerequisites, so this test is skipped,
visibly, where they are missing; where they exist it installs socket.io-client into
tests/js on first use and drives the simulator with it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.simulator import REFUSED, Simulator

pytestmark = pytest.mark.integration

JS = Path(__file__).parents[2] / "js"


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js/npm not installed: the reference JS client check needs them")
    if not (JS / "node_modules" / "socket.io-client").exists():
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"], cwd=JS,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"npm could not install socket.io-client: {r.stderr[-300:]}")
    return node


async def test_reference_js_client_speaks_with_the_simulator(node: str) -> None:
    import asyncio

    async with Simulator(port=0, api_keys=["js-key"], interval=0.2) as sim:
        proc = await asyncio.create_subprocess_exec(
            node, str(JS / "client_check.mjs"), sim.url, "js-key", cwd=JS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode() + out.decode()
    r = json.loads(out.decode().strip().splitlines()[-1])
    assert r["badKey"] == {"connected": False, "message": REFUSED}
    assert r["headerAuth"] is True and r["authConnected"] is True
    assert r["subscribeTicker"] == {
        "status": "partial", "involvedSubscriptions": ["BTC/USD"],
        "subscriptionsAfterUpdate": ["BTC/USD"], "rejectedSubscriptions": ["NOPE/USD"]}
    assert r["subscribeEquity"]["status"] == "ok"
    assert r["hostile"]["status"] == "error"
    assert r["tickerState"]["id"] == "BTC/USD"
    assert set(r["tickerState"]) == {"id", "aggregated", "cex", "dex", "sentTimestampMs"}
    assert set(r["equityState"]) == {"sentTimestampMs", "symbol", "price"}
    assert r["unsubscribe"]["subscriptionsAfterUpdate"] == []
