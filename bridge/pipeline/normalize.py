"""Wire records -> validated :class:`~bridge.core.envelope.Event`.

Nothing from the wire can raise out of here: a record that fails validation is
dropped and counted by reason (``Normalizer.invalid``), and the first record of each
reason is logged once with a sample. ``tests/unit/pipeline/test_normalize.py`` proves it with
hypothesis over arbitrary JSON.

Time sanity: a send time is checked against this host's clock at receipt, not only
against the years a send time can have. A record stamped further in the future than
``source.max_clock_skew_s`` (``clock_skew``) or sent longer ago than
``source.max_record_age_s`` (``too_old``) is dropped like any invalid record. One record
stamped ten years ahead would otherwise become the symbol's last value until 2036 (every
good update after it is older), block every ``min_interval_s`` route of the symbol, and
make a ``gap`` of 630 million missed updates; one from the year 2000 would add some
800 million seconds to the lag histogram. If *every* record is dropped so, the host's clock
is wrong (the log line says so): keep it synchronized (NTP).

A ``new_token_states`` payload is an array of Aleno ``Ticker`` states::

    [{"id": "BTC/USD",
      "aggregated": {"price": 87107.08, "h24UsdVolume": 41234567890.5},
      "cex": {"price": 87110.2, "h24UsdVolume": 35123456789.1},
      "dex": {"price": 87098.7, "h24UsdVolume": 6111111101.4, "usdTvl": 912345678.9},
      "sentTimestampMs": 1732480000000}]

A ``new_equity_states`` payload is an array of::

    [{"sentTimestampMs": 1732480000000, "symbol": "AAPL", "price": 229.87}]
"""

from __future__ import annotations

import logging
import math
import re
import reprlib
import time
from collections.abc import Callable, Container
from typing import Any, Final

from bridge.core.envelope import DEFAULT_SOURCE, Event, install_raw_decoder, iso_time
from bridge.core.state import NormalizerSnapshot, frozen_counts

log = logging.getLogger("aleno_bridge.normalize")


#: symbols longer than this are not prices, they are garbage or an attack
MAX_SYMBOL_LEN: Final = 64
#: 2000-01-01 .. 2200-01-01 in ms: anything else is not a real send time
_MIN_TS: Final = 946_684_800_000
_MAX_TS: Final = 7_258_118_400_000

_isfinite = math.isfinite
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*@")
_sample_repr = reprlib.Repr()
_sample_repr.maxlevel = 4
_sample_repr.maxstring = 120
_sample_repr.maxother = 120
_sample_repr.maxlist = _sample_repr.maxdict = 8


def _sample(record: Any) -> str:
    """A bounded, never-raising sample of a record for a log line."""
    try:
        text = record if isinstance(record, str) else _sample_repr.repr(record)
    except Exception as exc:  # a hostile __repr__ or a nesting beyond the limit
        text = f"<{type(record).__name__}: unprintable ({type(exc).__name__})>"
    return text if len(text) <= 300 else text[:300] + "..."


class Invalid(Exception):
    """A record failed validation; ``reason`` is the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _number(value: Any, reason_prefix: str) -> float:
    t = type(value)
    if t is float:
        if not _isfinite(value):
            raise Invalid(f"non_finite_{reason_prefix}")
        return value  # type: ignore[no-any-return]
    if t is int:
        return float(value)
    if value is None:
        raise Invalid(f"missing_{reason_prefix}")
    raise Invalid(f"non_numeric_{reason_prefix}")


def _optional_number(value: Any) -> float | None:
    if value is None:
        return None
    t = type(value)
    if t is float:
        if not _isfinite(value):
            raise Invalid("non_finite_field")
        return value  # type: ignore[no-any-return]
    if t is int:
        return float(value)
    raise Invalid("bad_field_type")


def _timestamp(value: Any) -> int:
    t = type(value)
    if t is int:
        ts: int = value
    elif t is float and _isfinite(value) and value == int(value):
        ts = int(value)
    elif value is None:
        raise Invalid("missing_timestamp")
    else:
        raise Invalid("bad_timestamp")
    if not _MIN_TS <= ts <= _MAX_TS:
        raise Invalid("bad_timestamp")
    return ts


def _symbol(value: Any) -> str:
    if type(value) is not str:
        raise Invalid("missing_symbol" if value is None else "bad_symbol")
    symbol = value.strip().upper()
    if not symbol:
        raise Invalid("missing_symbol")
    if len(symbol) > MAX_SYMBOL_LEN or not symbol.isprintable():
        raise Invalid("bad_symbol")
    return symbol


def _venue(value: Any, tvl: bool) -> dict[str, float | None] | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise Invalid("bad_field_type")
    out = {
        "price": _optional_number(value.get("price")),
        "h24UsdVolume": _optional_number(value.get("h24UsdVolume")),
    }
    if tvl:
        out["usdTvl"] = _optional_number(value.get("usdTvl"))
    return out


class Normalizer:
    """Turns decoded payloads into events and counts what it drops.

    ``source`` is the envelope's CloudEvents ``source`` (the upstream URL and path;
    credentials in it are stripped); ``clock`` returns the receive time in ms
    (injectable for tests).

    ``allowed`` (per call) is the set of symbols subscribed for that kind: a record of
    any other symbol is dropped as ``unsubscribed`` (an upstream cannot make the bridge
    republish, or cache routes for, symbols nobody asked for). ``None`` accepts all.

    ``max_clock_skew_s`` / ``max_record_age_s``: the time sanity bounds (see the
    module), applied by :meth:`validate` and the batch methods against the receive
    time; ``None`` (the default, for tools and tests that replay old records) checks
    only that the send time is between the years 2000 and 2200. The bridge passes
    ``source.max_clock_skew_s`` and ``source.max_record_age_s``.
    """

    def __init__(
        self,
        source: str = DEFAULT_SOURCE,
        clock: Callable[[], int] | None = None,
        *,
        max_clock_skew_s: float | None = None,
        max_record_age_s: float | None = None,
    ) -> None:
        self.source = _USERINFO.sub(r"\1", source)
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self.set_time_bounds(max_clock_skew_s, max_record_age_s)
        self.invalid: dict[str, int] = {}
        self.received: dict[str, int] = {"ticker": 0, "equity": 0}
        self._logged: set[str] = set()
        self._symbols: dict[str, tuple[str, str, str]] = {}

    def set_time_bounds(self, max_clock_skew_s: float | None,
                        max_record_age_s: float | None) -> None:
        """The time sanity bounds (``None``: that side is not checked)."""
        self.max_clock_skew_s = max_clock_skew_s
        self.max_record_age_s = max_record_age_s
        self._skew_ms = _MAX_TS if max_clock_skew_s is None else int(max_clock_skew_s * 1000)
        self._age_ms = _MAX_TS if max_record_age_s is None else int(max_record_age_s * 1000)

    def timely(self, sent_ms: int, received_ms: int) -> bool:
        """``sent_ms`` is within the time sanity bounds of ``received_ms`` (the lag of
        a record that is not would only mislead the lag histogram)."""
        return -self._age_ms <= sent_ms - received_ms <= self._skew_ms

    def reject(self, kind: str, reason: str, record: Any, hint: str = "") -> None:
        """Count (and log once per reason) a record or packet dropped as invalid;
        ``hint``, when given, is added to the log line (what to check)."""
        key = f"{kind}:{reason}"
        self.invalid[key] = self.invalid.get(key, 0) + 1
        if key not in self._logged:
            self._logged.add(key)
            sample = _sample(record)
            log.warning(
                "dropped an invalid %s record (%s%s); later ones with this reason are only "
                "counted. sample: %s",
                kind, reason, f": {hint}" if hint else "", sample,
                extra={"kind": kind, "reason": reason},
            )

    def _untimely(self, kind: str, record: Any, sent: int, received: int) -> None:
        ahead = sent - received
        if ahead > 0:
            reason = "clock_skew"
            hint = "" if f"{kind}:{reason}" in self._logged else (
                f"sentTimestampMs is {ahead / 1000:,.1f}s ahead of this host's clock, more "
                f"than source.max_clock_skew_s ({self.max_clock_skew_s:g}s); if every "
                "record is dropped so, this host's clock is behind: check its time sync")
        else:
            reason = "too_old"
            hint = "" if f"{kind}:{reason}" in self._logged else (
                f"sent {-ahead / 1000:,.1f}s before it arrived, longer ago than "
                f"source.max_record_age_s ({self.max_record_age_s:g}s); if every record "
                "is dropped so, this host's clock is ahead: check its time sync")
        self.reject(kind, reason, record, hint)

    def snapshot(self) -> NormalizerSnapshot:
        """Records received and dropped so far, for operator code."""
        invalid: dict[tuple[str, str], int] = {}
        for key, n in self.invalid.items():
            kind, _, reason = key.partition(":")
            invalid[(kind, reason)] = n
        return NormalizerSnapshot(frozen_counts(self.received), frozen_counts(invalid))

    def tickers(self, payload: Any, allowed: Container[str] | None = None) -> list[Event]:
        """Events of a ``new_token_states`` payload; invalid records are dropped."""
        return self._batch("ticker", payload, self.ticker, allowed)

    def equities(self, payload: Any, allowed: Container[str] | None = None) -> list[Event]:
        """Events of a ``new_equity_states`` payload; invalid records are dropped."""
        return self._batch("equity", payload, self.equity, allowed)

    def _batch(
        self, kind: str, payload: Any, one: Callable[[Any, int, Container[str] | None], Event],
        allowed: Container[str] | None,
    ) -> list[Event]:
        records = self.records(kind, payload)
        if records is None:
            return []
        return self._validate(kind, records, one, allowed, self._clock())

    def now_ms(self) -> int:
        """The receive time, in ms, as events get it (``receivedTimestampMs``)."""
        return self._clock()

    def records(self, kind: str, payload: Any) -> list[Any] | None:
        """The records of one upstream payload, counted as received, without validating
        them (``None``, counted as invalid, when the payload is not an array).

        The bridge calls this in the receive loop and :meth:`validate` later, so that a
        payload shed under overload costs no validation (see :mod:`bridge.app`)."""
        if type(payload) is not list:
            # a single object instead of an array is tolerated; anything else is not
            if type(payload) is dict:
                payload = [payload]
            else:
                self.reject(kind, "not_an_array", payload)
                return None
        records: list[Any] = payload
        self.received[kind] += len(records)
        return records

    def validate(self, kind: str, records: list[Any], received_ms: int,
                 allowed: Container[str] | None = None) -> list[Event]:
        """Events of ``records`` (returned by :meth:`records`), received at
        ``received_ms``; invalid records are dropped and counted."""
        one = self.ticker if kind == "ticker" else self.equity
        return self._validate(kind, records, one, allowed, received_ms)

    def _validate(
        self, kind: str, records: list[Any],
        one: Callable[[Any, int, Container[str] | None], Event],
        allowed: Container[str] | None, received: int,
    ) -> list[Event]:
        events = []
        # the time sanity bounds of this batch (see the module)
        latest = received + self._skew_ms
        earliest = received - self._age_ms
        for record in records:
            try:
                ev = one(record, received, allowed)
            except Invalid as exc:
                self.reject(kind, exc.reason, record)
            except Exception as exc:  # defence in depth: nothing from the wire escapes
                self.reject(kind, f"unexpected_{type(exc).__name__}", record)
            else:
                sent = ev.sent_ms
                if sent > latest or sent < earliest:
                    self._untimely(kind, record, sent, received)
                else:
                    events.append(ev)
        return events

    def _ticker_symbol(self, raw: Any, allowed: Container[str] | None) -> tuple[str, str, str]:
        cached = self._symbols.get(raw) if type(raw) is str else None
        if cached is not None:
            if allowed is not None and cached[0] not in allowed:
                raise Invalid("unsubscribed")
            return cached
        symbol = _symbol(raw)
        base, sep, quote = symbol.partition("/")
        if not sep or not base or not quote or "/" in quote:
            raise Invalid("bad_symbol")
        if allowed is not None and symbol not in allowed:
            raise Invalid("unsubscribed")
        if len(self._symbols) < 100_000:
            self._symbols[raw] = (symbol, base, quote)
        return symbol, base, quote

    def ticker(self, record: Any, received_ms: int,
               allowed: Container[str] | None = None) -> Event:
        if type(record) is not dict:
            raise Invalid("not_an_object")
        symbol, base, quote = self._ticker_symbol(record.get("id"), allowed)
        agg = record.get("aggregated")
        cex = record.get("cex")
        dex = record.get("dex")
        sent = record.get("sentTimestampMs")
        # fast path for the common record (every number a float, both venues present);
        # anything else takes the field-by-field path below, which names the reason
        if type(agg) is dict and type(cex) is dict and type(dex) is dict and type(sent) is int:
            p, av = agg.get("price"), agg.get("h24UsdVolume")
            cp, cv = cex.get("price"), cex.get("h24UsdVolume")
            dp, dv, dt = dex.get("price"), dex.get("h24UsdVolume"), dex.get("usdTvl")
            if (
                type(p) is float and type(av) is float and type(cp) is float
                and type(cv) is float and type(dp) is float and type(dv) is float
                and type(dt) is float and p > 0.0 and _MIN_TS <= sent <= _MAX_TS
            ):
                total = p + av + cp + cv + dp + dv + dt
                if total - total == 0.0:  # all finite (inf/nan make this nan)
                    # the wire's own venue dicts are reused when they hold exactly the
                    # validated keys (nothing else can leak into the envelope)
                    data = {
                        "kind": "ticker", "symbol": symbol, "base": base, "quote": quote,
                        "price": p, "sentTimestampMs": sent, "receivedTimestampMs": received_ms,
                        "aggregated": agg if len(agg) == 2 else {"price": p, "h24UsdVolume": av},
                        "cex": cex if len(cex) == 2 else {"price": cp, "h24UsdVolume": cv},
                        "dex": dex if len(dex) == 3 else {"price": dp, "h24UsdVolume": dv,
                                                          "usdTvl": dt},
                    }
                    return Event("ticker", symbol, base, quote, sent, received_ms,
                                 iso_time(sent), data, record, (p, cp, dp), self.source)
        if type(agg) is not dict:
            raise Invalid("missing_price" if agg is None else "bad_field_type")
        price = _number(agg.get("price"), "price")
        if price <= 0:
            raise Invalid("non_positive_price")
        sent = _timestamp(record.get("sentTimestampMs"))
        aggregated = {"price": price, "h24UsdVolume": _optional_number(agg.get("h24UsdVolume"))}
        cex = _venue(record.get("cex"), False)
        dex = _venue(record.get("dex"), True)
        data = {
            "kind": "ticker",
            "symbol": symbol,
            "base": base,
            "quote": quote,
            "price": price,
            "sentTimestampMs": sent,
            "receivedTimestampMs": received_ms,
            "aggregated": aggregated,
            "cex": cex,
            "dex": dex,
        }
        prices = (price, cex["price"] if cex else None, dex["price"] if dex else None)
        return Event(
            "ticker", symbol, base, quote, sent, received_ms, iso_time(sent), data, record,
            prices, self.source,
        )

    def equity(self, record: Any, received_ms: int,
               allowed: Container[str] | None = None) -> Event:
        if type(record) is not dict:
            raise Invalid("not_an_object")
        symbol = _symbol(record.get("symbol"))
        if allowed is not None and symbol not in allowed:
            raise Invalid("unsubscribed")
        price = _number(record.get("price"), "price")
        if price <= 0:
            raise Invalid("non_positive_price")
        sent = _timestamp(record.get("sentTimestampMs"))
        data = {
            "kind": "equity",
            "symbol": symbol,
            "price": price,
            "sentTimestampMs": sent,
            "receivedTimestampMs": received_ms,
        }
        return Event(
            "equity", symbol, symbol, "", sent, received_ms, iso_time(sent), data, record,
            (price,), self.source,
        )


def _data_of_raw(kind: str, record: Any, received_ms: int, source: str) -> dict[str, Any]:
    """The ``data`` member a record of ``kind`` normalizes to (for raw-format headers)."""
    norm = Normalizer(source=source)
    one = norm.ticker if kind == "ticker" else norm.equity
    return one(record, received_ms).data


install_raw_decoder(_data_of_raw)
