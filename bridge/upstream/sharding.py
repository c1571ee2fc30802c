"""Split the configured symbols between the pods of a sharded deployment.

A symbol belongs to exactly one shard: ``crc32(kind:SYMBOL) % count``. The hash is
stable across processes, Python versions and machines (unlike ``hash()``), so every
pod of a StatefulSet computes the same partition from the same configuration.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bridge.config.schema import SourceConfig


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


def configured_symbols(source: SourceConfig) -> dict[str, list[str]]:
    """The configured symbols this process subscribes, by kind, in the file's order:
    all of them, or those of its shard (``source.shard``)."""
    out = {"ticker": list(source.tickers), "equity": list(source.equities)}
    shard = source.shard
    if shard is not None:
        out = {k: shard_symbols(k, v, shard.index, shard.count) for k, v in out.items()}
    return out
