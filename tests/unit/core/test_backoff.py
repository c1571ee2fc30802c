"""The runtime backoff: capped, jittered, reset after a success."""

from __future__ import annotations

import random

from bridge.core.backoff import Backoff


def test_delays_grow_to_the_cap_and_stay_within_the_jitter_bounds() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(7))
    ceilings = []
    for _ in range(8):
        ceiling = b.ceiling()
        delay = b.next()
        assert 0.25 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert b.attempts == 8


def test_reset_starts_again_from_the_initial_delay() -> None:
    b = Backoff(1.0, 60.0, rng=random.Random(1))
    for _ in range(5):
        b.next()
    assert b.ceiling() == 32.0
    b.reset()
    assert b.attempts == 0
    assert b.ceiling() == 1.0


def test_a_cap_below_the_initial_delay_is_raised_to_it() -> None:
    b = Backoff(2.0, 0.5)
    assert b.max_s == 2.0
    assert all(1.0 <= b.next() <= 2.0 for _ in range(20))


def test_many_attempts_do_not_overflow() -> None:
    b = Backoff(0.1, 30.0, rng=random.Random(3))
    b.attempts = 10_000
    assert b.ceiling() == 30.0
    assert 0.05 <= b.next() <= 30.0


def test_the_jitter_is_spread_not_fixed() -> None:
    b = Backoff(1.0, 1000.0, rng=random.Random(42))
    b.attempts = 6
    draws = set()
    for _ in range(20):
        draws.add(round(b.next(), 6))
        b.attempts = 6
    assert len(draws) > 10
