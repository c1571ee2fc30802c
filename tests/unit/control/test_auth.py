"""Bearer tokens with scopes (bridge.control.auth) and the control listener's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from bridge.config import ConfigError, Settings, parse_config
from bridge.config.schema import AuthConfig
from bridge.config.settings import control_listener
from bridge.control.auth import AuthError, Guard, Token, anonymous_scopes

A = "token-a-0123456789abcdef"
B = "token-b-fedcba9876543210"


def guard(anonymous: frozenset[str] = frozenset()) -> Guard:
    return Guard([Token("a", SecretStr(A), frozenset({"snapshot", "lease"}), 7),
                  Token("b", SecretStr(B), frozenset({"snapshot"}))], anonymous, 100)


def test_each_token_is_its_principal_with_its_scopes_and_caps() -> None:
    g = guard()
    a = g.check(f"Bearer {A}", "lease")
    assert (a.name, a.max_symbols, a.anonymous) == ("a", 7, False)
    b = g.check(f"bearer   {B} ", "snapshot")
    assert (b.name, b.max_symbols) == ("b", 100)  # the default cap
    with pytest.raises(AuthError) as info:
        g.check(f"Bearer {B}", "lease")
    assert info.value.status == 403 and "'lease' scope" in str(info.value)


@pytest.mark.parametrize("header", [None, "", "Bearer", f"Basic {A}", f"Bearer {A}x",
                                    f"Bearer {A[:-1]}", "Bearer " + "x" * 5000])
def test_no_or_a_wrong_token_is_401_and_never_quoted(header: str | None) -> None:
    with pytest.raises(AuthError) as info:
        guard().check(header, "snapshot")
    assert info.value.status == 401
    assert A not in str(info.value) and B not in str(info.value)


def test_anonymous_clients_get_their_scopes_and_a_wrong_token_stays_401() -> None:
    g = guard(frozenset({"snapshot"}))
    anon = g.check(None, "snapshot")
    assert anon.anonymous and anon.name == "anonymous" and anon.max_symbols == 100
    with pytest.raises(AuthError) as info:
        g.check(None, "lease")
    assert info.value.status == 401  # authenticate to get more
    with pytest.raises(AuthError) as wrong:
        g.check("Bearer not-a-token-of-ours", "snapshot")
    assert wrong.value.status == 401


def test_anonymous_scopes_by_door() -> None:
    tokens = [Token("a", SecretStr(A), frozenset({"snapshot"}))]
    assert anonymous_scopes(AuthConfig(), [], loopback=True) == {"snapshot", "lease"}
    assert anonymous_scopes(AuthConfig(), [], loopback=False) == frozenset()
    assert anonymous_scopes(AuthConfig(), tokens, loopback=True) == frozenset()
    explicit = AuthConfig(anonymous=["snapshot"])
    assert anonymous_scopes(explicit, tokens, loopback=False) == {"snapshot"}
    assert anonymous_scopes(AuthConfig(anonymous=[]), [], loopback=True) == frozenset()


def test_no_token_in_repr() -> None:
    g = guard()
    assert A not in repr(g) and B not in repr(g)
    assert A not in repr(Token("a", SecretStr(A), frozenset({"lease"})))
    assert g.names == ["a", "b"]


def _settings(control: str, http: str = "{host: 127.0.0.1}", env: dict[str, str] | None = None
              ) -> Settings:
    return parse_config(f"""
sinks: {{c: {{driver: console}}}}
http: {http}
control:
{control}
""", env=env or {})


def test_token_files_are_read_and_redacted(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(A + "\n")
    settings = _settings(f"  auth: {{tokens: [{{name: a, token_file: {tmp_path / 't'}, "
                         "scopes: [lease]}]}")
    assert [t.name for t in settings.tokens] == ["a"]
    assert settings.tokens[0].token.get_secret_value() == A
    assert A in settings.secrets()
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError) as info:
        _settings(f"  auth: {{tokens: [{{name: a, token_file: {tmp_path / 'short'}}}]}}")
    assert "control.auth.tokens[0].token_file: a token must be at least 16" in str(info.value)
    with pytest.raises(ConfigError) as dup:
        _settings(f"  auth: {{tokens: [{{name: a, token: {A}}}, {{name: b, token: {A}}}]}}")
    assert "the same token" in str(dup.value) and A not in str(dup.value)
    with pytest.raises(ConfigError) as anon:
        _settings(f"  auth: {{tokens: [{{name: anonymous, token: {A}}}]}}")
    assert "tokens.0.name" in str(anon.value) or "tokens[0].name" in str(anon.value)


def test_where_v1_is_served() -> None:
    legacy = _settings("  nats: null")
    assert control_listener(legacy.config) == (None, True)
    moved = _settings("  auth: {anonymous: [snapshot]}", http="{host: 0.0.0.0}")
    listener, on_probes = control_listener(moved.config)
    assert not on_probes and listener is not None
    assert (listener.host, listener.port) == ("127.0.0.1", 9465)
    own = _settings("  http: {port: 0}")
    listener, on_probes = control_listener(own.config)
    assert not on_probes and listener is not None and listener.port == 0
    off = _settings("  http: {enabled: false}")
    assert control_listener(off.config) == (None, False)
    # no HTTP at all, as before the split (the demo)
    quiet = _settings("  nats: null", http="{enabled: false}")
    assert control_listener(quiet.config) == (None, False)


def test_a_jetstream_stream_may_not_capture_the_control_door() -> None:
    from bridge.config.settings import subject_matches

    assert subject_matches("aleno.>", "aleno.bridge.snapshot")
    assert subject_matches("aleno.*.snapshot", "aleno.bridge.snapshot")
    assert not subject_matches("aleno.ticker.>", "aleno.bridge.snapshot")
    assert not subject_matches("aleno.bridge", "aleno.bridge.snapshot")
    text = """
sinks:
  bus: {driver: nats, servers: nats://127.0.0.1:4222, jetstream: true,
        stream: {name: P, subjects: ["aleno.ticker.>", "aleno.>"]}}
control:
  nats: {servers: [nats://127.0.0.1:4222]}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    assert "sinks.bus.stream.subjects[1]" in str(info.value)
    assert "sinks.bus.stream.subjects[0]" not in str(info.value)
    parse_config(text.replace(', "aleno.>"', ""), env={})
