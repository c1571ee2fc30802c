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


def test_the_checks_see_the_code() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert "bridge/app.py" in names and any(n.startswith("plugins/") for n in names)
