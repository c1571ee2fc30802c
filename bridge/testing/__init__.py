"""The plugin author kit.

- :class:`~bridge.testing.memory.MemorySink`: an in-memory driver with failure knobs,
  for unit tests of the core and of routing configurations;
- :func:`~bridge.testing.sample.sample_events` / :func:`~bridge.testing.sample.messages`:
  realistic events and messages without an upstream;
- :class:`~bridge.testing.conformance.SinkConformance`: the reusable pytest suite a
  driver author runs against a real bus (see docs/writing-plugins.md).
"""

from bridge.testing.memory import MemoryOptions, MemorySink
from bridge.testing.sample import messages, sample_events, ticker_record

__all__ = ["MemoryOptions", "MemorySink", "messages", "sample_events", "ticker_record"]
