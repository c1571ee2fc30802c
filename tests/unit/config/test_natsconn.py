"""The one NATS connection module (:mod:`bridge.sinks.natsconn`) the ``nats`` driver and
the control surface's NATS door share: the options and their checks, the nats-py
keyword arguments, TLS, the warnings; and ``control.nats``'s deprecated keys
(``username``, ``credentials_file``)."""

from __future__ import annotations

import ssl
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aleno_bridge_plugins.nats import NatsOptions, NatsSink
from aleno_bridge_plugins.nats.sink import _connect_kwargs, _Events
from pydantic import ValidationError

from bridge.cli.main import main
from bridge.config import ConfigError, ControlNatsConfig, Settings, parse_config
from bridge.sinks.kit import TlsFilesError
from bridge.sinks.natsconn import (
    NatsConnectionOptions,
    connect_kwargs,
    plain_text_problem,
    refused_credentials,
    security_warnings,
    server_url,
)
from tests.support.tls import make_tls_files

SERVERS = "nats://127.0.0.1:4222"


@pytest.fixture
def nkeys_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``creds_file`` / ``nkeys_seed`` are refused without the ``nkeys`` package (only
    imported by nats-py when it connects): a stand-in lets the options validate."""
    if "nkeys" not in sys.modules:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "nkeys", types.ModuleType("nkeys"))
    yield


def opts(**raw: Any) -> NatsConnectionOptions:
    return NatsConnectionOptions.model_validate({"servers": SERVERS, **raw})


def kwargs_of(o: NatsConnectionOptions, **extra: Any) -> dict[str, Any]:
    return connect_kwargs(o, name="n", tls=o.connection_tls(), **extra)


CREDENTIALS = ("user", "password", "token", "user_credentials", "nkeys_seed")


# -- the keyword arguments -------------------------------------------------------------


def test_no_credentials_no_tls() -> None:
    kw = kwargs_of(opts())
    assert kw == {"servers": [SERVERS], "name": "n", "connect_timeout": 5.0}


def test_user_and_password() -> None:
    kw = kwargs_of(opts(user="alice", password="pw-secret"))
    assert (kw["user"], kw["password"]) == ("alice", "pw-secret")
    assert [k for k in CREDENTIALS if k in kw] == ["user", "password"]


def test_token() -> None:
    kw = kwargs_of(opts(token="tok-secret"))
    assert kw["token"] == "tok-secret"
    assert [k for k in CREDENTIALS if k in kw] == ["token"]


@pytest.mark.usefixtures("nkeys_installed")
@pytest.mark.parametrize(("option", "kwarg"), [("creds_file", "user_credentials"),
                                               ("nkeys_seed", "nkeys_seed")])
def test_creds_file_and_nkeys_seed(tmp_path: Path, option: str, kwarg: str) -> None:
    path = tmp_path / "x"
    kw = kwargs_of(opts(**{option: str(path)}))
    assert kw[kwarg] == str(path)
    assert [k for k in CREDENTIALS if k in kw] == [kwarg]


def test_overrides_callbacks_and_client_settings() -> None:
    async def cb(*_: Any) -> None: ...

    o = opts(servers="nats://a:4222, nats://b:4222", connect_timeout_s=3)
    kw = connect_kwargs(o, name="x-control", tls=None, servers=["nats://b:4222"],
                        connect_timeout_s=0.5, callbacks={"error_cb": cb},
                        allow_reconnect=False)
    assert kw["servers"] == ["nats://b:4222"] and kw["connect_timeout"] == 0.5
    assert kw["error_cb"] is cb and kw["allow_reconnect"] is False
    assert connect_kwargs(o, name="x", tls=None)["connect_timeout"] == 3
    with pytest.raises(TypeError, match="unknown nats-py callbacks: eror_cb"):
        connect_kwargs(o, name="x", tls=None, callbacks={"eror_cb": cb})
    with pytest.raises(TypeError, match="set by connect_kwargs itself: token"):
        connect_kwargs(o, name="x", tls=None, token="sneaked-in")


# -- TLS ---------------------------------------------------------------------------------


def test_tls_context_and_hostname(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    o = opts(servers="tls://127.0.0.1:4222", tls_ca_file=str(files.ca),
             tls_cert_file=str(files.cert), tls_key_file=str(files.key),
             tls_hostname="nats.internal")
    kw = kwargs_of(o)
    assert isinstance(kw["tls"], ssl.SSLContext)
    assert kw["tls"].verify_mode == ssl.CERT_REQUIRED and kw["tls"].check_hostname
    assert kw["tls_hostname"] == "nats.internal"


def test_tls_is_asked_by_a_scheme_or_any_tls_option(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    assert not opts().uses_tls and opts().connection_tls() is None
    for raw in ({"servers": "tls://h:4222"}, {"servers": "wss://h:443"},
                {"tls_ca_file": str(files.ca)}, {"tls_verify": False},
                {"tls_hostname": "h"},
                {"tls_cert_file": str(files.cert), "tls_key_file": str(files.key)}):
        assert opts(**raw).uses_tls, raw
    off = opts(tls_verify=False).connection_tls()
    assert off is not None and off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    # no tls_hostname without TLS
    assert "tls_hostname" not in connect_kwargs(opts(), name="n", tls=None)


def test_unreadable_tls_file_names_the_option(tmp_path: Path) -> None:
    o = opts(tls_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(TlsFilesError, match="tls_ca_file"):
        o.connection_tls()


def test_plain_text_problem_and_server_url() -> None:
    url = types.SimpleNamespace(scheme="nats", hostname="h", port=4222)
    plain = types.SimpleNamespace(connected_url=url, _server_info={"tls_required": False})
    tls = types.SimpleNamespace(connected_url=url, _server_info={"tls_required": True})
    ctx = ssl.create_default_context()
    assert server_url(plain) == "nats://h:4222" and server_url(object()) == "?"
    assert plain_text_problem(plain, None) is None
    assert plain_text_problem(tls, ctx) is None
    problem = plain_text_problem(plain, ctx)
    assert problem is not None and "nats://h:4222 does not require TLS" in problem


def test_refused_credentials() -> None:
    class AuthorizationError(Exception): ...

    assert refused_credentials(Exception("nats: 'Authorization Violation'"))
    assert refused_credentials(AuthorizationError())
    assert not refused_credentials(TimeoutError())


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "error"), [
    ({"servers": []}, "at least 1"),
    ({"servers": "http://a:4222"}, "nats"),
    ({"servers": "nats://alice:pw-secret@a:4222"}, "credentials"),
    ({"user": "u"}, "user and password go together"),
    ({"password": "p"}, "user and password go together"),
    ({"user": "u", "password": "p", "token": "t"},
     "choose one authentication method, not user/password and token"),
    ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"tls_key_file": "k.pem"}, "tls_key_file needs tls_cert_file"),
    ({"connect_timeout_s": 0}, "greater than 0"),
    ({"connect_timeout_s": float("inf")}, "finite"),
    ({"secure": True}, "extra"),
])
def test_invalid_options(raw: dict[str, Any], error: str) -> None:
    for model in (NatsConnectionOptions, NatsOptions, ControlNatsConfig):
        with pytest.raises(ValidationError) as info:
            model.model_validate({"servers": SERVERS, **raw})
        assert error in str(info.value), (model, str(info.value))
        assert "pw-secret" not in str(info.value.errors(include_input=False))


@pytest.mark.usefixtures("nkeys_installed")
def test_only_one_authentication_method(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not token and creds_file and nkeys_seed"):
        opts(token="t", creds_file=str(tmp_path / "c"), nkeys_seed=str(tmp_path / "s"))


def test_creds_need_the_nkeys_package_on_both_sides(tmp_path: Path) -> None:
    try:
        import nkeys  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("nkeys is installed")
    for model in (NatsOptions, ControlNatsConfig):
        for option in ("creds_file", "nkeys_seed"):
            with pytest.raises(ValidationError, match="pip install nkeys"):
                model.model_validate({"servers": SERVERS, option: str(tmp_path / "x")})


def test_security_warnings() -> None:
    assert security_warnings(opts()) == []
    assert [w.split(":")[0] for w in security_warnings(opts(token="t"))] == ["token"]
    assert [w.split(":")[0] for w in security_warnings(opts(user="u", password="p"))] \
        == ["password"]
    assert security_warnings(opts(servers="tls://h:4222", token="t")) == []
    found = security_warnings(opts(servers="tls://h:4222", tls_verify=False))
    assert len(found) == 1 and found[0].startswith("tls_verify: false:")


# -- both users ------------------------------------------------------------------------------


def test_the_driver_and_the_door_use_the_same_options() -> None:
    assert issubclass(NatsOptions, NatsConnectionOptions)
    assert issubclass(ControlNatsConfig, NatsConnectionOptions)
    raw = {"servers": SERVERS, "user": "u", "password": "p", "tls_hostname": "h",
           "connect_timeout_s": 2}
    driver = NatsOptions.model_validate(raw)
    door = ControlNatsConfig.model_validate(raw)
    events = _Events("s")
    kw = _connect_kwargs(driver, list(driver.servers), events, driver.connection_tls(),
                         2.0, 10.0)
    assert (kw["user"], kw["password"], kw["tls_hostname"]) == ("u", "p", "h")
    assert kw["allow_reconnect"] is False and kw["closed_cb"] == events.on_lost
    shared = connect_kwargs(door, name="aleno-bridge-control", tls=door.connection_tls())
    assert {k: shared[k] for k in ("servers", "user", "password", "connect_timeout")} \
        == {k: kw[k] for k in ("servers", "user", "password", "connect_timeout")}
    assert NatsSink.security_warnings(driver) == security_warnings(door)


# -- control.nats: the new names and the deprecated ones ---------------------------------------


def door_config(nats: str) -> str:
    return f"""
source: {{api_key: k, tickers: [BTC/USD]}}
sinks: {{out: {{driver: console}}}}
control:
  nats: {{servers: ["{SERVERS}"], {nats}}}
"""


def load(nats: str) -> Settings:
    return parse_config(door_config(nats), env={})


def test_control_nats_takes_the_driver_names(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path)
    s = load(f"user: alice, password: pw-secret, tls_ca_file: '{files.ca}', "
             f"tls_cert_file: '{files.cert}', tls_key_file: '{files.key}', "
             "tls_hostname: nats.internal")
    door = s.config.control.nats
    assert door is not None and door.user == "alice" and door.deprecated_keys == {}
    assert door.tls_hostname == "nats.internal" and door.uses_tls
    assert s.warnings == [] and s.deprecated == ()


def test_username_is_a_deprecated_alias_of_user() -> None:
    s = load("username: alice, password: pw-secret")
    door = s.config.control.nats
    assert door is not None and door.user == "alice"
    assert door.password is not None and door.password.get_secret_value() == "pw-secret"
    assert door.deprecated_keys == {"username": "user"}
    warning = "control.nats.username: deprecated, use control.nats.user"
    assert warning in s.warnings and s.deprecated == (warning,)
    # the same connection as with the new name
    assert "username" not in door.model_dump()
    assert door.model_dump() == ControlNatsConfig.model_validate(
        {"servers": [SERVERS], "user": "alice", "password": "pw-secret"}).model_dump()


@pytest.mark.usefixtures("nkeys_installed")
def test_credentials_file_is_a_deprecated_alias_of_creds_file(tmp_path: Path) -> None:
    creds = tmp_path / "bridge.creds"
    s = load(f"credentials_file: '{creds}'")
    door = s.config.control.nats
    assert door is not None and door.creds_file == creds
    assert s.warnings == ["control.nats.credentials_file: deprecated, use "
                          "control.nats.creds_file"]
    kw = connect_kwargs(door, name="n", tls=None)
    assert kw["user_credentials"] == str(creds)


@pytest.mark.usefixtures("nkeys_installed")
@pytest.mark.parametrize(("both", "old", "new"), [
    ("username: a, user: b, password: p", "username", "user"),
    ("credentials_file: /a.creds, creds_file: /b.creds", "credentials_file", "creds_file"),
])
def test_old_and_new_key_at_once_is_an_error_naming_the_path(
    both: str, old: str, new: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        load(both)
    assert info.value.problems == [
        f"control.nats: {old} and {new} are both set: {old} is the deprecated name of "
        f"{new}; keep {new} only"]


def test_control_nats_secrets_without_tls_are_a_warning() -> None:
    s = load("token: tok-secret-value")
    assert len(s.warnings) == 1 and s.warnings[0].startswith(
        "control.nats.token: no TLS is configured")
    assert "tok-secret-value" not in str(s.warnings)


def test_validate_prints_the_deprecation(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(door_config("username: alice, password: pw-secret"))
    assert main(["validate", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: control.nats.username: deprecated, use control.nats.user" in err
    assert "pw-secret" not in err
