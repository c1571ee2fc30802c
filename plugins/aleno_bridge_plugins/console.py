"""``console``: live prices on the terminal (the demo's sink).

``style: lines`` prints one line per event; ``style: table`` prints a table of the
latest price of every symbol every ``refresh_s`` seconds. Output goes to stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from rich.console import Console
from rich.table import Table

from bridge.sinks import Message, Sink, SinkOptions


class ConsoleOptions(SinkOptions):
    style: Literal["lines", "table", "json"] = "lines"
    refresh_s: float = Field(2.0, gt=0)
    color: bool | None = None


def _price(p: float) -> str:
    return f"{p:,.2f}" if p >= 1 else f"{p:.8g}"


class ConsoleSink(Sink[ConsoleOptions]):
    options_model = ConsoleOptions

    def __init__(self, name: str, options: ConsoleOptions) -> None:
        super().__init__(name, options)
        self._console: Console | None = None
        self._latest: dict[tuple[str, str], Message] = {}
        self._last_table = 0.0

    async def connect(self) -> None:
        self._console = Console(file=sys.stdout, force_terminal=self.options.color,
                                no_color=self.options.color is False, highlight=False)

    async def publish(self, batch: Sequence[Message]) -> None:
        console = self._console
        if console is None:
            msg = f"sink {self.name!r} is not connected"
            raise ConnectionError(msg)
        style = self.options.style
        if style == "json":
            for m in batch:
                console.out(m.body.decode(), highlight=False)
        elif style == "lines":
            for m in batch:
                ev = m.event
                color = "cyan" if ev.kind == "ticker" else "magenta"
                console.print(
                    f"[dim]{ev.time[11:23]}[/] [{color}]{ev.kind:<6}[/] [bold]{ev.symbol:<10}[/] "
                    f"{_price(ev.price):>16}  [dim]-> {m.topic}[/]"
                )
        else:
            for m in batch:
                self._latest[(m.event.kind, m.event.symbol)] = m
            now = time.monotonic()
            if now - self._last_table >= self.options.refresh_s:
                self._last_table = now
                console.print(self._table())
        sys.stdout.flush()

    def _table(self) -> Table:
        table = Table(title=f"aleno-bridge: latest prices ({len(self._latest)} symbols)")
        for col in ("kind", "symbol", "price", "sent (UTC)", "topic"):
            table.add_column(col, justify="right" if col == "price" else "left")
        for (kind, symbol), m in sorted(self._latest.items()):
            table.add_row(kind, symbol, _price(m.event.price), m.event.time[11:23], m.topic)
        return table

    async def close(self) -> None:
        self._console = None
