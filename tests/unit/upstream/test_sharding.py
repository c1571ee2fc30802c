"""Symbol sharding: a stable partition every pod computes alike."""

from __future__ import annotations

import zlib

import pytest

from bridge.upstream.sharding import shard_of, shard_symbols

SYMBOLS = [f"SYM{i}/USD" for i in range(200)]


def test_shard_of_is_crc32_of_kind_and_normalized_symbol() -> None:
    assert shard_of("ticker", "BTC/USD", 7) == zlib.crc32(b"ticker:BTC/USD") % 7
    assert shard_of("ticker", " btc/usd ", 7) == shard_of("ticker", "BTC/USD", 7)
    assert shard_of("ticker", "X", 1) == 0


def test_every_symbol_belongs_to_exactly_one_shard() -> None:
    shards = [shard_symbols("ticker", SYMBOLS, i, 4) for i in range(4)]
    assert sorted(s for shard in shards for s in shard) == sorted(SYMBOLS)
    assert all(shards), "200 symbols over 4 shards leave none empty"


def test_the_kind_is_part_of_the_key() -> None:
    tickers = [shard_of("ticker", s, 16) for s in SYMBOLS]
    equities = [shard_of("equity", s, 16) for s in SYMBOLS]
    assert tickers != equities


def test_shard_symbols_keeps_the_order() -> None:
    mine = shard_symbols("equity", SYMBOLS, 1, 3)
    assert mine == [s for s in SYMBOLS if s in set(mine)]


@pytest.mark.parametrize("count", [0, -1])
def test_a_count_below_one_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match="shard count must be >= 1"):
        shard_of("ticker", "BTC/USD", count)


@pytest.mark.parametrize("index", [-1, 3])
def test_an_index_out_of_range_is_refused(index: int) -> None:
    with pytest.raises(ValueError, match=r"shard index must be in \[0, 3\)"):
        shard_symbols("ticker", SYMBOLS, index, 3)
