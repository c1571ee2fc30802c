"""An Aleno-compatible pricing server: the development target, the test double and
the engine of ``aleno-bridge demo``.

It speaks the Aleno WebSocket V1 protocol over Socket.IO (path ``/v1/socket``):

- API key in the CONNECT packet (``auth: {apiKey}``) or the ``x-api-key`` handshake
  header; a missing or unknown key is refused with ``connect_error`` message
  ``Missing or invalid API key.``
- ``subscribe_ticker`` / ``unsubscribe_ticker`` / ``subscribe_equity`` /
  ``unsubscribe_equity`` with an array of symbols, each acknowledged with
  ``{status, involvedSubscriptions, subscriptionsAfterUpdate, rejectedSubscriptions?,
  error?}``. Symbols are trimmed and upper-cased; unknown symbols are rejected.
- ``new_token_states`` / ``new_equity_states`` arrays every ``interval`` seconds, each
  record stamped with ``sentTimestampMs``; prices follow a geometric random walk.

Choices where the upstream documentation is silent (documented in docs/simulator.md):
the subscription limit is per API key ("per-key feed limit"): it counts the distinct
tickers and equities of all that key's open connections together; a request
that would pass the limit is refused whole (``error``, nothing changes); a request whose
every symbol is unsupported is ``error``; a payload that is not an array of strings or
holds more than ``MAX_SYMBOLS_PER_REQUEST`` entries is ``error``; unsubscribing an
unsupported symbol rejects it (``partial``); unknown events are ignored.

Test hooks (Python, and over HTTP under ``/admin/`` when ``admin=True``) pause single
symbols, drop a number of updates and record their sent times, and disconnect the
clients of one key, so that a consumer's status events (``down``/``stale``/``gap``) and
live subscriptions can be tested end to end. The admin API never shows a key: it names
each by :func:`fingerprint`.
"""

from __future__ import annotations

from bridge.simulator.protocol import (
    BAD_PAYLOAD,
    KINDS,
    LIMIT_REACHED,
    MAX_SYMBOL_LEN,
    MAX_SYMBOLS_PER_REQUEST,
    NONE_SUPPORTED,
    REFUSED,
    TOO_MANY,
    Kind,
    fingerprint,
)
from bridge.simulator.protocol import Client as _Client
from bridge.simulator.protocol import check_kind as _kind
from bridge.simulator.server import Simulator, log
from bridge.simulator.universe import (
    EQUITIES,
    TICKERS,
    default_equities,
    default_tickers,
    normalize_symbol,
)
from bridge.simulator.universe import Quote as _Quote

__all__ = [
    "BAD_PAYLOAD",
    "EQUITIES",
    "KINDS",
    "LIMIT_REACHED",
    "MAX_SYMBOLS_PER_REQUEST",
    "MAX_SYMBOL_LEN",
    "NONE_SUPPORTED",
    "REFUSED",
    "TICKERS",
    "TOO_MANY",
    "Kind",
    "Simulator",
    "_Client",
    "_Quote",
    "_kind",
    "default_equities",
    "default_tickers",
    "fingerprint",
    "log",
    "normalize_symbol",
]
