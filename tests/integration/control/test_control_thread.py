"""The control thread (:mod:`bridge.control.thread`) with real sockets and a real bridge.

- ``/v1/snapshot`` is answered on the control thread while the bridge's own event loop
  is blocked; ``/healthz`` hops to that loop and waits for it;
- a hop to a loop blocked past the hop timeout is a 503 whose JSON body names the loop;
- the lease doors run on the bridge's loop (a real simulator, real leases) and wait
  for it however long it is blocked;
- :func:`call_on` runs a call on the home loop, returns its result, raises its
  exception and times out when that loop is blocked; a call handed over runs to its
  end even when the wait timed out or was cancelled;
- snapshots read the last-value cache from the control thread while the data path
  writes it: every reply is whole, ordered and consistent;
- the control thread ends with :meth:`Bridge.run` (and with :meth:`ControlLoop.stop`).

The bridge's loop is this test's loop: a request made while it is blocked is made from
a thread of the test's own (``urllib``), never from this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import json
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from bridge.app import Bridge
from bridge.config import Settings, parse_config
from bridge.control.core import ORDER, Control, SnapshotReply
from bridge.control.thread import HOP_TIMEOUT_S, ControlLoop, LoopTimeout, call_on
from bridge.core.envelope import Event
from bridge.pipeline.market import LastValues, MarketState
from bridge.pipeline.normalize import Normalizer
from bridge.simulator import Simulator
from bridge.sinks import Drivers
from bridge.testing import MemorySink, wait_until
from bridge.testing.sample import T0_MS, equity_record, ticker_record

pytestmark = pytest.mark.integration

#: the name of the thread :meth:`Bridge.run` starts (ControlLoop's default)
CONTROL_THREAD = ControlLoop().name
#: how long a test holds the bridge's loop
BLOCK_S = 1.5
#: the hop timeout while a test blocks the loop past it
SHORT_HOP_S = 0.3
TICKERS = [f"SYM{i:03d}/USD" for i in range(150)]
EQUITIES = [f"EQ{i:02d}" for i in range(40)]


# -- helpers --------------------------------------------------------------------------


def settings(extra: str = "") -> Settings:
    text = """
sinks: {mem: {driver: memory}}
routes: [{sinks: [mem]}]
http: {host: 127.0.0.1, port: 0}
shutdown_timeout_s: 5
""" + extra
    return parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink}))


def sample(tickers: Sequence[str] = TICKERS, equities: Sequence[str] = EQUITIES,
           sent_ms: int = T0_MS) -> list[Event]:
    norm = Normalizer(clock=lambda: sent_ms + 7)
    out = norm.tickers([ticker_record(s, 100.0 + i, sent_ms) for i, s in enumerate(tickers)])
    out += norm.equities([equity_record(s, 50.0 + i, sent_ms)
                          for i, s in enumerate(equities)])
    return out


@dataclass(frozen=True)
class Fetched:
    """One HTTP exchange, timed on the monotonic clock by the thread that made it."""

    status: int
    body: bytes
    started: float
    ended: float

    @property
    def took(self) -> float:
        return self.ended - self.started

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(url: str, method: str = "GET", body: dict[str, Any] | None = None,
          timeout: float = 15.0) -> Fetched:
    """A blocking HTTP request (run it in a thread: the bridge's loop may be blocked)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return Fetched(status, payload, started, time.monotonic())


def control_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == CONTROL_THREAD}


class Served:
    """A bridge running (:meth:`Bridge.run`) with its HTTP server on the control thread."""

    def __init__(self, bridge: Bridge, thread: threading.Thread) -> None:
        self.bridge = bridge
        #: the control thread this run started
        self.thread = thread
        self.home = asyncio.get_running_loop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.bridge.http_port}{path}"


@contextlib.asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[Served]:
    """Run ``bridge`` for the ``async with`` block; then check its control thread ended."""
    before = control_threads()
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await wait_until(lambda: bridge.http_port is not None, 10, "the HTTP port",
                         task=task)
        started = control_threads() - before
        assert len(started) == 1, started
        thread = started.pop()
        assert thread.is_alive() and thread is not threading.current_thread()
        yield Served(bridge, thread)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    # Bridge.run stopped the control thread before it returned
    assert not thread.is_alive()
    assert not {t for t in control_threads() - before if t.is_alive()}


@contextlib.asynccontextmanager
async def requesters(n: int) -> AsyncIterator[ThreadPoolExecutor]:
    """Threads for requests made while the loop is blocked; joined without blocking it."""
    pool = ThreadPoolExecutor(n, thread_name_prefix="test-client")
    try:
        yield pool
    finally:
        await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


def when_blocked(pool: ThreadPoolExecutor, blocked: threading.Event, url: str,
                 method: str = "GET", body: dict[str, Any] | None = None) -> Future[Fetched]:
    """A request made from ``pool`` as soon as ``blocked`` is set."""
    def go() -> Fetched:
        assert blocked.wait(10), "the loop was never blocked"
        return fetch(url, method, body)
    return pool.submit(go)


def hold_loop(blocked: threading.Event, first: Sequence[Future[Fetched]] = ()
              ) -> tuple[float, float]:
    """Block the running loop (this thread) for :data:`BLOCK_S`: nothing else runs on
    it meanwhile. ``first``: requests that must complete within the block (waited for
    during it, failing when one does not). Returns when the block began and ended."""
    blocked.set()
    began = time.monotonic()
    for f in first:
        f.result(timeout=max(0.0, began + BLOCK_S - time.monotonic()))
    time.sleep(max(0.0, began + BLOCK_S - time.monotonic()))  # the load: a stuck loop
    return began, time.monotonic()


def items_of(body: bytes) -> list[tuple[str, str]]:
    """(kind, symbol) of every item of a snapshot reply, in order."""
    doc = orjson.loads(body)
    return [(i["event"]["data"]["kind"], i["event"]["subject"]) for i in doc["items"]]


# -- 1. a snapshot while the bridge's loop is blocked -----------------------------------


async def test_a_snapshot_is_answered_while_the_bridges_loop_is_blocked() -> None:
    bridge = Bridge(settings(), with_source=False)
    for ev in sample():
        bridge.last_values.put(ev)
    everything = [("ticker", s) for s in sorted(TICKERS)] + \
                 [("equity", s) for s in sorted(EQUITIES)]
    async with running(bridge) as served:
        # both answer while the loop runs
        ok = await asyncio.to_thread(fetch, served.url("/v1/snapshot"))
        assert ok.status == 200 and items_of(ok.body) == everything
        assert (await asyncio.to_thread(fetch, served.url("/healthz"))).status == 200

        blocked = threading.Event()
        async with requesters(2) as pool:
            snap = when_blocked(pool, blocked, served.url("/v1/snapshot"))
            health = when_blocked(pool, blocked, served.url("/healthz"))
            began, ended = hold_loop(blocked, first=[snap])
            # the loop was blocked all along: /healthz, which hops there, is still waiting
            assert not health.done()
            got = snap.result()
            late = await asyncio.wrap_future(health)

    assert got.status == 200, got.body
    assert got.took < 0.5 and got.ended < ended, (got.took, ended - began)
    doc = orjson.loads(got.body)
    assert items_of(got.body) == everything
    assert doc["count"] == len(everything) and doc["next"] is None
    # /healthz was asked during the block and answered only once the loop ran again
    assert late.started < ended <= late.ended
    assert late.status == 200 and late.json() == {"status": "ok"}


# -- 2. the hop timeout -------------------------------------------------------------------


def shorten_hops(monkeypatch: pytest.MonkeyPatch, timeout: float) -> None:
    """Make every :func:`call_on` that takes the default timeout use ``timeout``.

    ``timeout`` is keyword-only (it follows ``*args``) and its default was bound when
    the function was defined: patching :data:`bridge.control.thread.HOP_TIMEOUT_S` changes
    nothing, the function's ``__kwdefaults__`` is what the callers get."""
    defaults = call_on.__kwdefaults__
    assert defaults is not None and defaults["timeout"] == HOP_TIMEOUT_S
    monkeypatch.setitem(defaults, "timeout", timeout)


async def test_a_hop_to_a_loop_blocked_past_the_timeout_is_a_503_naming_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shorten_hops(monkeypatch, SHORT_HOP_S)
    bridge = Bridge(settings(), with_source=False)
    for ev in sample():
        bridge.last_values.put(ev)
    async with running(bridge) as served:
        assert (await asyncio.to_thread(fetch, served.url("/healthz"))).status == 200
        blocked = threading.Event()
        async with requesters(4) as pool:
            hops = {path: when_blocked(pool, blocked, served.url(path))
                    for path in ("/healthz", "/readyz", "/metrics")}
            snap = when_blocked(pool, blocked, served.url("/v1/snapshot?kind=ticker"))
            # every answer comes while the loop is still blocked
            began, ended = hold_loop(blocked, first=[*hops.values(), snap])
        # the loop runs again: the call that timed out left nothing stuck
        again = await asyncio.to_thread(fetch, served.url("/healthz"))

    for path, f in hops.items():
        got = f.result()
        assert got.status == 503, (path, got.status, got.body)
        assert got.json() == {"error": "the bridge's event loop did not answer within "
                                       f"{SHORT_HOP_S:g}s"}, path
        # answered at the (short) timeout, not when the loop ran again
        assert SHORT_HOP_S - 0.05 <= got.took < SHORT_HOP_S + 0.6, (path, got.took)
        assert got.ended < ended
    assert snap.result().status == 200
    assert items_of(snap.result().body) == [("ticker", s) for s in sorted(TICKERS)]
    assert again.status == 200 and again.json() == {"status": "ok"}


# -- 3. the lease doors run on the bridge's loop ------------------------------------------


def upstream_tickers(sim: Simulator, key: str = "test-key") -> set[str]:
    return sim.subscriptions_by_key().get(key, {}).get("ticker", set())


async def test_lease_doors_are_served_on_the_control_thread_and_run_on_the_bridges_loop(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pinned, leased = simulator.tickers[0], simulator.tickers[1]
    text = f"""
source:
  url: {simulator.url}
  api_key: test-key
  tickers: [{pinned}]
  equities: []
  backoff: {{initial_s: 0.05, max_s: 0.3}}
  leases: {{enabled: true, default_ttl_s: 5, max_ttl_s: 30, grace_s: 0.3}}
sinks: {{mem: {{driver: memory}}}}
routes: [{{sinks: [mem]}}]
http: {{host: 127.0.0.1, port: 0}}
shutdown_timeout_s: 5
"""
    bridge = Bridge(parse_config(text, env={}, drivers=Drivers(injected={"memory": MemorySink})),
                    sinks={"mem": MemorySink("mem")})
    control, subs = bridge.control, bridge.subscriptions
    assert control is not None and subs is not None
    # where each step runs: the door's call (Control) and the leases (Subscriptions);
    # both call through to the real objects
    seen: dict[str, tuple[threading.Thread, asyncio.AbstractEventLoop]] = {}

    def spy(obj: object, name: str, tag: str) -> None:
        real = getattr(obj, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            seen[tag] = (threading.current_thread(), asyncio.get_running_loop())
            return await real(*args, **kwargs)
        monkeypatch.setattr(obj, name, call)

    for name in ("lease", "renew", "release"):
        spy(control, name, f"door.{name}")
        spy(subs, name, f"leases.{name}")

    async with running(bridge) as served:
        await wait_until(lambda: upstream_tickers(simulator) == {pinned}, 10,
                         "the pinned symbol subscribed")
        got = await asyncio.to_thread(
            fetch, served.url("/v1/subscriptions"), "POST",
            {"kind": "ticker", "symbols": [leased.lower()], "ttl_s": 5, "holder": "t"})
        assert got.status == 200, got.body
        doc = got.json()
        assert doc["symbols"][leased]["status"] == "accepted" and doc["holder"] == "t"
        lease = doc["lease"]
        assert isinstance(lease, str) and lease.startswith(f"0.{control.instance}.")
        assert leased in upstream_tickers(simulator)  # the upstream's own record

        got = await asyncio.to_thread(fetch, served.url(f"/v1/subscriptions/{lease}/renew"),
                                      "POST", {"ttl_s": 20})
        assert got.status == 200, got.body
        assert got.json()["lease"] == lease and 19 < got.json()["expiresInS"] <= 20

        # the loop blocked past the hop timeout: a lease door does not give up (a
        # lease call runs to its end once handed over, so only its own answer is
        # true): the renew is answered, and applied, once the loop is free again
        blocked = threading.Event()
        with monkeypatch.context() as m:
            shorten_hops(m, SHORT_HOP_S)
            async with requesters(1) as pool:
                waiting = when_blocked(pool, blocked,
                                       served.url(f"/v1/subscriptions/{lease}/renew"), "POST",
                                       {"ttl_s": 25})
                _, ended = hold_loop(blocked)
                late = await asyncio.wrap_future(waiting)
        assert late.status == 200 and late.ended >= ended, late
        assert late.json()["lease"] == lease and 24 < late.json()["expiresInS"] <= 25

        got = await asyncio.to_thread(fetch, served.url(f"/v1/subscriptions/{lease}"),
                                      "DELETE")
        assert got.status == 204, got.body
        await wait_until(lambda: upstream_tickers(simulator) == {pinned}, 10,
                         "the released symbol unsubscribed after its grace")
        got = await asyncio.to_thread(fetch, served.url(f"/v1/subscriptions/{lease}/renew"),
                                      "POST", {})
        assert got.status == 404 and got.json()["parameter"] == "lease"

        here = (threading.current_thread(), served.home)
        assert set(seen) == {f"{side}.{name}" for side in ("door", "leases")
                             for name in ("lease", "renew", "release")}
        for name in ("lease", "renew", "release"):
            door_thread, door_loop = seen[f"door.{name}"]
            assert door_thread is served.thread and door_loop is not served.home, name
            assert seen[f"leases.{name}"] == here, name


# -- 4. call_on and ControlLoop on their own ----------------------------------------------


class Refused(Exception):
    pass


async def test_call_on_runs_on_the_home_loop_and_times_out_when_it_is_blocked() -> None:
    home = asyncio.get_running_loop()
    main = threading.current_thread()
    thread = ControlLoop(name=f"test-control-{uuid.uuid4().hex[:8]}")
    await thread.start()
    try:
        control_loop = thread.loop
        assert control_loop is not None and control_loop is not home

        async def doubled(x: int) -> tuple[int, asyncio.AbstractEventLoop, threading.Thread]:
            await asyncio.sleep(0)
            return 2 * x, asyncio.get_running_loop(), threading.current_thread()

        async def refuse() -> int:
            await asyncio.sleep(0)
            raise Refused("no")

        async def probe() -> tuple[Any, ...]:
            here = (asyncio.get_running_loop(), threading.current_thread())
            value: tuple[int, asyncio.AbstractEventLoop, threading.Thread] = \
                await call_on(home, doubled, 21)
            plain = await call_on(home, threading.current_thread)  # a plain function
            local = await call_on(None, threading.current_thread)  # None: right here
            return here, value, plain, local

        (loop, where), (value, ran_loop, ran_thread), plain, local = \
            await thread.run(probe())
        assert loop is control_loop and where is not main and where.name == thread.name
        assert value == 42 and ran_loop is home and ran_thread is main
        assert plain is main and local is where

        async def refused() -> int:
            n: int = await call_on(home, refuse)
            return n

        with pytest.raises(Refused, match="no"):
            await thread.run(refused())

        # the home loop blocked past the timeout: LoopTimeout, while it is still blocked
        asked = asyncio.run_coroutine_threadsafe(
            call_on(home, threading.current_thread, timeout=0.2), control_loop)
        began = time.monotonic()
        with pytest.raises(LoopTimeout, match=r"event loop did not answer within 0\.2s"):
            asked.result(timeout=2)  # this blocks the home loop meanwhile
        assert 0.15 <= time.monotonic() - began < 1.0
        # and the control loop goes on
        assert await thread.run(call_on(home, threading.current_thread)) is main
    finally:
        await thread.stop()
    assert not {t for t in threading.enumerate() if t.name == thread.name}
    assert thread.loop is None
    with pytest.raises(RuntimeError, match="not running"):
        await thread.run(asyncio.sleep(0))


async def test_a_call_whose_wait_timed_out_still_runs_to_its_end_on_the_home_loop() -> None:
    """A call handed over runs whole: the timeout only ends the wait (a lease stopped
    half-way would be subscribed upstream and recorded nowhere)."""
    home = asyncio.get_running_loop()
    thread = ControlLoop(name=f"test-control-{uuid.uuid4().hex[:8]}")
    await thread.start()
    ran: list[str] = []

    async def two_steps() -> None:
        ran.append("first")
        await asyncio.sleep(0.05)
        ran.append("second")

    try:
        assert thread.loop is not None
        asked = asyncio.run_coroutine_threadsafe(
            call_on(home, two_steps, timeout=0.2), thread.loop)
        with pytest.raises(LoopTimeout):
            asked.result(timeout=2)  # blocks the home loop past the timeout
        assert ran == []
        await wait_until(lambda: len(ran) == 2, 5, "the timed-out call ran to its end")
        assert ran == ["first", "second"]
        # a cancelled wait does not stop the call either
        ran.clear()
        waiting = asyncio.run_coroutine_threadsafe(call_on(home, two_steps), thread.loop)
        await wait_until(lambda: ran == ["first"], 5, "the call started")
        waiting.cancel()
        await wait_until(lambda: len(ran) == 2, 5, "the call whose wait was cancelled ended")
    finally:
        await thread.stop()


# -- 5. the cache read from another thread while the data path writes -----------------


@dataclass
class Host:
    """What :class:`Control` reads: the real cache and real settings."""

    last_values: LastValues
    settings: Settings


STABLE_T = [f"S{i:03d}/USD" for i in range(200)]
STABLE_E = [f"E{i:02d}" for i in range(40)]
STRESS_S = 2.0
#: (kind, symbols, max_bytes, limit) of the queries the reader cycles through
QUERIES: list[tuple[str | None, list[str] | None, int | None, int | None]] = [
    (None, None, None, None),
    ("ticker", None, None, None),
    ("*", ["S1*", "F*", "e0?"], None, None),
    ("ticker", ["S005/USD", "F0003/USD", "F0004/USD"], None, None),
    (None, None, 8192, None),
    ("*", ["F*", "S0*", "X*"], None, 37),
    ("equity", None, 2048, None),
    (None, ["*"], 30_000, 120),
]


def check_reply(reply: SnapshotReply, kind: str | None, patterns: list[str] | None,
                max_bytes: int | None, limit: int | None) -> list[tuple[str, str]]:
    """Check one page; its (kind, symbol) in order."""
    doc = orjson.loads(reply.body)
    items = doc["items"]
    assert doc["count"] == len(items) == reply.count
    assert doc["next"] == reply.next and doc["shard"] is None
    keys: list[tuple[str, str]] = []
    for item in items:
        ev = item["event"]
        data = ev["data"]
        k, s = data["kind"], ev["subject"]
        assert ev["id"] == f"{k}:{s}:{data['sentTimestampMs']}", ev["id"]
        assert data["symbol"] == s and ev["type"] == f"ai.aleno.{k}.v1"
        assert isinstance(item["ageMs"], int) and item["ageMs"] >= 0
        keys.append((k, s))
    order = [(ORDER.index(k), s) for k, s in keys]
    assert all(a < b for a, b in itertools.pairwise(order)), keys  # sorted, unique
    if kind not in (None, "*"):
        assert all(k == kind for k, _ in keys)
    if patterns is not None:
        upper = [p.upper() for p in patterns]
        assert all(any(fnmatch.fnmatchcase(s, p) for p in upper) for _, s in keys)
    if max_bytes is not None:
        assert len(reply.body) <= max_bytes or reply.count == 1
    if limit is not None:
        assert reply.count <= limit
    if reply.next is not None:
        assert keys and reply.next == f"{keys[-1][0]}:{keys[-1][1]}"
    return keys


def read_all(ctl: Control, kind: str | None, patterns: list[str] | None,
             max_bytes: int | None, limit: int | None) -> list[tuple[str, str]]:
    """Every page of one query, checked; the (kind, symbol) of all of them, in order."""
    out: list[tuple[str, str]] = []
    after: str | None = None
    for _ in range(10_000):
        reply = ctl.snapshot(kind, patterns, after=after, max_bytes=max_bytes, limit=limit)
        keys = check_reply(reply, kind, patterns, max_bytes, limit)
        if out and keys:  # a page starts after the previous one: nothing repeats
            assert (ORDER.index(out[-1][0]), out[-1][1]) < (ORDER.index(keys[0][0]),
                                                            keys[0][1])
        out += keys
        if reply.next is None:
            return out
        after = reply.next
    raise AssertionError("paging did not end")


def stable_matches(kind: str | None, patterns: list[str] | None) -> set[tuple[str, str]]:
    kinds = ORDER if kind in (None, "*") else (kind,)
    every = [("ticker", s) for s in STABLE_T] + [("equity", s) for s in STABLE_E]
    upper = None if patterns is None else [p.upper() for p in patterns]
    return {(k, s) for k, s in every if k in kinds and
            (upper is None or any(fnmatch.fnmatchcase(s, p) for p in upper))}


async def test_snapshots_from_another_thread_stay_whole_while_the_data_path_writes() -> None:
    market = MarketState(lambda evs: None, stale_after_s=60.0, update_interval_s=1.0)
    ctl = Control.of(Host(market.values, settings()))
    clock = [T0_MS]
    norm = Normalizer(clock=lambda: clock[0] + 5)

    def write(round_: int) -> None:
        """One upstream round: every stable symbol updated, a new symbol of each kind,
        and the symbols added three rounds ago forgotten."""
        sent = T0_MS + round_ * 1000
        clock[0] = sent
        fresh_t, fresh_e = f"F{round_:04d}/USD", f"X{round_:04d}"
        market.observe("ticker", norm.tickers(
            [ticker_record(s, 100.0 + i + round_, sent)
             for i, s in enumerate([*STABLE_T, fresh_t])]))
        market.observe("equity", norm.equities(
            [equity_record(s, 50.0 + i + round_, sent)
             for i, s in enumerate([*STABLE_E, fresh_e])]))
        if round_ >= 3:
            market.values.forget("ticker", [f"F{round_ - 3:04d}/USD"])
            market.values.forget("equity", [f"X{round_ - 3:04d}"])

    write(0)
    done = threading.Event()
    reads: list[int] = [0]
    churn: set[frozenset[tuple[str, str]]] = set()

    async def reader() -> None:
        """On the control thread: the queries, round and round, until the writer stops."""
        while not done.is_set():
            for kind, patterns, max_bytes, limit in QUERIES:
                keys = read_all(ctl, kind, patterns, max_bytes, limit)
                # a symbol never forgotten is in every whole answer
                missing = stable_matches(kind, patterns) - set(keys)
                assert not missing, sorted(missing)[:5]
                if kind is None and patterns is None:
                    churn.add(frozenset(k for k in keys if k[1][0] in "FX"))
                reads[0] += 1
            await asyncio.sleep(0)

    thread = ControlLoop(name=f"test-control-{uuid.uuid4().hex[:8]}")
    await thread.start()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # switch threads often: interleave reads and writes
    rounds = 1
    try:
        assert thread.loop is not None
        reading = asyncio.run_coroutine_threadsafe(reader(), thread.loop)
        # the data path, on this thread: write until the time is up or the reader failed
        end = time.monotonic() + STRESS_S
        while time.monotonic() < end and not reading.done():
            write(rounds)
            rounds += 1
        done.set()
        reading.result(timeout=10)  # the reader's failure, if any, is raised here
    finally:
        done.set()
        sys.setswitchinterval(switch)
        await thread.stop()
    assert not {t for t in threading.enumerate() if t.name == thread.name}
    # it was a race: many rounds written, many queries read, many different key sets seen
    assert rounds >= 20 and reads[0] >= 40, (rounds, reads[0])
    assert len(churn) >= 5, len(churn)
    # once the writes stop, a snapshot holds exactly what the cache holds, in order
    cached = [(k, s) for k in ORDER for s in sorted(market.values.by_kind(k))]
    assert read_all(ctl, None, None, None, None) == cached
    assert read_all(ctl, "*", None, 4096, None) == cached
    assert len(cached) == len(STABLE_T) + len(STABLE_E) + 2 * 3
