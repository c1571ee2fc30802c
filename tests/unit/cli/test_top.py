"""``aleno-bridge top`` reads only http(s) metrics endpoints, by the names the bridge
exports."""

from __future__ import annotations

import argparse

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from bridge.cli.top import check_url, parse, render, run_top, scrape
from bridge.core import metrics as m
from tests.unit.core.test_metrics import snapshot


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host/metrics", "http://", "/tmp/x"])
def test_non_http_urls_are_refused(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_url(url) is not None
    with pytest.raises(ValueError, match="http"):
        scrape(url)
    args = argparse.Namespace(url=url, once=True, interval=0.1)
    assert run_top(args) == 2
    assert "--url must be" in capsys.readouterr().err


def test_http_urls_are_accepted() -> None:
    assert check_url("http://127.0.0.1:9464/metrics") is None
    assert check_url("https://bridge.internal/metrics") is None



def test_the_table_reads_the_names_the_bridge_exports() -> None:
    """``top`` and the collector share the metric names: a renamed metric shows here."""
    metrics = m.Metrics()
    metrics.attach(snapshot)
    text = generate_latest(metrics.registry).decode()
    console = Console(width=200, record=True)
    console.print(render(parse(text, 0.0), parse(text, 1.0)))
    out = console.export_text()
    assert "upstream subscribed  received/s 0.0  invalid 4" in out
    assert "reconnects 2" in out
    row = next(line for line in out.splitlines() if " bus " in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    # sink, state, published/s, published, queue, fill, dropped, conflated, failures
    assert cells == ["bus", "failing", "0.0", "10", "5", "10%", "3", "2", "7"]
