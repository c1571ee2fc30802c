"""A sink's disk spool: segment files written by a thread, recovered at start.

:class:`SpoolStore` owns one spool directory (the format is
:mod:`bridge.sinks.spool_format`): it takes the directory's lock, recovers what a
previous process left (torn tails truncated, corrupt records counted and cut out,
released segments deleted), appends records, reads them back and deletes the segments
whose records are all released. :class:`~bridge.sinks.spool_buffer.SpoolBuffer`
decides what goes in and out; this module only stores.

Threads: the event loop calls :meth:`SpoolStore.append` (a deque append, no I/O) and
the bookkeeping methods; one writer thread per spool writes what was appended (one
``write`` per batch), starts, seals and deletes segment files in the order they were
asked for, rewrites the ledger in place when the released position moved, and syncs
the active segment and the ledger at most every ``fsync_interval_ms``. It writes at
least every ``min(fsync_interval_ms, 50 ms)``, so a killed process (SIGKILL, OOM) loses
at most what was accepted in that time; a power loss, at most ``fsync_interval_ms``.
:meth:`SpoolStore.read` runs in a worker thread (``asyncio.to_thread``): it waits until
the writer has written what it is asked for.

A write that fails (disk full, I/O error) is retried every second with what was
appended meanwhile kept in memory; :attr:`SpoolStore.error` says why (``/readyz``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Final

from bridge.sinks.spool_format import (
    HEAD,
    LEDGER_FILE,
    MAX_RECORD,
    Record,
    SegmentScan,
    SpoolError,
    fsync_dir,
    ledger_record,
    lock,
    parse,
    read_ledger,
    scan_segment,
    segment_name,
    segment_paths,
    segment_size,
    write_meta,
)

log = logging.getLogger("aleno_bridge.spool")

#: the writer writes at least this often, whatever ``fsync_interval_ms`` is
MAX_WRITE_INTERVAL_S: Final = 0.05
#: the writer is woken early once this much was appended
WAKE_BYTES: Final = 256 << 10
#: how long a failed write waits before it is tried again
RETRY_S: Final = 1.0
#: how much :meth:`SpoolStore.read` reads at once
READ_CHUNK: Final = 1 << 20

_OPEN: Final = -1
_SEAL: Final = -2
_DELETE: Final = -3
_STOP: Final = -4


class Segment:
    """One segment file and the state of its records (kept on the event loop)."""

    __slots__ = ("first_ms", "first_seq", "inflight", "last_seq", "path", "queued", "sealed",
                 "size", "start", "written")

    def __init__(self, first_seq: int, path: Path, size: int = 0, queued: int = 0,
                 start: int = 0, sealed: bool = False) -> None:
        self.first_seq = first_seq
        self.path = path
        #: bytes appended (or found at start)
        self.size = size
        #: records not yet handed to the driver nor dropped
        self.queued = queued
        #: records of the batch handed to the driver
        self.inflight = 0
        self.last_seq = first_seq - 1
        #: where its first record still needed starts
        self.start = start
        self.sealed = sealed
        #: received_ms of its oldest record still needed (about: the oldest event's age)
        self.first_ms = 0
        #: bytes the writer has written (set by the writer thread)
        self.written = size

    def __repr__(self) -> str:
        return (f"Segment({self.path.name}, size={self.size}, queued={self.queued}, "
                f"inflight={self.inflight}, sealed={self.sealed})")


class SpoolStore:
    """The segment files of one sink's spool (see the module docstring)."""

    def __init__(self, path: str | Path, max_bytes: int, fsync_interval_s: float,
                 sink: str) -> None:
        self.dir = Path(path)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = segment_size(self.max_bytes)
        #: the largest record that fits (a larger one is dropped on arrival)
        self.max_record = min(MAX_RECORD, self.max_bytes // 4)
        self.fsync_interval_s = fsync_interval_s
        self.write_interval_s = max(0.002, min(fsync_interval_s, MAX_WRITE_INTERVAL_S))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = (f"sink {sink!r}: cannot create the spool directory {self.dir}: "
                   f"{exc.strerror or exc}; check buffer.disk.path and its permissions")
            raise SpoolError(msg) from exc
        if not os.access(self.dir, os.W_OK | os.X_OK):
            msg = (f"sink {sink!r}: the spool directory {self.dir} is not writable by "
                   "this process; check buffer.disk.path and its permissions")
            raise SpoolError(msg)
        self._lock_fd: int | None = lock(self.dir)
        write_meta(self.dir, sink)
        #: corrupt records found at start (torn tails, bad frames, a bad ledger)
        self.corrupt = 0
        #: the segments with records still needed, oldest first (the last one is the
        #: active one, once something was appended)
        self.segments: deque[Segment] = deque()
        self.used = 0
        self.active: Segment | None = None
        self.released, bad_ledger = read_ledger(self.dir)
        self.corrupt += int(bad_ledger)
        #: records found at start, still needed
        self.restored = 0
        self.head = self.released
        self._recover()
        #: the released position the writer puts in the ledger next
        self.ledger_wanted = self.released
        self._ledger_written = self.released
        #: the last seq the writer has written
        self.written_seq = self.head - 1
        #: why the last write failed, ``None`` while writes succeed
        self.error: str | None = None
        self.write_errors = 0
        #: what the writer does next, in order: records ``(seq, frame)``, and commands
        #: ``(_OPEN | _SEAL | _DELETE, segment)``, ``(_STOP, None)``
        self._queue: deque[tuple[int, bytes | Segment | None]] = deque()
        self._pending_bytes = 0
        self._wake = threading.Event()
        self._written = threading.Condition()
        self._thread = threading.Thread(target=self._write_forever, daemon=True,
                                        name=f"spool-writer:{sink}")
        self._thread.start()

    # -- recovery ----------------------------------------------------------------------

    def _recover(self) -> None:
        for tmp in self.dir.glob("*.tmp"):  # a rewrite a killed process did not finish
            tmp.unlink(missing_ok=True)
        max_seq = self.released - 1
        for first, path in segment_paths(self.dir):
            scan = scan_segment(first, path, self.released)
            max_seq = max(max_seq, scan.max_seq, first - 1)
            self.corrupt += scan.corrupt
            if scan.corrupt:
                log.warning("spool %s: %s: %d corrupt record(s) cut out%s", self.dir,
                            path.name, scan.corrupt, " (a torn tail)" if scan.torn else "",
                            extra={"spool": str(self.dir), "corrupt": scan.corrupt})
            if not scan.records:
                path.unlink(missing_ok=True)
                continue
            if scan.corrupt:
                scan = self._repair(scan)
            seg = Segment(first, path, scan.size, scan.records, scan.start, sealed=True)
            seg.last_seq = scan.last_seq
            seg.first_ms = scan.first_received_ms
            self.segments.append(seg)
            self.used += seg.size
            self.restored += scan.records
        self.head = max_seq + 1

    def _repair(self, scan: SegmentScan) -> SegmentScan:
        """Rewrite a segment with its intact records only (the bad ones are counted
        already), so that the next start and ``spool verify`` find it clean."""
        data = scan.path.read_bytes()
        got = parse(data)
        tmp = scan.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for r in got.records:
                if r.seq >= self.released:
                    f.write(data[r.start:r.end])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, scan.path)
        fsync_dir(self.dir)
        return scan_segment(scan.first_seq, scan.path, self.released)

    # -- on the event loop ----------------------------------------------------------------

    def append(self, seq: int, data: bytes, received_ms: int) -> Segment:
        """Queue one framed record for writing; returns its segment."""
        seg = self.active
        if seg is None or seg.size >= self.segment_bytes:
            seg = self._roll(seq)
        if not seg.queued and not seg.inflight:
            seg.first_ms = received_ms
        seg.size += len(data)
        seg.queued += 1
        seg.last_seq = seq
        self.used += len(data)
        self._queue.append((seq, data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= WAKE_BYTES:
            self._pending_bytes = 0
            self._wake.set()
        return seg

    def _roll(self, seq: int) -> Segment:
        self.seal_active()
        seg = Segment(seq, self.dir / segment_name(seq))
        seg.written = 0
        self.segments.append(seg)
        self.active = seg
        self._queue.append((_OPEN, seg))
        return seg

    def seal_active(self) -> None:
        """Close the active segment: the next record starts a new one."""
        seg = self.active
        if seg is not None:
            seg.sealed = True
            self.active = None
            self._queue.append((_SEAL, seg))
            self.release(seg)

    def release(self, seg: Segment) -> None:
        """Delete ``seg`` if none of its records is needed any more."""
        if seg.sealed and not seg.queued and not seg.inflight and seg in self.segments:
            self.segments.remove(seg)
            self.used -= seg.size
            self._queue.append((_DELETE, seg))

    def after(self, seg: Segment) -> Segment | None:
        """The segment after ``seg``."""
        found = False
        for s in self.segments:
            if found:
                return s
            found = s is seg
        return None

    def set_released(self, released: int) -> None:
        self.ledger_wanted = released

    def wake(self) -> None:
        self._wake.set()

    # -- in a worker thread ------------------------------------------------------------------

    def read(self, seg: Segment, offset: int, limit: int, before: int,
             wait_s: float = 5.0) -> tuple[list[Record], int]:
        """Up to ``limit`` records of ``seg`` from ``offset`` whose seq is below ``before``,
        once the writer has written them; and the offset after the last one."""
        if self.written_seq < before - 1:
            self._wake.set()
            with self._written:
                self._written.wait_for(lambda: self.written_seq >= before - 1, wait_s)
        end = min(seg.written, seg.size)
        if offset >= end:
            return [], offset
        want = min(end - offset, max(READ_CHUNK, limit * 2048))
        with open(seg.path, "rb") as f:
            f.seek(offset)
            data = f.read(want)
            got = parse(data, final=False, before=before, limit=limit)
            if (not got.records and got.end == 0 and len(data) >= HEAD.size
                    and HEAD.size + HEAD.unpack_from(data)[1] > len(data)):
                # one record larger than the chunk: read it whole
                data += f.read(end - offset - len(data))
                got = parse(data, final=False, before=before, limit=limit)
        for r in got.records:
            r.start += offset
            r.end += offset
        return got.records, offset + got.end

    # -- the writer thread -------------------------------------------------------------------

    def _write_forever(self) -> None:
        fd: int | None = None
        ledger: int | None = None
        cur: Segment | None = None
        last_sync = time.monotonic()
        dirty = ledger_dirty = False
        stop = False
        queue = self._queue
        while not stop:
            self._wake.wait(self.write_interval_s)
            self._wake.clear()
            try:
                chunk: list[bytes] = []
                last = -1
                while queue:
                    kind, obj = queue[0]
                    if isinstance(obj, bytes):
                        chunk.append(obj)
                        last = kind
                        queue.popleft()
                        continue
                    if chunk:
                        self._write(fd, cur, chunk, last)
                        dirty = True
                        chunk = []
                    if obj is None:
                        stop = True
                    elif kind == _OPEN:
                        fd = os.open(obj.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                        cur = obj
                        fsync_dir(self.dir)
                    elif kind == _SEAL:
                        if fd is not None and cur is obj:
                            os.fsync(fd)
                            os.close(fd)
                            fd, cur, dirty = None, None, False
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(obj.path)
                    queue.popleft()
                if chunk:
                    self._write(fd, cur, chunk, last)
                    dirty = True
                if last >= 0:
                    with self._written:
                        self.written_seq = last
                        self._written.notify_all()
                now = time.monotonic()
                synced = stop or now - last_sync >= self.fsync_interval_s
                if fd is not None and dirty and synced:
                    os.fsync(fd)
                    dirty = False
                if synced:
                    last_sync = now
                wanted = self.ledger_wanted
                if wanted != self._ledger_written:
                    record = ledger_record(wanted)
                    if ledger is None:
                        ledger = os.open(self.dir / LEDGER_FILE, os.O_RDWR | os.O_CREAT, 0o640)
                        os.ftruncate(ledger, len(record))
                    os.pwrite(ledger, record, 0)
                    self._ledger_written = wanted
                    ledger_dirty = True
                if ledger is not None and ledger_dirty and (stop or synced):
                    os.fsync(ledger)
                    ledger_dirty = False
                self.error = None
            except OSError as exc:
                self.write_errors += 1
                if self.error is None:
                    log.error("spool %s: writing failed, retrying every %gs (accepted "
                              "events are held in memory meanwhile): %s", self.dir, RETRY_S,
                              exc, extra={"spool": str(self.dir)})
                self.error = f"{type(exc).__name__}: {exc}"
                time.sleep(RETRY_S)
        for open_fd in (fd, ledger):
            if open_fd is not None:
                os.close(open_fd)

    def _write(self, fd: int | None, seg: Segment | None, chunk: list[bytes],
               last: int) -> None:
        if fd is None or seg is None:
            msg = "spool writer: a record without an open segment"
            raise RuntimeError(msg)
        data = b"".join(chunk)
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        finally:
            seg.written += done
            if done < len(data):
                # what was written stays; the rest is put back in front of the queue
                self._queue.appendleft((last, data[done:]))

    # -- closing --------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, sync, write the ledger, release the lock (blocking)."""
        if self._lock_fd is None:
            return
        self._queue.append((_STOP, None))
        self._wake.set()
        self._thread.join(timeout_s)
        fd, self._lock_fd = self._lock_fd, None
        os.close(fd)
