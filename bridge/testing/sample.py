"""Realistic events without an upstream: records shaped exactly like Aleno's, run
through the real :class:`~bridge.pipeline.normalize.Normalizer`."""

from __future__ import annotations

from typing import Any

from bridge.core.envelope import Event
from bridge.pipeline.normalize import Normalizer
from bridge.sinks import Message

T0_MS = 1_732_480_000_000


def ticker_record(symbol: str, price: float, sent_ms: int) -> dict[str, Any]:
    return {
        "id": symbol,
        "aggregated": {"price": price, "h24UsdVolume": 1_234_567.5},
        "cex": {"price": price * 1.0002, "h24UsdVolume": 1_000_000.25},
        "dex": {"price": price * 0.9998, "h24UsdVolume": 234_567.25, "usdTvl": 9_876_543.0},
        "sentTimestampMs": sent_ms,
    }


def equity_record(symbol: str, price: float, sent_ms: int) -> dict[str, Any]:
    return {"sentTimestampMs": sent_ms, "symbol": symbol, "price": price}


def sample_events(
    symbols: int = 5, updates: int = 3, kind: str = "ticker", start_ms: int = T0_MS,
    step_ms: int = 1000,
) -> list[Event]:
    """``updates`` rounds of ``symbols`` events, in upstream order (round by round)."""
    norm = Normalizer(clock=lambda: start_ms + 5)
    events: list[Event] = []
    for u in range(updates):
        sent = start_ms + u * step_ms
        if kind == "ticker":
            tickers = [ticker_record(f"T{i}/USD", 100.0 + i + u / 100, sent)
                       for i in range(symbols)]
            events += norm.tickers(tickers)
        else:
            equities = [equity_record(f"EQ{i}", 50.0 + i + u / 100, sent)
                        for i in range(symbols)]
            events += norm.equities(equities)
    return events


def messages(
    events: list[Event], topic: str, fmt: str = "cloudevents-json", key: bool = True,
) -> list[Message]:
    """One message per event, all to ``topic``, keyed by symbol."""
    out = []
    for ev in events:
        enc = ev.encoded(fmt)
        out.append(Message(topic, ev.symbol if key else None, enc.body, enc.content_type, ev.header,
                           enc.attributes))
    return out
