"""The control surface's own thread: snapshots are answered beside the data path.

The bridge's event loop carries the data path: each second it decodes the upstream's
frame (10,000 records are one ~2.5 MB Socket.IO packet, ~15 ms in one call) and
validates and routes it in chunks of a few milliseconds. A snapshot request served on
that loop waits for whatever callback runs when it arrives, and then holds the loop
itself while it splices megabytes. So the HTTP server and the NATS control service run
on a second event loop, in a thread of their own (:class:`ControlLoop`):

- ``/v1/snapshot`` and the NATS ``snapshot`` endpoints are answered on that thread,
  reading the last-value cache directly (:class:`bridge.pipeline.market.LastValues` is made to be
  read from another thread without a lock);
- everything that touches the rest of the bridge runs on the bridge's own loop, as
  before: ``/healthz``, ``/readyz`` and ``/metrics`` hop there with :func:`call_on`
  and wait for the answer at most :data:`HOP_TIMEOUT_S` (then 503: a stuck loop
  fails the liveness probe); the lease doors wait for theirs as long as it takes
  (their own upstream timeouts bound it), because a lease call runs to its end once
  handed over and its answer is the only true account of what it did.

Python runs one thread at a time (the GIL), but the interpreter switches threads every
few milliseconds (``sys.setswitchinterval``), so a request no longer waits for a whole
callback of the data path, and the data path never waits for a whole reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar, overload

log = logging.getLogger("aleno_bridge.control")

T = TypeVar("T")

#: how long a request served on the control thread waits for the bridge's loop
HOP_TIMEOUT_S: Final = 10.0
#: how long :meth:`ControlLoop.stop` waits for the thread to end
STOP_TIMEOUT_S: Final = 5.0


class LoopTimeout(Exception):
    """The bridge's event loop did not run a call in time (it is stuck or overloaded)."""


@overload
async def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., Awaitable[T]],
                  *args: Any, timeout: float | None = ...) -> T: ...


@overload
async def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., T],
                  *args: Any, timeout: float | None = ...) -> T: ...


async def call_on(loop: asyncio.AbstractEventLoop | None,
                  fn: Callable[..., Any], *args: Any,
                  timeout: float | None = HOP_TIMEOUT_S) -> Any:
    """Run ``fn(*args)`` (a function or a coroutine function) on ``loop`` and return
    its result, from whichever loop this is awaited on. ``loop`` ``None`` or the
    running loop: called right here.

    Once handed over, the call runs to its end on ``loop``: neither the timeout nor a
    cancellation of the caller stops it there, because a call stopped half-way (a
    lease granted but not recorded, a symbol subscribed upstream but not held) would
    leave the bridge inconsistent. Raises :class:`LoopTimeout` when ``loop`` did not
    answer within ``timeout`` (``None``: wait as long as it takes); the call may still
    take effect afterwards, so only calls that are harmless to repeat or to lose
    (reads) should have a timeout.
    """
    async def call() -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            return await result
        return result

    if loop is None or loop is asyncio.get_running_loop():
        return await call()
    # shielded: cancelling this wait must not cancel the call on the other loop
    waited = asyncio.shield(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop)))
    if timeout is None:
        return await waited
    try:
        return await asyncio.wait_for(waited, timeout)
    except TimeoutError:
        msg = f"the bridge's event loop did not answer within {timeout:g}s"
        raise LoopTimeout(msg) from None


class ControlLoop:
    """A daemon thread running an event loop for the control surface.

    :meth:`start` and :meth:`stop` are awaited on the bridge's loop; :meth:`run` runs
    a coroutine on the control loop and waits for it there.
    """

    def __init__(self, name: str = "aleno-bridge-control") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    _cancel_all(loop)
                loop.close()

        self.loop = loop
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait, STOP_TIMEOUT_S)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the control loop and return its result."""
        loop = self.loop
        if loop is None:
            coro.close()
            msg = "the control loop is not running"
            raise RuntimeError(msg)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def stop(self) -> None:
        """Stop the loop (what still runs there is cancelled) and wait for the thread."""
        loop, thread = self.loop, self._thread
        self.loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("control: the control thread did not stop within %gs",
                        STOP_TIMEOUT_S)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on ``loop`` and let it finish (as ``asyncio.run`` does)."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


__all__ = ["HOP_TIMEOUT_S", "ControlLoop", "LoopTimeout", "call_on"]
