"""Sink drivers shipped with aleno-bridge.

Each is registered under the ``bridge.sinks`` entry-point group in ``pyproject.toml``
exactly like a third-party plugin; the core never imports this package.
"""
