"""The web terminal: static serving rules, and the page itself in a real Chromium.

The browser test starts `relayd demo` as users do and drives Debian's Chromium
headless with Playwright (`web/tests/e2e.mjs`); its screenshots, the console log
it downloads and its JSON result are left in `tests/artifacts/web/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from relayd import webui

from .conftest import TIMEOUT, FarEnd, running

REPO = Path(__file__).resolve().parent.parent
WEB = REPO / "web"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "web"
CHROMIUM = Path(os.environ.get("RELAYD_CHROMIUM", "/usr/bin/chromium"))
E2E_TIMEOUT = 120.0


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """A small built-assets directory, with a secret next to it that must never be served."""
    root = tmp_path / "assets"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>relayd</title>")
    (root / "app.js").write_text("export {};\n")
    (root / "xterm.mjs").write_text("export {};\n")
    (root / "app.css").write_text("body {}\n")
    (root / "notes.py").write_text("print('not an asset type')\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.js").write_text("export {};\n")
    (tmp_path / "secret.txt").write_text("top secret\n")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


def _headers(response: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in response.headers}


def test_index_carries_csp_and_security_headers(assets: Path) -> None:
    """`/` is the built page, with the strict CSP and the framing/referrer/sniffing headers."""
    response = webui.static_response("/", root=assets)
    assert response is not None
    assert response.status == 200
    assert response.body.startswith(b"<!doctype html>")
    assert response.content_type == "text/html; charset=utf-8"
    headers = _headers(response)
    assert headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("xterm.mjs", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
    ],
)
def test_assets_are_served_with_their_content_type(
    assets: Path, name: str, content_type: str
) -> None:
    """Scripts (module scripts need a JavaScript type) and styles get the right type."""
    response = webui.static_response(f"/assets/{name}", root=assets)
    assert response is not None
    assert response.status == 200
    assert response.content_type == content_type
    assert response.body == (assets / name).read_bytes()
    assert "content-security-policy" in _headers(response)


@pytest.mark.parametrize(
    "path",
    [
        "/assets/../../etc/passwd",
        "/assets/../secret.txt",
        "/assets/..%2fsecret.txt",
        "/assets/%2e%2e/secret.txt",
        "/assets/%2e%2e%2fsecret.txt",
        "/assets/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/assets/..%5csecret.txt",
        "/assets/..\\secret.txt",
        "/assets//etc/passwd",
        "/assets/sub/inner.js",
        "/assets/sub%2finner.js",
        "/assets/.hidden.js",
        "/assets/app.js/",
        "/assets/app.js%00.css",
        "/assets/app.js\x00.css",
        "/assets/",
        "/assets/link.txt",
        "/assets/notes.py",
        "/assets/missing.js",
        "/v1/vms",
        "/index.html",
    ],
)
def test_anything_but_a_plain_asset_name_is_refused(assets: Path, path: str) -> None:
    """Traversal (plain or percent-encoded), subfolders, symlinks and unknown types get None."""
    assert webui.static_response(path, root=assets) is None


def test_missing_assets_index_explains_make_web(tmp_path: Path) -> None:
    """Without built assets `/` still answers, says how to build them, and keeps the CSP."""
    root = tmp_path / "nothing-built"
    response = webui.static_response("/", root=root)
    assert response is not None
    assert response.status == 200
    assert b"make web" in response.body
    assert b"<script" not in response.body
    assert "content-security-policy" in _headers(response)
    assert webui.static_response("/assets/app.js", root=root) is None


def test_unchanged_asset_is_304_and_rebuilt_one_is_fresh(assets: Path) -> None:
    """The ETag revalidates; a rebuilt file gets a new tag and its new body."""
    first = webui.static_response("/assets/app.js", root=assets)
    assert first is not None
    etag = _headers(first)["etag"]
    again = webui.static_response("/assets/app.js", root=assets, if_none_match=f'W/{etag}, "x"')
    assert again is not None
    assert (again.status, again.body) == (304, b"")
    (assets / "app.js").write_text("export const rebuilt = true;\n")
    fresh = webui.static_response("/assets/app.js", root=assets, if_none_match=etag)
    assert fresh is not None
    assert fresh.status == 200
    assert b"rebuilt" in fresh.body


async def _https_get(port: int, ctx: ssl.SSLContext, path: str) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    writer.close()
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers


async def test_gateway_serves_page_and_refuses_traversal(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """Through the TLS listener: `/` has the CSP; encoded traversal under /assets/ is a 404."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        status, headers = await _https_get(gw.tls_port, client_ssl, "/")
        assert status == 200
        assert headers["content-security-policy"] == webui.CONTENT_SECURITY_POLICY
        assert headers["x-frame-options"] == "DENY"
        for path in ("/assets/..%2f..%2fsetup.cfg", "/assets/../../setup.cfg", "/assets/x.js"):
            status, _ = await _https_get(gw.tls_port, client_ssl, path)
            assert status == 404, path


# -- the page in Chromium -----------------------------------------------------------------


def _browser_prerequisites() -> list[str]:
    """What the browser test needs that is missing, each with how to get it."""
    missing = []
    if shutil.which("node") is None:
        missing.append("node (Node.js 18+): install nodejs and npm")
    if not (WEB / "node_modules" / "playwright-core" / "package.json").is_file():
        missing.append("web/node_modules/playwright-core: run `make web` (npm ci in web/)")
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM}: run `scripts/ensure-system-packages.sh chromium`")
    if not (webui.ASSETS_DIR / "index.html").is_file():
        missing.append("relayd/web/assets/: run `make web`")
    return missing


async def _start_demo(
    tmp_path: Path, log: BinaryIO
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd.cli",
        "demo",
        "--certs",
        str(tmp_path / "certs"),
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        "127.0.0.1:0",
        "--health-listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    assert demo.stdout is not None
    lines: dict[str, str] = {}
    async with asyncio.timeout(TIMEOUT * 2):
        while "health" not in lines:
            line = (await demo.stdout.readline()).decode()
            assert line, "relayd demo exited before printing its lines"
            key, _, value = line.rstrip("\n").partition(": ")
            lines[key] = value
    return demo, lines


async def test_web_terminal_in_chromium(tmp_path: Path) -> None:
    """Sign in, list VMs, log in to demo-1, run commands, paste, take over, reconnect, a11y."""
    missing = _browser_prerequisites()
    if missing:
        pytest.fail(
            "the browser test cannot run; `make test` installs what it needs. Missing:\n  "
            + "\n  ".join(missing),
            pytrace=False,
        )
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    with (ARTIFACTS / "relayd-demo.log").open("wb") as log:
        demo, lines = await _start_demo(tmp_path, log)
        try:
            node = await asyncio.create_subprocess_exec(
                "node",
                str(WEB / "tests" / "e2e.mjs"),
                cwd=WEB,
                env={
                    **os.environ,
                    "RELAYD_URL": lines["web"],
                    "RELAYD_TOKEN": lines["token"],
                    "RELAYD_ARTIFACTS": str(ARTIFACTS),
                    "RELAYD_CHROMIUM": str(CHROMIUM),
                    "RELAYD_GUEST_LOGIN": lines["guest-login"],
                },
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(E2E_TIMEOUT):
                    out, err = await node.communicate()
            finally:
                if node.returncode is None:
                    node.kill()
                    await node.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                demo.send_signal(signal.SIGINT)
            async with asyncio.timeout(TIMEOUT):
                await demo.wait()
    stdout = out.decode(errors="replace").strip().splitlines()
    assert stdout, f"e2e.mjs printed nothing (exit {node.returncode}): {err.decode()[-2000:]}"
    result = json.loads(stdout[-1])
    failed = [step for step in result["steps"] if not step["ok"]]
    report = "\n".join(f"FAILED {s['name']}:\n{s.get('error', '')}" for s in failed)
    report += "".join(f"\n{p}" for p in result["problems"])
    assert node.returncode == 0, f"{report}\nartifacts in {ARTIFACTS}\n{err.decode()[-2000:]}"
    assert result["ok"]
    assert len(result["steps"]) >= 10
    assert {"01-vm-list.png", "05-taken-over.png", "07-reconnected.png"} <= set(result["artifacts"])
    assert all((ARTIFACTS / name).stat().st_size > 0 for name in result["artifacts"])
