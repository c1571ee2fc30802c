"""Reading a configuration: files with bounds, YAML with guards, ``${VAR}`` interpolation,
and validation errors as paths in the file.

The loader refuses what YAML would otherwise accept silently or expand without bound:
duplicate mapping keys (the later one would replace the earlier), recursive aliases,
aliases that expand to more than :data:`MAX_ALIAS_NODES` nodes ("billion laughs"),
nesting deeper than :data:`MAX_DEPTH`, and a file larger than :data:`MAX_CONFIG_BYTES` or
not UTF-8. An ``api_key_file`` is read with the same care (:func:`read_key_file`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from bridge.config.schema import ConfigError, key_problem

#: a configuration file larger than this is refused before it is parsed
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: an ``api_key_file`` larger than this is refused (it holds one key on one line)
MAX_KEY_FILE_BYTES = 4096
#: YAML aliases may add at most this many nodes to the document as written
MAX_ALIAS_NODES = 100_000
#: mappings and sequences nested deeper than this are refused
MAX_DEPTH = 100


def read_config_file(path: str | os.PathLike[str], *, regular_only: bool = False) -> str:
    """The text of the configuration file at ``path``: at most :data:`MAX_CONFIG_BYTES`,
    UTF-8. Raises :class:`ConfigError` (its source is the path) when it cannot be read.

    Reading never takes more than the bound, whatever the path holds: a file whose size
    is over it is refused from its ``stat`` (a 300 MB file is never read), and at most
    the bound plus one byte is read from anything else (``/dev/zero``). The file is
    opened non-blocking, so a FIFO with no writer never hangs the reader.

    ``regular_only`` (reloads) refuses anything but a regular file (through symlinks):
    a running bridge must never wait on a FIFO or a socket, nor read a device. At
    start-up a pipe is accepted (``run -c <(envsubst < bridge.yaml)``): the operator
    who starts the process is there to feed it.
    """
    p = Path(path)
    mib = MAX_CONFIG_BYTES // (1024 * 1024)
    too_big = f"<file>: larger than {mib} MiB; is this the right file?"
    try:
        mode = os.stat(p).st_mode
        if regular_only and not stat.S_ISREG(mode):
            raise ConfigError([f"<file>: {_not_regular(mode)}"], str(p))
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)  # what was opened, not what was there a moment before
            if regular_only and not stat.S_ISREG(st.st_mode):
                raise ConfigError([f"<file>: {_not_regular(st.st_mode)}"], str(p))
            if stat.S_ISREG(st.st_mode) and st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError([too_big], str(p))
            if stat.S_ISFIFO(st.st_mode):
                # a pipe at start-up (``<(...)``): read it to its end, as a blocking
                # open would have (a pipe nobody writes to reads as empty: refused)
                os.set_blocking(fd, True)
            data = _read_at_most(fd, MAX_CONFIG_BYTES + 1)
            if not data and stat.S_ISFIFO(st.st_mode):
                raise ConfigError(["<file>: a FIFO with nothing written to it"], str(p))
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([too_big], str(p))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        problem = (f"<file>: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at line "
                   f"{line}, column {column})")
        raise ConfigError([problem], str(p)) from None


def _not_regular(mode: int) -> str:
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a directory" if stat.S_ISDIR(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return (f"not a regular file ({kind}); a configuration is reloaded only from a "
            "regular file")


def _read_at_most(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes of ``fd``, until its end (``os.read`` may return less
    than asked before the end)."""
    parts: list[bytes] = []
    left = limit
    while left > 0:
        try:
            chunk = os.read(fd, min(left, 1024 * 1024))
        except BlockingIOError:  # a non-blocking device with nothing to read now
            break
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_tree(
    text: str, env: Mapping[str, str] | None = None, source: str = "configuration"
) -> tuple[dict[Any, Any], list[str]]:
    """The document of ``text`` with ``${VAR}`` replaced from ``env`` (default: the
    process environment), and the problems found so far (duplicate keys, unset
    variables). Raises :class:`ConfigError` when the text is no mapping at all."""
    tree, problems = load_yaml(text, source)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        problem = "<root>: the file must hold a mapping (source:, sinks:, routes:)"
        raise ConfigError([*problems, problem], source)
    tree, env_problems = interpolate(tree, os.environ if env is None else env)
    problems.extend(env_problems)
    return tree, problems


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def interpolate(tree: Any, env: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``tree``.

    ``$$`` is a literal ``$``. An unset variable without default is a problem at its
    path; its value never appears in the message. A ``${`` that starts no valid
    reference (``${VAR`` unterminated, ``${1X}``) is a problem too, never kept literally.
    """
    problems: list[str] = []

    def sub(text: str, where: str) -> str:
        malformed = False

        def one(m: re.Match[str]) -> str:
            nonlocal malformed
            if m.group(0) == "$$":
                return "$"
            if m.group(1) is None:
                if not malformed:
                    malformed = True
                    problems.append(
                        f"{where or '<root>'}: unterminated or malformed ${{...}} reference "
                        "(use ${VAR} or ${VAR:-default}; $$ is a literal $)"
                    )
                return m.group(0)
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                problems.append(f"{where or '<root>'}: environment variable {name} is not set")
                return ""
            return value

        return _VAR.sub(one, text)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):
            return sub(node, where)
        if isinstance(node, dict):
            return {k: walk(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        return node

    return walk(tree, path), problems


def format_loc(loc: Iterable[int | str], prefix: str = "") -> str:
    """A pydantic error location as a path in the file: ``sinks.bus.retry``, ``routes[0]``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def validation_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``path: message`` per error of ``exc``, the path under ``prefix``, in the
    words ``validate`` prints (``field required``, ``unknown option``)."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "field required"
        elif err["type"] == "extra_forbidden":
            msg = "unknown option"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        else:
            msg = msg[:1].lower() + msg[1:]
        problems.append(f"{format_loc(err['loc'], prefix)}: {msg}")
    return problems


def read_key_file(path: Path, problems: list[str]) -> SecretStr | None:
    """The key in ``path``: at most :data:`MAX_KEY_FILE_BYTES`, UTF-8, one line (one
    trailing newline is stripped), not empty. Problems go to ``problems``."""
    where = "source.api_key_file"
    try:
        mode = path.stat().st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            problems.append(f"{where}: not a regular file (a pipe or socket)")
            return None
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(f"{where}: cannot read the file: {exc.strerror or exc}")
        return None
    if len(data) > MAX_KEY_FILE_BYTES:
        kib = MAX_KEY_FILE_BYTES // 1024
        problems.append(f"{where}: larger than {kib} KiB; the file must hold the key on one line")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{where}: not UTF-8 text")
        return None
    key = text.removesuffix("\n").removesuffix("\r")
    if not key:
        problems.append(f"{where}: the file is empty")
        return None
    problem = key_problem(key)
    if problem is not None:
        problems.append(f"{where}: {problem}")
        return None
    return SecretStr(key)


# ---------------------------------------------------------------------------
# The YAML loader

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """The document cannot be constructed safely (recursive, too large, too deep)."""


class _Loader(yaml.SafeLoader):
    """A SafeLoader whose document is checked before it is constructed: duplicate
    mapping keys (PyYAML keeps the last one silently), recursive aliases, alias
    expansion beyond :data:`MAX_ALIAS_NODES` nodes and nesting beyond :data:`MAX_DEPTH`."""

    def check(self, root: yaml.Node) -> list[str]:
        """The problems of the composed document; raises :class:`_Refused` (with the
        problems so far in its args) when it must not be constructed."""
        problems: list[str] = []
        seen: set[int] = set()
        active: set[int] = set()
        budget = MAX_ALIAS_NODES

        def refuse(problem: str) -> None:
            problems.append(problem)
            raise _Refused(problems)

        def walk(node: yaml.Node, where: str, depth: int, aliased: bool) -> None:
            nonlocal budget
            here = where or "<root>"
            ident = id(node)
            if ident in active:
                refuse(f"{here}: recursive YAML alias (a node that contains itself)")
            if ident in seen:
                aliased = True
            seen.add(ident)
            if aliased:
                budget -= 1
                if budget < 0:
                    refuse(f"{here}: YAML aliases expand to more than {MAX_ALIAS_NODES} "
                           "nodes; refusing to expand them")
            if depth > MAX_DEPTH:
                refuse(f"{here}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, yaml.MappingNode):
                active.add(ident)
                first: dict[tuple[str, str], int] = {}
                for key, value in node.value:
                    if key.tag == _MERGE_TAG:
                        walk(value, where, depth + 1, aliased)
                        continue
                    name = str(key.value) if isinstance(key, yaml.ScalarNode) else "<key>"
                    sub = f"{where}.{name}" if where else name
                    if isinstance(key, yaml.ScalarNode):
                        line = key.start_mark.line + 1
                        dup = (key.tag, key.value)
                        if dup not in first:
                            first[dup] = line
                        elif not aliased:
                            problems.append(
                                f"{sub}: duplicate key at line {line} (first at line "
                                f"{first[dup]}); the second would silently replace the first"
                            )
                    walk(value, sub, depth + 1, aliased)
                active.discard(ident)
            elif isinstance(node, yaml.SequenceNode):
                active.add(ident)
                for i, item in enumerate(node.value):
                    walk(item, f"{where}[{i}]", depth + 1, aliased)
                active.discard(ident)

        walk(root, "", 0, False)
        return problems


def load_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """The YAML document of ``text`` and its non-fatal problems (duplicate keys);
    raises :class:`ConfigError` when it cannot be read at all."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        try:
            problems = loader.check(node)
        except _Refused as exc:
            raise ConfigError(exc.args[0], source) from None
        return loader.construct_document(node), problems
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {problem}"], source) from None
    except RecursionError:
        problem = f"<root>: not valid YAML: nested deeper than {MAX_DEPTH} levels"
        raise ConfigError([problem], source) from None
    finally:
        loader.dispose()


__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_KEY_FILE_BYTES",
    "format_loc",
    "interpolate",
    "load_yaml",
    "read_config_file",
    "read_key_file",
    "read_tree",
    "validation_problems",
]
