"""The driver kit (bridge.sinks.kit) and the core's side of it (options-aware topic rules,
budgets, quiet loggers, connect bugs)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr, ValidationError

from bridge.config import SinkSpec
from bridge.config.schema import SinkCommon
from bridge.core import logs
from bridge.core.state import SinkState
from bridge.sinks import (
    Budget,
    Message,
    Sink,
    SinkOptions,
    SinkRejectedError,
    check_driver,
    topic_rules,
)
from bridge.sinks.kit import (
    KAFKA_PREFIX,
    PasswordOptions,
    Refusals,
    TlsFilesError,
    TlsOptions,
    ce_headers,
    derived_timeout,
    host_ports,
    mask_secrets,
    server_urls,
    split_list,
    timeout_problem,
    tls_context,
    topic_problem,
    user_properties,
)
from bridge.sinks.worker import SinkWorker
from bridge.testing import until
from bridge.testing.sample import sample_events

_EVENTS = sample_events(10)


def _msg(i: int, attributes: dict[str, str] | None = None) -> Message:
    return Message("t", "k", b"{}", "application/json", _EVENTS[i], attributes)


class Opts(TlsOptions, PasswordOptions):
    host: str = "h"
    timeout_s: float = 10.0


def test_tls_and_password_mixins_validate() -> None:
    with pytest.raises(ValidationError, match="tls_key_file needs tls_cert_file"):
        Opts.model_validate({"tls_key_file": "/k.pem"})
    with pytest.raises(ValidationError, match="password needs a username"):
        Opts.model_validate({"password": "pw"})
    with pytest.raises(ValidationError, match="no_such"):
        Opts.model_validate({"no_such": 1})
    o = Opts.model_validate({"username": "u", "password": "s3cret-pw", "tls_ca_file": "/ca"})
    assert o.tls_files == ["tls_ca_file"] and "s3cret-pw" not in repr(o)


def test_tls_context_names_the_missing_file_and_honours_verify(tmp_path: Path) -> None:
    with pytest.raises(TlsFilesError, match=r"tls_ca_file '.*no\.pem' is not a readable"):
        tls_context(tmp_path / "no.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TlsFilesError, match="cannot load the TLS files"):
        tls_context(bad)
    assert tls_context(verify=False).verify_mode == ssl.CERT_NONE
    ctx = tls_context(check_hostname=False)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def test_server_lists() -> None:
    assert split_list(" a:1, ,b:2 ") == ["a:1", "b:2"]
    assert host_ports([" a:1 ", "b:65535"]) == ["a:1", "b:65535"]
    with pytest.raises(ValueError, match="give at least one broker as host:port"):
        host_ports([], "broker")
    with pytest.raises(ValueError, match="'a:0' is not host:port"):
        host_ports(["a:0"])
    assert server_urls(["h:4222", "tls://x:1"], ("nats", "tls")) == [
        "nats://h:4222", "tls://x:1"]
    with pytest.raises(ValueError, match=r"servers\[1\] must look like"):
        server_urls(["h:1", "http://x:1"], ("nats",))
    with pytest.raises(ValueError, match=r"servers\[0\] holds credentials"):
        server_urls(["nats://u:p@h:1"], ("nats",))


def test_cloudevents_headers_per_binding() -> None:
    binary = _msg(1, {"id": "id-1", "specversion": "1.0"})
    assert ce_headers(binary) == {"content-type": "application/json", "ce-id": "id-1",
                                  "ce-specversion": "1.0"}
    assert ce_headers(binary, KAFKA_PREFIX)["ce_specversion"] == "1.0"
    assert ce_headers(_msg(2)) == {"content-type": "application/json"}
    assert ce_headers(_msg(2), KAFKA_PREFIX, always_id=True)["ce_id"] == _EVENTS[2].id
    assert user_properties(binary) == [("id", "id-1"), ("specversion", "1.0")]


def test_refusals_give_the_exact_count_and_which() -> None:
    batch = [_msg(i) for i in range(5)]
    r = Refusals("bus", batch, shown=1)
    assert r.error() is None
    r.add(batch[3], "too large")
    r.add(1, "denied")
    r.add(batch[3], "again")  # counted once
    with pytest.raises(SinkRejectedError) as info:
        r.raise_if_any("too_large")
    err = info.value
    assert err.rejected == 2 and list(err.refused or ()) == [1, 3]
    assert err.reason == "too_large"
    assert "2 of 5 message(s)" in str(err) and f"{batch[3].id}: too large" in str(err)
    assert "(+1 more)" in str(err)
    with pytest.raises(ValueError, match="not part of this batch"):
        r.add(_msg(9), "x")


def test_topic_problem_shared_checks() -> None:
    assert topic_problem("") == "the topic is empty"
    assert topic_problem("", noun="subject") == "the subject is empty"
    too_long = "the topic has 3 characters; Kafka allows 2"
    assert topic_problem("abc", max_chars=2, bus="Kafka") == too_long
    assert topic_problem("é", max_bytes=1) == "the topic is longer than 1 bytes"
    assert topic_problem("a\x01b") == "the topic contains a control character"
    assert topic_problem("a\x01b", control_chars=True) is None
    import re

    found = topic_problem("a/b c", forbidden=re.compile(r"[/ ]"), bus="X", allowed="letters")
    assert found == "X topics allow only letters (found ' ' '/')"


def test_timeouts_derive_from_the_budget() -> None:
    default = Opts()
    assert derived_timeout(default, "timeout_s", 15.0) == 10.0
    assert derived_timeout(default, "timeout_s", 5.0) == pytest.approx(4.0)
    assert derived_timeout(default, "timeout_s", 5.0, reserve_s=1.0) == pytest.approx(3.0)
    explicit = Opts(timeout_s=10.0)
    assert derived_timeout(explicit, "timeout_s", 5.0) == 10.0
    assert timeout_problem(default, "timeout_s", 5.0, "publish_timeout_s") is None
    problem = timeout_problem(explicit, "timeout_s", 5.0, "publish_timeout_s")
    assert problem is not None and problem.startswith("timeout_s: 10 does not fit in "
                                                      "retry.publish_timeout_s (5s)")
    assert timeout_problem(Opts(timeout_s=4.0), "timeout_s", 5.0, "x", reserve_s=1.0)


def test_mask_secrets() -> None:
    o = Opts(username="u", password=SecretStr("hunter2-pw"))
    assert mask_secrets("login hunter2-pw failed", o) == "login ********** failed"


# -- the core's side --------------------------------------------------------------


class _O(SinkOptions):
    prefix: str = "p"


class _Base(Sink[_O]):
    options_model = _O

    async def connect(self) -> None: ...
    async def publish(self, batch: Sequence[Message]) -> None: ...
    async def close(self) -> None: ...


class OldStyle(_Base):
    @classmethod
    def safe_token(cls, value: str) -> str:
        return value.replace("/", "_")

    @classmethod
    def check_topic(cls, topic: str) -> str | None:
        return None if topic else "empty"


class NewStyle(_Base):
    @classmethod
    def safe_token(cls, value: str, options: SinkOptions | None = None) -> str:
        prefix = options.prefix if isinstance(options, _O) else ""
        return prefix + value

    @classmethod
    def check_topic(cls, topic: str, options: SinkOptions | None = None) -> str | None:
        if isinstance(options, _O) and not topic.startswith(options.prefix):
            return f"must start with {options.prefix}"
        return None


class BadSignature(_Base):
    @classmethod
    def safe_token(cls, value: str, options: SinkOptions, extra: int) -> str:  # type: ignore[override]
        return value


def test_topic_rules_pass_options_only_to_drivers_that_take_them() -> None:
    old = topic_rules(OldStyle, _O())
    assert old.safe_token("A/B") == "A_B" and old.check_topic("") == "empty"
    new = topic_rules(NewStyle, _O(prefix="x."))
    assert new.safe_token("A") == "x.A"
    assert new.check_topic("y.A") == "must start with x."
    assert check_driver(OldStyle) is None and check_driver(NewStyle) is None
    assert "safe_token must take one argument, or two" in (check_driver(BadSignature) or "")


def _spec(driver: type[Sink[Any]], **common: Any) -> SinkSpec:
    c = SinkCommon.model_validate({"driver": "x", **common})
    return SinkSpec("s", c, driver, driver.options_model())


class Buggy(_Base):
    quiet_loggers: ClassVar[tuple[str, ...]] = ("test.kit.library",)
    calls = 0

    async def connect(self) -> None:
        type(self).calls += 1
        raise KeyError("v")  # what no bus raises: a bug


async def test_a_connect_bug_is_visible_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    spec = _spec(Buggy, retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02,
                               "publish_timeout_s": 3, "connect_timeout_s": 2})
    worker = SinkWorker(spec)
    assert worker.sink.budget == Budget(3.0, 2.0)
    caplog.set_level(logging.ERROR, "aleno_bridge.runner")
    task = worker.start()
    try:
        await until(lambda: Buggy.calls >= 3, 5, "three connect attempts")
    finally:
        worker.begin_stop()
        await worker.stop(1.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    bugs = [r for r in caplog.records if "bug in the driver" in r.getMessage()]
    assert len(bugs) == 1 and bugs[0].exc_info is not None
    assert worker.stats.connect_driver_errors >= 3
    assert worker.stats.connect_failures >= 3


async def test_a_connect_bug_shows_as_driver_error_in_the_state() -> None:
    worker = SinkWorker(_spec(Buggy))
    assert not await worker._connect()
    assert worker.state == SinkState.FAILING
    assert (worker.snapshot().last_error or "").startswith("driver_error: KeyError")


def test_driver_loggers_are_quieted_by_the_core() -> None:
    lib = logging.getLogger("test.kit.library")
    lib.setLevel(logging.NOTSET)
    logs.setup("INFO", "text")
    SinkWorker(_spec(Buggy))
    assert lib.level == logging.CRITICAL
    logs.setup("DEBUG", "text")
    assert lib.level == logging.WARNING
    assert "aiokafka" not in logs.QUIET_LOGGERS and "socketio" in logs.QUIET_LOGGERS
