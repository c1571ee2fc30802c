"""aleno-bridge: republish the Aleno real-time pricing feed onto a message bus.

The subpackages are the stages of the data flow, in order: :mod:`bridge.upstream`
(the Socket.IO client, the pool of API keys, the symbol set) -> :mod:`bridge.pipeline`
(wire record to validated event, last values and status events, routing) ->
:mod:`bridge.sinks` (one worker per sink; the plugin API, discovery and driver kit) ->
a sink driver found through the ``bridge.sinks`` entry-point group.
:mod:`bridge.core` holds what they share (envelope, kinds, templates, state, metrics,
logs); :mod:`bridge.config`, :mod:`bridge.control` and :mod:`bridge.cli` the
configuration, the control surface and the commands; :mod:`bridge.app` wires them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aleno-bridge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
