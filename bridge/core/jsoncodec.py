"""The JSON module handed to python-socketio (client and simulator).

python-socketio accepts any module-like object with ``dumps``/``loads``; it is a
process-wide setting. orjson is several times faster than the standard library on
price arrays. orjson refuses a few things the standard library accepts (integers
beyond 64 bits, NaN literals): such a packet falls back to the standard library, so
a hostile or odd peer can never make decoding raise where ``json`` would not.

Whatever the input, :func:`loads` raises only ``ValueError``: nesting beyond orjson's
limit (1024) would make the standard library recurse until ``RecursionError``; it is
refused as ``ValueError("JSON nested too deeply")`` instead, which python-engineio and
python-socketio treat as an unreadable packet.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(s: str | bytes, **_: Any) -> Any:
    try:
        return orjson.loads(s)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc).lower():
            msg = "JSON nested too deeply"
            raise ValueError(msg) from None
    try:
        return json.loads(s)
    except RecursionError:
        msg = "JSON nested too deeply"
        raise ValueError(msg) from None


def dumps(obj: Any, **kwargs: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), **kwargs)
