"""Prove a conformance suite: run it against deliberately broken drivers (mutants).

A green suite proves something only if it turns red when the driver is wrong. A
*mutant* is a subclass of your driver with one defect (publishes twice, drops the
key, raises ``TypeError`` from a failed ``connect()``...). :func:`run_mutants` runs your
:class:`~bridge.testing.conformance.SinkConformance` class against each mutant, each
in a pytest process of its own (so a mutant that leaks tasks, hangs or corrupts
state cannot affect the next one), with the suite's waits shortened
(``timeout_s``) and a time limit per mutant; the run of one mutant stops at its
first failing test::

    from bridge.testing.mutants import Mutant, assert_killed, run_mutants

    import test_webhook_conformance as suite    # the module, not its Test* class

    class PublishesTwice(WebhookSink):          # at module level: the child imports it
        async def publish(self, batch):
            await super().publish(batch)
            await super().publish(batch)

    EACH_ONCE = "test_each_message_arrives_once_on_its_topic_with_its_key_and_body"

    def test_the_suite_catches_every_mutant():
        results = run_mutants(suite.TestWebhookConformance, [Mutant(PublishesTwice, EACH_ONCE)])
        assert_killed(results)

A mutant is *killed* when a test of the suite fails on it (naming the test that was
expected to catch it runs that test first, and :func:`assert_killed` checks it was
that one); it *survived* when the whole suite passed: a hole in the suite, usually
in the probe (see ``BusProbe.delivers_keys``, ``exact_bodies``, ``idempotent``). A
mutant that runs past its time limit is *hung*: the suite should have failed it with
a message, and a hung run counts as not killed.

The mutant classes and the suite class must be importable by their module name
(defined at module level of a test module or a helper module); the child process
runs pytest on the suite's own file, so its fixtures (``options``, ``probe``, a
``conftest.py``) are the same as in the suite's passing run. This module is also the
pytest plugin (``-p bridge.testing.mutants``) that swaps the driver in that child.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: environment of the child: the mutant (``module:qualname``), the directory to import
#: it from, the test to run first, and the suite's ``timeout_s`` to use
ENV_MUTANT = "ALENO_BRIDGE_MUTANT"
ENV_MUTANT_PATH = "ALENO_BRIDGE_MUTANT_PATH"
ENV_MUTANT_FIRST = "ALENO_BRIDGE_MUTANT_FIRST"
ENV_MUTANT_TIMEOUT = "ALENO_BRIDGE_MUTANT_TIMEOUT_S"

Outcome = Literal["killed", "survived", "hung", "error"]


@dataclass(frozen=True)
class Mutant:
    """A broken subclass of the driver, and the test expected to catch it (run first;
    ``None``: any test may)."""

    driver: type[Any]
    caught_by: str | None = None

    @property
    def name(self) -> str:
        return self.driver.__name__


@dataclass(frozen=True)
class MutantResult:
    """How the suite fared against one mutant."""

    mutant: Mutant
    outcome: Outcome
    #: the first failing test (``None`` unless killed)
    failed_test: str | None
    #: its failure message, first lines
    message: str
    seconds: float
    #: the end of the child's output (for a survived, hung or broken run)
    output: str = ""

    def __str__(self) -> str:
        where = f" by {self.failed_test}" if self.failed_test else ""
        text = f"{self.mutant.name}: {self.outcome}{where} in {self.seconds:.1f}s"
        return f"{text}: {self.message}" if self.message else text


def run_mutants(
    suite: type[Any],
    mutants: Iterable[Mutant | type[Any]],
    *,
    timeout_s: float = 3.0,
    limit_s: float = 120.0,
    jobs: int = 1,
    pytest_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> list[MutantResult]:
    """Run ``suite`` (a ``SinkConformance`` subclass) against each mutant, each in its
    own pytest process; return one :class:`MutantResult` per mutant, in order.

    ``timeout_s`` replaces the suite's :attr:`~bridge.testing.conformance.SinkConformance.timeout_s`
    (a healthy driver delivers within it; a mutant that loses data costs this wait,
    not the suite's default 20 s); ``limit_s`` bounds each child process; ``jobs``
    runs that many children at once; ``pytest_args`` are added to each child's command
    line; ``cwd`` is the children's working directory (default: this process's).
    """
    suite_file = Path(inspect.getfile(suite)).resolve()
    wanted = [m if isinstance(m, Mutant) else Mutant(m) for m in mutants]

    def one(mutant: Mutant) -> MutantResult:
        return _run_one(suite, suite_file, mutant, timeout_s, limit_s, pytest_args, env, cwd)

    if jobs <= 1:
        return [one(m) for m in wanted]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, wanted))


def assert_killed(results: Sequence[MutantResult]) -> None:
    """Every mutant was killed, by the test named as its catcher (when one was)."""
    problems = []
    for r in results:
        expected = r.mutant.caught_by
        if r.outcome != "killed":
            problems.append(f"{r}\n{r.output[-2000:]}" if r.outcome != "survived" else str(r))
        elif expected is not None and (r.failed_test or "").split("[")[0] != expected:
            problems.append(f"{r} (expected to be caught by {expected})")
    assert not problems, "the suite let mutants through:\n" + "\n".join(problems)


def _import_root(cls: type[Any]) -> Path:
    """The directory from which ``cls.__module__`` imports as that name."""
    path = Path(inspect.getfile(cls)).resolve()
    parts = cls.__module__.split(".")
    root = path.parent
    for _ in parts[:-1]:
        root = root.parent
    return root


def _run_one(
    suite: type[Any], suite_file: Path, mutant: Mutant, timeout_s: float, limit_s: float,
    pytest_args: Sequence[str], env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
) -> MutantResult:
    cls = mutant.driver
    if "<locals>" in cls.__qualname__:
        msg = f"mutant {cls.__qualname__} must be defined at module level (the child imports it)"
        raise ValueError(msg)
    child_env = {**os.environ, **(env or {})}
    child_env[ENV_MUTANT] = f"{cls.__module__}:{cls.__qualname__}"
    child_env[ENV_MUTANT_PATH] = str(_import_root(cls))
    child_env[ENV_MUTANT_TIMEOUT] = str(timeout_s)
    if mutant.caught_by:
        child_env[ENV_MUTANT_FIRST] = mutant.caught_by
    else:
        child_env.pop(ENV_MUTANT_FIRST, None)
    with tempfile.TemporaryDirectory(prefix="aleno-mutant-") as tmp:
        report = Path(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", f"{suite_file}::{suite.__qualname__}",
               "-x", "-q", "-p", "no:cacheprovider", "-p", "bridge.testing.mutants",
               f"--junitxml={report}", *pytest_args]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit_s)
            hung = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, _ = proc.communicate()
            hung = True
        took = time.monotonic() - start
        text = out.decode(errors="replace")
        if hung:
            return MutantResult(mutant, "hung", None, f"still running after {limit_s}s",
                                took, text[-4000:])
        failed = _first_failure(report)
        if proc.returncode == 1 and failed is not None:
            return MutantResult(mutant, "killed", failed[0], failed[1], took)
        if proc.returncode == 0:
            return MutantResult(mutant, "survived", None, "every test passed", took,
                                text[-4000:])
        return MutantResult(mutant, "error", None, f"pytest exited with {proc.returncode}",
                            took, text[-4000:])


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop the child and everything it started (brokers of its fixtures)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def _first_failure(report: Path) -> tuple[str, str] | None:
    """The first failed (or errored) test of a JUnit XML report, and its message."""
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError):
        return None
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip()
                return case.get("name", "?"), message.splitlines()[0][:500] if message else ""
    return None


# ---------------------------------------------------------------------------
# the pytest plugin of the child process


def _load_mutant(spec: str) -> type[Any]:
    root = os.environ.get(ENV_MUTANT_PATH)
    if root and root not in sys.path:
        sys.path.insert(0, root)
    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """In the child: give every collected ``SinkConformance`` class the mutant as its
    driver and the short ``timeout_s``; run the expected catcher first."""
    spec = os.environ.get(ENV_MUTANT)
    if not spec:
        return
    from bridge.testing.conformance import SinkConformance

    mutant = _load_mutant(spec)
    timeout = float(os.environ.get(ENV_MUTANT_TIMEOUT, "3"))
    for cls in {item.cls for item in items if getattr(item, "cls", None) is not None}:
        if issubclass(cls, SinkConformance):
            cls.driver = mutant
            cls.timeout_s = timeout
    first = os.environ.get(ENV_MUTANT_FIRST)
    if first:
        items.sort(key=lambda item: getattr(item, "originalname", item.name) != first)
