"""The plugin author kit.

- :class:`~bridge.testing.memory.MemorySink`: an in-memory driver with failure knobs,
  for unit tests of the core and of routing configurations;
- :func:`~bridge.testing.sample.sample_events` / :func:`~bridge.testing.sample.messages`:
  realistic events and messages without an upstream;
- :func:`~bridge.testing.wait.wait_until` / :func:`~bridge.testing.wait.wait_until_sync`:
  poll until a condition holds, failing with what did not happen in time;
- :class:`~bridge.testing.conformance.SinkConformance`: the reusable pytest suite a
  driver author runs against a real bus (see docs/writing-plugins.md).
"""

from bridge.testing.memory import MemoryOptions, MemorySink
from bridge.testing.sample import messages, sample_events, ticker_record
from bridge.testing.wait import wait_until, wait_until_sync

__all__ = [
    "MemoryOptions",
    "MemorySink",
    "messages",
    "sample_events",
    "ticker_record",
    "wait_until",
    "wait_until_sync",
]
