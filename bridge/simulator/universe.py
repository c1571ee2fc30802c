"""The simulator's market: the symbols of both feeds, their starting prices and the
geometric random walk they follow, and the records the protocol sends
(``new_token_states`` / ``new_equity_states`` entries).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

#: a plausible universe: symbol -> starting price (USD)
TICKERS: Final[dict[str, float]] = {
    "BTC": 87107.08, "ETH": 3120.55, "SOL": 242.1, "BNB": 640.3, "XRP": 1.42, "ADA": 0.98,
    "DOGE": 0.39, "AVAX": 42.7, "DOT": 8.9, "LINK": 17.6, "MATIC": 0.61, "TRX": 0.2,
    "LTC": 96.4, "BCH": 470.2, "UNI": 11.3, "ATOM": 7.6, "XLM": 0.46, "ETC": 31.2,
    "FIL": 5.9, "APT": 12.4, "ARB": 0.97, "OP": 2.1, "NEAR": 6.8, "ICP": 11.9,
    "AAVE": 232.8, "MKR": 1620.0, "INJ": 28.4, "SUI": 3.6, "SEI": 0.55, "TIA": 6.2,
    "RUNE": 5.4, "GRT": 0.27, "SAND": 0.55, "MANA": 0.5, "AXS": 6.9, "CRV": 0.74,
    "LDO": 1.62, "SNX": 2.3, "COMP": 68.2, "SUSHI": 1.1, "YFI": 7400.0, "1INCH": 0.36,
    "PEPE": 0.0000198, "SHIB": 0.0000245, "WIF": 3.1, "BONK": 0.0000452, "JUP": 1.08,
    "PYTH": 0.41, "ENA": 0.62, "ONDO": 0.98, "HBAR": 0.11, "VET": 0.042, "ALGO": 0.31,
    "USDC": 1.0, "USDT": 1.0, "DAI": 1.0, "WBTC": 87090.0, "STETH": 3118.0,
}
EQUITIES: Final[dict[str, float]] = {
    "AAPL": 229.87, "MSFT": 417.0, "GOOGL": 168.9, "AMZN": 197.1, "META": 559.1,
    "NVDA": 141.9, "TSLA": 352.6, "BRK.B": 475.2, "JPM": 247.3, "V": 311.2,
    "UNH": 597.4, "XOM": 121.8, "JNJ": 155.9, "WMT": 90.3, "MA": 520.7, "PG": 173.2,
    "HD": 414.6, "CVX": 161.4, "LLY": 768.9, "ABBV": 172.9, "MRK": 99.8, "KO": 63.5,
    "PEP": 161.2, "AVGO": 163.3, "COST": 947.1, "ADBE": 520.4, "CSCO": 58.9,
    "CRM": 338.7, "NFLX": 897.8, "AMD": 138.7, "INTC": 24.1, "ORCL": 190.2,
    "TMO": 519.4, "ABT": 118.5, "DIS": 115.9, "NKE": 77.6, "MCD": 296.2, "BA": 153.9,
    "IBM": 222.4, "QCOM": 159.2, "TXN": 201.3, "GS": 594.3, "MS": 131.5, "CAT": 397.2,
    "GE": 181.9, "UBER": 71.3, "PYPL": 86.9, "SBUX": 99.4, "PFE": 25.6, "T": 22.9,
    "VZ": 43.8, "BAC": 46.9, "C": 70.1, "SPY": 595.5, "QQQ": 505.8,
}


def default_tickers() -> list[str]:
    return [f"{b}/USD" for b in TICKERS]


def default_equities() -> list[str]:
    return list(EQUITIES)


def normalize_symbol(value: str) -> str:
    return value.strip().upper()


@dataclass
class Quote:
    price: float
    volume: float
    cex_share: float
    tvl: float


class Universe:
    """The quotes of every symbol the simulator serves, by feed (``tickers`` and
    ``equities``: symbol -> :class:`Quote`, in the order given), moved by :meth:`step`
    and drawn from ``rng`` (a seeded ``random.Random`` makes the whole feed repeatable).
    ``None`` for a feed: the built-in universe (:func:`default_tickers`,
    :func:`default_equities`); a symbol without a known price starts at a random one."""

    def __init__(self, rng: random.Random, tickers: Iterable[str] | None,
                 equities: Iterable[str] | None) -> None:
        self.rng = rng
        self.tickers = self._quotes(tickers, default_tickers(), TICKERS, ticker=True)
        self.equities = self._quotes(equities, default_equities(), EQUITIES, ticker=False)

    def _quotes(
        self, chosen: Iterable[str] | None, default: list[str], prices: dict[str, float],
        ticker: bool,
    ) -> dict[str, Quote]:
        out = {}
        for sym in (normalize_symbol(s) for s in (chosen if chosen is not None else default)):
            base = sym.split("/")[0] if ticker else sym
            start = prices.get(base, self.rng.uniform(1, 500))
            out[sym] = Quote(
                price=start,
                volume=self.rng.uniform(1e6, 5e9),
                cex_share=self.rng.uniform(0.6, 0.95),
                tvl=self.rng.uniform(1e6, 1e9),
            )
        return out

    def of(self, ticker: bool) -> dict[str, Quote]:
        """The quotes of one feed."""
        return self.tickers if ticker else self.equities

    def step(self, interval: float) -> None:
        """Move every quote by one update of ``interval`` seconds."""
        dt = max(interval, 0.001)
        rng = self.rng
        for q in (*self.tickers.values(), *self.equities.values()):
            q.price *= math.exp(rng.gauss(0.0, 0.0008 * math.sqrt(dt)))
            q.volume *= math.exp(rng.gauss(0.0, 0.002 * math.sqrt(dt)))
            q.tvl *= math.exp(rng.gauss(0.0, 0.001 * math.sqrt(dt)))

    def ticker_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        """The ``new_token_states`` record of ``symbol`` now."""
        q = self.tickers[symbol]
        spread = 1.0 + self.rng.uniform(-0.0004, 0.0004)
        return {
            "id": symbol,
            "aggregated": {"price": round(q.price, 10), "h24UsdVolume": round(q.volume, 2)},
            "cex": {"price": round(q.price * spread, 10),
                    "h24UsdVolume": round(q.volume * q.cex_share, 2)},
            "dex": {"price": round(q.price / spread, 10),
                    "h24UsdVolume": round(q.volume * (1 - q.cex_share), 2),
                    "usdTvl": round(q.tvl, 2)},
            "sentTimestampMs": sent_ms,
        }

    def equity_state(self, symbol: str, sent_ms: int) -> dict[str, Any]:
        """The ``new_equity_states`` record of ``symbol`` now."""
        return {"sentTimestampMs": sent_ms, "symbol": symbol,
                "price": round(self.equities[symbol].price, 4)}


__all__ = [
    "EQUITIES",
    "TICKERS",
    "Quote",
    "Universe",
    "default_equities",
    "default_tickers",
    "normalize_symbol",
]
