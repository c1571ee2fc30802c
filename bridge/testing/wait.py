"""Poll until a condition holds: the one wait helper of the test suites.

Tests of an asynchronous system wait for an effect (a message arrived, a sink
reconnected, a counter moved) instead of sleeping a fixed time. These helpers poll
``cond()`` and fail with an :class:`AssertionError` naming ``what`` and the time limit
when it does not hold in time, so a failure reads like an assertion of the test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def _timed_out(what: str, timeout: float) -> AssertionError:
    return AssertionError(f"{what}: not within {timeout}s")


async def wait_until(
    cond: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.02,
    task: asyncio.Future[Any] | None = None,
) -> float:
    """Poll ``cond()`` every ``interval`` seconds until it is true; return the seconds
    it took.

    Raises :class:`AssertionError` after ``timeout`` seconds. When ``task`` is given
    (the bridge or source under test) and it fails first, its exception is raised at
    once instead of a timeout that would hide it.
    """
    start = time.monotonic()
    while not cond():
        if task is not None and task.done():
            task.result()
        if time.monotonic() - start > timeout:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)
    return time.monotonic() - start


def wait_until_sync(
    cond: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
) -> float:
    """:func:`wait_until` for code without an event loop (processes, threads): polls
    with :func:`time.sleep`; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise _timed_out(what, timeout)
        time.sleep(interval)
    return time.monotonic() - start
