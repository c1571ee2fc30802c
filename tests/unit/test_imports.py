"""The import graph of ``bridge/`` and ``plugins/`` has no cycle.

The graph is read from the source with the standard library's :mod:`ast`, so no module
is executed. Every ``import`` and ``from ... import`` statement counts wherever it is,
at module level or inside a function, a method or a ``try``: a lazy import is still a
dependency, it only hides the cycle until run time. Imports under ``if TYPE_CHECKING:``
never run; the graph without them must be acyclic (a cycle there breaks at import
time), and the graph with them too (a cycle there is a knot for the reader: a module
that knows the one that uses it).

Module names are the installed ones: ``bridge.*``, ``aleno_bridge_plugins.*`` for
``plugins/aleno_bridge_plugins/**`` and the package of each example distribution under
``plugins/examples/<name>/``. ``from pkg import name`` is an edge to ``pkg.name`` when
that is a module of the graph, else to ``pkg``. Importing a submodule is not counted as
importing its parent package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"build", "__pycache__", "node_modules"}


def _files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*.py")):
        rel = path.relative_to(directory).parts
        if not any(p in SKIP_DIRS or p.endswith(".egg-info") for p in rel):
            yield path


def _module_name(path: Path, package_root: Path, package: str) -> str:
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def discover() -> dict[str, tuple[Path, bool]]:
    """``module name -> (file, is_package)`` for every module of the graph."""
    modules: dict[str, tuple[Path, bool]] = {}
    for path in _files(ROOT / "bridge"):
        modules[_module_name(path, ROOT / "bridge", "bridge")] = (path, path.stem == "__init__")
    plugins = ROOT / "plugins"
    for path in _files(plugins):
        rel = path.relative_to(plugins).parts
        if rel[0] == "examples":
            # plugins/examples/<dist>/<package>/...: its own distribution
            if len(rel) < 4:
                continue
            name = _module_name(path, plugins / rel[0] / rel[1] / rel[2], rel[2])
        elif len(rel) > 1:
            # plugins/<package>/...: the drivers shipped with aleno-bridge
            # (plugins/aleno_bridge_plugins/kafka/sink.py: aleno_bridge_plugins.kafka.sink)
            name = _module_name(path, plugins / rel[0], rel[0])
        else:
            continue  # a loose plugins/*.py belongs to no installed package
        modules[name] = (path, path.stem == "__init__")
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST, type_checking: bool = False) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth; those under TYPE_CHECKING only
    with ``type_checking``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """``module -> modules of the graph it imports``."""
    modules = discover()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), type_checking):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve(node, name, is_package)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_one_cycle(graph, set(c), c[0]) for c in components]


def _one_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside one component (BFS)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_the_graph_covers_the_core_and_the_drivers() -> None:
    graph = import_graph()
    assert "bridge.app" in graph and "bridge.sinks" in graph
    assert "aleno_bridge_plugins.kafka.sink" in graph
    assert "bridge.sinks" in graph["aleno_bridge_plugins.kafka.sink"]


def test_lazy_imports_count_and_type_checking_imports_do_not() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
        "def f():\n    import c\n"
        "class K:\n    def m(self):\n        from d import e\n"
    )
    found = {alias.name if isinstance(n, ast.Import) else n.module
             for n in _imports(tree) for alias in n.names}
    assert found == {"typing", "b", "c", "d"}


def test_cycles_are_found_and_printed() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_the_import_graph_of_bridge_and_plugins_has_no_cycle(type_checking: bool) -> None:
    found = cycles(import_graph(type_checking))
    text = "\n".join(" -> ".join(c) for c in found)
    assert not found, f"import cycles in bridge/ and plugins/:\n{text}"


# ---------------------------------------------------------------------------
# the layer rule: the data path imports the configuration's schema, never its loader;
# nothing below the command line and the wiring imports them

#: the data path, and what it stands on
DATA_PATH = ("bridge.core", "bridge.upstream", "bridge.pipeline", "bridge.sinks")
#: what the data path must never import: the configuration's loader side (YAML, files,
#: driver discovery, reload), the control surface, the command line and the wiring
NOT_FROM_DATA_PATH = ("bridge.config", "bridge.config.loading", "bridge.config.settings",
                      "bridge.config.reload", "bridge.control", "bridge.cli", "bridge.app",
                      "bridge.simulator")
#: the top: only they (and ``python -m bridge``) import themselves
TOP = ("bridge.cli", "bridge.app")


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_data_path_imports_the_schema_never_the_loader() -> None:
    graph = import_graph(type_checking=True)
    wrong = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if _within(m, DATA_PATH)
        for t in targets
        if t in NOT_FROM_DATA_PATH or _within(t, ("bridge.control", "bridge.cli")))
    assert not wrong, "the data path imports above itself:\n" + "\n".join(wrong)


def test_nothing_below_the_command_line_and_the_wiring_imports_them() -> None:
    graph = import_graph(type_checking=True)
    wrong = sorted(
        f"{m} -> {t}" for m, targets in graph.items()
        if not _within(m, TOP) and m != "bridge.__main__"
        for t in targets if _within(t, TOP))
    assert not wrong, "imports of the command line or the wiring from below:\n" + "\n".join(wrong)


def loaded_by(imports: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has loaded after importing ``imports``."""
    import subprocess
    import sys

    code = (f"import sys\nimport {', '.join(imports)}\n"
            f"print(repr(sorted(m for m in {watched!r} if m in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    found: list[str] = ast.literal_eval(done.stdout.strip())
    return found


def test_the_data_path_loads_neither_yaml_nor_driver_discovery() -> None:
    """The modules of the router, the sink worker, the normalizer and the Aleno client,
    imported in a fresh interpreter: no YAML parser, no stevedore."""
    assert loaded_by(["bridge.pipeline.routing", "bridge.sinks.worker",
                      "bridge.pipeline.normalize", "bridge.upstream.client"],
                     ("yaml", "stevedore")) == []


def test_the_symbol_set_and_the_control_surface_do_without_the_socketio_client() -> None:
    """The leases, the subscription owner and the control core share the protocol's
    types (:mod:`bridge.upstream.protocol`), not the Socket.IO client."""
    assert loaded_by(["bridge.control.core", "bridge.upstream.subscriptions",
                      "bridge.upstream.leases", "bridge.upstream.symbols"],
                     ("socketio", "engineio", "bridge.upstream.client")) == []


def test_the_import_probe_sees_a_loaded_module() -> None:
    assert loaded_by(["bridge.config.loading"], ("yaml", "stevedore")) == ["yaml"]


def test_the_layout_is_the_map() -> None:
    """At most 8 modules at the top of ``bridge/``, the rest in subpackages."""
    top = sorted(p.name for p in (ROOT / "bridge").glob("*.py"))
    packages = sorted(p.name for p in (ROOT / "bridge").iterdir()
                      if p.is_dir() and (p / "__init__.py").exists())
    assert len(top) <= 8, top
    assert len(packages) >= 5, packages
