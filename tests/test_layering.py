"""The import graph of `relayd`, read statically: arrows point down, sans-I/O stays sans-I/O.

What counts as an import:

- Module-level imports, including those under a module-level `if`/`try` and in class
  bodies (they run at import time), and `from . import x` (an edge to `relayd.x`).
- Not imports under `if TYPE_CHECKING:`: they never run, so they cannot form a cycle.
- Not function-level imports: they run late, so they hide a cycle instead of forming
  one. Outside `relayd/cli.py` a function-level import of a relayd module is itself a
  failure ("no function-level imports to dodge a cycle"). cli.py is the exception: it
  imports its subcommands lazily so that `relayd token issue` does not load the
  gateway. That is sound only while cli.py is the top of the graph, so nothing may
  import it.

Edges through the package `__init__` that Python adds implicitly (importing
`relayd.ports.tty` runs `relayd/ports/__init__.py`) are not edges here: only what a
module names.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import relayd

PACKAGE_DIR = Path(relayd.__file__).resolve().parent

# [S] modules (STYLE.md): bytes or messages in, decisions and bytes out, the clock a
# parameter. Each must exist: a rename must update this list, not silently skip a check.
SANS_IO = (
    "relayd.config",
    "relayd.control",
    "relayd.errors",
    "relayd.frames",
    "relayd.lease",
    "relayd.principal",
    "relayd.proxy_protocol",
    "relayd.ratelimit",
    "relayd.ring",
    "relayd.telnet",
    "relayd.throttle",
    "relayd.tickets",
)
# [S] modules that other branches are adding; checked as soon as they exist.
SANS_IO_WHEN_PRESENT = (
    "relayd.inputqueue",
    "relayd.cluster.ownership",
    "relayd.cluster.forwarding",
    "relayd.cluster.wsframes",
)
# What a sans-I/O module may not import, directly or through any relayd module it imports.
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "time", "logging", "structlog"})

# The serial backends sit below the hub: nothing in ports/ may reach a session, the
# HTTP layer or the gateway (the hub hands a link its callback, as `SerialLink.start`).
ABOVE_PORTS = frozenset(
    {
        "relayd.access",
        "relayd.api",
        "relayd.app",
        "relayd.connection",
        "relayd.health",
        "relayd.hub",
        "relayd.keeper",
        "relayd.listener",
        "relayd.session",
        "relayd.webui",
    }
)
# The bottom of the HTTP layer: each may import only these relayd modules.
FLOOR = {
    "relayd.errors": frozenset(),
    "relayd.http": frozenset({"relayd.errors"}),
}
# Function-level imports of relayd modules are allowed only here (see the docstring).
LAZY_IMPORTS_ALLOWED = frozenset({"relayd.cli"})


@dataclass(frozen=True)
class Edge:
    """One import statement's target, as the source names it."""

    source: str
    target: str  # a relayd module, or the top-level name of anything else
    line: int
    in_function: bool

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({_path(self.source)}:{self.line})"


def _path(module: str) -> str:
    """The file of a relayd module, relative to the repository (the name, if not a file)."""
    path = MODULES.get(module)
    return module if path is None else str(path.relative_to(PACKAGE_DIR.parent))


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Import statements that run, and whether they run only when a function is called."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), in_function)
        else:
            nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from _imports(node, nested)


def _resolve(
    module: str, node: ast.Import | ast.ImportFrom, names: Collection[str], *, is_package: bool
) -> Iterator[str]:
    """The modules an import statement loads (relayd's by full name, others by top level).

    Args:
        module: the importing module's dotted name.
        names: every relayd module's dotted name.
        is_package: the importing module is a package's `__init__`.
    """
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name if alias.name in names else alias.name.split(".")[0]
        return
    if node.level:
        anchor = module.split(".")
        if not is_package:
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    if base not in names:
        yield base.split(".")[0]
        return
    for alias in node.names:
        # `from . import control` loads relayd.control; `from .hub import X` loads relayd.hub.
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base


def edges_of(
    module: str, source: str, names: Collection[str], *, is_package: bool = False
) -> list[Edge]:
    """The imports in one module's source."""
    edges = []
    for node, in_function in _imports(ast.parse(source)):
        assert isinstance(node, ast.Import | ast.ImportFrom)
        for target in dict.fromkeys(_resolve(module, node, names, is_package=is_package)):
            edges.append(Edge(module, target, node.lineno, in_function))
    return edges


EDGES = [
    edge
    for module, path in MODULES.items()
    for edge in edges_of(
        module, path.read_text(encoding="utf-8"), MODULES, is_package=path.name == "__init__.py"
    )
]


def graph_of(edges: list[Edge]) -> dict[str, list[Edge]]:
    """The graph that exists once every module is imported: no function-level edges."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, [])
        if not edge.in_function:
            graph[edge.source].append(edge)
    return graph


GRAPH = graph_of(EDGES)


def chain(graph: dict[str, list[Edge]], start: str, targets: Collection[str]) -> list[Edge] | None:
    """A shortest import chain from `start` to any of `targets` (breadth first), or None."""
    came: dict[str, list[Edge]] = {start: []}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for edge in graph.get(module, []):
            if edge.target in targets:
                return [*came[module], edge]
            if edge.target in graph and edge.target not in came:
                came[edge.target] = [*came[module], edge]
                queue.append(edge.target)
    return None


def cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One shortest cycle for each set of modules that import one another in a circle."""
    found: dict[frozenset[str], list[Edge]] = {}
    for module in sorted(graph):
        loop = chain(graph, module, {module})
        if loop is not None:
            found.setdefault(frozenset(e.source for e in loop), loop)
    return list(found.values())


def describe(edges: list[Edge]) -> str:
    """One edge a line, indented under a failure's first line."""
    return "\n  ".join(str(edge) for edge in edges)


# -- the walker itself ------------------------------------------------------------------


WALKER_SAMPLE = """
from __future__ import annotations
import asyncio
from typing import TYPE_CHECKING
from . import stream
from .. import telnet
from ..errors import PortUnavailableError
if TYPE_CHECKING:
    from ..hub import ConsoleHub
else:
    import socket
try:
    import uvloop
except ImportError:
    pass
class Link:
    from ..config import VmConfig
def later():
    from ..session import ConsoleSession
"""


def test_walker_resolves_relative_imports_and_skips_type_checking() -> None:
    """`from . import x` is an edge to the module x; TYPE_CHECKING imports are no edge."""
    names = {"relayd", "relayd.ports", "relayd.ports.stream", "relayd.telnet", "relayd.errors"}
    names |= {"relayd.hub", "relayd.config", "relayd.session"}
    edges = edges_of("relayd.ports.fake", WALKER_SAMPLE, names)
    now = {e.target for e in edges if not e.in_function}
    later = {e.target for e in edges if e.in_function}
    assert now == {
        "__future__",
        "asyncio",
        "typing",
        "relayd.ports.stream",
        "relayd.telnet",
        "relayd.errors",
        "socket",
        "uvloop",
        "relayd.config",
    }
    assert later == {"relayd.session"}
    source = "from .stream import x\nfrom . import tty"
    as_package = edges_of("relayd.ports", source, names, is_package=True)
    assert {e.target for e in as_package} == {"relayd.ports.stream", "relayd.ports"}


def test_walker_reports_a_cycle_by_its_edges() -> None:
    """A circle of imports is found, once, and named edge by edge with file and line."""
    names = {"relayd", "relayd.a", "relayd.b", "relayd.c"}
    edges = [
        *edges_of("relayd.a", "from . import b", names),
        *edges_of("relayd.b", "import os\nfrom .c import X", names),
        *edges_of("relayd.c", "def f():\n    from .a import Y\nfrom . import a", names),
    ]
    found = cycles(graph_of(edges))
    assert [[(e.source, e.target, e.line) for e in loop] for loop in found] == [
        [("relayd.a", "relayd.b", 1), ("relayd.b", "relayd.c", 2), ("relayd.c", "relayd.a", 3)]
    ]
    assert cycles(graph_of(edges[:-1])) == []  # the function-level import closes no circle


def test_walker_lists_every_sans_io_module() -> None:
    """Every module named as sans-I/O exists, so no check passes by checking nothing."""
    missing = [m for m in SANS_IO if m not in MODULES]
    assert not missing, f"sans-I/O modules not found (renamed? update SANS_IO): {missing}"


# -- the rules -----------------------------------------------------------------------------


def test_import_graph_has_no_cycle() -> None:
    """Module-level imports form no cycle: each arrow points down."""
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(f"  {describe(loop)}" for loop in found)


def test_function_level_imports_of_relayd_only_in_cli() -> None:
    """No relayd module is imported inside a function (to dodge a cycle), except by cli.py."""
    lazy = [
        e
        for e in EDGES
        if e.in_function and e.target in MODULES and e.source not in LAZY_IMPORTS_ALLOWED
    ]
    assert not lazy, "function-level imports (import at module level instead):\n  " + describe(lazy)


def test_nothing_imports_cli() -> None:
    """cli.py is the top of the graph (which is what makes its lazy imports harmless)."""
    offending = [e for e in EDGES if e.target == "relayd.cli" and e.source != "relayd.cli"]
    assert not offending, "imports of relayd.cli:\n  " + describe(offending)


@pytest.mark.parametrize("module", [*SANS_IO, *(m for m in SANS_IO_WHEN_PRESENT if m in MODULES)])
def test_sans_io_module_reaches_no_io_module(module: str) -> None:
    """A sans-I/O module imports no asyncio/socket/ssl/time/logging, not even through relayd."""
    found = chain(GRAPH, module, IO_MODULES)
    assert found is None, f"sans-I/O {module} imports I/O:\n  {describe(found)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("relayd.ports")))
def test_ports_module_reaches_no_session_or_http_layer(module: str) -> None:
    """The serial backends never import what sits above them (hub, sessions, HTTP, app)."""
    found = chain(GRAPH, module, ABOVE_PORTS)
    assert found is None, f"{module} imports a layer above ports/:\n  {describe(found)}"


@pytest.mark.parametrize("module", sorted(FLOOR))
def test_http_floor_imports_nothing_above_it(module: str) -> None:
    """errors.py imports no relayd module; http.py only errors.py."""
    above = [
        e
        for e in EDGES
        if e.source == module and e.target in MODULES and e.target not in FLOOR[module]
    ]
    assert not above, f"{module} may import only {sorted(FLOOR[module])}:\n  " + describe(above)
