"""The spool's on-disk format: segment files of framed records, the ledger, the lock.

A spool is one directory per sink (``buffer.disk.path``)::

    spool.json                 {"format": 1, "sink": "<name>"}: what wrote it
    lock                       flock()ed by the process that has the spool open; its pid
    ledger                     16 bytes: b"ASPL", u64le RELEASED, u32le crc32 of the first 12
    00000000000000001234.seg   segment files, named by the sequence number of their first
    ...                        record, append-only; a new one is started when the active
                               one reaches the segment size, or at every start

Every record with a sequence number below ``RELEASED`` was confirmed by the bus or
dropped for a counted reason; a segment is deleted once none of its records is
needed. A record is one frame (little-endian)::

    offset size
    0      4    magic   b"\\xa5SR\\x01"
    4      4    length  bytes after the crc field (12 + meta + body)
    8      4    crc     zlib.crc32 of the length field and of the ``length`` bytes after crc
    12     8    seq     the record's sequence number (increasing, never reused)
    20     4    meta    the size of the meta field
    24     ...  meta    JSON array: [topic, key, content_type, attributes or null, kind,
                        symbol, base, quote, id, sent_ms, received_ms, time, price, source]
    ...    ...  body    the message body exactly as the driver receives it

What a record carries is what the worker hands the driver (:class:`~bridge.sinks.Message`:
topic, key, content type, CloudEvents attributes, body, and the event header the
drivers read), so a replayed event is published byte for byte as the first time.

Reading: a frame whose magic, length or crc does not check is corrupt; the reader
counts it and looks for the next magic from the following byte (a body is JSON and
never contains the magic's ``\\x01``), so one bad record never hides the intact ones
after it. A frame cut short at the end of a file is a torn tail (a write the process
did not finish), counted as one corrupt record.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from bridge.core.envelope import EventHeader
from bridge.sinks import Message

FORMAT_VERSION: Final = 1
MAGIC: Final = b"\xa5SR\x01"
META_FILE: Final = "spool.json"
LOCK_FILE: Final = "lock"
LEDGER_FILE: Final = "ledger"
SEGMENT_SUFFIX: Final = ".seg"
#: magic + length + crc
HEAD: Final = struct.Struct("<4sII")
#: seq + meta size
REC: Final = struct.Struct("<QI")
#: the bytes a frame adds to its meta and body
OVERHEAD: Final = HEAD.size + REC.size
_U32: Final = struct.Struct("<I")
_LEDGER: Final = struct.Struct("<4sQ")
LEDGER_MAGIC: Final = b"ASPL"
#: no record is larger (a length field above it is corruption)
MAX_RECORD: Final = 64 << 20
#: the segment size: 1/16 of ``max_bytes``, between these
MIN_SEGMENT: Final = 64 << 10
MAX_SEGMENT: Final = 8 << 20


class SpoolError(OSError):
    """A spool directory cannot be used (message names the cause and the fix)."""


class SpoolLockedError(SpoolError):
    """Another process has the spool open."""


def segment_size(max_bytes: int) -> int:
    """The size at which a segment is closed and a new one started."""
    return max(MIN_SEGMENT, min(MAX_SEGMENT, max_bytes // 16))


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segment_paths(directory: Path) -> list[tuple[int, Path]]:
    """The segment files of ``directory``, oldest first."""
    out = []
    for p in directory.glob(f"*{SEGMENT_SUFFIX}"):
        stem = p.name[: -len(SEGMENT_SUFFIX)]
        if stem.isdigit():
            out.append((int(stem), p))
    return sorted(out)


# -- records ----------------------------------------------------------------------------


def meta_of(m: Message) -> bytes:
    """The meta field of ``m`` (everything but the body)."""
    ev = m.event
    return orjson.dumps([m.topic, m.key, m.content_type, m.attributes or None, ev.kind,
                         ev.symbol, ev.base, ev.quote, ev.id, ev.sent_ms, ev.received_ms,
                         ev.time, ev.price, ev.source])


def frame(seq: int, meta: bytes, body: bytes) -> bytes:
    """One record, framed (one copy of the body: this runs once per accepted event)."""
    rec = REC.pack(seq, len(meta))
    length = _U32.pack(REC.size + len(meta) + len(body))
    crc = zlib.crc32(body, zlib.crc32(meta, zlib.crc32(rec, zlib.crc32(length))))
    return b"".join((MAGIC, length, _U32.pack(crc), rec, meta, body))


def message(meta: bytes | memoryview, body: bytes, fmt: str | None) -> Message:
    """The :class:`Message` a record holds (``fmt``: the sink's format, for the header's
    deprecated decoders)."""
    (topic, key, ctype, attrs, kind, symbol, base, quote, eid, sent_ms, received_ms, time,
     price, source) = orjson.loads(meta)
    h = object.__new__(EventHeader)
    h.kind, h.symbol, h.base, h.quote, h.id = kind, symbol, base, quote, eid
    h.sent_ms, h.received_ms, h.time, h.price, h.source = (sent_ms, received_ms, time,
                                                             price, source)
    h._body, h._format = body, fmt
    # Message's own __init__ checks what it is given; these fields were checked when the
    # record was written (this runs once per event read back)
    m = _new_message(Message)
    m.topic, m.key, m.body, m.content_type, m.event = topic, key, body, ctype, h
    m.attributes = attrs if attrs is not None else {}
    return m


_new_message: Final = object.__new__


@dataclass(slots=True)
class Record:
    """One intact record: where it is in its file, its sequence number, its fields."""

    start: int
    end: int
    seq: int
    meta: bytes
    body: bytes


@dataclass(slots=True)
class Parsed:
    """What :func:`parse` found in a buffer."""

    records: list[Record]
    #: corrupt frames (each region skipped up to the next magic counts once)
    corrupt: int
    #: where parsing stopped: the end of the last whole frame (or of what was skipped)
    end: int
    #: a frame was cut short at the end of the buffer (only with ``final``)
    torn: bool


def parse(buf: bytes, pos: int = 0, *, final: bool = True, before: int | None = None,
          limit: int | None = None) -> Parsed:
    """The intact records of ``buf`` from ``pos``.

    ``final``: the buffer ends where the file ends (an incomplete frame is a torn tail);
    otherwise an incomplete frame ends the parse before it (more is to be read).
    ``before``: stop before the first record whose seq is not below it. ``limit``: stop
    after that many records.
    """
    records: list[Record] = []
    corrupt = 0
    n = len(buf)
    i = pos
    torn = False
    unpack_head = HEAD.unpack_from
    while i < n:
        if limit is not None and len(records) >= limit:
            break
        if n - i < HEAD.size + REC.size:
            if final:
                torn = True
                corrupt += 1
                i = n
            break
        magic, length, crc = unpack_head(buf, i)
        end = i + HEAD.size + length
        if magic != MAGIC or length < REC.size or length > MAX_RECORD:
            corrupt += 1
            i = _resync(buf, i, final)
            continue
        if end > n:
            if not final:
                break
            nxt = buf.find(MAGIC, i + 1)
            if nxt < 0:  # cut short: a torn tail
                torn = True
                corrupt += 1
                i = n
                break
            corrupt += 1
            i = nxt
            continue
        if zlib.crc32(memoryview(buf)[i + HEAD.size:end],
                      zlib.crc32(memoryview(buf)[i + 4:i + 8])) != crc:
            corrupt += 1
            i = _resync(buf, i, final)
            continue
        seq, meta_len = REC.unpack_from(buf, i + HEAD.size)
        if before is not None and seq >= before:
            break
        body_at = i + OVERHEAD + meta_len
        if body_at > end:
            corrupt += 1
            i = end
            continue
        records.append(Record(i, end, seq, buf[i + OVERHEAD:body_at], buf[body_at:end]))
        i = end
    return Parsed(records, corrupt, i, torn)


def _resync(buf: bytes, i: int, final: bool) -> int:
    """Where the next frame may start after a corrupt one at ``i`` (without ``final``,
    a magic cut by the end of the buffer is kept for the next read)."""
    nxt = buf.find(MAGIC, i + 1)
    if nxt >= 0:
        return nxt
    return len(buf) if final else max(i + 1, len(buf) - len(MAGIC) + 1)


def iter_file(path: Path, offset: int = 0, chunk: int = 1 << 20) -> Iterator[Parsed]:
    """Parse ``path`` from ``offset`` in chunks (the last one ``final``)."""
    with open(path, "rb") as f:
        f.seek(offset)
        pending = b""
        base = offset
        while True:
            data = f.read(chunk)
            buf = pending + data if pending else data
            last = not data
            got = parse(buf, final=last)
            for r in got.records:
                r.start += base
                r.end += base
            yield got
            if last:
                return
            pending = buf[got.end:]
            base += got.end


# -- the ledger, the lock, the meta file ---------------------------------------------------


def read_ledger(directory: Path) -> tuple[int, bool]:
    """``(released, corrupt)``: 0 when there is no ledger, or a corrupt one."""
    try:
        data = (directory / LEDGER_FILE).read_bytes()
    except FileNotFoundError:
        return 0, False
    if len(data) != _LEDGER.size + 4:
        return 0, True
    magic, released = _LEDGER.unpack_from(data)
    (crc,) = _U32.unpack_from(data, _LEDGER.size)
    if magic != LEDGER_MAGIC or zlib.crc32(data[:_LEDGER.size]) != crc:
        return 0, True
    return int(released), False


def ledger_record(released: int) -> bytes:
    """The ledger's 16 bytes. The writer rewrites them in place (one ``pwrite`` of 16
    bytes at offset 0: a process that is killed cannot cut it; a torn write after a power
    loss fails the crc and counts as a corrupt ledger, whose spool is then delivered
    again whole: duplicates, never a loss)."""
    head = _LEDGER.pack(LEDGER_MAGIC, released)
    return head + _U32.pack(zlib.crc32(head))


def lock(directory: Path) -> int:
    """Take the spool's lock (raises :class:`SpoolLockedError`); returns its fd."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        msg = (f"spool {directory} is in use by another process (pid {holder}): two "
               "bridges cannot share a spool; give each its own buffer.disk.path")
        raise SpoolLockedError(msg) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(directory: Path) -> int | None:
    """The pid of the process that has the spool open, or ``None`` (not locked)."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_meta(directory: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        meta = orjson.loads((directory / META_FILE).read_bytes())
        if isinstance(meta, dict):
            return meta
    return None


def write_meta(directory: Path, sink: str) -> None:
    meta = read_meta(directory)
    if meta is not None and meta.get("sink") == sink:
        return
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps({"format": FORMAT_VERSION, "sink": sink}))
    os.replace(tmp, directory / META_FILE)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- scanning a spool (at start, and for ``aleno-bridge spool inspect/verify``) -----------


@dataclass(slots=True)
class SegmentScan:
    """One segment file as read: its intact records still needed (seq >= released)."""

    first_seq: int
    path: Path
    size: int
    #: intact records with seq >= released, the offset of the first, the last seq
    records: int = 0
    start: int = 0
    last_seq: int = -1
    #: bytes of those records (framed)
    live_bytes: int = 0
    #: received_ms of the first of them (the oldest event's age), 0 if none
    first_received_ms: int = 0
    #: sent_ms of the oldest and newest of them (only with ``times``)
    oldest_sent_ms: int | None = None
    newest_sent_ms: int | None = None
    #: the end of the last intact frame (what follows is a torn tail or garbage)
    good_end: int = 0
    corrupt: int = 0
    torn: bool = False
    #: seq of every intact record at or above released is known to be increasing
    max_seq: int = -1


def scan_segment(first_seq: int, path: Path, released: int, times: bool = False) -> SegmentScan:
    """Read a whole segment file and check every frame."""
    scan = SegmentScan(first_seq, path, path.stat().st_size)
    for got in iter_file(path):
        scan.corrupt += got.corrupt
        scan.torn = scan.torn or got.torn
        for r in got.records:
            scan.good_end = r.end
            scan.max_seq = max(scan.max_seq, r.seq)
            if r.seq < released:
                continue
            if not scan.records:
                scan.start = r.start
                with contextlib.suppress(ValueError, TypeError, orjson.JSONDecodeError):
                    scan.first_received_ms = int(orjson.loads(r.meta)[10])
            scan.records += 1
            scan.last_seq = r.seq
            scan.live_bytes += r.end - r.start
            if times:
                with contextlib.suppress(ValueError, TypeError, IndexError,
                                         orjson.JSONDecodeError):
                    sent = int(orjson.loads(r.meta)[9])
                    if scan.oldest_sent_ms is None or sent < scan.oldest_sent_ms:
                        scan.oldest_sent_ms = sent
                    if scan.newest_sent_ms is None or sent > scan.newest_sent_ms:
                        scan.newest_sent_ms = sent
    return scan


@dataclass(slots=True)
class SpoolScan:
    """A spool directory as read, without changing it."""

    path: Path
    sink: str | None
    released: int
    ledger_corrupt: bool
    segments: list[SegmentScan]
    #: the pid of the process that has it open, ``None`` if none
    holder: int | None

    @property
    def events(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def corrupt(self) -> int:
        """Corrupt records; a torn tail of the newest segment of a spool in use is a
        write in progress, not corruption."""
        n = int(self.ledger_corrupt) + sum(s.corrupt for s in self.segments)
        if self.holder is not None and self.segments and self.segments[-1].torn:
            n -= 1
        return n


def is_spool(directory: Path) -> bool:
    return directory.is_dir() and ((directory / META_FILE).exists()
                                   or (directory / LEDGER_FILE).exists()
                                   or bool(segment_paths(directory)))


def scan_spool(directory: Path, times: bool = True) -> SpoolScan:
    """Read a spool directory whole (``aleno-bridge spool inspect`` and ``verify``)."""
    meta = read_meta(directory)
    released, bad = read_ledger(directory)
    segments = [scan_segment(first, p, released, times) for first, p in segment_paths(directory)]
    sink = meta.get("sink") if meta is not None else None
    return SpoolScan(directory, sink if isinstance(sink, str) else None, released, bad,
                     segments, holder(directory))
