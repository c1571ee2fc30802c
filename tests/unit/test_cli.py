"""The command line's own logic: the demo's settings are built as objects; the install
hints of ``aleno-bridge plugins``."""

from __future__ import annotations

from bridge.cli import DEMO_EQUITIES, DEMO_TICKERS, _core_extras, demo_settings, install_hints
from bridge.config import parse_config
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
