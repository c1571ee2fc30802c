"""Capped exponential backoff with full jitter, reset after a success."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` draws a delay uniformly from ``[initial/2, min(cap, initial * 2**n)]``.

    Full jitter spreads the reconnects of many bridges after a shared outage (the
    floor of half the first delay keeps a flapping bus from being hammered); the cap
    bounds the wait; :meth:`reset` after a success starts again from ``initial``.
    """

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)
        self.attempts = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.max_s, self.initial_s * 2.0 ** min(self.attempts, 32))

    def next(self) -> float:
        delay: float = self._rng.uniform(self.initial_s / 2, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
