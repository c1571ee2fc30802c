"""Hot reload: a new configuration applied to a running bridge, or refused whole.

What triggers it: SIGHUP, and (``reload.watch``, on by default) a change of the
configuration file. The directory holding the file is watched (watchfiles), not the
file: Kubernetes updates a ConfigMap volume by swapping a ``..data`` symlink, which
never writes the file itself. Changes are debounced (``reload.debounce_s``) and a
file whose content did not change is not reloaded.

What a reload does (:meth:`bridge.app.Bridge.reload`):

1. the whole file is read and validated as at start-up, drivers included; an invalid
   one is refused with every problem and its path in the log, and nothing changes;
2. a change that needs a restart (:func:`restart_needed`: the upstream URL, path or
   keys, TLS, sharding, the HTTP server, the control surface, the log settings, the
   intake size) refuses the reload with a message naming what changed;
3. otherwise the symbols are changed with ``subscribe_*`` / ``unsubscribe_*`` on the
   live connection (no reconnect, no gap on the symbols that stay), new and changed
   sinks are built and started, the routes are swapped between two dispatch chunks
   (never in the middle of an event's targets), and the sinks that were replaced or
   removed are drained and closed in the background; unchanged sinks are untouched.

Every outcome is counted: ``aleno_bridge_config_reloads_total{result}`` with result
``applied``, ``unchanged``, ``invalid``, ``refused`` or ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bridge.config import Config, Settings, SinkSpec
from bridge.state import RELOAD_RESULTS

log = logging.getLogger("aleno_bridge.reload")

RESULTS: Final = RELOAD_RESULTS
#: source keys a reload may change (the rest of ``source`` needs a restart)
HOT_SOURCE_KEYS: Final = frozenset({
    "tickers", "equities", "symbol_stale_after_s", "update_interval_s", "leases",
})
#: top-level sections a reload applies (the others need a restart)
HOT_SECTIONS: Final = frozenset({"source", "sinks", "routes", "shutdown_timeout_s", "reload"})


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: ``result`` (one of :data:`RESULTS`) and, in words, each
    change applied or the reason it was refused."""

    result: str
    changes: list[str] = field(default_factory=list)
    message: str = ""


def _dump(model: Any) -> Any:
    # secrets compare by value (SecretStr equality), and never leave this function
    return model.model_dump() if hasattr(model, "model_dump") else model


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The changed settings a running bridge cannot apply (paths, never values)."""
    out: list[str] = []
    o_src, n_src = _dump(old.config.source), _dump(new.config.source)
    for key in sorted(set(o_src) | set(n_src)):
        if key not in HOT_SOURCE_KEYS and o_src.get(key) != n_src.get(key):
            out.append(f"source.{key}")
    if (old.api_key != new.api_key or [k.key for k in old.api_keys]
            != [k.key for k in new.api_keys]) and not any(
                p.startswith("source.api_key") for p in out):
        out.append("source.api_key_file (the key in the file changed)")
    for name in type(old.config).model_fields:
        if name in HOT_SECTIONS:
            continue
        if _dump(getattr(old.config, name)) != _dump(getattr(new.config, name)):
            out.append(name)
    return out


def same_sink(a: SinkSpec, b: SinkSpec) -> bool:
    """Whether a sink's configuration is unchanged (driver, common keys, options)."""
    return (a.driver is b.driver and a.common.model_dump() == b.common.model_dump()
            and a.options.model_dump() == b.options.model_dump())


def pinned_changed(old: Config, new: Config) -> bool:
    """Whether the configured (pinned) ticker or equity set differs (order aside)."""
    return (set(old.source.tickers) != set(new.source.tickers)
            or set(old.source.equities) != set(new.source.equities))


def file_digest(path: Path) -> str | None:
    """The SHA-256 of the file's content (through symlinks), or ``None`` if unreadable."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """Calls ``on_change()`` when the content of ``path`` changes (debounced), until
    :meth:`close`. Watches the directory, so symlink swaps are seen."""

    def __init__(self, path: Path, on_change: Callable[[], Awaitable[Any]],
                 debounce_s: float = 1.0) -> None:
        self.path = path
        self.on_change = on_change
        self.debounce_s = debounce_s
        self.digest = file_digest(path)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="config-watch")

    async def _run(self) -> None:
        from watchfiles import awatch  # imported here: only a running bridge watches

        directory = self.path.absolute().parent
        debounce_ms = int(self.debounce_s * 1000)
        try:
            async for _ in awatch(directory, stop_event=self._stop, debounce=max(debounce_ms, 50),
                                  step=50, recursive=False, ignore_permission_denied=True):
                digest = file_digest(self.path)
                if digest is None or digest == self.digest:
                    continue
                self.digest = digest
                try:
                    await self.on_change()
                except Exception:
                    log.exception("reloading %s failed", self.path)
        except Exception as exc:  # a watch that cannot run leaves SIGHUP working
            log.warning("cannot watch %s for changes (%s: %s); reload with SIGHUP",
                        directory, type(exc).__name__, exc)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


__all__ = [
    "HOT_SOURCE_KEYS",
    "RESULTS",
    "ConfigWatcher",
    "ReloadOutcome",
    "file_digest",
    "pinned_changed",
    "restart_needed",
    "same_sink",
]
