"""``jsonl``: one message body per line, appended to a file, flushed per batch.

With the default ``cloudevents-json`` format each line is a whole envelope. The
topic is not written (a file has none): route to several ``jsonl`` sinks to split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pydantic import Field

from bridge.sinks import Message, Sink, SinkOptions


class JsonlOptions(SinkOptions):
    path: Path
    fsync: bool = Field(False, description="fsync after every batch (durable, slower)")


class JsonlSink(Sink[JsonlOptions]):
    options_model = JsonlOptions

    def __init__(self, name: str, options: JsonlOptions) -> None:
        super().__init__(name, options)
        self._file: IO[bytes] | None = None

    async def connect(self) -> None:
        path = self.options.path
        path.parent.mkdir(parents=True, exist_ok=True)
        # a local append is cheaper than a thread hop per batch; kept open across batches
        self._file = open(path, "ab")  # noqa: SIM115, ASYNC230

    async def publish(self, batch: Sequence[Message]) -> None:
        f = self._file
        if f is None:
            msg = f"sink {self.name!r}: file is not open"
            raise ConnectionError(msg)
        f.write(b"".join(m.body + b"\n" for m in batch))
        f.flush()
        if self.options.fsync:
            os.fsync(f.fileno())

    async def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
