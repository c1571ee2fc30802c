"""Start and stop real processes (brokers, the bridge) for tests.

Every process a test starts is stopped by it: :class:`Proc` is a context manager and
a pytest finalizer, it kills the whole process group on exit, and its output goes to
a log file that is printed when a test fails while waiting on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: set to 1 to ignore the brokers running on this machine and start our own
OWN_BROKERS_ENV = "ALENO_BRIDGE_TEST_OWN_BROKERS"


def own_brokers() -> bool:
    return os.environ.get(OWN_BROKERS_ENV, "") not in ("", "0", "false", "no")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return
        time.sleep(0.05)
    msg = f"nothing listens on {host}:{port} after {timeout}s"
    raise TimeoutError(msg)


def venv_bin(name: str) -> str | None:
    """A console script installed next to this interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def thread_states(pid: int) -> list[str]:
    """The scheduler state of every thread of ``pid`` (``T``: stopped): from /proc on
    Linux, else the process state ``ps`` shows (macOS)."""
    if not os.path.isdir("/proc/self/task"):
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                             text=True, check=False).stdout.strip()
        return [out[:1]] if out else []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    states: list[str] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # the thread exited meanwhile
        # "tid (comm) S ...": comm may hold spaces or ")", the state follows the last ")"
        states.append(stat.rsplit(b")", 1)[1].split()[0].decode())
    return states


def wait_stopped(pid: int, timeout: float) -> None:
    """Wait until every thread of ``pid`` is stopped (after a SIGSTOP)."""
    deadline = time.monotonic() + timeout
    while True:
        states = thread_states(pid)
        if states and all(s == "T" for s in states):
            return
        if time.monotonic() > deadline:
            msg = f"process {pid} not stopped {timeout}s after SIGSTOP (thread states {states})"
            raise TimeoutError(msg)
        time.sleep(0.001)


class Proc:
    """A child process in its own process group, logging to ``log_path``."""

    def __init__(
        self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.popen = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.cwd, start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group (a broker crash, not a clean stop)."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss(self) -> int:
        """The process's resident memory, bytes (Linux: /proc)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None
        return int(found.group(1)) * 1024

    def until(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        """Wait until ``cond()`` holds; fail naming ``what`` with the end of the output,
        at once if the process ended meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if not self.alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout:g}s; output:\n"
                             f"{self.output()[-4000:]}")

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
