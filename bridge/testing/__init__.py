"""The plugin author kit.

- :class:`~bridge.testing.memory.MemorySink`: an in-memory driver with failure knobs,
  for unit tests of the core and of routing configurations;
- :func:`~bridge.testing.sample.sample_events` / :func:`~bridge.testing.sample.messages`:
  realistic events and messages without an upstream;
- :func:`~bridge.testing.wait.until` (async; ``wait_until`` is the same function) /
  :func:`~bridge.testing.wait.wait_until_sync`: poll until a condition holds, failing
  with what did not happen in time;
- :class:`~bridge.testing.proxy.FaultProxy`: a TCP proxy that refuses, stalls or resets
  a driver's connections on demand (outages and a hung bus without killing the bus);
- :class:`~bridge.testing.conformance.SinkConformance`: the reusable pytest suite a
  driver author runs against a real bus (see docs/writing-plugins.md);
- :func:`~bridge.testing.mutants.run_mutants`: runs that suite against deliberately
  broken subclasses of the driver, each in its own process, to prove the suite
  catches them.

Install it with the light extra ``pip install 'aleno-bridge[testing]'`` (pytest and
pytest-asyncio only).
"""

from bridge.testing.memory import MemoryOptions, MemorySink
from bridge.testing.proxy import FaultProxy
from bridge.testing.sample import messages, sample_events, ticker_record
from bridge.testing.wait import until, wait_until, wait_until_sync

__all__ = [
    "FaultProxy",
    "MemoryOptions",
    "MemorySink",
    "messages",
    "sample_events",
    "ticker_record",
    "until",
    "wait_until",
    "wait_until_sync",
]
