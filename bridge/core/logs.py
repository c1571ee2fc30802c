"""Logging: structured JSON when stderr is not a terminal, readable lines when it is,
and every known secret redacted from every record.

A :class:`Redactor` holds the secret values to hide. Log records are redacted by the
process's :data:`LOG_REDACTOR`, whose secrets are registered once the configuration is
loaded (``setup(..., secrets=...)`` or :func:`add_secrets`); the redaction runs in a
handler filter, so it covers our loggers and third-party ones alike, messages,
arguments, extras and tracebacks. A bridge redacts what it shows (``/readyz``) with its
own redactor, built from its settings. The Socket.IO / Engine.IO packet loggers (which
print the CONNECT ``auth`` payload, i.e. the API key) are pinned to WARNING whatever
the level. The bus libraries' loggers are not named here: each sink driver declares
its own (``Sink.quiet_loggers``) and the configured drivers' ones are quieted through
:func:`quiet`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson

REDACTED: Final = "***"

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
#: the core's own noisy libraries (its Socket.IO source and server, plugin discovery);
#: drivers declare theirs in ``Sink.quiet_loggers``
QUIET_LOGGERS: Final = ("socketio", "engineio", "socketio.client", "engineio.client",
                        "socketio.server", "engineio.server", "aiohttp.access", "stevedore")

#: driver library loggers to quiet (:func:`quiet`), and the level of the last ``setup``
_driver_loggers: set[str] = set()
_level: list[int] = []


class Redactor:
    """Replaces every known secret value in a text with ``***``.

    Values shorter than 4 characters are not registered: a 1-3 character value would
    redact half the text and protect nothing.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self.add(secrets)

    def add(self, values: Iterable[str]) -> None:
        """Redact these values too from now on."""
        self._secrets.update(v for v in values if v and len(v) >= 4)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secret(s))"

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        return text


#: redacts every log record of this process (and the command line's error messages)
LOG_REDACTOR: Final = Redactor()


def add_secrets(values: Iterable[str]) -> None:
    """Redact these values from every log record from now on."""
    LOG_REDACTOR.add(values)


def redact(text: str) -> str:
    """``text`` with the secrets of :data:`LOG_REDACTOR` replaced."""
    return LOG_REDACTOR(text)


class RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments, extras and traceback in place."""

    def __init__(self, redactor: Redactor = LOG_REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        if not redact:
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
    """One JSON object per record; the whole line is redacted once more."""

    def __init__(self, redactor: Redactor = LOG_REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

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
        return self.redactor(orjson.dumps(out, default=str).decode())


def setup(level: str = "INFO", fmt: str = "auto", stream: Any = None,
          secrets: Iterable[str] = ()) -> None:
    """Log to ``stream`` (stderr) at ``level``, as JSON or text (``auto``: JSON unless
    a terminal), with ``secrets`` added to the values redacted from every record."""
    add_secrets(secrets)
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    use_json = fmt == "json" or (fmt == "auto" and not getattr(stream, "isatty", lambda: False)())
    if use_json:
        handler.setFormatter(JsonFormatter(LOG_REDACTOR))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               "%H:%M:%S"))
    handler.addFilter(RedactingFilter(LOG_REDACTOR))
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
    _level[:] = [logging.getLevelName(level)]
    _apply(_driver_loggers)


def quiet(names: Iterable[str]) -> None:
    """Quiet these client-library loggers of a configured sink driver
    (``Sink.quiet_loggers``): now if :func:`setup` ran, else when it runs.

    At DEBUG they log WARNING and above; at any other level only CRITICAL: a bus
    library logs every failed reconnect attempt, while the sink worker logs each
    state change of the sink once, with its cause.
    """
    new = set(names) - _driver_loggers
    _driver_loggers.update(new)
    _apply(new)


def _apply(names: Iterable[str]) -> None:
    if not _level:
        return
    level = logging.WARNING if _level[0] <= logging.DEBUG else logging.CRITICAL
    for name in names:
        logging.getLogger(name).setLevel(max(level, _level[0]))
