"""Regression tests for what the pre-auth fuzz (issue 15) found, against a live gateway.

Each bug here was found by the Hypothesis fuzz of the whole pre-auth stream and
is pinned by a deterministic test: real TLS on loopback, a real gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import ssl
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from relayd.app import Gateway
from relayd.config import Config

from .conftest import TIMEOUT, FarEnd, raw_console, running

TRUSTED = "127.0.0.1"  # the gateway's trusted proxy: it must send a PROXY header


def _proxy_v1(source: str) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "2001:db8::1" if ":" in source else "10.0.0.1"
    return f"PROXY {family} {source} {dest} 50000 443\r\n".encode()


async def _connect(port: int, source: str) -> socket.socket:
    """A TCP connection to the gateway from `source` (any 127/8 address is this host)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Tls:
    """A client TLS connection over memory buffers, so every byte on the wire is ours to cut."""

    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


async def _drain_until_closed(sock: socket.socket, tls: Tls | None = None) -> bytes:
    """Half-close, then read until the gateway closes its end; the start of its answer."""
    loop = asyncio.get_running_loop()
    answer = b""
    try:
        sock.shutdown(socket.SHUT_WR)
        while data := await loop.sock_recv(sock, 65536):
            if tls is None:
                answer = (answer + data)[:64]
                continue
            tls.incoming.write(data)
            with contextlib.suppress(ssl.SSLError):  # want-read, or a record it cut
                while len(answer) < 64 and (plain := tls.obj.read(4096)):
                    answer += plain
    except OSError:  # a reset is also an end
        pass
    return answer


class Discard(asyncio.Protocol):
    """The VM's serial far end: takes whatever the writer types."""

    def data_received(self, data: bytes) -> None:
        """Dropped."""


async def _normal_request(gw: Gateway, ctx: ssl.SSLContext, bearer: str) -> dict[str, Any]:
    """GET /v1/vms through a valid PROXY header and TLS, as a balancer would pass it on."""
    loop = asyncio.get_running_loop()
    sock = await _connect(gw.tls_port, TRUSTED)
    await loop.sock_sendall(sock, _proxy_v1("192.0.2.7"))
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
    writer.write(
        b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Authorization: Bearer " + bearer.encode() + b"\r\n\r\n"
    )
    async with asyncio.timeout(TIMEOUT):
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    result: dict[str, Any] = json.loads(body)
    return result


async def test_request_and_close_in_the_handshakes_last_flight_leave_the_listener_serving(
    write_config: Callable[..., Config], pki: dict[str, Path], token: Callable[..., str]
) -> None:
    """Finished, a `Connection: close` request and more records in one flight: one close.

    The gateway answered and closed; reading the records behind the request while
    closing, asyncio's TLS transport called eof_received, and the gateway closed
    again. A second close() makes that transport forget its protocol, so the
    listener's own next look at it (in debug mode, as CI runs) raised, and the
    listener's task group went down with it: one client stopped the gateway.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    far = await loop.create_server(Discard, "127.0.0.1", 0)
    port = far.sockets[0].getsockname()[1]
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{port}"}],
        gateway={"trusted_proxies": [f"{TRUSTED}/32"]},
    )
    gw = Gateway(config)
    serving = asyncio.create_task(gw.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            await gw.ready.wait()
        with capture_logs() as events:
            for _ in range(3):
                await _close_behind_a_request(gw.tls_port, ctx)
        assert not [e for e in events if e["log_level"] in ("error", "critical")], events
        listed = await _normal_request(gw, ctx, token("alice"))
        assert [vm["id"] for vm in listed["vms"]] == ["vm-a"]
        assert not serving.done()
        assert not problems, problems
    finally:
        gw.stop()
        async with asyncio.timeout(TIMEOUT):
            await serving
        far.close()
        await far.wait_closed()


async def _close_behind_a_request(port: int, ctx: ssl.SSLContext) -> None:
    """Hold back TLS's last flight; send it with a closing request and more records behind."""
    loop = asyncio.get_running_loop()
    sock = await _connect(port, TRUSTED)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        await loop.sock_sendall(sock, _proxy_v1("192.0.2.7"))
        while True:  # the handshake, but for the client's last flight
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(sock, outgoing.read())
                incoming.write(await loop.sock_recv(sock, 65536))
        flight = outgoing.read()
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        tls.write(b"GET / HTTP/1.1\r\n\r\n")  # one more record: read while closing
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # and a close_notify
        await loop.sock_sendall(sock, flight + outgoing.read())
        await _drain_until_closed(sock)
    finally:
        sock.close()


async def test_a_session_closed_after_a_sweep_is_freed_before_the_next(
    write_config: Callable[..., Config],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """The sweeper, sleeping between rounds, held the last session it swept (and its buffers)."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"keepalive_interval": "1s"},  # a round a second; the first ping within it
    )
    async with running(config) as gw:
        reader, writer = await raw_console(gw, client_ssl, token("alice"))
        (session,) = gw.sessions.values()
        swept = weakref.ref(session)
        del session
        async with asyncio.timeout(TIMEOUT):
            while True:  # a ping: the sweeper has just been through this session
                head = await reader.readexactly(2)
                size = head[1] & 0x7F
                if size == 126:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                await reader.readexactly(size)
                if head[0] & 0x0F == 0x9:
                    break
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            await gw._until(lambda: not gw.sessions and not gw.connections)
        gc.collect()
        assert swept() is None, "a closed session outlived its connection"
