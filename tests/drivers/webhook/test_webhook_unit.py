"""The example webhook plugin without an endpoint: discovery through its entry point,
options, formats and the topic rule.

Moved from ``tests/drivers/webhook/test_webhook_plugin.py`` so that ``make unit`` runs
them. Like there, every test fails (never skips) when the plugin is not installed.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge.config import ConfigError, parse_config
from bridge.sinks import Drivers
from tests.support.bridges import config_text as _config

NOT_INSTALLED = (
    "the example plugin is not installed in this environment: run "
    "`pip install ./plugins/examples/webhook` (from the repository root) first"
)

try:
    from aleno_bridge_webhook import WebhookOptions, WebhookSink
except ImportError:  # every test below then fails with NOT_INSTALLED (never skips)
    WebhookOptions = WebhookSink = None

TOKEN = "whk-8f3e1c0d-secret-token"


@pytest.fixture(autouse=True)
def _plugin_is_installed(request: pytest.FixtureRequest) -> None:
    """Every test needs the installed plugin (the discovery test reports it itself)."""
    if WebhookSink is None and request.function is not test_found_through_its_entry_point:
        pytest.fail(NOT_INSTALLED, pytrace=False)


def test_found_through_its_entry_point() -> None:
    infos = {i.name: i for i in Drivers().infos()}
    info = infos.get("webhook")
    if info is None:
        pytest.fail(NOT_INSTALLED, pytrace=False)
    assert info.error is None, info.error
    assert info.distribution == "aleno-bridge-webhook"
    assert info.target == "aleno_bridge_webhook:WebhookSink"
    assert info.driver is WebhookSink


def test_options_refuse_what_cannot_work() -> None:
    for bad in (
        {"url": "ftp://127.0.0.1/hook"},
        {"url": "127.0.0.1:8080/hook"},
        {"url": "https://user:pw@example.com/hook"},
        {"url": "http://127.0.0.1/hook", "headers": {"Authorization": "Bearer x"}},
        {"url": "http://127.0.0.1/hook", "headers": {"X-Evil": "a\r\nX-Injected: 1"}},
        {"url": "http://127.0.0.1/hook", "timeout_s": 0},
    ):
        with pytest.raises(ValidationError):
            WebhookOptions.model_validate(bad)
    ok = WebhookOptions.model_validate({"url": "https://example.com/h", "auth_token": TOKEN})
    assert ok.tls_verify is True


def test_config_refuses_binary_format_and_unsendable_topics() -> None:
    sinks = "  hook: {driver: webhook, url: 'http://127.0.0.1:9/h', format: cloudevents-binary}"
    routes = "  - {sinks: [hook]}"
    with pytest.raises(ConfigError) as err:
        parse_config(_config("http://127.0.0.1:9", sinks, routes))
    assert "does not carry 'cloudevents-binary'" in str(err.value)

    sinks = "  hook: {driver: webhook, url: 'http://127.0.0.1:9/h'}"
    routes = "  - {sinks: [hook], topic: 'prices {symbol}'}"
    with pytest.raises(ConfigError) as err:
        parse_config(_config("http://127.0.0.1:9", sinks, routes))
    assert "HTTP header" in str(err.value)

    assert WebhookSink.safe_token("A B\u00e9") == "A_B_"
    assert WebhookSink.check_topic("prices.ticker.BTC/USD") is None
