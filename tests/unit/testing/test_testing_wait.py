"""bridge.testing.wait: the one poll-until helper of the test suites (public: ``until``)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

import bridge.testing
from bridge.testing import until, wait_until, wait_until_sync


async def test_wait_until_returns_once_the_condition_holds() -> None:
    calls = itertools.count()
    took = await wait_until(lambda: next(calls) >= 3, 5.0, "three polls", interval=0.001)
    assert 0 <= took < 5.0


async def test_wait_until_fails_naming_what_did_not_happen() -> None:
    with pytest.raises(AssertionError, match=r"the bus came back: not within 0\.05s"):
        await wait_until(lambda: False, 0.05, "the bus came back", interval=0.01)


async def test_wait_until_raises_the_error_of_a_task_that_failed_first() -> None:
    async def fails() -> None:
        raise RuntimeError("upstream gone")

    task = asyncio.ensure_future(fails())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="upstream gone"):
        await wait_until(lambda: False, 5.0, "never", task=task)


def test_wait_until_sync() -> None:
    calls = itertools.count()
    assert wait_until_sync(lambda: next(calls) >= 2, 5.0, interval=0.001) < 5.0
    with pytest.raises(AssertionError, match=r"condition: not within 0\.02s"):
        wait_until_sync(lambda: False, 0.02, interval=0.005)


def test_until_is_the_public_name_and_wait_until_the_same_function() -> None:
    assert "until" in bridge.testing.__all__
    assert wait_until is until


async def test_until_awaits_an_async_condition() -> None:
    calls = itertools.count()

    async def arrived() -> bool:
        await asyncio.sleep(0)
        return next(calls) >= 2

    assert await until(arrived, 5.0, "an async probe", interval=0.001) < 5.0
    with pytest.raises(AssertionError, match=r"never true: not within 0\.02s"):
        await until(_never, 0.02, "never true", interval=0.005)


async def _never() -> bool:
    return False
