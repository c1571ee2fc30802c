"""aleno-bridge: republish the Aleno real-time pricing feed onto a message bus.

The data flows through the modules in this order: ``source`` (Socket.IO client)
-> ``normalize`` (wire record to validated event) -> ``envelope`` (CloudEvents)
-> ``routing`` (declarative routes) -> ``runner`` (one worker per sink) -> a sink
driver found through the ``bridge.sinks`` entry-point group.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aleno-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
