"""The conformance suite's own rules, without a bus: key checks, failure messages,
the mutant runner's verdicts, and the option-alias pattern the guide documents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import Field

from bridge.config import ConfigError, parse_config
from bridge.sinks import Drivers, Message, Sink, SinkOptions
from bridge.testing.conformance import BusProbe, Received, SinkConformance
from bridge.testing.mutants import Mutant, MutantResult, _first_failure, assert_killed
from bridge.testing.sample import messages, sample_events
from bridge.testing.wait import until


class Probe(BusProbe):
    def __init__(self, keys: bool | None) -> None:
        self.delivers_keys = keys

    async def subscribe(self, topic: str) -> None:
        pass

    async def received(self, count: int, timeout: float) -> list[Received]:
        return []


def arrived(batch: Sequence[Message], keys: bool = True) -> list[Received]:
    return [Received(m.topic, m.body, m.key if keys else None) for m in batch]


BATCH = messages(sample_events(symbols=2, updates=2), "t")  # keyed by symbol


def test_keys_are_checked_when_the_flag_is_unset() -> None:
    SinkConformance._assert_exactly(BATCH, arrived(BATCH), Probe(None))
    with pytest.raises(AssertionError, match="none arrived with one"):
        SinkConformance._assert_exactly(BATCH, arrived(BATCH, keys=False), Probe(None))
    wrong = [Received(r.topic, r.body, "other") for r in arrived(BATCH)]
    with pytest.raises(AssertionError, match=r"key .* arrived as 'other'"):
        SinkConformance._assert_exactly(BATCH, wrong, Probe(None))


def test_a_probe_that_opts_out_still_has_the_keys_it_reports_checked() -> None:
    SinkConformance._assert_exactly(BATCH, arrived(BATCH, keys=False), Probe(False))
    wrong = [Received(r.topic, r.body, "other") for r in arrived(BATCH)]
    with pytest.raises(AssertionError, match="arrived as 'other'"):
        SinkConformance._assert_exactly(BATCH, wrong, Probe(False))
    with pytest.raises(AssertionError, match="arrived as None"):
        SinkConformance._assert_exactly(BATCH, arrived(BATCH, keys=False), Probe(True))


def test_a_missing_message_is_named() -> None:
    with pytest.raises(AssertionError) as caught:
        SinkConformance._assert_exactly(BATCH, arrived(BATCH[1:]), Probe(True))
    assert f"3 of 4 message(s) arrived; first missing: ['{BATCH[0].id}']" in str(caught.value)


async def test_a_wait_says_what_did_happen() -> None:
    with pytest.raises(AssertionError, match=r"ten published: not within 0.05s \(3 so far\)"):
        await until(lambda: False, 0.05, "ten published", detail=lambda: "3 so far")


def test_the_first_failure_of_a_report(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite><testcase name="test_a"/>'
        '<testcase name="test_b[raw]"><failure message="AssertionError: 2 of 3 arrived&#10;'
        'more">trace</failure></testcase><testcase name="test_c"><error message="x"/>'
        "</testcase></testsuite></testsuites>")
    assert _first_failure(report) == ("test_b[raw]", "AssertionError: 2 of 3 arrived")
    assert _first_failure(tmp_path / "none.xml") is None


class Broken(Sink[SinkOptions]):
    options_model = SinkOptions

    async def connect(self) -> None: ...
    async def publish(self, batch: Sequence[Message]) -> None: ...
    async def close(self) -> None: ...


def test_assert_killed_accepts_only_mutants_caught_by_their_test() -> None:
    m = Mutant(Broken, "test_b")
    assert_killed([MutantResult(m, "killed", "test_b[raw]", "why", 1.0)])
    for bad in (MutantResult(m, "killed", "test_a", "why", 1.0),
                MutantResult(m, "survived", None, "every test passed", 1.0),
                MutantResult(m, "hung", None, "still running", 1.0, "output")):
        with pytest.raises(AssertionError, match="let mutants through"):
            assert_killed([bad])


class PgOptions(SinkOptions):
    """The guide's pattern for an option named like a BaseModel attribute."""

    dsn: str
    db_schema: str = Field(default="public", alias="schema", pattern=r"^[a-z_][a-z0-9_]*$")


class Pg(Broken):
    options_model = PgOptions


def test_an_option_named_schema_is_an_alias() -> None:
    drivers = Drivers(injected={"pg": Pg})
    ok = parse_config("sinks: {db: {driver: pg, dsn: x, schema: audit}}\n"
                      "http: {enabled: false}\n", env={}, drivers=drivers)
    options = ok.sinks["db"].options
    assert isinstance(options, PgOptions) and options.db_schema == "audit"
    with pytest.raises(ConfigError) as caught:
        parse_config("sinks: {db: {driver: pg, dsn: x, schema: Bad-1}}\n"
                     "http: {enabled: false}\n", env={}, drivers=drivers)
    assert "sinks.db.schema: string should match pattern" in str(caught.value)
