"""Topic/key templates and route matching, shared by the configuration and the router."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bridge.config.schema import Match
from bridge.core.templates import (
    NEUTRAL_SAMPLES,
    PLACEHOLDERS,
    matches,
    placeholder_values,
    render,
    template_problem,
    topic_problem,
)
from bridge.pipeline import routing

BRIDGE = Path(__file__).resolve().parents[3] / "bridge"


def test_every_placeholder_is_accepted() -> None:
    assert template_problem("".join("{" + p + "}" for p in PLACEHOLDERS)) is None
    assert template_problem("no.placeholders") is None
    assert template_problem("") is None


def test_an_unknown_placeholder_names_the_allowed_ones() -> None:
    assert template_problem("a.{sym}") == (
        "unknown placeholder {sym} in 'a.{sym}'; use {kind}, {symbol}, {base}, {quote}, "
        "{feed}, {interval}"
    )


@pytest.mark.parametrize("template", ["{symbol!r}", "{symbol:>10}"])
def test_a_format_spec_or_conversion_is_refused(template: str) -> None:
    assert template_problem(template) == (
        f"placeholder {{symbol}} in {template!r} takes no format spec"
    )


def test_a_broken_template_is_reported_not_raised() -> None:
    problem = template_problem("a.{symbol")
    assert problem is not None
    assert problem.startswith("invalid template 'a.{symbol': ")


def test_placeholder_values_of_a_ticker_and_an_equity() -> None:
    assert placeholder_values("ticker", "BTC/USD") == {
        "kind": "ticker", "symbol": "BTC/USD", "base": "BTC", "quote": "USD"}
    assert placeholder_values("equity", "AAPL") == {
        "kind": "equity", "symbol": "AAPL", "base": "AAPL", "quote": ""}


def test_matches_kind_globs_and_excludes() -> None:
    m = Match(kind="ticker", symbols=["btc/*", "ETH/USD"], exclude=[" btc/eur "])
    assert matches(m, "ticker", "BTC/USD")
    assert matches(m, "ticker", "ETH/USD")
    assert not matches(m, "ticker", "BTC/EUR")
    assert not matches(m, "equity", "BTC/USD")
    assert not matches(m, "ticker", "SOL/USD")
    assert matches(Match(), "equity", "AAPL")


def test_render_applies_the_safe_token_rule_to_every_value() -> None:
    assert render("p.{kind}.{symbol}.{base}-{quote}", "ticker", "BTC/USD",
                  lambda v: v.replace("/", "_")) == "p.ticker.BTC_USD.BTC-USD"


def test_topic_problem_returns_the_first_refused_sample() -> None:
    def check(topic: str) -> str | None:
        return "ends with a dot" if topic.endswith(".") else None

    samples = [*NEUTRAL_SAMPLES, ("ticker", "ETH/USD")]
    assert topic_problem("p.{quote}", Match(kind="ticker"), samples, str, check) is None
    assert topic_problem("p.{quote}", Match(), samples, str, check) == (
        "AAPL", "p.", "ends with a dot")
    # a sample the route does not select is never checked
    assert topic_problem("p.{quote}", Match(kind="equity", symbols=["MSFT"]), samples,
                         str, check) is None


def test_the_router_re_exports_the_helpers() -> None:
    assert routing.matches is matches
    assert routing.placeholder_values is placeholder_values


def _bridge_imports(module: str) -> set[str]:
    tree = ast.parse((BRIDGE / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "bridge" or m.startswith("bridge.")}


def test_templates_import_nothing_of_the_bridge() -> None:
    assert _bridge_imports("core/templates") == set()


@pytest.mark.parametrize("module", ["config/__init__", "config/schema", "config/loading",
                                    "config/settings"])
def test_the_configuration_does_not_import_the_router(module: str) -> None:
    assert "bridge.pipeline.routing" not in _bridge_imports(module)
