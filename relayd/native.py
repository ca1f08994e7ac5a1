"""The keystroke path, compiled: which modules mypyc builds, and how to run without them.

relayd is Python throughout. At 1,000 typing sessions its interpreted work per keystroke
(about 20 µs of a 70 µs round trip) kept the relay's p99 over target, so `setup.py`
compiles the modules on that path with mypyc, from this same typed source, where a C
compiler is at hand (`make native`, `make wheel`). Without one, or with
RELAYD_PURE_PYTHON=1 in the environment, the same modules run interpreted: behaviour is
the same, only slower. docs/architecture.md has the measurements.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# Everything a keystroke and its echo pass through in relayd's own code: the links' asyncio
# protocol, but not the links themselves (ports/), whose waits are coroutines. Compiled
# modules hold no coroutines, since mypyc has had bugs with exception state across `await`
# (keeper.py does the hub's I/O).
NATIVE_MODULES = (
    "relayd.frames",
    "relayd.ring",
    "relayd.throttle",
    "relayd.inputqueue",
    "relayd.consolelog",
    "relayd.hub",
    "relayd.session",
    "relayd.telnet",
    "relayd.ports.protocol",
)
# The shared library mypyc builds beside them (setup.py's group name).
RUNTIME_GROUP = "relayd._compiled"
PURE_PYTHON_ENV = "RELAYD_PURE_PYTHON"

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str) -> Path:
    """The .py file a native module is compiled from."""
    return _PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Loads the native modules from their .py files even where a compiled one exists."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """A source spec for the native modules; None (the usual search) for the rest."""
        if fullname not in NATIVE_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def honour_pure_python_request() -> None:
    """With RELAYD_PURE_PYTHON=1, import the native modules from source (once per process)."""
    if os.environ.get(PURE_PYTHON_ENV) != "1":
        return
    if not any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def compiled_modules() -> list[str]:
    """Which native modules this process runs compiled (imports them all to find out)."""
    out = []
    for name in NATIVE_MODULES:
        module = importlib.import_module(name)
        if not str(getattr(module, "__file__", "")).endswith(".py"):
            out.append(name)
    return out


def mode() -> str:
    """'compiled', 'interpreted' or 'partial' (a build that lost modules: rebuild it)."""
    done = len(compiled_modules())
    if done == len(NATIVE_MODULES):
        return "compiled"
    return "interpreted" if done == 0 else "partial"
