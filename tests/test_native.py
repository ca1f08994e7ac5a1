"""The compiled keystroke path: all or nothing, and RELAYD_PURE_PYTHON=1 bypasses it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import native

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def test_native_modules_are_all_compiled_or_all_interpreted() -> None:
    """A build never leaves half the keystroke path compiled against the other half's source."""
    assert native.mode() in {"compiled", "interpreted"}


def test_native_modules_each_have_their_source() -> None:
    """Every listed module exists as typed source (what mypyc compiles and the fallback runs)."""
    for module in native.NATIVE_MODULES:
        assert native.source_path(module).is_file(), module


def test_native_modules_define_no_coroutines() -> None:
    """Coroutines stay interpreted: mypyc has mishandled exception state across `await`."""
    for module in native.NATIVE_MODULES:
        tree = ast.parse(native.source_path(module).read_text())
        found = [n.name for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef)]
        assert not found, f"{module}: {found}"


def test_pure_python_request_imports_every_native_module_from_source() -> None:
    """RELAYD_PURE_PYTHON=1 runs the .py files even beside compiled ones."""
    code = (
        "from relayd import native; import relayd.hub, relayd.telnet; "
        "print(native.mode(), relayd.hub.__file__, relayd.telnet.__file__)"
    )
    mode, hub_file, telnet_file = _run(code, RELAYD_PURE_PYTHON="1").split()
    assert mode == "interpreted"
    assert hub_file.endswith("relayd/hub.py")
    assert telnet_file.endswith("relayd/telnet.py")


@pytest.mark.skipif(native.mode() != "compiled", reason="built without a C compiler")
def test_without_the_request_the_compiled_modules_are_used() -> None:
    """After `make native`, a fresh process runs the compiled keystroke path."""
    assert _run("from relayd import native; print(native.mode())") == "compiled"
