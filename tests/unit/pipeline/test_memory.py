"""What a buffered event costs (issue 8, item 5).

A sink that cannot deliver holds up to ``buffer.max_events`` events; with the shipped
``config/fanout.yaml`` and the Helm chart's 256 MiB limit, that only fits when a
buffered event costs about 1 KB. Measured on the real path: wire JSON -> Normalizer ->
Router -> SinkWorker buffer, behind a sink that never connects.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import orjson
import pytest

from bridge.config import parse_config
from bridge.pipeline.normalize import Normalizer
from bridge.pipeline.routing import Router
from bridge.sinks import Drivers
from bridge.sinks.worker import SinkWorker
from bridge.testing import MemorySink
from bridge.testing.sample import equity_record, ticker_record

ROOT = Path(__file__).resolve().parents[3]
MAX_BYTES_PER_EVENT = 1536


def _pipeline(fmt: str, capacity: int) -> tuple[SinkWorker, Router]:
    settings = parse_config(
        f"""
sinks:
  bus: {{driver: memory, format: {fmt}, buffer: {{max_events: {capacity}}}}}
routes:
  - sinks: [bus]
    topic: "prices.{{kind}}.{{base}}-{{quote}}"
""",
        drivers=Drivers(injected={"memory": MemorySink}),
    )
    worker = SinkWorker(settings.sinks["bus"], MemorySink("bus"))  # never started
    return worker, Router(settings.routes, {"bus": worker})


def _payload(kind: str, r: int, n: int = 100) -> bytes:
    sent = 1_732_480_000_000 + r * 1000
    if kind == "ticker":
        return orjson.dumps([ticker_record(f"S{i}/USD", 100.0 + i + r / 1000, sent)
                             for i in range(n)])
    return orjson.dumps([equity_record(f"EQ{i}", 50.0 + i + r / 1000, sent) for i in range(n)])


@pytest.mark.parametrize("fmt", ["cloudevents-json", "cloudevents-binary", "raw"])
@pytest.mark.parametrize("kind", ["ticker", "equity"])
def test_a_buffered_event_costs_at_most_1_5_kb(fmt: str, kind: str) -> None:
    events = 20_000
    worker, router = _pipeline(fmt, events)
    norm = Normalizer()
    decode = norm.tickers if kind == "ticker" else norm.equities

    def feed(first: int, last: int) -> None:
        for r in range(first, last):
            for ev in decode(orjson.loads(_payload(kind, r))):
                router.dispatch(ev)

    feed(0, 2)  # the route cache, the symbol cache, the time cache
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed(2, 2 + events // 100)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert worker.depth == events
    per_event = held / events
    assert per_event <= MAX_BYTES_PER_EVENT, f"{per_event:.0f} bytes per buffered {kind} event"


MEASURE = textwrap.dedent("""
    import gc, sys
    sys.path.insert(0, sys.argv[1])
    from tests.unit.pipeline.test_memory import _payload, _pipeline
    from bridge.pipeline.normalize import Normalizer
    import orjson
    worker, router = _pipeline("cloudevents-json", 100_000)
    norm = Normalizer()
    for r in range(1000):
        for ev in norm.tickers(orjson.loads(_payload("ticker", r))):
            router.dispatch(ev)
    gc.collect()
    assert worker.depth == 100_000, worker.depth
    # VmHWM: the peak of this process's own memory since exec (ru_maxrss would also
    # carry the peak of the forked test runner, inherited across exec)
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    print(peak_kb // 1024)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_100k_buffered_events_fit_in_250_mb_of_rss() -> None:
    """A dead sink with a 100,000-event buffer: the whole process stays under 250 MB
    (it was 620-730 MB)."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(ROOT)], capture_output=True, text=True,
        timeout=120, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    rss_mb = int(out.stdout.strip().splitlines()[-1])
    assert rss_mb <= 250, f"RSS {rss_mb} MB with 100,000 buffered events"
