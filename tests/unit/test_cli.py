"""The command line's own logic: the demo's settings are built as objects."""

from __future__ import annotations

from bridge.cli import DEMO_EQUITIES, DEMO_TICKERS, demo_settings
from bridge.config import parse_config

URL = "http://127.0.0.1:8765"


def test_demo_settings_are_those_of_the_demo_configuration_file() -> None:
    """The settings the demo used to build from YAML text, now built as models."""
    text = f"""
source: {{url: "{URL}", api_key: demo-key, tickers: {DEMO_TICKERS}, equities: {DEMO_EQUITIES}}}
sinks:
  screen: {{driver: console, style: table, batch: {{linger_ms: 0}}}}
routes:
  - {{match: {{kind: ticker}}, sinks: [screen], topic: "prices.ticker.{{base}}-{{quote}}"}}
  - {{match: {{kind: equity}}, sinks: [screen], topic: "prices.equity.{{symbol}}"}}
http: {{enabled: false}}
"""
    expected = parse_config(text, env={})
    got = demo_settings(URL, "table")
    assert got.config.model_dump() == expected.config.model_dump()
    assert got.config.source.api_key is not None
    assert got.config.source.api_key.get_secret_value() == "demo-key"
    assert [r.model_dump() for r in got.routes] == [r.model_dump() for r in expected.routes]
    spec = got.sinks["screen"]
    assert spec.options == expected.sinks["screen"].options
    assert spec.common == expected.sinks["screen"].common
    assert not got.config.http.enabled
