"""``webhook``: POST every batch to an HTTP endpoint (an example third-party sink).

A batch becomes one POST per topic, topics in order of first appearance, messages in
batch order. The topic travels in the ``X-Aleno-Topic`` header; the body is a JSON array:

- ``cloudevents-json``: the envelopes, ``Content-Type: application/cloudevents-batch+json``
  (the batched content mode of the CloudEvents HTTP binding);
- ``raw``: the upstream records, ``Content-Type: application/json``.

``cloudevents-binary`` carries ONE event's attributes in HTTP headers, which means nothing
for a batch: the driver does not declare it, so the configuration refuses it.

``connect()`` checks that the endpoint accepts a TCP connection (it sends no request)
and creates the HTTP session. Delivery is at least once. A 2xx answer means the
endpoint took the request. A 5xx, 408 or 429 answer, a timeout or a connection error
is retriable: the core reconnects and sends the whole batch again (deduplicate on the
envelope ``id``). Any other answer is
permanent (:class:`~bridge.sinks.SinkRejectedError`): the batch is dropped and counted;
redirects are not followed, so a 3xx is permanent too. If a batch holds several topics
and a later POST fails, the earlier ones are sent again with the retried batch.

Topic rule: a topic is an HTTP header value, so :meth:`WebhookSink.safe_token` turns
every character outside visible ASCII (space, controls, non-ASCII) into ``_``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, SecretStr, field_validator

from bridge.sinks import Message, Sink, SinkConnectionError, SinkOptions, SinkRejectedError

TOPIC_HEADER = "X-Aleno-Topic"
#: per-message content type -> content type of the JSON array of such messages
BATCH_TYPES = {"application/cloudevents+json": "application/cloudevents-batch+json"}
RETRIABLE_STATUS = frozenset({408, 429})
_RESERVED = frozenset({"authorization", "content-type", TOPIC_HEADER.lower()})
_NOT_VISIBLE = re.compile(r"[^\x21-\x7e]")


class WebhookOptions(SinkOptions):
    """``url``: the http(s) endpoint; ``headers``: extra headers, shown in ``repr`` (not
    for secrets); ``auth_token``: sent as ``Authorization: Bearer ...``, never shown;
    ``timeout_s``: bound on each request, connect to answer; ``tls_verify``."""

    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    auth_token: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    tls_verify: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = "must be an http:// or https:// URL"
            raise ValueError(msg)
        if parts.username is not None or parts.password is not None:
            msg = "must not hold credentials: use auth_token"
            raise ValueError(msg)
        return v

    @field_validator("headers")
    @classmethod
    def _own_headers(cls, v: dict[str, str]) -> dict[str, str]:
        clash = sorted(k for k in v if k.lower() in _RESERVED)
        if clash:
            msg = f"{', '.join(clash)} set by the driver (a bearer token goes in auth_token)"
            raise ValueError(msg)
        if any(_NOT_VISIBLE.search(k) or "\r" in x or "\n" in x for k, x in v.items()):
            msg = "header names must be visible ASCII and values hold no line break"
            raise ValueError(msg)
        return v


class WebhookSink(Sink[WebhookOptions]):
    options_model = WebhookOptions
    formats = ("cloudevents-json", "raw")

    def __init__(self, name: str, options: WebhookOptions) -> None:
        super().__init__(name, options)
        self._session: aiohttp.ClientSession | None = None
        parts = urlsplit(options.url)
        self._origin = f"{parts.scheme}://{parts.netloc}"  # for errors: never the path

    @classmethod
    def safe_token(cls, value: str) -> str:
        """Every character outside visible ASCII (space, controls, non-ASCII) becomes ``_``."""
        return _NOT_VISIBLE.sub("_", value)

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        if not topic:
            return "the topic is empty"
        if _NOT_VISIBLE.search(topic):
            return "a topic is sent as an HTTP header: visible ASCII only, no spaces"
        return None

    async def connect(self) -> None:
        """Check that the endpoint accepts a TCP connection, then create the HTTP session.

        No request is sent (an endpoint may accept only POST), but an endpoint that is
        down fails here, so the core's backoff paces the retries while it stays down.
        """
        await self.close()
        await self._reachable()
        o = self.options
        headers = dict(o.headers)
        if o.auth_token is not None:
            headers["Authorization"] = f"Bearer {o.auth_token.get_secret_value()}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=o.timeout_s),
            connector=aiohttp.TCPConnector(ssl=o.tls_verify),
        )

    async def _reachable(self) -> None:
        parts = urlsplit(self.options.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port), self.options.timeout_s)
        except TimeoutError as exc:
            msg = f"{self._origin} did not accept a connection within {self.options.timeout_s}s"
            raise SinkConnectionError(self.name, msg) from exc
        except OSError as exc:
            msg = f"{self._origin} is unreachable: {type(exc).__name__}: {exc}"
            raise SinkConnectionError(self.name, msg) from exc
        writer.transport.abort()  # nothing was sent: no need for a polite close

    async def publish(self, batch: Sequence[Message]) -> None:
        by_topic: dict[str, list[Message]] = {}
        for m in batch:
            by_topic.setdefault(m.topic, []).append(m)
        # one POST per topic; a topic the endpoint refuses for good does not stop the
        # others: the refused messages are named so the core counts exactly those
        refused: list[Message] = []
        errors: list[str] = []
        for topic, msgs in by_topic.items():
            ctype = BATCH_TYPES.get(msgs[0].content_type, "application/json")
            try:
                await self._post(topic, b"[" + b",".join(m.body for m in msgs) + b"]", ctype)
            except SinkRejectedError as exc:
                refused.extend(msgs)
                errors.append(f"{topic}: {exc}")
        if refused:
            raise SinkRejectedError(self.name, "; ".join(errors), refused=refused)

    async def _post(self, topic: str, body: bytes, ctype: str) -> None:
        if self._session is None:
            raise SinkConnectionError(self.name, "not connected")
        headers = {"Content-Type": ctype, TOPIC_HEADER: topic}
        try:
            async with self._session.post(
                self.options.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()  # read to the end so the connection is kept alive
        except TimeoutError as exc:
            msg = f"{self._origin} did not answer within {self.options.timeout_s}s"
            raise SinkConnectionError(self.name, msg) from exc
        except aiohttp.ClientError as exc:
            msg = f"POST to {self._origin} failed: {type(exc).__name__}: {exc}"
            raise SinkConnectionError(self.name, msg) from exc
        if 200 <= resp.status < 300:
            return
        msg = f"{self._origin} answered {resp.status} {resp.reason or ''}".rstrip()
        if resp.status >= 500 or resp.status in RETRIABLE_STATUS:
            raise SinkConnectionError(self.name, msg)
        raise SinkRejectedError(self.name, msg)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.close(), 5.0)
