"""Operations with the real components: systemd notify socket, reload, drain, HAProxy, the unit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from structlog.testing import capture_logs
from websockets.asyncio.client import connect

from relayd import native
from relayd.hub import log_identity

from .conftest import TIMEOUT, FarEnd, running, wait_hub, wait_port_up
from .logevents import LogWaiter

ROOT = Path(__file__).resolve().parent.parent


async def _recv_notify(sock: socket.socket) -> set[str]:
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), TIMEOUT)
    return set(data.decode().split("\n"))


async def _notify_until(sock: socket.socket, wanted: str) -> set[str]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            lines = await _recv_notify(sock)
            if wanted in lines:
                return lines


async def test_serve_talks_to_systemd_ready_watchdog_reload_stopping(
    write_config: Callable[..., Any], far_end: FarEnd, tmp_path: Path
) -> None:
    """READY=1 after bind, WATCHDOG=1 pings, RELOADING then READY on SIGHUP, STOPPING."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"drain_seconds": "200ms"},
    )
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "300000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd.cli",
        "serve",
        "--config",
        str(config.path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        ready = await _notify_until(sock, "READY=1")
        assert any(line.startswith("STATUS=") for line in ready)
        # READY came after the bind: the TLS port named in the log accepts now.
        async with asyncio.timeout(TIMEOUT):
            while True:
                event = json.loads(await proc.stdout.readline())
                if event["event"] == "gateway_ready":
                    break
        _, writer = await asyncio.open_connection("127.0.0.1", event["port"])
        writer.close()
        await _notify_until(sock, "WATCHDOG=1")
        await _notify_until(sock, "WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        reloading = await _notify_until(sock, "RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        await _notify_until(sock, "READY=1")
        proc.send_signal(signal.SIGTERM)
        await _notify_until(sock, "STOPPING=1")
        async with asyncio.timeout(TIMEOUT):
            assert await proc.wait() == 0
    finally:
        sock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _serial_of(ssl_object: Any) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_reload_new_certificate_for_new_handshakes_sessions_continue(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
    ca: trustme.CA,
    client_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """After reload a new connection sees the new certificate; an open session keeps working."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    fresh = ca.issue_cert("localhost", "127.0.0.1")
    fresh.private_key_pem.write_to_path(str(tmp_path / "new.key"))
    fresh.cert_chain_pems[0].write_to_path(str(tmp_path / "new.crt"))
    new_serial = x509.load_pem_x509_certificate(fresh.cert_chain_pems[0].bytes()).serial_number
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a") as console:
            old_serial = _serial_of(console.ws.transport.get_extra_info("ssl_object"))
            text = config.path.read_text()
            text = text.replace(str(Path(config.tls.cert)), str(tmp_path / "new.crt"))
            text = text.replace(str(Path(config.tls.key)), str(tmp_path / "new.key"))
            config.path.write_text(text)
            assert await gw.reload()
            _, writer = await asyncio.open_connection(
                "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
            )
            assert _serial_of(writer.get_extra_info("ssl_object")) == new_serial != old_serial
            writer.close()
            await console.send(b"still alive\r")
            await far_end.wait_received(lambda b: b"still alive" in b)


async def test_reload_with_broken_config_keeps_the_old_one(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A bad file on reload is logged and refused; the gateway keeps serving as before."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        config.path.write_text(config.path.read_text() + "\n[limits]\nmax_paste_bytes = -1\n")
        with capture_logs() as events:
            assert not await gw.reload()
        failed = [e for e in events if e["event"] == "config_reload_failed"]
        assert failed
        assert str(config.path) in failed[0]["error"]
        async with open_console(gw, "vm-a") as console:
            assert console.hello["role"] == "writer"


async def test_reload_with_an_unusable_console_log_fails_the_reload_not_the_daemon(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """A VM added on reload whose log cannot be opened: reload refused, old VMs serve on."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    config = write_config(vms=[{"id": "vm-a", "serial": serial}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        new = write_config(
            vms=[{"id": "vm-a", "serial": serial}, {"id": "vm-new", "serial": serial}]
        )
        new_vm = new.vm("vm-new")
        assert new_vm is not None
        name = log_identity(new_vm).directory_name()
        (config.gateway.state_dir / "consolelog" / name).write_text("not a directory")
        with capture_logs() as events:
            assert not await gw.reload()
        failed = [e for e in events if e["event"] == "config_reload_failed"]
        assert failed
        assert "vm-new" in failed[0]["error"]
        assert set(gw.hubs) == {"vm-a"}
        async with open_console(gw, "vm-a") as console:
            await console.send(b"still here\r")
            await far_end.wait_received(lambda b: b"still here" in b)


async def test_reload_adds_new_vm_and_removes_old_with_4004(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    open_console: Callable[..., Any],
) -> None:
    """VMs added on reload start; sessions on removed VMs close with 4004 and a reason."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    config = write_config(vms=[{"id": "vm-old", "serial": serial}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-old")
        async with open_console(gw, "vm-old") as console:
            write_config(vms=[{"id": "vm-new", "serial": serial}])  # same path, new content
            assert await gw.reload()
            code, reason = await console.closed()
            assert code == 4004
            assert reason is not None
            assert "removed" in reason
        await wait_port_up(gw, "vm-new")
        assert set(gw.hubs) == {"vm-new"}


async def test_reload_demotes_closes_and_strips_live_sessions_whose_roles_changed(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """After a reload: writer now reader is demoted; no role closes 4003; ex-owner loses NMI."""
    serial = f"tcp://127.0.0.1:{far_end.port}"
    vms = [
        {"id": "vm-a", "serial": serial},
        {"id": "vm-b", "serial": serial, "nmi_command": ["true"]},
    ]
    config = write_config(
        vms=vms,
        roles=[
            ("user:alice", "contributor", "/subscriptions/sub-1"),
            ("user:rita", "reader", "/subscriptions/sub-1"),
            ("user:olga", "owner", "/subscriptions/sub-1"),
        ],
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        await wait_port_up(gw, "vm-b")
        async with (
            open_console(gw, "vm-a", user="alice") as alice,
            open_console(gw, "vm-a", user="rita") as rita,
            open_console(gw, "vm-b", user="olga") as olga,
        ):
            assert (alice.hello["role"], olga.hello["role"]) == ("writer", "writer")
            await olga.send({"type": "nmi"})
            await olga.control(type="notice", event="hook_result")
            write_config(
                vms=vms,
                roles=[
                    ("user:alice", "reader", "/subscriptions/sub-1"),
                    ("user:olga", "contributor", "/subscriptions/sub-1"),
                ],
            )
            assert await gw.reload()
            code, _ = await rita.closed()
            assert code == 4003
            notice = await alice.control(type="notice", event="demoted")
            assert notice["reason"] == "role_revoked"
            await wait_hub(gw, "vm-a", lambda hub: hub.lease.holder is None)
            await alice.send(b"typed as a reader\r")
            await alice.control(type="error", code="read_only")
            await olga.send({"type": "nmi"})
            await olga.control(type="error", code="forbidden")
            await olga.send(b"contributor still types\r")
            await far_end.wait_received(lambda b: b"contributor still types" in b)
        assert b"typed as a reader" not in far_end.received


async def test_drain_readyz_503_at_once_then_clients_closed_1001(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """stop(): /readyz 503 immediately, a shutting_down notice, then close 1001 after the grace."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"drain_seconds": "500ms"},
    )
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        assert await _readyz(gw.health_port) == 200
        async with open_console(gw, "vm-a") as console:
            gw.stop()
            notice = await console.control(type="notice", event="shutting_down")
            assert notice["closes_in"] == 0.5
            assert await _readyz(gw.health_port) == 503
            code, _ = await console.closed()
            assert code == 1001


async def test_connection_still_open_after_the_shutdown_close_timeout_is_reset(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last connections are reset, not sent a FIN: the gateway gives up on them."""
    monkeypatch.setattr("relayd.app.SHUTDOWN_CLOSE_TIMEOUT", 0.2)
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"handshake_timeout": "60s"},  # only the shutdown ends the request below
    )
    async with running(config) as gw:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.tls_port, ssl=client_ssl, server_hostname="localhost"
        )
        # One answer first, so the gateway holds this connection before it stops.
        writer.write(b"GET /not-here HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"GET /not-here HTTP/1.1\r\nHost: x\r\n")  # half a request
            await writer.drain()
            gw.stop()
            with pytest.raises(ConnectionResetError):
                await reader.read()
        writer.close()


async def test_health_client_still_there_at_the_request_deadline_is_reset(
    write_config: Callable[..., Any], far_end: FarEnd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health listener gives up on a slow client as the TLS listener does: with a reset.

    A FIN would queue behind whatever of the answer the client has not read.
    """
    monkeypatch.setattr("relayd.health.REQUEST_DEADLINE", 0.2)
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.health_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ConnectionResetError):
                await reader.read()
        writer.close()


async def _readyz(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    writer.close()
    return int(data.split()[1])


async def test_metrics_expose_the_contract_families(
    write_config: Callable[..., Any], far_end: FarEnd, open_console: Callable[..., Any]
) -> None:
    """/metrics is Prometheus text with sessions, ports, bytes, takeovers, auth and TLS failures."""
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        async with open_console(gw, "vm-a"), open_console(gw, "vm-a", user="bob"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.health_port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            text = (await asyncio.wait_for(reader.read(), TIMEOUT)).decode()
            writer.close()
    for needle in (
        'relayd_sessions{role="writer"} 1.0',
        'relayd_port_up{vm="vm-a"} 1.0',
        'relayd_takeovers_total{vm="vm-a"} 1.0',
        "relayd_console_output_bytes_total",
        "relayd_tls_handshakes_total",
        "relayd_certificate_expiry_timestamp_seconds",
        f'relayd_native_module{{module="relayd.hub",state="{native.module_states()["relayd.hub"]}"}}',
    ):
        assert needle in text


HAPROXY_CFG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    server relayd 127.0.0.1:{back} {send_proxy}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    """Debian's haproxy (make test installs it)."""
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(path).exists():
        pytest.fail("haproxy is not installed; `make test` installs it")
    return path


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_in_front_audit_shows_the_real_client_address(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
    tmp_path: Path,
    haproxy_bin: str,
    send_proxy: str,
) -> None:
    """Through a real HAProxy (PROXY v2 and v1) the audit event names the client, not HAProxy."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"trusted_proxies": ["127.0.0.1/32"]},
    )
    with capture_logs() as events:
        async with running(config) as gw:
            await wait_port_up(gw, "vm-a")
            front = _free_port()
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(front=front, back=gw.tls_port, send_proxy=send_proxy))
            pidfile = tmp_path / "haproxy.pid"
            # -D returns once haproxy has bound its frontend: no polling needed.
            started = subprocess.run(  # noqa: ASYNC221 - a short, bounded start-up
                [haproxy_bin, "-D", "-q", "-f", str(cfg), "-p", str(pidfile)],
                check=False,
                timeout=TIMEOUT,
            )
            assert started.returncode == 0
            try:
                client = socket.socket()
                client.bind(("127.0.0.2", 0))
                client.connect(("127.0.0.1", front))
                client.setblocking(False)
                async with connect(
                    f"wss://localhost:{front}/v1/vms/vm-a/console",
                    sock=client,
                    server_hostname="localhost",
                    ssl=client_ssl,
                    subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
                    additional_headers={"Authorization": f"Bearer {token('alice')}"},
                ) as ws:
                    assert json.loads(await ws.recv())["role"] == "writer"
                    await ws.send(b"through haproxy\r")
                    await far_end.wait_received(lambda b: b"through haproxy" in b)
            finally:
                for pid in pidfile.read_text().split():
                    os.kill(int(pid), signal.SIGTERM)
    started_events = [e for e in events if e["event"] == "session_started"]
    assert [e["peer"] for e in started_events] == ["127.0.0.2"]


async def test_proxy_header_from_untrusted_or_missing_from_trusted_is_refused_and_counted(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """A PROXY header from elsewhere fails; a trusted peer without one is closed; both counted."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"trusted_proxies": ["127.0.0.3/32"], "handshake_timeout": "2s"},
    )
    waiter = LogWaiter()
    with capture_logs(processors=[waiter]):
        async with running(config) as gw:
            assert gw.listener is not None
            # Untrusted 127.0.0.2 sends a PROXY header: it is taken as a (bad) TLS ClientHello.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.tls_port, local_addr=("127.0.0.2", 0)
            )
            writer.write(b"PROXY TCP4 1.2.3.4 127.0.0.1 5555 443\r\n")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            # Trusted 127.0.0.3 starts TLS without a header: refused before any handshake.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.open_connection(
                    "127.0.0.1",
                    gw.tls_port,
                    ssl=client_ssl,
                    server_hostname="localhost",
                    local_addr=("127.0.0.3", 0),
                )
            failures = gw.listener.handshake_failures
            assert failures["proxy_header"] == 1
            assert sum(failures.values()) == 2
    failed = {e["peer"]: e for e in waiter.named("handshake_failed")}
    # The log says what to change, not only OpenSSL's words for "this was not TLS".
    assert "trusted_proxies" in failed["127.0.0.2"]["hint"]
    assert "send-proxy-v2" in failed["127.0.0.3"]["hint"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this install)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd)")
    relayd = Path(sys.executable).parent / "relayd"
    unit = (ROOT / "systemd" / "relayd.service").read_text().replace("/usr/bin/relayd", str(relayd))
    path = tmp_path / "relayd.service"
    path.write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "relayd.service" not in result.stderr, result.stderr


async def test_proxy_header_that_never_completes_is_closed_at_the_deadline_and_counted(
    write_config: Callable[..., Any], far_end: FarEnd
) -> None:
    """A trusted peer that sends half a PROXY header and stalls is dropped at handshake_timeout."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        gateway={"trusted_proxies": ["127.0.0.0/8"], "handshake_timeout": "300ms"},
    )
    async with running(config) as gw:
        assert gw.listener is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.tls_port)
        writer.write(b"PROXY TCP4 10.1.2.3 ")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        assert gw.listener.handshake_failures["timeout"] == 1
