"""Snapshot latency under load, and what the load costs the data path.

Runs a real bridge (:class:`bridge.app.Bridge`, in this process) fed by the real
simulator (a child process, ``bench/_e2e_support.py simulate``) with ``--symbols``
tickers (default 10,000: ``S00000/USD`` ...) at ``--interval`` 1.0 s, i.e. 10,000
events/s, into a counting in-memory sink, with the control surface on HTTP
(``/v1/snapshot``) and NATS (a private ``nats-server`` unless ``--nats URL``).

Five phases of ``--seconds`` each, after the cache holds every symbol:

1. ``baseline``: no snapshot requests;
2. ``http``: a client process fetches ``GET /v1/snapshot`` (everything) ``--rate`` times
   a second;
3. ``http-raw``: the same client against a bare aiohttp server that answers with a
   ready-made body of the same bytes (a full snapshot taken before), on a thread of
   the bridge's process like the bridge's own control thread: the floor of moving that
   many bytes through aiohttp on this machine, under the same load;
4. ``nats``: a client process fetches the whole snapshot over NATS (all pages, the
   recipe in docs/control-api.md) ``--rate`` times a second;
5. ``nats-raw``: the same client against a bare nats-py responder answering the same
   ready-made pages.

The clients run in their own process so that their parsing does not share the
bridge's process. Printed: p50/p99/max latency of one full snapshot per door, the
ratio of the bridge's door to the bare library's (the comparison that holds on a
shared machine), and per phase the events the bridge received from the upstream, the
events the sink published, and the bridge's drop counters (intake shed, sink drops):
"no added loss" means the drop counters stay at zero and published tracks received
in every phase.

    python bench/snapshot.py                      # 10,000 symbols, 20 s per phase
    python bench/snapshot.py --symbols 2000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _e2e_support import run_json_child  # noqa: E402

SUPPORT = str(ROOT / "bench" / "_e2e_support.py")
PREFIX = "bench.control"
#: the subject prefix of the bare nats-py responder
RAW_PREFIX = "bench.raw"


def symbols(n: int) -> list[str]:
    return [f"S{i:05d}/USD" for i in range(n)]


# ---------------------------------------------------------------------------
# child process: the snapshot client


async def _client(args: argparse.Namespace) -> None:
    import aiohttp
    import orjson
    from nats.aio.client import Client

    latencies: list[float] = []
    counts: list[int] = []
    period = 1.0 / args.rate
    deadline = time.monotonic() + args.seconds
    if args.mode == "http":
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                async with session.get(args.url) as resp:
                    body = await resp.read()
                latencies.append(time.perf_counter() - start)
                # the count is read after the clock stopped: parsing is the client's cost
                counts.append(orjson.loads(body)["count"])
                await asyncio.sleep(max(0.0, period - latencies[-1]))
    else:
        nc = Client()
        await nc.connect(args.url, allow_reconnect=False)
        try:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                n = 0
                pages = []
                after = None
                while True:
                    body = b"" if after is None else orjson.dumps({"after": after})
                    msg = await nc.request(f"{args.prefix}.snapshot", body, timeout=5)
                    pages.append(msg.data)
                    # the cursor is at the end of the page: no need to parse the page
                    tail = msg.data[msg.data.rindex(b'"next":') + 7:-1]
                    after = None if tail == b"null" else orjson.loads(tail)
                    if after is None:
                        break
                latencies.append(time.perf_counter() - start)
                n = sum(orjson.loads(p)["count"] for p in pages)
                counts.append(n)
                await asyncio.sleep(max(0.0, period - latencies[-1]))
        finally:
            await nc.close()
    print(json.dumps({"latencies": latencies, "counts": counts}))


# ---------------------------------------------------------------------------
# the bench


class _Counters:
    def __init__(self, bridge: Any, sink: Any) -> None:
        self.received = bridge.normalizer.received["ticker"]
        self.published = sink.count
        self.shed = sum(bridge.pipeline_dropped.values())
        self.sink_dropped = sum(sum(w.stats.dropped.values()) for w in bridge.workers.values())

    def minus(self, before: _Counters) -> dict[str, int]:
        return {"received": self.received - before.received,
                "published": self.published - before.published,
                "intake_shed": self.shed - before.shed,
                "sink_dropped": self.sink_dropped - before.sink_dropped}


def _page_bytes(args: argparse.Namespace) -> int:
    """The page size of the bridge's NATS door: the server's ``max_payload`` (the
    bench's own server; give ``--max-payload`` of a server given by ``--nats``)."""
    return int(args.max_payload)


def _pages(control: Any, max_bytes: int) -> dict[bytes, bytes]:
    """A full snapshot in pages of at most ``max_bytes``, by the request that asks for
    each (``b""`` for the first, then ``{"after": cursor}``)."""
    import orjson

    from bridge.control.core import parse_query

    out: dict[bytes, bytes] = {}
    request = b""
    after = None
    while True:
        reply = control.answer(parse_query(after=after), max_bytes=max_bytes)
        out[request] = reply.body
        if reply.next is None:
            return out
        after = reply.next
        request = orjson.dumps({"after": after})


class _Raw:
    def __init__(self, runner: Any, nc: Any, http_url: str) -> None:
        self.runner, self.nc, self.http_url = runner, nc, http_url

    async def close(self) -> None:
        await self.nc.close()
        await self.runner.cleanup()


async def _raw_servers(pages: dict[bytes, bytes], nats_url: str) -> _Raw:
    """A bare aiohttp server and a bare nats-py responder answering ``pages``."""
    from nats.aio.client import Client

    from tests.support.proc import free_port

    port = free_port()
    runner = await _bare_http(port, pages[b""])
    nc = Client()
    await nc.connect(nats_url)

    async def respond(msg: Any) -> None:
        await msg.respond(pages[msg.data])

    await nc.subscribe(f"{RAW_PREFIX}.snapshot", cb=respond)
    await nc.flush()
    return _Raw(runner, nc, f"http://127.0.0.1:{port}/v1/snapshot")


async def _run_client(mode: str, url: str, args: argparse.Namespace,
                      prefix: str = PREFIX) -> dict[str, Any]:
    return await run_json_child(
        f"{mode} client", __file__, "client", "--mode", mode, "--url", url,
        "--prefix", prefix, "--seconds", str(args.seconds), "--rate", str(args.rate))


async def bench(args: argparse.Namespace) -> int:
    from bridge.app import Bridge, tune_gc
    from bridge.config import parse_config
    from bridge.control.thread import ControlLoop
    from bridge.sinks import Drivers, Message
    from bridge.testing import MemorySink
    from tests.support.nats import NatsServer
    from tests.support.proc import free_port

    class CountingSink(MemorySink):
        """Counts what it is given and keeps nothing (a bus that always accepts)."""

        count = 0

        async def publish(self, batch: Sequence[Message]) -> None:
            self.count += len(batch)

    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    server = None
    nats_url = args.nats
    if nats_url is None:
        # a full 10,000-symbol snapshot is ~6 MB: with the default max_payload (1 MiB)
        # it comes in 6 pages, with 8 MiB (the largest NATS recommends) in one reply
        server = NatsServer(work / "nats", jetstream=False,
                            config=f"max_payload: {args.max_payload}\n").start()
        nats_url = server.url
    port = free_port()
    sim = await asyncio.create_subprocess_exec(
        sys.executable, SUPPORT, "simulate", "--port", str(port), "--interval",
        str(args.interval), "--count", str(args.symbols), "--ticks-file",
        str(work / "ticks.txt"), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    stop = asyncio.Event()
    task = None
    owned: list[Any] = [None]  # the bare server process of phase http-own
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            await asyncio.sleep(0.05)
        config = {
            "source": {"url": f"http://127.0.0.1:{port}", "api_key": "demo-key",
                       "tickers": symbols(args.symbols)},
            "sinks": {"mem": {"driver": "memory", "buffer": {"max_events": 50_000}}},
            "routes": [{"sinks": ["mem"]}],
            "http": {"host": "127.0.0.1", "port": 0},
            "control": {"nats": {"servers": [nats_url], "subject_prefix": PREFIX}},
            "intake_max_events": 50_000,
        }
        settings = parse_config(json.dumps(config), env={},
                                drivers=Drivers(injected={"memory": MemorySink}))
        sink = CountingSink("mem")
        bridge = Bridge.from_settings(settings, sinks={"mem": sink})
        tune_gc()  # as `aleno-bridge run` does (bridge.app.serve)
        task = asyncio.create_task(bridge.run(stop))
        start = time.monotonic()
        while len(bridge.last_values) < args.symbols or bridge.http_port is None:
            if task.done():
                task.result()
            if time.monotonic() - start > 60:
                msg = f"the cache holds {len(bridge.last_values)} of {args.symbols} symbols"
                raise RuntimeError(msg)
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # warm: steady flow
        http_url = f"http://127.0.0.1:{bridge.http_port}/v1/snapshot"
        phases: dict[str, dict[str, int]] = {}
        results: dict[str, dict[str, Any]] = {}
        lags: dict[str, list[float]] = {}
        # the bare libraries, on a thread of this process (as the bridge's control
        # thread), answering ready-made bytes of a full snapshot
        assert bridge.control is not None
        pages = _pages(bridge.control, _page_bytes(args))
        raw_thread = ControlLoop("bench-raw")
        await raw_thread.start()
        raw = await raw_thread.run(_raw_servers(pages, nats_url))
        # and a bare aiohttp server in a process of its own: the floor without sharing
        # the bridge's interpreter (its GIL)
        body_file = work / "snapshot.json"
        body_file.write_bytes(pages[b""])
        own_port = free_port()
        owned[0] = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "serve", "--port", str(own_port), "--body-file",
            str(body_file), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await _wait_port(own_port)
        for phase in ("baseline", "http", "http-raw", "http-own", "nats", "nats-raw"):
            before = _Counters(bridge, sink)
            lags[phase] = []
            probe = asyncio.create_task(_loop_lag(lags[phase]))
            if phase == "baseline":
                await asyncio.sleep(args.seconds)
            else:
                url = {"http": http_url, "http-raw": raw.http_url,
                       "http-own": f"http://127.0.0.1:{own_port}/v1/snapshot",
                       "nats": nats_url, "nats-raw": nats_url}[phase]
                prefix = RAW_PREFIX if phase == "nats-raw" else PREFIX
                results[phase] = await _run_client(phase.split("-")[0], url, args, prefix)
            probe.cancel()
            await asyncio.sleep(0)
            phases[phase] = _Counters(bridge, sink).minus(before)
        await raw_thread.run(raw.close())
        await raw_thread.stop()
        _report(args, phases, results)
        print("\nevent-loop lag of the bridge (a 5 ms timer's lateness: how long a request "
              "may wait before the bridge even reads it)")
        print(f"{'phase':<9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for phase, values in lags.items():
            ms = [v * 1000 for v in values] or [0.0]
            print(f"{phase:<9} {_pct(ms, 0.5):>8.2f} {_pct(ms, 0.99):>8.2f} {max(ms):>8.2f}")
        return 0
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
        for proc in (sim, owned[0]):
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        if owned[0] is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(owned[0].wait(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sim.wait(), 10)
        if server is not None:
            server.stop()


async def _loop_lag(out: list[float], period: float = 0.005) -> None:
    """Record how late a ``period`` timer fires on the bridge's event loop."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(period)
        out.append(max(0.0, time.perf_counter() - start - period))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(args: argparse.Namespace, phases: dict[str, dict[str, int]],
            results: dict[str, dict[str, Any]]) -> None:
    print(f"\nsnapshot latency: {args.symbols} symbols, {args.symbols / args.interval:,.0f} "
          f"events/s, {args.rate:g} snapshots/s for {args.seconds:g} s per door")
    print(f"{'door':<9} {'requests':>8} {'items':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8}  {'p50 x raw':>9} {'p99 x raw':>9}")
    for door, res in results.items():
        lat = [v * 1000 for v in res["latencies"]]
        items = int(statistics.median(res["counts"])) if res["counts"] else 0
        ratios = ""
        raw = results.get(f"{door}-raw") if door in ("http", "nats") else None
        if raw is not None and raw["latencies"] and lat:
            base = [v * 1000 for v in raw["latencies"]]
            ratios = (f"{_pct(lat, 0.5) / _pct(base, 0.5):>9.2f} "
                      f"{_pct(lat, 0.99) / _pct(base, 0.99):>9.2f}")
        print(f"{door:<9} {len(lat):>8} {items:>7} {_pct(lat, 0.50):>8.2f} "
              f"{_pct(lat, 0.99):>8.2f} {max(lat):>8.2f}  {ratios}")
    print("(raw: the bare library answering ready-made bytes of the same size, on a "
          "thread of the bridge's process; own: bare aiohttp in a process of its own; "
          "the goal of issue 12 is p99 <= 20 ms)")
    print(f"\n{'phase':<9} {'received':>9} {'published':>10} {'pub/recv':>9} "
          f"{'intake shed':>12} {'sink dropped':>13}")
    for phase, c in phases.items():
        ratio = c["published"] / c["received"] if c["received"] else 0.0
        print(f"{phase:<9} {c['received']:>9} {c['published']:>10} {ratio:>9.4f} "
              f"{c['intake_shed']:>12} {c['sink_dropped']:>13}")
    print("(received: upstream records the bridge took in during the phase; published: "
          "what the sink accepted; one upstream tick in flight at a phase edge moves "
          "pub/recv by up to one tick's share; the drop counters are exact)")


async def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        w.close()
        return


async def _bare_http(port: int, body: bytes) -> Any:
    """A bare aiohttp server answering ``body`` on ``/v1/snapshot``; its runner."""
    from aiohttp import web

    async def handle(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/snapshot", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _serve_file(port: int, body: bytes) -> None:
    """:func:`_bare_http` until killed (phase ``http-own``)."""
    await _bare_http(port, body)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    client = sub.add_parser("client")
    client.add_argument("--mode", choices=["http", "nats"], required=True)
    client.add_argument("--url", required=True)
    client.add_argument("--prefix", default=PREFIX)
    client.add_argument("--seconds", type=float, required=True)
    client.add_argument("--rate", type=float, required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--body-file", required=True)
    parser.add_argument("--symbols", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=5.0, help="snapshots per second")
    parser.add_argument("--nats", default=None, help="a running nats-server (default: own)")
    parser.add_argument("--max-payload", type=int, default=8 * 1024 * 1024,
                        help="max_payload of the bench's own nats-server (bytes)")
    args = parser.parse_args(argv)
    if args.cmd == "client":
        asyncio.run(_client(args))
        return 0
    if args.cmd == "serve":
        asyncio.run(_serve_file(args.port, Path(args.body_file).read_bytes()))
        return 0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
