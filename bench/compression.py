"""Upstream compression: bytes on the wire and bridge CPU per event, with and without
WebSocket permessage-deflate.

The simulator and a byte-counting TCP proxy run in a child process (their CPU is not
the bridge's); this process runs the bridge's upstream half: :class:`AlenoSource`
(python-socketio over aiohttp) and the :class:`Normalizer`, and measures its own CPU
time (all threads: aiohttp inflates large frames in an executor). Each mode runs
``--seconds`` after the first update, against a fresh simulator.

    python bench/compression.py                       # 1,000 tickers every 0.1 s, 10 s
    python bench/compression.py --tickers 1000 --interval 1 --seconds 20  # real cadence

Modes: ``off`` (source.compression: off), ``auto`` (offered, the simulator takes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bridge.config import SourceConfig
from bridge.pipeline.normalize import EQUITY_EVENT, Normalizer
from bridge.simulator import Simulator
from bridge.upstream.client import AlenoSource

KEY = "bench-key"


# -- the child: simulator + counting proxy ------------------------------------------


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                counter: list[int]) -> None:
    try:
        while chunk := await src.read(65536):
            counter[0] += len(chunk)
            dst.write(chunk)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.close()


async def serve(tickers: int, interval: float, compression: bool = True) -> None:
    """Print ``ready PORT``; answer each line on stdin with the counters as JSON; exit
    at end of input."""
    symbols = [f"T{i:05d}/USD" for i in range(tickers)]
    down = [0]  # upstream -> bridge
    up = [0]  # bridge -> upstream
    async with Simulator(port=0, api_keys=[KEY], interval=interval, seed=1,
                         tickers=symbols, equities=[], max_subscriptions=tickers,
                         compression=compression) as sim:

        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection(sim.host, sim.port)
            await asyncio.gather(_pump(ur, w, down), _pump(r, uw, up))

        proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps({"down": down[0], "up": up[0], "ticks": sim.ticks,
                              "ws_compression": sim.ws_compression,
                              "server_cpu_s": time.process_time()}), flush=True)
        proxy.close()


# -- the parent: the bridge's upstream half ------------------------------------------


async def measure(mode: str, tickers: int, interval: float, seconds: float) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", "--tickers", str(tickers), "--interval",
        str(interval), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout
    try:
        port = int((await stdout.readline()).split()[1])
        cfg = SourceConfig(url=f"http://127.0.0.1:{port}",
                           tickers=[f"T{i:05d}/USD" for i in range(tickers)],
                           compression=mode, connect_timeout_s=30)
        normalizer = Normalizer(source=cfg.endpoint)
        events = [0]
        counting = [False]

        def on_payload(event: str, payload: Any) -> None:
            out = (normalizer.equities(payload) if event == EQUITY_EVENT
                   else normalizer.tickers(payload))
            if counting[0]:
                events[0] += len(out)

        source = AlenoSource(cfg, KEY, on_payload, normalizer.reject)
        task = asyncio.create_task(source.run())
        deadline = time.monotonic() + 60
        while not source.flowing:
            if time.monotonic() > deadline or task.done():
                msg = f"no prices from the simulator ({source.stats.last_error})"
                raise RuntimeError(msg)
            await asyncio.sleep(0.05)

        async def counters() -> dict[str, Any]:
            stdin.write(b"?\n")
            await stdin.drain()
            return dict(json.loads(await stdout.readline()))

        before = await counters()
        cpu0, wall0 = time.process_time(), time.monotonic()
        counting[0] = True
        await asyncio.sleep(seconds)
        counting[0] = False
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        after = await counters()
        negotiated = source.stats.compression
        source.stop()
        await asyncio.wait_for(task, 10)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    return {"mode": mode, "negotiated": negotiated, "events": events[0], "cpu_s": cpu,
            "wall_s": wall, "down": after["down"] - before["down"],
            "up": after["up"] - before["up"],
            "server_cpu_s": after["server_cpu_s"] - before["server_cpu_s"]}


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| source.compression | deflate | events | wire bytes/event | MB/s down "
           "| bridge CPU/event | bridge CPU (% core) | simulator CPU/event |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = max(r["events"], 1)
        deflate = f"yes ({r['negotiated']} bits)" if r["negotiated"] else "no"
        out.append(
            f"| {r['mode']} | {deflate} | {r['events']:,} | {r['down'] / n:.1f}"
            f" | {r['down'] / r['wall_s'] / 1e6:.2f} | {r['cpu_s'] / n * 1e6:.1f} µs"
            f" | {r['cpu_s'] / r['wall_s'] * 100:.1f}% | {r['server_cpu_s'] / n * 1e6:.1f} µs |")
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in ("off", "auto"):
        rows.append(await measure(mode, args.tickers, args.interval, args.seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tickers", type=int, default=1000)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.tickers, args.interval))
        return 0
    rows = asyncio.run(main_async(args))
    print(f"{args.tickers} tickers every {args.interval:g} s "
          f"({args.tickers / args.interval:,.0f} events/s offered), {args.seconds:g} s per mode")
    print(table(rows))
    off, on = rows
    b_off = off["down"] / max(off["events"], 1)
    b_on = on["down"] / max(on["events"], 1)
    c_off = off["cpu_s"] / max(off["events"], 1)
    c_on = on["cpu_s"] / max(on["events"], 1)
    print(f"deflate: {b_on / b_off:.3f}x the bytes ({(1 - b_on / b_off) * 100:.0f}% saved), "
          f"{c_on / c_off:.2f}x the bridge CPU per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
