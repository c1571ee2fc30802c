"""The command line's own logic: the demo's settings are built as objects; the install
hints of ``aleno-bridge plugins``; the paragraph a failed bind of ``run`` or an
unreachable bridge in ``top`` prints."""

from __future__ import annotations

import errno
import os
import socket
import urllib.error

import pytest

from bridge.cli.main import (
    DEMO_EQUITIES,
    DEMO_TICKERS,
    _core_extras,
    demo_settings,
    install_hints,
    listen_problem,
    listeners,
)
from bridge.cli.top import START_HINT, unreachable
from bridge.config import Settings, parse_config
from bridge.sinks import DriverInfo, Drivers
from bridge.testing import MemorySink

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


EXTRAS = {"kafka": ["aiokafka"], "nats": ["nats-py"], "mqtt": ["paho-mqtt"],
          "all": ["aiokafka", "nats-py", "paho-mqtt"], "testing": ["pytest", "pytest-asyncio"]}


def _failed(name: str, error: str, dist: str = "aleno-bridge") -> DriverInfo:
    return DriverInfo(name, f"aleno_bridge_plugins.{name}_sink:Sink", dist, "0.1.0", None, error)


def test_a_builtin_driver_whose_library_is_missing_gets_its_extra() -> None:
    infos = [
        _failed("kafka", "ImportError: the kafka sink needs aiokafka (No module named "
                "'aiokafka'); install it with `pip install 'aleno-bridge[kafka]'`"),
        _failed("nats", "ModuleNotFoundError: No module named 'nats'"),
        _failed("mqtt", "ModuleNotFoundError: No module named 'paho'"),
    ]
    assert install_hints(infos, EXTRAS, installed=lambda _: True) == {
        "kafka": "pip install 'aleno-bridge[kafka]'",
        "nats": "pip install 'aleno-bridge[nats]'",
        "mqtt": "pip install 'aleno-bridge[mqtt]'",
    }


def test_a_missing_extra_distribution_gets_a_hint_whatever_the_error() -> None:
    info = _failed("nats", "AttributeError: module 'nats' has no attribute 'connect'")
    assert install_hints([info], EXTRAS, installed=lambda _: True) == {}
    assert install_hints([info], EXTRAS, installed=lambda d: d != "nats-py") == {
        "nats": "pip install 'aleno-bridge[nats]'"}


def test_no_hint_for_loaded_drivers_third_parties_or_drivers_without_an_extra() -> None:
    loaded = Drivers(injected={"kafka": MemorySink}).infos()
    third_party = _failed("nats", "ModuleNotFoundError: No module named 'nats'",
                          dist="acme-nats")
    no_extra = _failed("redis", "ModuleNotFoundError: No module named 'redis'")
    assert install_hints([*loaded, third_party, no_extra], EXTRAS,
                         installed=lambda _: False) == {}


def test_the_extras_come_from_the_installed_distribution() -> None:
    extras = _core_extras()
    assert {"kafka", "nats", "mqtt", "all"} <= set(extras)
    assert extras["kafka"] == ["aiokafka"] and extras["nats"] == ["nats-py"]
    assert extras["mqtt"] == ["paho-mqtt"]


# -- issue 19: a failed bind of ``run`` names its setting, the cause and the fix ------


def _bind_error(code: int, host: str, port: int) -> OSError:
    """The error asyncio's ``create_server`` raises (Python 3.11-3.13 wording)."""
    return OSError(code, f"error while attempting to bind on address ({host!r}, {port}): "
                         f"{os.strerror(code).lower()}")


def _settings(extra: str) -> Settings:
    return parse_config(f"source: {{api_key: k, tickers: [BTC/USD]}}\n"
                        f"sinks: {{s: {{driver: console}}}}\n{extra}", env={})


def test_a_port_in_use_names_http_port_and_the_fix() -> None:
    found = listeners(_settings("http: {port: 9999}\ncontrol: {http: {port: 9998}}\n"))
    why = listen_problem(_bind_error(errno.EADDRINUSE, "127.0.0.1", 9999), found, "c.yaml")
    assert why is not None
    assert why.startswith("cannot listen on 127.0.0.1:9999 for /healthz, /readyz and "
                          "/metrics (http.port): the port is already in use")
    assert "set http.port in c.yaml to a free port" in why
    assert "http: {enabled: false}" in why and "sport = :9999" in why


def test_a_control_port_in_use_names_control_http_port() -> None:
    found = listeners(_settings("control: {http: {port: 9998}}\n"))
    why = listen_problem(_bind_error(errno.EADDRINUSE, "127.0.0.1", 9998), found, "c.yaml")
    assert why is not None and "(control.http.port): the port is already in use" in why
    assert "set control.http.port in c.yaml to a free port" in why
    assert "enabled: false" not in why


def test_a_defaulted_control_listener_says_it_is_the_default() -> None:
    """``control.http`` absent, probes off loopback: /v1 gets the default 9465."""
    found = listeners(_settings("http: {host: 0.0.0.0}\n"
                                "control: {auth: {anonymous: [snapshot]}}\n"))
    assert [(x.setting, x.port) for x in found] == [("http", 9464), ("control.http", 9465)]
    why = listen_problem(_bind_error(errno.EADDRINUSE, "127.0.0.1", 9465), found, "c.yaml")
    assert why is not None and "control.http is not set in c.yaml" in why
    assert "default 127.0.0.1:9465" in why and "port: N}` with a free port N" in why


def test_a_privileged_port_and_a_foreign_address_say_what_to_change() -> None:
    found = listeners(_settings("http: {host: 10.1.2.3, port: 80}\n"))
    denied = listen_problem(_bind_error(errno.EACCES, "10.1.2.3", 80), found, "c.yaml")
    assert denied is not None and "(http.port): permission denied" in denied
    assert "CAP_NET_BIND_SERVICE" in denied and "above 1023" in denied
    foreign = listen_problem(_bind_error(errno.EADDRNOTAVAIL, "10.1.2.3", 80), found, "c.yaml")
    assert foreign is not None
    assert "(http.host): 10.1.2.3 is not an address of this machine" in foreign
    assert "Set http.host in c.yaml" in foreign


def test_other_errors_are_not_explained_as_a_listener() -> None:
    found = listeners(_settings("http: {port: 9999}\n"))
    refused = OSError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9999)")
    assert listen_problem(refused, found, "c.yaml") is None
    elsewhere = _bind_error(errno.EADDRINUSE, "127.0.0.1", 1234)  # not one of ours
    assert listen_problem(elsewhere, found, "c.yaml") is None
    assert listen_problem(_bind_error(errno.EADDRINUSE, "127.0.0.1", 9999), [], "c") is None


# -- top: what it says when no bridge answers ------------------------------------------


@pytest.mark.parametrize(("reason", "expected"), [
    (ConnectionRefusedError(111, "Connection refused"), "nothing listens at URL"),
    (socket.gaierror(-2, "Name or service not known"),
     "the host name '127.0.0.1' of URL does not resolve (Name or service not known)"),
    (TimeoutError("timed out"), "URL did not answer within 5s"),
])
def test_top_explains_an_unreachable_bridge(reason: OSError, expected: str) -> None:
    url = "http://127.0.0.1:9464/metrics"
    why = unreachable(url, urllib.error.URLError(reason), 5.0)
    assert why.startswith(expected.replace("URL", url))
    assert why.endswith(START_HINT)
    assert "URLError" not in why and "Errno" not in why

