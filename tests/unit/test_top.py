"""``aleno-bridge top`` reads only http(s) metrics endpoints."""

from __future__ import annotations

import argparse

import pytest

from bridge.top import check_url, run_top, scrape


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
