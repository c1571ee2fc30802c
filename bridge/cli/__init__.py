"""The ``aleno-bridge`` command line: :mod:`bridge.cli.main` (commands),
:mod:`bridge.cli.tap` (watch the routed events), :mod:`bridge.cli.top` (a live view)."""

from bridge.cli.main import main

__all__ = ["main"]
