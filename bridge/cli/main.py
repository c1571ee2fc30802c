"""The ``aleno-bridge`` command line (``python -m bridge`` does the same).

Exit codes: 0 success; 2 invalid configuration or usage; 3 the upstream refused the
API key or could not be reached within the configured attempts; 1 anything else.
Every failure prints one paragraph naming the cause and the fix, never a traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge import __version__
from bridge.core import logs

if TYPE_CHECKING:
    from bridge.config import Settings
    from bridge.sinks import DriverInfo

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_UPSTREAM = 3

log = logging.getLogger("aleno_bridge.cli")


class CommandFailed(Exception):
    """A failure the user can fix: the message is the whole paragraph printed (the
    cause and the fix), without an exception type or a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aleno-bridge",
        description="Republish Aleno real-time prices as CloudEvents onto your message bus.",
    )
    p.add_argument("--version", action="version", version=f"aleno-bridge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge until SIGINT/SIGTERM, then drain")
    run.add_argument("-c", "--config", required=True, help="configuration file (YAML)")

    val = sub.add_parser("validate", help="check a configuration file; exit 2 if invalid")
    val.add_argument("-c", "--config", required=True)

    sim = sub.add_parser("simulate", help="run the Aleno-compatible pricing simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                     help="accepted API key (repeatable; default: demo-key)")
    sim.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    sim.add_argument("--max-subscriptions", type=int, default=250,
                     help="limit of tickers + equities per API key, over all its "
                          "connections (default for every key)")
    sim.add_argument("--key-limit", action="append", dest="key_limits", default=[],
                     metavar="KEY=N", type=_key_limit,
                     help="the subscription limit of one accepted key (repeatable; the "
                          "last '=' splits, so keys may contain '=')")
    sim.add_argument("--admin", action="store_true",
                     help="serve the test hooks over HTTP under /admin/ (off by default: "
                          "anyone who reaches it can pause, drop and disconnect)")
    sim.add_argument("--tickers", help="comma-separated ticker universe (default: built-in)")
    sim.add_argument("--equities", help="comma-separated equity universe (default: built-in)")
    sim.add_argument("--seed", type=int, help="random seed for reproducible prices")
    sim.add_argument("--compression", action=argparse.BooleanOptionalAction, default=True,
                     help="offer WebSocket permessage-deflate (default: on, like the upstream)")

    demo = sub.add_parser("demo", help="simulator + bridge + console sink in one process")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.add_argument("--style", choices=["lines", "table"], default="lines")
    demo.add_argument("--interval", type=float, default=1.0)

    sub.add_parser("plugins", help="list the sink drivers found through entry points")

    tap = sub.add_parser("tap", help="print envelopes as they pass through a configured bridge")
    tap.add_argument("-c", "--config", required=True)
    tap.add_argument("--route", help="only events of this route (name or routeN)")
    tap.add_argument("--sink", help="only events routed to this sink")
    tap.add_argument("--limit", type=int, help="stop after this many envelopes")
    tap.add_argument("--publish", action="store_true",
                     help="also publish to the configured sinks (default: observe only)")

    spool = sub.add_parser("spool", help="inspect or verify a sink's disk spool (buffer.disk)")
    spool.add_argument("action", choices=["inspect", "verify"],
                       help="inspect: what it holds; verify: exit 1 on corruption")
    spool.add_argument("path", help="a spool directory, or a directory of them")
    spool.add_argument("--json", action="store_true", help="one JSON object per spool")

    top = sub.add_parser("top", help="live per-sink rates, queues, drops and lag of a bridge")
    top.add_argument("--url", default="http://127.0.0.1:9464/metrics")
    top.add_argument("--interval", type=float, default=2.0)
    top.add_argument("--once", action="store_true", help="print one table and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        from bridge.config import ConfigError
        from bridge.upstream.protocol import SourceError

        if isinstance(exc, CommandFailed):
            print(f"aleno-bridge: {args.command}: {logs.redact(str(exc))}", file=sys.stderr)
            return exc.exit_code
        if isinstance(exc, ConfigError):
            print(f"aleno-bridge: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, SourceError):
            print(f"aleno-bridge: {logs.redact(str(exc))}", file=sys.stderr)
            return EXIT_UPSTREAM
        print(
            f"aleno-bridge: {args.command} failed: {type(exc).__name__}: {logs.redact(str(exc))}"
            "\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


# -- commands ----------------------------------------------------------------


def _validate(args: argparse.Namespace) -> int:
    from bridge.config import load_config

    settings = load_config(args.config)
    routes = len(settings.routes)
    sinks = ", ".join(f"{n} ({s.common.driver})" for n, s in settings.sinks.items())
    src = settings.config.source
    # insecure but valid settings: reported, not fatal
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    disk = settings.disk_estimate()
    spools = (f"; disk with every spool full: at most {sum(disk.values()) / 2**20:,.0f} MiB ("
              + ", ".join(f"{n}: {b / 2**20:,.0f} MiB" for n, b in disk.items()) + ")"
              if disk else "")
    print(f"{args.config}: valid. sinks: {sinks}; routes: {routes}; tickers: "
          f"{len(src.tickers)}; equities: {len(src.equities)}; memory with every buffer "
          f"full: about {settings.memory_estimate() / 2**20:.0f} MiB{spools}")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from bridge.app import Bridge, serve
    from bridge.config import load_config

    settings = load_config(args.config)
    logs.setup(settings.config.log.level, settings.config.log.format,
               secrets=settings.secrets())
    for warning in settings.warnings:
        kind = "deprecated" if warning in settings.deprecated else "insecure"
        log.warning("%s setting: %s", kind, warning)

    async def run() -> int:
        await serve(Bridge.from_settings(settings), config_path=str(args.config))
        return EXIT_OK

    try:
        return asyncio.run(run())
    except OSError as exc:
        why = listen_problem(exc, listeners(settings), str(args.config))
        if why is None:
            raise
        raise CommandFailed(why) from exc


@dataclass(frozen=True)
class Listener:
    """One listening socket of ``run``: the setting that configures it, what it serves."""

    setting: str
    host: str
    port: int
    serves: str
    #: the port when the setting is absent from the file (its default), else ``None``
    default_port: int | None = None


def listeners(settings: Settings) -> list[Listener]:
    """The sockets ``run`` listens on, each with the setting that chooses its port."""
    cfg = settings.config
    found: list[Listener] = []
    if cfg.http.enabled:
        found.append(Listener("http", cfg.http.host, cfg.http.port,
                              "/healthz, /readyz and /metrics"))
    control = settings.control_http
    if control is not None:
        found.append(Listener("control.http", control.host, control.port,
                              "/v1 snapshots and leases",
                              default_port=control.port if cfg.control.http is None else None))
    return found


#: the address in asyncio's bind error: "... bind on address ('127.0.0.1', 9464): ..."
_BIND_ADDRESS = re.compile(r"address \('([^']*)', (\d+)")


def listen_problem(exc: OSError, candidates: Sequence[Listener], config: str) -> str | None:
    """One paragraph naming the listener setting a failed bind belongs to, why the bind
    failed and how to fix it; ``None`` when ``exc`` is not a failed bind of ``run``."""
    if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        return None
    found = _BIND_ADDRESS.search(str(exc))
    if found is None:
        return None
    host, port = found.group(1), int(found.group(2))
    same_port = [c for c in candidates if c.port == port]
    matching = [c for c in same_port if c.host == host] or same_port
    if not matching:
        return None
    where = matching[0]
    setting = f"{where.setting}.port"
    if where.default_port is not None:
        set_how = (f"{where.setting} is not set in {config}, so it listens on the default "
                   f"{where.host}:{where.default_port}: add `{where.setting}: {{host: "
                   f"{where.host}, port: N}}` with a free port N")
    else:
        set_how = f"set {setting} in {config} to a free port"
    named = f"{where.setting}.host" if exc.errno == errno.EADDRNOTAVAIL else setting
    head = f"cannot listen on {host}:{port} for {where.serves} ({named})"
    if exc.errno == errno.EADDRINUSE:
        also = (" (or `http: {enabled: false}` to serve no probes and no metrics)"
                if where.setting == "http" else "")
        return (f"{head}: the port is already in use, by another program or by another "
                f"aleno-bridge still running (`ss -ltnp 'sport = :{port}'` or `lsof -i "
                f":{port}` shows which). Stop it, or {set_how}{also}.")
    if exc.errno == errno.EACCES:
        return (f"{head}: permission denied; a port below 1024 needs root or the "
                f"CAP_NET_BIND_SERVICE capability. Set {setting} in {config} to a port above "
                "1023.")
    return (f"{head}: {host} is not an address of this machine. Set {where.setting}.host in "
            f"{config} to one of its addresses: 127.0.0.1 (this machine only) or 0.0.0.0 "
            "(every interface).")


def _key_limit(value: str) -> tuple[str, int]:
    """``KEY=N`` of ``simulate --key-limit``: split at the last ``=`` (a base64 key ends
    in ``=``). Errors never repeat the value: it holds a key."""
    key, sep, limit = value.rpartition("=")
    if not sep or not key or not limit.isdigit():
        msg = "expected KEY=N with N a whole number (the value is not shown: it holds a key)"
        raise argparse.ArgumentTypeError(msg)
    return key, int(limit)


def _simulate(args: argparse.Namespace) -> int:
    from bridge.app import install_signals
    from bridge.simulator import Simulator

    api_keys = args.api_keys or ["demo-key"]
    logs.setup("INFO", "auto", secrets=api_keys)

    def split(v: str | None) -> list[str] | None:
        return [s.strip() for s in v.split(",") if s.strip()] if v else None

    try:
        sim = Simulator(
            host=args.host, port=args.port, api_keys=api_keys,
            interval=args.interval, max_subscriptions=args.max_subscriptions,
            tickers=split(args.tickers), equities=split(args.equities), seed=args.seed,
            compression=args.compression, limits=dict(args.key_limits), admin=args.admin,
        )
    except ValueError as exc:  # a --key-limit for a key not given with --api-key
        print(f"aleno-bridge: simulate: {exc} (with --api-key)", file=sys.stderr)
        return EXIT_CONFIG

    async def serve() -> None:
        stop = asyncio.Event()
        install_signals(stop)
        async with sim:
            print(f"aleno simulator on {sim.url}{sim.path} ({len(sim.tickers)} tickers, "
                  f"{len(sim.equities)} equities, interval {sim.interval:g}s"
                  f"{', admin API on ' + sim.url + '/admin/' if sim.admin else ''})",
                  flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        msg = (f"cannot listen on {args.host}:{args.port}: the port is already in use, "
               "perhaps by another `aleno-bridge simulate` still running (`ss -ltnp "
               f"'sport = :{args.port}'` shows which program). Stop it, or pick a free port "
               "with --port N and point the bridge at it (ALENO_URL=http://127.0.0.1:N with "
               "the example configurations).")
        raise CommandFailed(msg) from exc
    return EXIT_OK


DEMO_TICKERS = ["BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD", "LINK/USD"]
DEMO_EQUITIES = ["AAPL", "MSFT", "NVDA", "TSLA"]


def _demo(args: argparse.Namespace) -> int:
    from bridge.app import Bridge, serve
    from bridge.simulator import Simulator

    logs.setup("WARNING", "text")

    async def demo() -> int:
        sim = Simulator(port=0, api_keys=["demo-key"], interval=args.interval)
        async with sim:
            settings = demo_settings(sim.url, args.style)
            print(f"aleno-bridge demo: simulator on {sim.url}/v1/socket -> bridge -> console. "
                  "Ctrl-C to stop.", flush=True)
            stop = asyncio.Event()
            if args.duration:
                asyncio.get_running_loop().call_later(args.duration, stop.set)
            await serve(Bridge.from_settings(settings), stop)
        return EXIT_OK

    return asyncio.run(demo())


def demo_settings(url: str, style: str = "lines") -> Settings:
    """The demo's settings: the simulator at ``url``, every price to one console sink."""
    from pydantic import SecretStr

    from bridge.config import (
        BatchConfig,
        Config,
        HttpConfig,
        Match,
        RouteConfig,
        SinkCommon,
        SourceConfig,
        resolve_settings,
    )

    config = Config(
        source=SourceConfig(url=url, api_key=SecretStr("demo-key"), tickers=DEMO_TICKERS,
                            equities=DEMO_EQUITIES),
        # ``style`` is an option of the console driver (checked by resolve_settings)
        sinks={"screen": SinkCommon(driver="console", style=style,
                                    batch=BatchConfig(linger_ms=0))},
        routes=[
            RouteConfig(match=Match(kind="ticker"), sinks=["screen"],
                        topic="prices.ticker.{base}-{quote}"),
            RouteConfig(match=Match(kind="equity"), sinks=["screen"],
                        topic="prices.equity.{symbol}"),
        ],
        http=HttpConfig(enabled=False),
    )
    return resolve_settings(config, source="demo configuration")


#: the distribution of the built-in drivers; each bus driver's client library comes
#: with the extra of the same name (``kafka`` -> ``pip install 'aleno-bridge[kafka]'``)
CORE_DISTRIBUTION = "aleno-bridge"


def _core_extras() -> dict[str, list[str]]:
    """The extras of the installed ``aleno-bridge`` and the distributions each needs."""
    import re
    from importlib import metadata

    try:
        dist = metadata.distribution(CORE_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree
        return {}
    extras: dict[str, list[str]] = {e: [] for e in dist.metadata.get_all("Provides-Extra") or []}
    for req in dist.requires or []:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if marker and name and marker.group(1) in extras:
            extras[marker.group(1)].append(name.group(0))
    return extras


def _is_installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def install_hints(
    infos: Sequence[DriverInfo],
    extras: dict[str, list[str]],
    installed: Callable[[str], bool] = _is_installed,
) -> dict[str, str]:
    """``{driver: "pip install 'aleno-bridge[<driver>]'"}`` for every built-in driver
    that did not load because its extra is missing: its import failed, or a
    distribution its extra requires is not installed.

    ``extras`` maps each extra of ``aleno-bridge`` to the distributions it requires
    (:func:`_core_extras`); a driver of another distribution never gets a hint.
    """
    hints: dict[str, str] = {}
    for info in infos:
        if info.driver is not None or info.distribution != CORE_DISTRIBUTION:
            continue
        if info.name not in extras:
            continue
        import_failed = (info.error or "").startswith(("ImportError", "ModuleNotFoundError"))
        if import_failed or not all(installed(d) for d in extras[info.name]):
            hints[info.name] = f"pip install '{CORE_DISTRIBUTION}[{info.name}]'"
    return hints


def _plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from bridge.sinks import Drivers

    infos = Drivers().infos()
    extras = _core_extras()
    hints = install_hints(infos, extras)
    table = Table(title="sink drivers (entry-point group bridge.sinks)")
    for col in ("name", "distribution", "version", "target", "status"):
        table.add_column(col)
    failed = 0
    for info in infos:
        status = "ok" if info.driver is not None else f"failed: {info.error}"
        hint = hints.get(info.name)
        if hint is not None and hint not in status:
            status += f" (install: {hint})"
        failed += info.driver is None
        table.add_row(info.name, info.distribution, info.version, info.target, escape(status))
    # on a pipe, never wrap a failure reason across lines: scripts grep for it
    console = Console() if sys.stdout.isatty() else Console(width=400)
    console.print(table)
    for name, hint in hints.items():
        console.print(escape(f"hint: the {name} driver needs its client library: {hint}"),
                      soft_wrap=True)
    if len(hints) > 1 and "all" in extras:
        console.print(escape(f"hint: every built-in bus driver at once: "
                             f"pip install '{CORE_DISTRIBUTION}[all]'"), soft_wrap=True)
    return EXIT_ERROR if failed else EXIT_OK


def _tap(args: argparse.Namespace) -> int:
    from bridge.cli.tap import TapOptions, run_tap

    options = TapOptions(route=args.route, sink=args.sink, limit=args.limit,
                         publish=args.publish)
    return run_tap(args.config, options)


def _spool(args: argparse.Namespace) -> int:
    from bridge.cli.spool import SpoolCommandError, run_spool

    try:
        return run_spool(args.action, args.path, as_json=args.json)
    except SpoolCommandError as exc:
        raise CommandFailed(str(exc), EXIT_CONFIG) from exc


def _top(args: argparse.Namespace) -> int:
    from bridge.cli.top import TopError, run_top

    try:
        return run_top(args)
    except TopError as exc:
        raise CommandFailed(str(exc)) from exc


_COMMANDS = {
    "run": _run,
    "validate": _validate,
    "simulate": _simulate,
    "demo": _demo,
    "plugins": _plugins,
    "tap": _tap,
    "top": _top,
    "spool": _spool,
}

__all__ = ["main"]
