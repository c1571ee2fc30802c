"""Split the configured symbols between the pods of a sharded deployment.

A symbol belongs to exactly one shard: ``crc32(kind:SYMBOL) % count``. The hash is
stable across processes, Python versions and machines (unlike ``hash()``), so every
pod of a StatefulSet computes the same partition from the same configuration.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable


def shard_of(kind: str, symbol: str, count: int) -> int:
    """The shard index (``0 <= index < count``) that owns ``symbol`` of ``kind``."""
    if count < 1:
        msg = f"shard count must be >= 1, got {count}"
        raise ValueError(msg)
    key = f"{kind}:{symbol.strip().upper()}".encode()
    return zlib.crc32(key) % count


def shard_symbols(kind: str, symbols: Iterable[str], index: int, count: int) -> list[str]:
    """The symbols of ``symbols`` that shard ``index`` of ``count`` subscribes to, in order."""
    if not 0 <= index < count:
        msg = f"shard index must be in [0, {count}), got {index}"
        raise ValueError(msg)
    return [s for s in symbols if shard_of(kind, s, count) == index]
