"""``aleno-bridge top``: a refreshing terminal view of a running bridge's /metrics.

Per sink: state, events/s published, queue depth and fill, drops, conflated,
failures; upstream: state, events/s received, invalid records, lag (p50/p99 estimated
from the histogram). Reads only the Prometheus endpoint, so it works against any
bridge you can reach, in a pod through ``kubectl port-forward`` too.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bridge.core import metrics as m
from bridge.core.metrics import TOTAL


@dataclass
class Snapshot:
    at: float
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        total = 0.0
        for (n, lbls), v in self.values.items():
            if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
                total += v
        return total

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted({dict(lbls)[label] for (n, lbls), _ in self.values.items()
                       if n == name and label in dict(lbls)})


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a bridge's metrics endpoint, or ``None``.

    Only http(s) is read: urllib would also open ``file://`` and ``ftp://`` URLs.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return (f"--url must be the http:// or https:// address of a bridge's /metrics "
                f"endpoint, not {url!r}")
    return None


#: what the user can do when no bridge answers at ``--url`` (the second half of a message)
START_HINT = (
    "Is the bridge running? Start it with `aleno-bridge run -c CONFIG`: top reads its "
    "probes' listener (http.host and http.port, default 127.0.0.1:9464, with "
    "http.enabled: true). For a bridge elsewhere, pass --url http://HOST:PORT/metrics; "
    "for a pod, run `kubectl port-forward POD 9464` first."
)


class TopError(Exception):
    """``top`` could not read a bridge's metrics; the message names the cause and the fix."""


def scrape(url: str, timeout: float = 5.0) -> Snapshot:
    """Read and parse ``url``; :class:`TopError` (one paragraph) when that fails."""
    problem = check_url(url)
    if problem is not None:
        raise ValueError(problem)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        msg = (f"{url} answered HTTP {exc.code} {exc.reason}: something listens there, but "
               "it is not a bridge's metrics endpoint. Point --url at the bridge's "
               "http.host:http.port with the path /metrics (default "
               "http://127.0.0.1:9464/metrics).")
        raise TopError(msg) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TopError(unreachable(url, exc, timeout)) from exc
    try:
        snap = parse(text, time.monotonic())
    except ValueError as exc:
        msg = (f"{url} did not answer with Prometheus metrics ({exc}): is --url the "
               "bridge's /metrics endpoint (http.port, default 9464)?")
        raise TopError(msg) from exc
    if snap.values and not any(n.startswith("aleno_bridge_") for n, _ in snap.values):
        msg = (f"{url} serves Prometheus metrics, but none of aleno-bridge's (no "
               "aleno_bridge_* series): it is another program's endpoint. Point --url at "
               "the bridge's http.port (default http://127.0.0.1:9464/metrics).")
        raise TopError(msg)
    return snap


def unreachable(url: str, exc: BaseException, timeout: float) -> str:
    """Why nothing usable answered at ``url``, and what to do, in one paragraph."""
    reason: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    host = urllib.parse.urlsplit(url).hostname or "?"
    if isinstance(reason, ConnectionRefusedError):
        cause = f"nothing listens at {url} (connection refused)"
    elif isinstance(reason, socket.gaierror):
        cause = f"the host name {host!r} of {url} does not resolve ({reason.strerror})"
    elif isinstance(reason, TimeoutError):
        cause = (f"{url} did not answer within {timeout:g}s (a firewall dropping the "
                 "connection, or a program that accepts it and stays silent)")
    elif isinstance(reason, (ConnectionResetError, http.client.HTTPException)):
        cause = f"{url} closed the connection without an HTTP answer"
    elif isinstance(reason, OSError) and reason.strerror:
        cause = f"cannot reach {url} ({reason.strerror.lower()})"
    else:
        cause = f"cannot reach {url} ({reason})"
    return f"{cause}. {START_HINT}"


def parse(text: str, at: float) -> Snapshot:
    """The samples of a Prometheus text exposition, read at monotonic time ``at``."""
    snap = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            snap.values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return snap


def _quantile(snap: Snapshot, name: str, q: float) -> float | None:
    buckets: dict[float, float] = {}
    for (n, lbls), v in snap.values.items():
        if n == f"{name}_bucket":
            le = float(dict(lbls)["le"])
            buckets[le] = buckets.get(le, 0.0) + v
    if not buckets:
        return None
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


def render(prev: Snapshot | None, cur: Snapshot) -> Group:
    dt = (cur.at - prev.at) if prev else 0.0

    def rate(name: str, **labels: str) -> str:
        if prev is None or dt <= 0:
            return "-"
        return f"{(cur.get(name, **labels) - prev.get(name, **labels)) / dt:,.1f}"

    state = next((s for s in cur.label_values(m.UPSTREAM_STATE, "state")
                  if cur.get(m.UPSTREAM_STATE, state=s) == 1), "?")
    p50 = _quantile(cur, m.UPSTREAM_LAG_SECONDS, 0.5)
    p99 = _quantile(cur, m.UPSTREAM_LAG_SECONDS, 0.99)
    head = Text(
        f"upstream {state}  received/s {rate(m.EVENTS_RECEIVED + TOTAL)}  "
        f"invalid {cur.get(m.EVENTS_INVALID + TOTAL):,.0f}  "
        f"lag p50 <= {p50 if p50 is not None else '-'}s  p99 <= {p99 if p99 is not None else '-'}s"
        f"  reconnects {cur.get(m.UPSTREAM_RECONNECTS + TOTAL):,.0f}"
    )
    table = Table(title="sinks")
    for col in ("sink", "state", "published/s", "published", "queue", "fill", "dropped",
                "conflated", "failures"):
        table.add_column(col, justify="left" if col in ("sink", "state") else "right")
    for sink in cur.label_values(m.SINK_UP, "sink"):
        st = next((s for s in cur.label_values(m.SINK_STATE, "state")
                   if cur.get(m.SINK_STATE, sink=sink, state=s) == 1), "?")
        depth = cur.get(m.SINK_QUEUE_DEPTH, sink=sink)
        cap = cur.get(m.SINK_QUEUE_CAPACITY, sink=sink) or 1
        table.add_row(
            sink, st, rate(m.SINK_EVENTS_PUBLISHED + TOTAL, sink=sink),
            f"{cur.get(m.SINK_EVENTS_PUBLISHED + TOTAL, sink=sink):,.0f}",
            f"{depth:,.0f}", f"{depth / cap:.0%}",
            f"{cur.get(m.SINK_EVENTS_DROPPED + TOTAL, sink=sink):,.0f}",
            f"{cur.get(m.SINK_EVENTS_CONFLATED + TOTAL, sink=sink):,.0f}",
            f"{cur.get(m.SINK_PUBLISH_FAILURES + TOTAL, sink=sink):,.0f}",
        )
    return Group(head, table)


def run_top(args: argparse.Namespace) -> int:
    problem = check_url(args.url)
    if problem is not None:
        print(f"aleno-bridge: {problem}", file=sys.stderr)
        return 2
    console = Console()
    prev = None
    if args.once:
        first = scrape(args.url)
        time.sleep(min(args.interval, 1.0))
        console.print(render(first, scrape(args.url)))
        return 0
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while True:
            cur = scrape(args.url)
            live.update(render(prev, cur))
            prev = cur
            time.sleep(args.interval)
