"""Hot-path benchmark: upstream payload -> events -> envelopes -> routed messages.

One process, one core, no I/O. For Socket.IO payloads of 1, 100 and 2,000 ticker and
equity records, it measures the bridge's whole per-event path (JSON decode of the
array, validation, normalization, CloudEvents envelope, routing with a rendered topic,
encoding, hand-off into a sink worker's buffer) and, in the same run on the same
payloads, the floor no implementation can beat: decoding the array and encoding each
record once with the fastest JSON library installed (orjson). It prints events/s for
both and their ratio. The process's garbage collector is tuned as ``aleno-bridge run``
tunes it (``bridge.app.tune_gc``), for both measurements.

    python bench/pipeline.py            # full run (about a minute)
    python bench/pipeline.py --quick    # tiny smoke run (used by the test suite)

Goal (issue 3): >= 150,000 events/s with cloudevents-json and >= 50% of the floor.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bridge.app import tune_gc
from bridge.config import parse_config
from bridge.core import jsoncodec
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks import Drivers
from bridge.sinks.worker import SinkWorker
from bridge.testing import MemorySink
from bridge.testing.sample import equity_record, ticker_record

T0 = 1_732_480_000_000


def payload(kind: str, n: int) -> str:
    """The JSON text of one ``new_token_states`` / ``new_equity_states`` array."""
    if kind == "ticker":
        records = [ticker_record(f"S{i}/USD", 100.0 + i * 0.37, T0) for i in range(n)]
    else:
        records = [equity_record(f"EQ{i}", 50.0 + i * 0.11, T0) for i in range(n)]
    return orjson.dumps(records).decode()


def make_pipeline(fmt: str) -> tuple[Callable[[str, str], int], SinkWorker]:
    settings = parse_config(
        f"""
sinks:
  bus: {{driver: memory, format: {fmt}, buffer: {{max_events: 10000000}}}}
routes:
  - match: {{kind: "*", symbols: ["*"]}}
    sinks: [bus]
    topic: "prices.{{kind}}.{{base}}-{{quote}}"
    key: "{{symbol}}"
""",
        env={},
        drivers=Drivers(injected={"memory": MemorySink}),
    )
    spec = settings.sinks["bus"]
    worker = SinkWorker(spec, MemorySink("bus"))
    router = Router(settings.routes, {"bus": worker})
    normalizer = Normalizer()
    dispatch = router.dispatch
    loads = jsoncodec.loads

    def run(kind: str, text: str) -> int:
        records = loads(text)
        events = normalizer.tickers(records) if kind == "ticker" else normalizer.equities(records)
        for ev in events:
            dispatch(ev)
        return len(events)

    return run, worker


def floor(kind: str, text: str) -> int:
    records = orjson.loads(text)
    dumps = orjson.dumps
    for r in records:
        dumps(r)
    return len(records)


def measure(fn: Callable[[], int], min_time: float, reset: Callable[[], None]) -> float:
    """Best events/s over a few timed rounds of at least ``min_time`` seconds each."""
    best = 0.0
    for _ in range(3):
        gc.collect()
        events = 0
        started = time.perf_counter()
        elapsed = 0.0
        while elapsed < min_time:
            events += fn()
            reset()
            elapsed = time.perf_counter() - started
        best = max(best, events / elapsed)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny input, for smoke tests")
    ap.add_argument("--formats", default="cloudevents-json,cloudevents-binary,raw")
    args = ap.parse_args(argv)
    tune_gc()  # as `aleno-bridge run` does; the floor runs under the same settings
    sizes = [1, 10] if args.quick else [1, 100, 2000]
    min_time = 0.01 if args.quick else 0.6
    formats = args.formats.split(",")

    print(f"aleno-bridge hot path, 1 core, python {sys.version.split()[0]}, orjson "
          f"{orjson.__version__}")
    header = f"{'format':<19}{'kind':<8}{'batch':>6}{'bridge ev/s':>14}{'floor ev/s':>14}" \
             f"{'ratio':>8}"
    print(header)
    print("-" * len(header))
    results: list[dict[str, Any]] = []
    for fmt in formats:
        for kind in ("ticker", "equity"):
            for n in sizes:
                text = payload(kind, n)
                run, worker = make_pipeline(fmt)

                def reset(w: SinkWorker = worker) -> None:
                    w._queue.clear()

                bridge_rate = measure(lambda r=run, t=text, k=kind: r(k, t), min_time, reset)
                floor_rate = measure(lambda t=text, k=kind: floor(k, t), min_time, lambda: None)
                ratio = bridge_rate / floor_rate
                results.append({"format": fmt, "kind": kind, "batch": n, "bridge": bridge_rate,
                                "floor": floor_rate, "ratio": ratio})
                print(f"{fmt:<19}{kind:<8}{n:>6}{bridge_rate:>14,.0f}{floor_rate:>14,.0f}"
                      f"{ratio:>8.1%}", flush=True)
    big = [r for r in results if r["format"] == "cloudevents-json" and r["batch"] == max(sizes)]
    worst = min(big, key=lambda r: r["bridge"])
    print(f"\ncloudevents-json, batch {max(sizes)}: worst kind {worst['kind']}: "
          f"{worst['bridge']:,.0f} events/s, {worst['ratio']:.1%} of the floor "
          "(goal: >= 150,000 events/s and >= 50%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
