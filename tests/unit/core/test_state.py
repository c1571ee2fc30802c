"""The read model: states print as their values, snapshots are frozen, and readiness
is computed from a snapshot alone."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from bridge.core.state import (
    BridgeSnapshot,
    IntakeSnapshot,
    NormalizerSnapshot,
    RouterSnapshot,
    SinkSnapshot,
    SinkState,
    UpstreamSnapshot,
    UpstreamState,
    frozen_counts,
    readiness,
)


def upstream(**changes: object) -> UpstreamSnapshot:
    base = UpstreamSnapshot(
        state=UpstreamState.SUBSCRIBED, flowing=True, seconds_since_update=0.5,
        stale_after_s=10.0, connects=1, reconnects=0, connect_failures=0,
        watchdog_restarts=0, acks=frozen_counts({"ok": 1}), rejected_symbols=0,
        subscriptions=frozen_counts({"ticker": 2}), last_error=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def sink(**changes: object) -> SinkSnapshot:
    base = SinkSnapshot(
        name="bus", driver="memory", state=SinkState.CONNECTED, ready=True, required=True,
        depth=0, capacity=10, blocked=0, offered=0, published=0, conflated=0,
        dropped=frozen_counts({}), failed_batches=0, reconnects=0, rejections=0,
        last_error=None, last_rejection=None, seconds_since_rejection=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def bridge(up: UpstreamSnapshot | None, *sinks: SinkSnapshot) -> BridgeSnapshot:
    return BridgeSnapshot(
        upstream=up,
        normalizer=NormalizerSnapshot(frozen_counts({}), frozen_counts({})),
        router=RouterSnapshot(0, frozen_counts({})),
        intake=IntakeSnapshot(0, 100, frozen_counts({})),
        sinks=sinks,
    )


def test_states_print_compare_and_serialize_as_their_values() -> None:
    state: str = UpstreamState.SUBSCRIBED
    assert state == "subscribed"
    assert f"{UpstreamState.REFUSED}" == str(UpstreamState.REFUSED) == "refused"
    assert f"sink is {SinkState.FAILING}" == "sink is failing"
    assert orjson.dumps({"s": SinkState.CONNECTED}) == b'{"s":"connected"}'
    assert [s.value for s in UpstreamState] == [
        "idle", "connecting", "connected", "subscribed", "disconnected", "refused", "stopped"]
    assert [s.value for s in SinkState] == ["idle", "connecting", "connected", "failing",
                                            "closed"]


def test_snapshots_are_frozen() -> None:
    snap = upstream()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.state = UpstreamState.IDLE  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.acks["ok"] = 2  # type: ignore[index]


def test_counts_are_copied_when_the_snapshot_is_taken() -> None:
    live = {"ok": 1}
    counts = frozen_counts(live)
    live["ok"] = 5
    assert counts == {"ok": 1}


@pytest.mark.parametrize(("changes", "ready"), [
    ({}, True),
    ({"state": UpstreamState.CONNECTED}, False),
    ({"flowing": False}, False),
    ({"seconds_since_update": None}, False),
    ({"seconds_since_update": 10.5}, False),
    ({"seconds_since_update": 10.0}, True),
])
def test_upstream_ready_needs_a_recent_price_while_subscribed(
    changes: dict[str, object], ready: bool,
) -> None:
    assert upstream(**changes).ready is ready
    ok, checks = readiness(bridge(upstream(**changes)), str)
    assert ok is ready and checks["upstream"]["ok"] is ready


def test_readiness_body_keeps_its_shape_and_redacts_errors() -> None:
    def redact(text: str) -> str:
        return text.replace("s3cret-key", "***")

    up = upstream(state=UpstreamState.DISCONNECTED, flowing=False, seconds_since_update=None,
                  last_error="refused s3cret-key")
    bus = sink(state=SinkState.FAILING, ready=False, last_error="auth s3cret-key failed",
               rejections=2, last_rejection="too large for s3cret-key",
               seconds_since_rejection=1.23456)
    spare = sink(name="spare", required=False, ready=False, state=SinkState.CONNECTING)
    ok, checks = readiness(bridge(up, bus, spare), redact)
    assert not ok
    assert orjson.dumps(checks) == orjson.dumps({
        "upstream": {"ok": False, "state": "disconnected", "seconds_since_update": None,
                     "error": "refused ***"},
        "sink:bus": {"ok": False, "state": "failing", "required": True,
                     "error": "auth *** failed", "rejections": 2,
                     "last_rejection": "too large for ***", "seconds_since_rejection": 1.235},
        "sink:spare": {"ok": False, "state": "connecting", "required": False, "error": None},
    })


def test_an_optional_sink_does_not_make_the_bridge_unready() -> None:
    ok, checks = readiness(bridge(None, sink(), sink(name="spare", required=False,
                                                   ready=False)), str)
    assert ok and "upstream" not in checks
    assert checks["sink:spare"]["ok"] is False
