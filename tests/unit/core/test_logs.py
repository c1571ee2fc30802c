"""Log redaction: a redactor per owner, every part of a record, and JSON lines."""

from __future__ import annotations

import io
import logging

import orjson

from bridge.core.logs import JsonFormatter, RedactingFilter, Redactor

SECRET = "s3cret-api-key"


def test_a_redactor_hides_its_secrets_and_ignores_short_values() -> None:
    redact = Redactor([SECRET, "abc", ""])
    assert redact(f"key={SECRET}; abc stays") == "key=***; abc stays"
    assert bool(redact) and not Redactor()
    redact.add(["token-1234"])
    assert redact("token-1234 and " + SECRET) == "*** and ***"
    assert SECRET not in repr(redact)


def test_redactors_are_independent() -> None:
    a, b = Redactor([SECRET]), Redactor()
    assert a(SECRET) == "***" and b(SECRET) == SECRET


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("aleno_bridge.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_the_filter_redacts_message_arguments_extras_and_tracebacks() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(Redactor([SECRET])))
    handler.setFormatter(logging.Formatter("%(message)s %(detail)s"))
    logger = _logger(handler)
    try:
        raise ValueError(f"refused {SECRET}")
    except ValueError:
        logger.exception("connect with %s", SECRET, extra={"detail": f"k={SECRET}"})
    text = out.getvalue()
    assert SECRET not in text
    assert "connect with *** k=***" in text and "refused ***" in text


def test_json_lines_are_redacted_too() -> None:
    out = io.StringIO()
    redactor = Redactor([SECRET])
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(JsonFormatter(redactor))
    _logger(handler).warning("up", extra={"url": f"http://x/?k={SECRET}", "n": 3})
    line = orjson.loads(out.getvalue())
    assert line["msg"] == "up" and line["n"] == 3 and line["url"] == "http://x/?k=***"
    assert line["logger"] == "aleno_bridge.test_logs" and line["level"] == "warning"
