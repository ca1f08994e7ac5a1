"""The keystroke path, compiled: which modules mypyc builds, and how to run without them.

relayd is Python throughout. At 1,000 typing sessions its interpreted work per keystroke
(about 20 µs of a 70 µs round trip) kept the relay's p99 over target, so `setup.py`
compiles the modules on that path with mypyc, from this same typed source, where a C
compiler is at hand (`make native`, `make wheel`). Without one, or with
RELAYD_PURE_PYTHON=1 in the environment, the same modules run interpreted: behaviour is
the same, only slower. docs/architecture.md has the measurements.

A compiled module sits beside its source and shadows it, so an edited .py would not
run. The build writes `MANIFEST_NAME` beside the compiled modules: the SHA-256 of each
source it compiled. At import (`select_implementation`, from `relayd/__init__.py`), a
compiled module whose source no longer has that hash (or with no manifest entry: a build
from before manifests) is stale, and then the whole keystroke path runs interpreted: the
compiled modules call one another natively and share their classes, so one of them
cannot be swapped for its source alone. The fallback is reported on stderr at once, in
`mode()` and `stale_modules()` (the `gateway_ready` line) and in `/metrics`. Where the
sources are not installed (a wheel stripped of its .py files) there is nothing to
compare with or fall back to, and the build is trusted.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
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
# Written by setup.py into the package directory beside the compiled modules (git-ignored).
MANIFEST_NAME = "_native_manifest.json"

_PACKAGE_DIR = Path(__file__).resolve().parent

# Set once per process by select_implementation().
_stale: tuple[str, ...] = ()


def source_path(module: str, package_dir: Path = _PACKAGE_DIR) -> Path:
    """The .py file a native module is compiled from."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def compiled_path(module: str, package_dir: Path = _PACKAGE_DIR) -> Path | None:
    """The compiled module beside a native module's source, if there is one."""
    stem = source_path(module, package_dir).with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = stem.with_name(stem.name + suffix)
        if built.is_file():
            return built
    return None


def source_hash(path: Path) -> str:
    """What the manifest records of a source file: the SHA-256 of its bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(sources: Mapping[str, Path]) -> str:
    """The manifest's text for the native modules built from `sources` (module -> .py)."""
    hashes = {module: source_hash(path) for module, path in sorted(sources.items())}
    return json.dumps({"modules": hashes}, indent=2) + "\n"


def read_manifest(package_dir: Path = _PACKAGE_DIR) -> dict[str, str]:
    """Module -> source hash from the manifest; empty when it is missing or unreadable."""
    try:
        modules = json.loads((package_dir / MANIFEST_NAME).read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(modules, dict):
        return {}
    return {str(k): str(v) for k, v in modules.items()}


def find_stale(package_dir: Path = _PACKAGE_DIR) -> list[str]:
    """Compiled native modules whose source differs from the one they were built from.

    A module with no compiled file is not stale (it runs interpreted anyway); one with
    no source beside it is trusted (an install without sources: nothing to fall back to).
    """
    recorded: dict[str, str] | None = None
    stale = []
    for module in NATIVE_MODULES:
        source = source_path(module, package_dir)
        if compiled_path(module, package_dir) is None or not source.is_file():
            continue
        if recorded is None:
            recorded = read_manifest(package_dir)
        if recorded.get(module) != source_hash(source):
            stale.append(module)
    return stale


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


def _import_from_source() -> None:
    if not any(isinstance(finder, _SourceFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def select_implementation() -> None:
    """Run the native modules from source on request or when the build is stale (once).

    Must run before any native module is imported: `relayd/__init__.py` calls it.
    """
    global _stale
    if os.environ.get(PURE_PYTHON_ENV) == "1":
        _import_from_source()
        return
    _stale = tuple(find_stale())
    if _stale:
        _import_from_source()
        print(
            f"relayd: {len(_stale)} of {len(NATIVE_MODULES)} compiled modules are out of date "
            f"with their source ({', '.join(_stale)}): the keystroke path runs interpreted; "
            "rebuild it (`make native`) or reinstall relayd",
            file=sys.stderr,
        )


def stale_modules() -> tuple[str, ...]:
    """The compiled modules this process found stale at import (and so runs from source)."""
    return _stale


def compiled_modules() -> list[str]:
    """Which native modules this process runs compiled (imports them all to find out)."""
    out = []
    for name in NATIVE_MODULES:
        module = importlib.import_module(name)
        if not str(getattr(module, "__file__", "")).endswith(".py"):
            out.append(name)
    return out


def mode() -> str:
    """How the keystroke path runs: 'compiled', 'interpreted', 'stale-fallback' or 'partial'.

    'stale-fallback': a build out of date with its source was bypassed (`stale_modules()` says
    which modules changed); 'partial': a build that lost modules (rebuild it).
    """
    done = len(compiled_modules())
    if done == len(NATIVE_MODULES):
        return "compiled"
    if done == 0:
        return "stale-fallback" if _stale else "interpreted"
    return "partial"


def module_states() -> dict[str, str]:
    """Each native module's state: 'compiled', 'interpreted' or 'stale' (run from source)."""
    compiled = set(compiled_modules())
    return {
        name: "stale" if name in _stale else "compiled" if name in compiled else "interpreted"
        for name in NATIVE_MODULES
    }
