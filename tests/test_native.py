"""The compiled keystroke path: all or nothing, RELAYD_PURE_PYTHON=1 bypasses it, and a
build out of date with its source is bypassed and reported."""

from __future__ import annotations

import ast
import asyncio
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relayd import native

from .conftest import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
COMPILED = native.mode() == "compiled"


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


@pytest.mark.skipif(not COMPILED, reason="built without a C compiler")
def test_without_the_request_the_compiled_modules_are_used() -> None:
    """After `make native`, a fresh process runs the compiled keystroke path."""
    assert _run("from relayd import native; print(native.mode())") == "compiled"


def _fake_build(package: Path, *, with_manifest: bool = True) -> None:
    """Sources, a stand-in compiled file beside each (find_stale only looks for one) and
    the manifest that setup.py writes."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module in native.NATIVE_MODULES:
        source = native.source_path(module, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f'"""{module}"""\n')
        source.with_name(source.stem + suffix).write_bytes(b"")
    if with_manifest:
        sources = {m: native.source_path(m, package) for m in native.NATIVE_MODULES}
        (package / native.MANIFEST_NAME).write_text(native.manifest(sources))


def test_find_stale_fresh_build_finds_nothing(tmp_path: Path) -> None:
    """Sources as the build hashed them: nothing is stale."""
    _fake_build(tmp_path)
    assert native.find_stale(tmp_path) == []


def test_find_stale_source_edited_after_build_names_that_module(tmp_path: Path) -> None:
    """A source whose bytes changed since the build is stale, whatever its mtime says."""
    _fake_build(tmp_path)
    source = native.source_path("relayd.ports.protocol", tmp_path)
    before = source.stat()
    source.write_text(source.read_text() + "# edited\n")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert native.find_stale(tmp_path) == ["relayd.ports.protocol"]


def test_find_stale_build_without_manifest_is_stale_throughout(tmp_path: Path) -> None:
    """Compiled modules with no recorded hash (an older build) cannot be trusted."""
    _fake_build(tmp_path, with_manifest=False)
    assert native.find_stale(tmp_path) == list(native.NATIVE_MODULES)


def test_find_stale_install_without_sources_trusts_the_build(tmp_path: Path) -> None:
    """With no .py beside a compiled module there is nothing to compare or fall back to."""
    _fake_build(tmp_path, with_manifest=False)
    native.source_path("relayd.hub", tmp_path).unlink()
    assert "relayd.hub" not in native.find_stale(tmp_path)


def test_find_stale_module_not_compiled_is_not_stale(tmp_path: Path) -> None:
    """An edited source with no compiled module beside it runs as it is."""
    _fake_build(tmp_path)
    built = native.compiled_path("relayd.ring", tmp_path)
    assert built is not None
    built.unlink()
    native.source_path("relayd.ring", tmp_path).write_text("# edited\n")
    assert native.find_stale(tmp_path) == []


@pytest.fixture
def stale_tree(tmp_path: Path) -> Path:
    """A copy of this compiled build whose relayd/throttle.py was edited after the build."""
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "relayd", tree / "relayd", ignore=shutil.ignore_patterns("__pycache__", "web")
    )
    throttle = tree / "relayd" / "throttle.py"
    throttle.write_text(throttle.read_text() + "# edited after make native\n")
    return tree


@pytest.mark.skipif(not COMPILED, reason="built without a C compiler")
def test_stale_build_runs_the_whole_keystroke_path_interpreted_and_says_so(
    stale_tree: Path,
) -> None:
    """One edited source: every native module runs from source, mode() and stderr say which."""
    code = (
        "import json, relayd.hub, relayd.throttle; from relayd import native; "
        "print(json.dumps([native.mode(), native.stale_modules(), native.module_states(), "
        "relayd.hub.__file__, relayd.throttle.__file__]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=stale_tree,
        env={**os.environ, "PYTHONPATH": str(stale_tree)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    mode, stale, states, hub_file, throttle_file = json.loads(result.stdout)
    assert mode == "stale-fallback"
    assert stale == ["relayd.throttle"]
    assert states["relayd.throttle"] == "stale"
    assert {states[m] for m in native.NATIVE_MODULES if m != "relayd.throttle"} == {"interpreted"}
    # The compiled hub holds its own compiled TokenBucket: it runs from source too.
    assert hub_file == str(stale_tree / "relayd" / "hub.py")
    assert throttle_file == str(stale_tree / "relayd" / "throttle.py")
    assert "relayd.throttle" in result.stderr
    assert "make native" in result.stderr


@pytest.mark.skipif(not COMPILED, reason="built without a C compiler")
async def test_stale_build_is_reported_in_gateway_ready_and_metrics(
    stale_tree: Path, write_config: Callable[..., Any]
) -> None:
    """`relayd serve` from a stale build logs the fallback and exports each module's state."""
    config = write_config(vms=[])
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relayd.cli", "serve", "--config", str(config.path)),
        cwd=stale_tree,
        env={**os.environ, "PYTHONPATH": str(stale_tree)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            warning = (await proc.stderr.readline()).decode()
            while (event := json.loads(await proc.stdout.readline()))["event"] != "gateway_ready":
                pass
            reader, writer = await asyncio.open_connection("127.0.0.1", event["health_port"])
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            metrics = (await reader.read()).decode()
            writer.close()
    finally:
        proc.terminate()
        async with asyncio.timeout(TIMEOUT):
            await proc.wait()
    assert "relayd.throttle" in warning
    assert event["keystroke_path"] == "stale-fallback"
    assert event["stale_modules"] == ["relayd.throttle"]
    assert 'relayd_native_module{module="relayd.throttle",state="stale"} 1.0' in metrics
    assert 'relayd_native_module{module="relayd.hub",state="interpreted"} 1.0' in metrics
