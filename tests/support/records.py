"""What a pool hands to ``on_payload``, for tests that drive an ``UpstreamPool`` directly."""

from __future__ import annotations

import time
from typing import Any


class Records:
    """(kind, symbol) -> when a record of it last reached ``on_payload``."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def __call__(self, event: str, payload: Any) -> None:
        kind = "ticker" if event == "new_token_states" else "equity"
        now = time.monotonic()
        for rec in payload if isinstance(payload, list) else []:
            if isinstance(rec, dict):
                self.last[(kind, str(rec.get("id") if kind == "ticker" else rec.get("symbol")))] \
                    = now

    def since(self, t: float) -> set[tuple[str, str]]:
        return {k for k, at in self.last.items() if at >= t}


__all__ = ["Records"]
