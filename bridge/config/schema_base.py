"""The ground of the configuration schema (:mod:`bridge.config.schema`): the error a
configuration is refused with, the rule of an API key, and the strict base model every
section derives from.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``path: message`` per problem."""

    def __init__(self, problems: Iterable[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        body = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{body}")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key, or ``None``: a key is one line without
    whitespace or control characters. The message never quotes the key."""
    for i, ch in enumerate(key, 1):
        if ch.isspace() or unicodedata.category(ch).startswith("C"):
            return ("the key must be one line without whitespace or control characters "
                    f"(found one at character {i})")
    return None


class _Model(BaseModel):
    # ``.inf`` / ``.nan`` are never a meaningful timeout, interval or size
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


__all__ = ["ConfigError", "key_problem"]
