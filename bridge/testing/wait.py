"""Poll until a condition holds: the one wait helper of the test suites.

Tests of an asynchronous system wait for an effect (a message arrived, a sink
reconnected, a counter moved) instead of sleeping a fixed time. :func:`until` polls
``cond()`` and fails with an :class:`AssertionError` naming ``what`` and the time limit
when it does not hold in time, so a failure reads like an assertion of the test::

    from bridge.testing import until

    await until(lambda: len(server.posts) >= 3, 10, "three POSTs")
    await until(probe.has_everything, 10, "the probe saw the batch")  # async cond too
    await until(lambda: worker.stats.published == 10, 10, "ten published",
                detail=lambda: f"published {worker.stats.published}")

:func:`wait_until` is the same function under its earlier name; :func:`wait_until_sync`
is the variant for code without an event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def _timed_out(what: str, timeout: float,
               detail: Callable[[], object] | None = None) -> AssertionError:
    text = f"{what}: not within {timeout}s"
    if detail is not None:
        try:
            text += f" ({detail()})"
        except Exception as exc:  # the message must not hide the timeout
            text += f" (detail failed: {type(exc).__name__}: {exc})"
    return AssertionError(text)


async def until(
    cond: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.02,
    task: asyncio.Future[Any] | None = None,
    detail: Callable[[], object] | None = None,
) -> float:
    """Poll ``cond()`` every ``interval`` seconds until it is true; return the seconds
    it took.

    ``cond`` is a plain function or a coroutine function (its result is awaited, so a
    probe may ask the bus). Raises :class:`AssertionError` naming ``what`` after
    ``timeout`` seconds. When ``task`` is given (the bridge or source under test) and
    it fails first, its exception is raised at once instead of a timeout that would
    hide it. ``detail`` (optional) is called at the timeout and its result appended to
    the message: what *did* happen (``lambda: f"{len(got)} of {n} arrived"``).
    """
    start = time.monotonic()
    while True:
        result = cond()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if task is not None and task.done():
            task.result()
        if time.monotonic() - start > timeout:
            raise _timed_out(what, timeout, detail)
        await asyncio.sleep(interval)


#: the earlier name of :func:`until` (kept: the same function)
wait_until = until


def wait_until_sync(
    cond: Callable[[], object],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.05,
    detail: Callable[[], object] | None = None,
) -> float:
    """:func:`until` for code without an event loop (processes, threads): polls
    with :func:`time.sleep`; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise _timed_out(what, timeout, detail)
        time.sleep(interval)
    return time.monotonic() - start
