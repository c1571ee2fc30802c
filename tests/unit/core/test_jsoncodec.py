"""The JSON module handed to python-socketio: orjson first, the standard library for
what orjson refuses, and only ``ValueError`` out, whatever the input."""

from __future__ import annotations

import pytest

from bridge.core import jsoncodec


def test_the_json_codec_refuses_deep_nesting_with_a_value_error() -> None:
    for depth in (2_000, 200_000):
        with pytest.raises(ValueError, match="nested too deeply"):
            jsoncodec.loads("[" * depth + "]" * depth)
    assert jsoncodec.loads("[NaN]")[0] != jsoncodec.loads("[NaN]")[0]


def test_what_orjson_refuses_falls_back_to_the_standard_library() -> None:
    assert jsoncodec.loads("[18446744073709551616]") == [2**64]
    assert jsoncodec.dumps({"n": 2**64}) == '{"n":18446744073709551616}'
    assert jsoncodec.loads(b'{"a": [1.5]}') == {"a": [1.5]}
    assert jsoncodec.dumps({"a": [1.5]}) == '{"a":[1.5]}'
    with pytest.raises(ValueError):
        jsoncodec.loads("{not json")
