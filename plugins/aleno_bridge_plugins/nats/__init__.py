"""``nats``: publish every envelope to a NATS subject, core NATS or JetStream (nats-py).

Delivery guarantee
------------------
``publish(batch)`` returns only once the server accepted every message of the batch:

- core NATS (``jetstream: false``, the default): the messages are written, then a
  PING/PONG round trip (``flush``) proves the server read all of them; a publish
  permission violation the server reports for this batch makes it fail. Core NATS
  then delivers to the subscribers connected at that moment (at most once beyond
  the server: a subscriber that is away misses the message).
- JetStream (``jetstream: true``): every message gets its own publish ack from the
  stream (publishes are pipelined, at most ``max_inflight`` awaiting their ack). Each
  message carries ``Nats-Msg-Id`` = the envelope id, so a batch the core retries after
  a failure, or another replica of the bridge, is stored once per id within the
  stream's ``duplicate_window``: at-least-once publishing, effectively once in the
  stream.

Reconnection is owned by the core's runner, not by nats-py: the client is created with
``allow_reconnect=False``. nats-py's own reconnection would buffer publishes in its
pending buffer while disconnected (so "published" would not mean "accepted"), raise
``OutboundBufferLimitError`` once 2 MiB are pending, and with its default
``max_reconnect_attempts=60`` close the client for good after about two minutes of
outage. Here a lost connection makes ``publish`` fail at once (retriable); the runner
keeps the batch, calls ``close()`` then ``connect()`` with capped backoff, forever.
Pings every ``ping_interval_s`` (nats-py's default is 120 s) detect a dead link.

Subjects
--------
A placeholder value is made safe by :meth:`NatsSink.safe_token`: ``.``, whitespace,
``*``, ``>`` and control characters become ``_`` (``BRK.B`` -> ``BRK_B``), so a symbol
can never add a token or a wildcard to the subject. ``/`` is kept (``BTC/USD``).
:meth:`NatsSink.check_topic` refuses a rendered subject with an empty token (leading,
trailing or double dot), whitespace or control characters, or a wildcard.

Formats
-------
``cloudevents-json``
    body = the envelope, header ``content-type: application/cloudevents+json``.
``cloudevents-binary``
    body = ``data``, header ``content-type: application/json`` and one ``ce-<name>``
    header per CloudEvents attribute (NATS protocol binding: ``ce-specversion``,
    ``ce-id``, ``ce-source``, ``ce-type``, ``ce-subject``, ``ce-time``).
``raw``
    body = the upstream record, header ``content-type: application/json``.

In every format the route's key travels in the header named by ``key_header``
(``aleno-key``; NATS has no message key) and, with JetStream, ``Nats-Msg-Id`` is set.

The driver in two modules: :mod:`.options` (the options and the stream settings, no
I/O) and :mod:`.sink` (the nats-py client: connecting, publishing, closing).
"""

from __future__ import annotations

from .options import NatsOptions, StreamOptions
from .sink import (
    CLOSE_TIMEOUT_S,
    JS_MESSAGE_TOO_LARGE,
    JS_STREAM_NAME_IN_USE,
    JS_SUBJECTS_OVERLAP,
    NatsSink,
    log,
    stream_config,
)

__all__ = [
    "CLOSE_TIMEOUT_S",
    "JS_MESSAGE_TOO_LARGE",
    "JS_STREAM_NAME_IN_USE",
    "JS_SUBJECTS_OVERLAP",
    "NatsOptions",
    "NatsSink",
    "StreamOptions",
    "log",
    "stream_config",
]
