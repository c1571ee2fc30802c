"""Hot reload: a new configuration applied to a running bridge, or refused whole.

What triggers it: SIGHUP, and (``reload.watch``, on by default) a change of the
configuration file. Requests never pile up (:class:`ReloadQueue`): one reload runs at a
time, and every request that arrives meanwhile is merged into one reload that follows
it (ten SIGHUPs while a reload runs are one more reload, not ten).

What is watched (:class:`ConfigWatcher`): the file and the symlinks on its way
(:func:`symlink_chain`), nothing else. Kubernetes updates a ConfigMap volume by
swapping a ``..data`` symlink (``config.yaml -> ..data/config.yaml``,
``..data -> ..2024_05_01_12_00_00.1``) and never writes the file; an editor renames a
new file over the old one; both are changes of a name in the chain. The directories
holding the chain are watched (a rename is an event of the directory), but their other
files are filtered out before anything is logged or read: a log file written beside
the configuration costs nothing.

When a change is seen, the file is applied only once it is *stable*: it is read, and
read again ``reload.debounce_s`` later, until two reads agree; a file rewritten in
place in several writes is never applied half-written as long as the writer pauses
less than ``debounce_s`` between them. The safe way to change the file is still to
write a new one and rename it over the old one (atomic). A file whose content did not
change is not reloaded.

Every read is bounded and never blocks the data path: the file is read in a worker
thread, only if it is a regular file, at most ``MAX_CONFIG_BYTES`` (a FIFO, a socket,
``/dev/zero`` or a 300 MB file at the path is an ``invalid`` reload naming why), and
parsed and validated in that thread too.

What a reload does (:class:`Reloader`, behind :meth:`bridge.app.Bridge.reload`):

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

A sink a reload replaced or removed is not forgotten (:class:`RetiredSinks`): its
counters stay on ``/metrics`` until the process ends (added to those of its successor
of the same name, so a counter never goes back), and what it could not deliver before
it was closed is counted as its ``dropped{reason="sink_removed"}`` and as
``aleno_bridge_pipeline_dropped_total{reason="sink_removed"}``, and reported by the
shutdown's last log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from bridge.config import Config, ConfigError, Settings, SinkSpec, parse_config
from bridge.config.loading import read_config_file
from bridge.config.schema import ReloadConfig
from bridge.core.logs import quiet
from bridge.core.state import RELOAD_RESULTS

if TYPE_CHECKING:
    pass

log = logging.getLogger("aleno_bridge.reload")
#: what applying a reload logs goes to the bridge's own log, as it always did
app_log = logging.getLogger("aleno_bridge.app")

RESULTS: Final = RELOAD_RESULTS
#: source keys a reload may change (the rest of ``source`` needs a restart)
HOT_SOURCE_KEYS: Final = frozenset({
    "tickers", "equities", "symbol_stale_after_s", "update_interval_s", "leases",
    "max_clock_skew_s", "max_record_age_s", "status_damping",
})
#: top-level sections a reload applies (the others need a restart)
HOT_SECTIONS: Final = frozenset({"source", "sinks", "routes", "shutdown_timeout_s", "reload"})
#: the drop reason of the events a replaced or removed sink could not deliver
SINK_REMOVED: Final = "sink_removed"
#: symlinks followed at most when looking for what to watch (as the kernel does)
MAX_SYMLINKS: Final = 40
#: the shortest stability window, whatever ``reload.debounce_s`` says: two reads of a
#: file must be apart for them to tell anything
MIN_SETTLE_S: Final = 0.05
#: how long a watch that could not start waits before it tries again
WATCH_RETRY_S: Final = 5.0
#: what a retired sink still gets to close when the shutdown's deadline cuts its drain
RETIRE_CUT_S: Final = 0.2


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


def settings_changed(old: Settings, new: Settings) -> list[str]:
    """The hot settings besides sinks, routes and symbols that differ (a reload that
    changes only these is ``applied``, not ``unchanged``)."""
    out = [f"source.{key}" for key in sorted(HOT_SOURCE_KEYS - {"tickers", "equities"})
           if _dump(getattr(old.config.source, key)) != _dump(getattr(new.config.source, key))]
    out += [name for name in ("shutdown_timeout_s", "reload")
            if _dump(getattr(old.config, name)) != _dump(getattr(new.config, name))]
    return out


def pinned_changed(old: Config, new: Config) -> bool:
    """Whether the configured (pinned) ticker or equity set differs (order aside)."""
    return (set(old.source.tickers) != set(new.source.tickers)
            or set(old.source.equities) != set(new.source.equities))


# -- reading ---------------------------------------------------------------------------


def load_settings(path: str, text: str | None = None) -> Settings:
    """The settings of the file at ``path`` for a reload, or of ``text`` (its content
    as the watcher saw it settle). Blocking: run it in a worker thread.

    Only a regular file is read (see :func:`bridge.config.loading.read_config_file`); raises
    :class:`ConfigError` as :func:`bridge.config.load_config` does.
    """
    if text is None:
        text = read_config_file(path, regular_only=True)
    return parse_config(text, source=str(Path(path)))


@dataclass(frozen=True)
class FileState:
    """One bounded read of the configuration file: the SHA-256 of its content (or of
    the reason it could not be read, so an unchanged problem compares equal) and its
    text (``None`` when it could not be read)."""

    digest: str
    text: str | None


def read_state(path: str | os.PathLike[str]) -> FileState:
    """The file at ``path`` now (blocking, bounded: run it in a worker thread)."""
    try:
        text = read_config_file(path, regular_only=True)
    except ConfigError as exc:
        return FileState("!" + hashlib.sha256(str(exc).encode()).hexdigest(), None)
    return FileState(hashlib.sha256(text.encode()).hexdigest(), text)


def file_digest(path: Path) -> str | None:
    """The SHA-256 of the file's content (through symlinks, bounded), or ``None`` if it
    cannot be read as a configuration."""
    state = read_state(path)
    return state.digest if state.text is not None else None


def symlink_chain(path: str | os.PathLike[str]) -> list[str]:
    """The names a reader of ``path`` goes through that can change what it reads:
    every symlink met on the way (the directories leading to the file included) and the
    file at the end, as absolute paths in the directories that hold them.

    For a ConfigMap volume mounted at ``/etc/bridge``: ``/etc/bridge/config.yaml``,
    ``/etc/bridge/..data`` and ``/etc/bridge/..2024_05_01/config.yaml``. A name that
    does not exist ends the chain (it is watched for its creation).
    """
    chain: list[str] = []
    directory = os.sep
    rest = [p for p in os.path.abspath(path).split(os.sep) if p]
    hops = 0
    while rest:
        name = rest.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            directory = os.path.dirname(directory)
            continue
        here = os.path.join(directory, name)
        try:
            target = os.readlink(here)
        except OSError:  # not a symlink (or missing): one plain step
            directory = here
            continue
        hops += 1
        if hops > MAX_SYMLINKS:  # a loop: what was met so far is all there is to watch
            return chain
        if here not in chain:
            chain.append(here)
        if os.path.isabs(target):
            directory = os.sep
        rest = [p for p in target.split(os.sep) if p] + rest
    if directory not in chain:
        chain.append(directory)
    return chain


def watched_dirs(chain: Iterable[str]) -> list[str]:
    """The existing directories holding the names of ``chain`` (what is watched)."""
    return sorted({d for d in (os.path.dirname(p) for p in chain) if os.path.isdir(d)})


# -- triggers --------------------------------------------------------------------------


class ReloadQueue:
    """Runs reloads one at a time; requests made while one runs are merged into one
    reload that follows it (at most one runs and one waits, however many arrive).

    A request carries the text to apply (the watcher's settled content) or ``None``
    (read the file); the last request before the queued reload starts wins.
    """

    def __init__(self, reload: Callable[[str | None], Awaitable[Any]]) -> None:
        self._reload = reload
        self._task: asyncio.Task[None] | None = None
        #: a reload is asked for and has not started yet (it takes the latest text)
        self._waiting = False
        self._text: str | None = None
        self._closed = False
        #: requests folded into a reload that was already waiting to start
        self.merged = 0
        #: reloads run so far
        self.runs = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def request(self, text: str | None = None) -> str:
        """Ask for a reload: ``"started"``, ``"queued"`` (one follows the running one),
        ``"merged"`` (into one that has not started yet) or ``"closed"``."""
        if self._closed:
            return "closed"
        self._text = text
        if self._waiting:
            self.merged += 1
            return "merged"
        self._waiting = True
        if self.running:
            return "queued"
        self._task = asyncio.create_task(self._run(), name="reload")
        return "started"

    async def _run(self) -> None:
        while self._waiting and not self._closed:
            self._waiting = False
            text, self._text = self._text, None
            self.runs += 1
            try:
                await self._reload(text)
            except Exception:  # the next request must still be served
                log.exception("configuration reload failed")

    async def close(self) -> None:
        """Take no more requests; cancel a reload still running (the bridge is down)."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class ConfigWatcher:
    """Calls ``on_change(text)`` when the content of ``path`` changed and then stayed
    the same for ``reload.debounce_s`` (``text`` is that content, ``None`` when the
    file cannot be read: the reload then reads it and says why), until :meth:`close`.

    ``config()`` gives the running ``reload`` settings, read at each change: a reload
    may change ``debounce_s``, or turn ``watch`` off (turning it on takes a restart).
    Only the names of :func:`symlink_chain` are watched; when the chain leads
    elsewhere (a ConfigMap's new ``..2024_...`` directory) the watch follows it.
    """

    def __init__(self, path: Path, on_change: Callable[[str | None], Any],
                 config: Callable[[], ReloadConfig] | float = 1.0) -> None:
        self.path = path
        self.on_change = on_change
        self._config: Callable[[], ReloadConfig] = (
            config if callable(config) else (lambda: ReloadConfig(debounce_s=config)))
        #: the content last handed over (or seen at start)
        self.digest: str | None = None
        #: the names watched now (absolute paths, see :func:`symlink_chain`)
        self.names: frozenset[str] = frozenset()
        #: changes of watched names seen, and stable contents handed over
        self.changes = 0
        self.handed_over = 0
        #: set once the first watch is up (its first answer, within a second)
        self.up = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="config-watch")

    def _relevant(self, _change: Any, path: str) -> bool:
        return os.path.normpath(path) in self.names

    async def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``; ``True`` when the watcher was closed meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _run(self) -> None:
        from watchfiles import awatch  # imported here: only a running bridge watches

        # its "N changes detected" lines say nothing this watcher does not say better
        quiet(("watchfiles",))
        self.digest = (await asyncio.to_thread(read_state, self.path)).digest
        failures = 0
        moved = False
        while not self._stop.is_set():
            chain = await asyncio.to_thread(symlink_chain, self.path)
            self.names = frozenset(chain)
            dirs = watched_dirs(chain)
            try:
                if not dirs:
                    raise FileNotFoundError(f"no directory of {self.path} exists")
                # an empty batch after each quiet second tells the watch is up
                watch = awatch(*dirs, watch_filter=self._relevant, stop_event=self._stop,
                               debounce=200, step=50, recursive=False,
                               ignore_permission_denied=True, rust_timeout=1000,
                               yield_on_timeout=True)
                async with contextlib.aclosing(watch) as changes:
                    async for batch in changes:
                        failures = 0
                        self.up.set()
                        if batch:
                            self.changes += 1
                        elif not moved:
                            continue
                        # a change, or the first quiet second after the watch moved
                        # (a change in between is seen now)
                        moved = False
                        await self._settle()
                        chain = await asyncio.to_thread(symlink_chain, self.path)
                        self.names = frozenset(chain)
                        if watched_dirs(chain) != dirs:
                            moved = True
                            break
            except Exception as exc:  # a watch that cannot run leaves SIGHUP working
                failures += 1
                if failures == 1:
                    log.warning("cannot watch %s for changes (%s: %s); retrying every %gs, "
                                "SIGHUP reloads meanwhile", self.path, type(exc).__name__,
                                exc, WATCH_RETRY_S)
                moved = True
                if await self._sleep(WATCH_RETRY_S):
                    return

    async def _settle(self) -> None:
        """Wait until two reads ``debounce_s`` apart agree; hand the content over if it
        differs from the last one handed over."""
        cfg = self._config()
        if not cfg.watch:
            return
        window = max(MIN_SETTLE_S, cfg.debounce_s)
        state = await asyncio.to_thread(read_state, self.path)
        while True:
            if await self._sleep(window):
                return
            again = await asyncio.to_thread(read_state, self.path)
            if again.digest == state.digest:
                break
            log.debug("%s is still changing; waiting %gs for it to settle", self.path,
                      window)
            state = again
        if state.digest == self.digest:
            return
        self.digest = state.digest
        self.handed_over += 1
        self.on_change(state.text)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
