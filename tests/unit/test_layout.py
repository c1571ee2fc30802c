"""The layout keeps every piece small enough to read whole: no module of ``bridge/`` or
``plugins/`` over 600 lines, no class over 400 (read with :mod:`ast`, nothing runs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _sources() -> list[Path]:
    out = []
    for top in ("bridge", "plugins"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).parts
            if "build" in rel or any(p.endswith(".egg-info") for p in rel) or "tests" in rel:
                continue
            out.append(path)
    return out


def test_no_module_is_longer_than_600_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, "modules over 600 lines:\n" + "\n".join(long)


def test_no_class_is_longer_than_400_lines() -> None:
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} {lines}")
    assert not long, "classes over 400 lines:\n" + "\n".join(long)


def _assigned_listeners(tree: ast.AST) -> list[tuple[int, str]]:
    """``x.on_something = ...`` (or ``x.keeper = ...``) where ``x`` is not ``self``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and (
                        target.attr.startswith("on_") or target.attr == "keeper") and not (
                        isinstance(target.value, ast.Name) and target.value.id == "self"):
                    found.append((node.lineno, ast.unparse(target)))
    return found


#: the one place a listener is set on another object: the subscriptions declare
#: themselves the keeper of the symbol book they are given (a two-way relation)
LISTENER_ASSIGNMENTS = {("bridge/upstream/subscriptions.py", "symbols.keeper")}


def test_listeners_are_passed_at_construction() -> None:
    """The wiring hands every listener to the constructor of the part that calls it;
    none is set on a part afterwards (driver code that sets a client library's own
    callbacks, in plugins/, is not wiring)."""
    late = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("bridge/"):
            continue
        for line, target in _assigned_listeners(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, target) not in LISTENER_ASSIGNMENTS:
                late.append(f"{rel}:{line}: {target} = ...")
    assert not late, "listeners set after construction:\n" + "\n".join(late)


def test_the_listener_check_sees_an_assignment() -> None:
    tree = ast.parse("pool.on_link = market.link\nself.on_link = on_link\n")
    assert _assigned_listeners(tree) == [(1, "pool.on_link")]


def test_the_checks_see_the_code() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert "bridge/app.py" in names and any(n.startswith("plugins/") for n in names)
