"""The bar builder against a reference implementation, over random streams (hypothesis).

The reference is written from the rules in ``bridge/pipeline/bars.py`` and
``docs/consuming-prices.md`` ("Bars"), not from the builder: it sees the whole stream at
once and decides each bar from the list of updates the symbol had, where the builder
keeps a few numbers per symbol and decides as updates arrive. The streams mix several
symbols and two feeds, updates out of order and repeated (the same send time again),
updates late for some intervals, upstream ``down`` events and clock ticks that finalize
bars, with intervals and a grace that make several bars of one symbol open at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.envelope import Event
from bridge.pipeline.bars import BarBuilder, BarEvent
from bridge.pipeline.status import StatusEvent

T0 = 1_700_000_000_000  # a multiple of every interval below
SYMBOLS = ("BTC/USD", "ETH/USD")
FEEDS = ("ticker", "ticker", "equity")
#: the steps from a symbol's newest update to its next
STEPS = (1, 2, 3, 49, 50, 51, 99, 100, 101, 149, 150, 151, 299, 300, 301)


def price_event(feed: str, symbol: str, sent: int, price: float) -> Event:
    return Event(feed, symbol, symbol, "", sent, sent, "", {"price": price}, None, (price,))


def down() -> Event:
    return StatusEvent("down", "upstream", T0, {"reason": "test"}, "test")


# -- the reference --------------------------------------------------------------------


@dataclass
class Rec:
    sent: int
    price: float
    epoch: int
    at: int  # the index of the operation that brought it


@dataclass
class RefBar:
    start: int
    end: int
    recs: list[Rec] = field(default_factory=list)


Finals = dict[tuple[str, str, str, int], tuple[int, dict[str, Any]]]


def reference(ops: list[tuple[Any, ...]], intervals: list[tuple[str, int]], grace: int,
              hole_ms: int, since: int) -> Finals:
    """(feed, symbol, interval, start) -> (the operation that finalized it, its fields)
    of every final bar the stream makes."""
    epoch = 0
    taken: dict[tuple[str, str], list[Rec]] = {}
    watermark = {label: 0 for label, _ in intervals}
    bars: dict[tuple[str, str, str, int], RefBar] = {}
    finalized: dict[tuple[str, str, str, int], int] = {}
    for i, op in enumerate(ops):
        if op[0] == "down":
            epoch += 1
        elif op[0] == "close":
            for label, size in intervals:
                edge = op[1] - grace
                watermark[label] = max(watermark[label], edge - edge % size)
                for key, bar in bars.items():
                    if key[2] == label and key not in finalized and bar.end <= watermark[label]:
                        finalized[key] = i
        else:
            _, feed, symbol, sent, price = op
            recs = taken.setdefault((feed, symbol), [])
            if recs and sent <= recs[-1].sent:
                continue  # a duplicate or out of order: not taken
            rec = Rec(sent, price, epoch, i)
            recs.append(rec)
            for label, size in intervals:
                start = sent - sent % size
                if start < watermark[label]:
                    continue  # late for this interval
                key = (feed, symbol, label, start)
                bars.setdefault(key, RefBar(start, start + size)).recs.append(rec)
    out = {}
    for key, f in finalized.items():
        feed, symbol, label, start = key
        bar = bars[key]
        recs = taken[(feed, symbol)]
        before = [r for r in recs if r.at < f]  # what the symbol had when it became final

        def meets(x: int, y: int, bar: RefBar = bar) -> bool:
            """Some millisecond strictly between x and y is in the bar."""
            return max(x + 1, bar.start) < min(y, bar.end)

        gap = bar.start < since
        pairs = [(-1, before[0].sent)] if before else []
        pairs += [(a.sent, b.sent) for a, b in pairwise(before)
                  if b.sent - a.sent > hole_ms or a.epoch != b.epoch]
        gap = gap or any(meets(x, y) for x, y in pairs)
        last = bar.recs[-1].sent
        if not any(r.sent >= bar.end for r in before) and bar.end - last > hole_ms:
            gap = True
        prices = [r.price for r in bar.recs]
        out[key] = (f, {"open": prices[0], "high": max(prices), "low": min(prices),
                        "close": prices[-1], "count": len(prices), "gap": gap,
                        "firstSentMs": bar.recs[0].sent, "lastSentMs": last})
    return out


# -- the streams --------------------------------------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], list[tuple[str, int]], int, int]:
    sizes = draw(st.lists(st.sampled_from([100, 200, 250, 500, 1000]), min_size=1,
                          max_size=3, unique=True))
    intervals = [(f"{s}ms", s) for s in sorted(sizes)]
    grace = draw(st.sampled_from([0, 50, 150, 400]))
    hole_ms = draw(st.sampled_from([50, 100, 150, 300]))
    now = T0 + draw(st.integers(0, 300))
    ops: list[tuple[Any, ...]] = []
    sent_seen: list[int] = []
    newest: dict[str, int] = {}
    for _ in range(draw(st.integers(1, 60))):
        what = draw(st.sampled_from(["rec"] * 6 + ["close", "close", "down", "down"]))
        if what == "close":
            now += draw(st.integers(0, 8)) * 50
            ops.append(("close", now))
        elif what == "down":
            ops.append(("down",))
        else:
            symbol = draw(st.sampled_from(SYMBOLS))
            how = draw(st.sampled_from(["next", "next", "grid", "again"]))
            if how == "again" and sent_seen:
                sent = draw(st.sampled_from(sent_seen))  # the same send time again
            elif how == "next" and symbol in newest:
                # the symbol's next update, a step away that meets the edges of every
                # rule: two updates 1 or 2 ms apart, a hole exactly the threshold long
                sent = newest[symbol] + draw(st.sampled_from(STEPS))
            else:
                # lag, or ahead of the clock, on a grid of 50 ms with a millisecond
                # either side (a bar's first and last millisecond)
                sent = now + draw(st.integers(-12, 3)) * 50 + draw(st.sampled_from(
                    [0, 0, 0, -1, 1]))
            newest[symbol] = max(sent, newest.get(symbol, sent))
            sent_seen.append(sent)
            ops.append(("rec", draw(st.sampled_from(FEEDS)), symbol, sent,
                        float(draw(st.integers(1, 50)))))
    ops.append(("close", now + 3_000))  # everything ends
    return ops, intervals, grace, hole_ms


def run_builder(ops: list[tuple[Any, ...]], intervals: list[tuple[str, int]], grace: int,
                hole_ms: int, since: int) -> Finals:
    builder = BarBuilder(intervals, grace_ms=grace, hole_ms=lambda: hole_ms, now_ms=since)
    out: Finals = {}
    for i, op in enumerate(ops):
        if op[0] == "down":
            builder.statuses([down()])
        elif op[0] == "close":
            for ev in builder.close(op[1]):
                assert isinstance(ev, BarEvent) and ev.data["final"] is True
                d = ev.data
                key = (d["feed"], d["symbol"], d["interval"], d["start"])
                assert key not in out, f"{key} finalized twice"
                assert ev.id == f"bar:{key[0]}:{key[1]}:{key[2]}:{key[3]}"
                out[key] = (i, {k: d[k] for k in ("open", "high", "low", "close", "count",
                                                  "gap", "firstSentMs", "lastSentMs")})
        else:
            _, feed, symbol, sent, price = op
            builder.add(feed, [price_event(feed, symbol, sent, price)])
    assert builder.open_bars() == 0
    return out


@settings(max_examples=300, deadline=None)
@given(stream=streams())
def test_the_builder_makes_the_bars_the_reference_makes(
        stream: tuple[list[tuple[Any, ...]], list[tuple[str, int]], int, int]) -> None:
    ops, intervals, grace, hole_ms = stream
    since = ops[0][1] if ops[0][0] == "close" else T0
    assert run_builder(ops, intervals, grace, hole_ms, since) == \
        reference(ops, intervals, grace, hole_ms, since)


def test_the_reference_sees_a_gap() -> None:
    """The reference itself is not vacuous: a hole marks the bars it touches, a stream
    without one makes complete bars, a repeated update is not counted."""
    ops: list[tuple[Any, ...]] = [("rec", "ticker", "BTC/USD", T0 + s, float(s))
                                  for s in (0, 100, 100, 200, 300, 900, 1000)]
    ops.append(("close", T0 + 5_000))
    out = reference(ops, [("1s", 1000)], 0, 150, T0)
    first = out[("ticker", "BTC/USD", "1s", T0)][1]
    assert first["count"] == 5 and first["gap"] is True  # 300 -> 900 is a hole
    assert (first["open"], first["high"], first["low"], first["close"]) == (0, 900, 0, 900)
    second = out[("ticker", "BTC/USD", "1s", T0 + 1000)][1]
    assert second["gap"] is True  # silent for the rest of it
    assert run_builder(ops, [("1s", 1000)], 0, 150, T0) == out
