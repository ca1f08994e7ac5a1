"""The `relayd` command as users run it: real subprocesses, real signals, a real pty."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, FarEnd

RELAYD = [sys.executable, "-m", "relayd.cli"]


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *RELAYD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(TIMEOUT * 3):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_valid_file_explains_it(write_config: Callable[..., Any]) -> None:
    """check-config on a good file exits 0 and names the VMs and their ports."""
    config = write_config(vms=[{"id": "vm-a", "serial": "telnet://127.0.0.1:7001"}])
    code, out, _ = await _run("check-config", str(config.path))
    assert code == 0
    assert "vm vm-a: telnet://127.0.0.1:7001" in out
    assert "takeover=evict" in out


async def test_check_config_bad_key_names_file_and_key(tmp_path: Path) -> None:
    """A bad value is refused with exit 2, the file and the key."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[tls]\ncert = "c"\nkey = "k"\n[auth]\nissuer = "i"\naudience = "a"\n'
        'hs256_secret_file = "s"\n[[subscriptions]]\nid = "s1"\n'
        '[[vms]]\nid = "vm-a"\nsubscription = "s1"\nserial = "tcp://h:1"\ntakeover = "kick"\n'
    )
    code, _, err = await _run("check-config", str(path))
    assert code == 2
    assert str(path) in err
    assert "vms[0].takeover" in err


async def test_check_config_missing_certificate_is_reported(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    """check-config loads the certificate as the daemon would, so a missing one fails here."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": "tcp://127.0.0.1:7001"}],
        tls={"cert": str(tmp_path / "nope.crt")},
    )
    code, _, err = await _run("check-config", str(config.path))
    assert code == 2
    assert "tls.cert" in err


async def _start_serve(config_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        *RELAYD, "serve", "--config", str(config_path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = await proc.stdout.readline()
            assert line, "relayd exited before it was ready"
            event = json.loads(line)
            if event["event"] == "gateway_ready":
                return proc, int(event["port"])


async def _recv_forever(ws: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            await ws.recv()


async def test_serve_sigterm_closes_sessions_with_1001_and_exits_0(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """SIGTERM: a notice, then after drain_seconds close 1001, and the daemon exits 0."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"drain_seconds": "300ms"},
    )
    proc, port = await _start_serve(config.path)
    try:
        async with connect(
            f"wss://localhost:{port}/v1/vms/vm-a/console",
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token('alice')}"},
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["role"] == "writer"
            proc.send_signal(signal.SIGTERM)
            notice = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert notice == {"type": "notice", "event": "shutting_down", "closes_in": 0.3}
            with pytest.raises(ConnectionClosed) as info:
                await _recv_forever(ws)
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1001
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _read_until(fd: int, marker: bytes, seen: bytearray) -> bytes:
    """Read a pty master until `marker` shows up."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        async with asyncio.timeout(TIMEOUT):
            while marker not in seen:
                readable.clear()
                await readable.wait()
                try:
                    seen += os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the child closed the pty
                    break
    finally:
        loop.remove_reader(fd)
    return bytes(seen)


async def test_demo_prints_contract_lines_and_connect_line_works_in_a_terminal(
    tmp_path: Path,
) -> None:
    """`relayd demo` prints every contract line; its `connect:` command logs in to demo-1."""
    demo = await asyncio.create_subprocess_exec(
        *RELAYD,
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
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert demo.stdout is not None
    lines: dict[str, str] = {}
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            while "health" not in lines:
                line = (await demo.stdout.readline()).decode()
                assert line, "demo exited early"
                key, _, value = line.rstrip("\n").partition(": ")
                lines[key] = value
        assert set(lines) >= {"web", "token", "ca", "config", "guest-login", "connect", "health"}
        assert lines["web"].startswith("https://127.0.0.1:")
        assert lines["guest-login"] == "operator/relayd"
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(lines["health"].split(":")[2].split("/")[0])
        )
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()

        argv = lines["connect"].split()
        assert argv[:2] == ["relayd", "connect"]
        master, slave = os.openpty()
        os.set_blocking(master, False)
        client = await asyncio.create_subprocess_exec(
            *RELAYD, *argv[1:], stdin=slave, stdout=slave, stderr=slave
        )
        os.close(slave)
        seen = bytearray()
        try:
            await _read_until(master, b"connected", seen)
            os.write(master, b"\r")
            await _read_until(master, b"login: ", seen)
            os.write(master, b"operator\r")
            await _read_until(master, b"Password: ", seen)
            os.write(master, b"relayd\r")
            await _read_until(master, b"$ ", seen)
            os.write(master, b"uname -a\r")
            await _read_until(master, b"GNU/Linux", seen)
            os.write(master, b"\x1dq")
            async with asyncio.timeout(TIMEOUT):
                assert await client.wait() == 0
        finally:
            if client.returncode is None:
                client.kill()
                await client.wait()
            os.close(master)
        demo.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            assert await demo.wait() == 0
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()


async def test_token_issue_mints_a_token_the_gateway_accepts(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """`relayd token issue` output authenticates as user:<sub>."""
    from .conftest import running

    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    code, out, _ = await _run("token", "issue", "--config", str(config.path), "--sub", "alice")
    assert code == 0
    async with (
        running(config) as gw,
        connect(
            f"wss://localhost:{gw.tls_port}/v1/vms/vm-a/console",
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {out.strip()}"},
        ) as ws,
    ):
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["role"] == "writer"


def _jwks_file(directory: Path) -> Path:
    """A production-style JWKS (one EC P-256 public key) on disk."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk = {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "ec-1", "alg": "ES256"}
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


async def test_check_config_with_dev_tokens_allowed_warns(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    """check-config accepts allow_dev_tokens but says, on stderr and in the explanation, why not."""
    config = write_config(vms=[{"id": "vm-a", "serial": "tcp://127.0.0.1:7001"}])
    jwks = _jwks_file(tmp_path)
    text = config.path.read_text().replace(
        "[auth]\n", f"[auth]\njwks_file = {json.dumps(str(jwks))}\nallow_dev_tokens = true\n"
    )
    config.path.write_text(text)
    code, out, err = await _run("check-config", str(config.path))
    assert code == 0, err
    assert "warning" in err
    assert "allow_dev_tokens" in err
    assert "allow_dev_tokens" in out


async def test_check_config_secret_beside_jwks_is_refused(
    write_config: Callable[..., Any], tmp_path: Path
) -> None:
    """Without the opt-in, the dev secret beside a JWKS is a config error naming the key."""
    config = write_config(vms=[{"id": "vm-a", "serial": "tcp://127.0.0.1:7001"}])
    jwks = _jwks_file(tmp_path)
    text = config.path.read_text().replace(
        "[auth]\n", f"[auth]\njwks_file = {json.dumps(str(jwks))}\n"
    )
    config.path.write_text(text)
    code, _, err = await _run("check-config", str(config.path))
    assert code == 2
    assert str(config.path) in err
    assert "auth.hs256_secret_file" in err
