"""The kinds of price events, defined once: their names, the upstream's Socket.IO event
for each, and the CloudEvents ``type`` of each event the bridge publishes."""

from __future__ import annotations

from typing import Final, Literal

#: the price feeds, in the order every listing uses (snapshots, metrics, subscriptions)
PRICE_KINDS: Final = ("ticker", "equity")
PriceKind = Literal["ticker", "equity"]

#: the upstream's Socket.IO event carrying each kind's updates
TICKER_EVENT: Final = "new_token_states"
EQUITY_EVENT: Final = "new_equity_states"
EVENT_OF_KIND: Final = {"ticker": TICKER_EVENT, "equity": EQUITY_EVENT}
KIND_OF_EVENT: Final = {TICKER_EVENT: "ticker", EQUITY_EVENT: "equity"}

#: the kind of the OHLC bars built from the prices (:mod:`bridge.pipeline.bars`); like
#: status events, routed only by routes that ask for it (``match: {kind: bar}``)
BAR_KIND: Final = "bar"

#: the CloudEvents ``type`` of each kind of event the bridge publishes
TYPES: Final = {"ticker": "ai.aleno.ticker.v1", "equity": "ai.aleno.equity.v1",
                "status": "ai.aleno.status.v1", BAR_KIND: "ai.aleno.bar.v1"}
