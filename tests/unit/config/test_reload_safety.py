"""Safe reloads (issue 19): bounded reads that never block, the symlink chain the watch
follows, merged reload requests, and a watch that applies a file only once it is
stable and ignores every other file of its directory."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from bridge.config import ConfigError
from bridge.config.loading import MAX_CONFIG_BYTES, read_config_file
from bridge.config.reload import (
    ConfigWatcher,
    ReloadQueue,
    load_settings,
    read_state,
    symlink_chain,
    watched_dirs,
)
from bridge.config.schema import ReloadConfig
from bridge.testing import until

posix = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")


def _refused(path: Path, regular_only: bool = True) -> str:
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        read_config_file(path, regular_only=regular_only)
    assert time.monotonic() - started < 1.0  # never waits, never reads much
    assert err.value.source == str(path)
    return "; ".join(err.value.problems)


@posix
def test_a_fifo_a_socket_a_device_or_a_directory_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file (a FIFO)" in _refused(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    assert "not a regular file (a device)" in _refused(zero)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.yaml"))
        assert "not a regular file (a socket)" in _refused(tmp_path / "s.yaml")
    assert "not a regular file (a directory)" in _refused(tmp_path)
    # without regular_only (start-up): /dev/zero is read up to the bound, then refused
    assert "larger than 4 MiB" in _refused(zero, regular_only=False)


def test_a_huge_file_is_refused_from_its_size_without_being_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as fh:  # sparse: 300 MB that take no room
        fh.truncate(300 * 1024 * 1024)
    assert "larger than 4 MiB" in _refused(huge)
    state = read_state(huge)
    assert state.text is None and state.digest.startswith("!")
    fine = tmp_path / "ok.yaml"
    fine.write_bytes(b"a: 1\n" + b"#" * (MAX_CONFIG_BYTES - 10) + b"\n")
    assert read_config_file(fine, regular_only=True).startswith("a: 1")


def _configmap(mount: Path, version: str, text: str) -> None:
    """Lay out (or update) a Kubernetes ConfigMap volume as the kubelet does."""
    (mount / version).mkdir(parents=True)
    (mount / version / "config.yaml").write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(version)
    os.replace(tmp, mount / "..data")
    if not (mount / "config.yaml").is_symlink():
        (mount / "config.yaml").symlink_to("..data/config.yaml")


def test_the_symlink_chain_of_a_configmap_volume(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    _configmap(mount, "..v1", "a: 1\n")
    chain = symlink_chain(mount / "config.yaml")
    assert chain == [str(mount / "config.yaml"), str(mount / "..data"),
                     str(mount / "..v1" / "config.yaml")]
    assert watched_dirs(chain) == sorted([str(mount), str(mount / "..v1")])
    plain = tmp_path / "plain.yaml"
    plain.write_text("a: 1\n")
    assert symlink_chain(plain) == [str(plain)]
    assert symlink_chain(tmp_path / "missing.yaml") == [str(tmp_path / "missing.yaml")]
    loop = tmp_path / "loop.yaml"
    loop.symlink_to("loop.yaml")
    assert symlink_chain(loop) == [str(loop)]  # bounded, as the kernel is


async def test_requests_during_a_reload_are_merged_into_one_that_follows() -> None:
    """Ten requests while one reload runs: one more reload, with the last text."""
    gate = asyncio.Event()
    seen: list[str | None] = []

    async def reload(text: str | None) -> None:
        seen.append(text)
        await gate.wait()

    queue = ReloadQueue(reload)
    assert queue.request("first") == "started"
    await asyncio.sleep(0)
    answers = [queue.request(f"r{i}") for i in range(10)]
    assert answers == ["queued"] + ["merged"] * 9 and queue.merged == 9
    gate.set()
    await until(lambda: not queue.running, 5, "the queue drained")
    assert seen == ["first", "r9"] and queue.runs == 2
    assert queue.request(None) == "started"
    await queue.close()
    assert queue.request(None) == "closed"


async def test_a_reload_that_raises_does_not_stop_the_queue() -> None:
    gate = asyncio.Event()
    calls = 0

    async def reload(_text: str | None) -> None:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise RuntimeError("bug")

    queue = ReloadQueue(reload)
    assert queue.request() == "started"
    assert queue.request() == "merged"  # the first has not started: it reads the latest
    await asyncio.sleep(0)
    assert queue.request() == "queued"
    gate.set()
    await until(lambda: not queue.running, 5, "the queue drained")
    assert calls == 2


# -- the watch, with the real watchfiles ------------------------------------------------

DEBOUNCE_S = 0.4


class Seen:
    def __init__(self) -> None:
        self.texts: list[str | None] = []
        self.changed = asyncio.Event()

    def __call__(self, text: str | None) -> None:
        self.texts.append(text)
        self.changed.set()

    async def next(self, timeout: float) -> str | None:
        await asyncio.wait_for(self.changed.wait(), timeout)
        self.changed.clear()
        return self.texts[-1]


async def _watch(path: Path, seen: Seen) -> ConfigWatcher:
    watcher = ConfigWatcher(path, seen, lambda: ReloadConfig(debounce_s=DEBOUNCE_S))
    watcher.start()
    await asyncio.wait_for(watcher.up.wait(), 10)  # the first answer within a second
    return watcher


#: a change is handed over after the watch's step, two reads a debounce apart, and the
#: thread hops: within three debounce windows and a second, however loaded the machine
HAND_OVER_S = 3 * DEBOUNCE_S + 1.0


async def test_other_files_of_the_directory_are_never_looked_at(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a: 1\n")
    seen = Seen()
    watcher = await _watch(cfg, seen)
    try:
        log = tmp_path / "bridge.log"
        for i in range(20):
            with log.open("a") as fh:
                fh.write(f"line {i}\n")
            await asyncio.sleep(0.05)
        await asyncio.sleep(HAND_OVER_S)
        assert seen.texts == [] and watcher.changes == 0
        new = tmp_path / "config.yaml.new"
        new.write_text("a: 2\n")
        os.replace(new, cfg)  # the safe way: write a new file, rename it over
        assert await seen.next(HAND_OVER_S) == "a: 2\n"
    finally:
        await watcher.close()


async def test_a_file_rewritten_in_two_writes_is_handed_over_whole(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    whole = "".join(f"line{i}: {i}\n" for i in range(100))
    cfg.write_text("a: 1\n")
    seen = Seen()
    watcher = await _watch(cfg, seen)
    try:
        for gap in (0.1, 0.3):
            assert gap < DEBOUNCE_S
            text = f"gap: {gap}\n" + whole
            with cfg.open("w") as fh:  # in place: truncated, half written, then the rest
                fh.write(text[: len(text) // 2])
                fh.flush()
                await asyncio.sleep(gap)
                fh.write(text[len(text) // 2:])
            assert await seen.next(HAND_OVER_S + gap) == text
        await asyncio.sleep(DEBOUNCE_S)
        assert len(seen.texts) == 2  # never the half, never twice
    finally:
        await watcher.close()


async def test_the_watch_follows_configmap_updates(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    _configmap(mount, "..v1", "v: 1\n")
    seen = Seen()
    watcher = await _watch(mount / "config.yaml", seen)
    try:
        for v in (2, 3):
            old = os.readlink(mount / "..data")
            _configmap(mount, f"..v{v}", f"v: {v}\n")
            (mount / old / "config.yaml").unlink()  # the kubelet removes the old one
            (mount / old).rmdir()
            assert await seen.next(HAND_OVER_S) == f"v: {v}\n"
            await until(lambda v=v: str(mount / f"..v{v}" / "config.yaml")  # type: ignore[misc]
                        in watcher.names, HAND_OVER_S, "the watch follows the new chain")
    finally:
        await watcher.close()


@posix
async def test_a_fifo_swapped_in_is_handed_over_unread(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("a: 1\n")
    seen = Seen()
    watcher = await _watch(cfg, seen)
    try:
        os.mkfifo(tmp_path / "fifo")
        os.replace(tmp_path / "fifo", cfg)
        assert await seen.next(HAND_OVER_S) is None  # the reload reads it and says why
        with pytest.raises(ConfigError, match="a FIFO"):
            await asyncio.wait_for(asyncio.to_thread(load_settings, str(cfg)), 1.0)
    finally:
        await watcher.close()
