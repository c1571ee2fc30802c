"""Logging: structured JSON when stderr is not a terminal, readable lines when it is,
and every known secret redacted from every record.

Secrets are registered once the configuration is loaded (:func:`add_secrets`); the
redaction runs in a handler filter, so it covers our loggers and third-party ones
alike, messages, arguments, extras and tracebacks. The Socket.IO / Engine.IO packet
loggers (which print the CONNECT ``auth`` payload, i.e. the API key) are pinned to
WARNING whatever the level.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson

REDACTED: Final = "***"
_secrets: set[str] = set()

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
QUIET_LOGGERS: Final = ("socketio", "engineio", "socketio.client", "engineio.client",
                        "socketio.server", "engineio.server", "aiokafka", "nats", "amqtt",
                        "aiohttp.access", "transitions", "stevedore")


def add_secrets(values: Iterable[str]) -> None:
    """Redact these values from every log record from now on (short ones excepted:
    a 1-3 character value would redact half the log and protect nothing)."""
    _secrets.update(v for v in values if v and len(v) >= 4)


def redact(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _secrets:
            return True
        msg = record.getMessage()
        record.msg = redact(msg)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for k, v in list(vars(record).items()):
            if k not in _STANDARD and isinstance(v, str):
                setattr(record, k, redact(v))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return redact(orjson.dumps(out, default=str).decode())


def setup(level: str = "INFO", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    use_json = fmt == "json" or (fmt == "auto" and not getattr(stream, "isatty", lambda: False)())
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # engine.io warns about every close handshake of a peer that goes away; the source
    # logs connection state changes itself, once, with the cause
    logging.getLogger("engineio.client").setLevel(logging.ERROR)
    if logging.getLevelName(level) > logging.DEBUG:
        # aiokafka logs every failed reconnect attempt at ERROR; the sink worker already
        # logs the sink's state changes once, with the cause
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
