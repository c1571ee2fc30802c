"""``aleno-bridge spool inspect|verify PATH``: what a sink's disk spool holds, and whether
it is intact.

PATH is one spool directory (a sink's ``buffer.disk.path``) or a directory whose
subdirectories are spools (one per sink). Both commands only read: they never repair
(the bridge cuts corrupt records out when it opens the spool) and may run while the
bridge runs (then the newest segment may end in a write in progress, which is not
counted as corruption). ``verify`` exits 1 when any spool holds a corrupt record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bridge.sinks.spool_format import SpoolScan, is_spool, scan_spool


class SpoolCommandError(Exception):
    """PATH is no spool (the message names the cause and the fix)."""


def spools(path: Path) -> list[Path]:
    """The spool directories at ``path``: itself, or its subdirectories that are spools."""
    if not path.is_dir():
        msg = f"{path} is not a directory: give a spool directory (a sink's buffer.disk.path)"
        raise SpoolCommandError(msg)
    if is_spool(path):
        return [path]
    found = sorted(p for p in path.iterdir() if is_spool(p))
    if not found:
        msg = (f"{path} holds no spool (no spool.json, ledger or *.seg file in it or in its "
               "subdirectories): give a sink's buffer.disk.path")
        raise SpoolCommandError(msg)
    return found


def _time(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def summary(scan: SpoolScan) -> dict[str, Any]:
    """What ``inspect`` shows of one spool."""
    oldest = [s.oldest_sent_ms for s in scan.segments if s.oldest_sent_ms is not None]
    newest = [s.newest_sent_ms for s in scan.segments if s.newest_sent_ms is not None]
    return {
        "path": str(scan.path),
        "sink": scan.sink,
        "events": scan.events,
        "bytes": scan.bytes,
        "segments": len(scan.segments),
        "oldest_event_time": _time(min(oldest) if oldest else None),
        "newest_event_time": _time(max(newest) if newest else None),
        "corrupt_records": scan.corrupt,
        "corrupt_by_segment": {s.path.name: s.corrupt for s in scan.segments if s.corrupt},
        "ledger_corrupt": scan.ledger_corrupt,
        "in_use_by_pid": scan.holder,
    }


def _line(info: dict[str, Any]) -> str:
    sink = f" (sink {info['sink']})" if info["sink"] else ""
    text = (f"{info['path']}{sink}: {info['events']:,} event(s), "
            f"{info['bytes'] / 2**20:,.2f} MiB in {info['segments']} segment(s)")
    if info["events"]:
        text += f"; oldest event {info['oldest_event_time']}, newest {info['newest_event_time']}"
    text += f"; corrupt records: {info['corrupt_records']}"
    if info["corrupt_by_segment"]:
        text += " (" + ", ".join(f"{k}: {v}" for k, v in info["corrupt_by_segment"].items()) + ")"
    if info["ledger_corrupt"]:
        text += "; the ledger is corrupt (the next start delivers everything present again)"
    if info["in_use_by_pid"] is not None:
        text += f"; in use by pid {info['in_use_by_pid']}"
    return text


def run_spool(action: str, path: str, as_json: bool = False) -> int:
    """``inspect`` (exit 0) or ``verify`` (exit 1 if any spool has a corrupt record)."""
    bad = 0
    for directory in spools(Path(path)):
        info = summary(scan_spool(directory, times=True))
        if as_json:
            print(orjson.dumps(info).decode())
        elif action == "verify":
            verdict = "ok" if not info["corrupt_records"] else "CORRUPT"
            print(f"{verdict}: {_line(info)}")
        else:
            print(_line(info))
        bad += int(bool(info["corrupt_records"]))
    if action == "verify" and bad:
        return 1
    return 0
