"""The listener's bounds before TLS: handshakes in flight, per address and in all, and the rate.

Every refusal here happens at accept (or right after a trusted proxy's header),
before the gateway spends anything on TLS: the refused client sees its
connection reset without a single byte from the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from relayd.app import Gateway

from .conftest import TIMEOUT, FarEnd, running, wait_port_up


def _vm(far_end: FarEnd) -> list[dict[str, Any]]:
    return [{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}]


# Held handshakes outlast every wait here, so an end seen within TIMEOUT is a refusal.
SLOW = {"handshake_timeout": "60s"}


@asynccontextmanager
async def idle_connections(
    gw: Gateway, source: str, count: int
) -> AsyncIterator[list[socket.socket]]:
    """`count` TCP connections from `source` that never send a byte (connected in order)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setblocking(False)
            sock.bind((source, 0))
            await loop.sock_connect(sock, ("127.0.0.1", gw.tls_port))
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def refused_before_tls(sock: socket.socket) -> bool:
    """Whether the server ends this connection without sending anything (waits until it does)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TIMEOUT):
            return await loop.sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True


def still_held(sock: socket.socket) -> bool:
    """Whether the server keeps this idle connection open (nothing sent, not closed)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


async def hello_from(gw: Gateway, source: str, client_ssl: ssl.SSLContext, bearer: str) -> bytes:
    """Open a console from `source` and return the head of its first frame."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        gw.tls_port,
        ssl=client_ssl,
        server_hostname="localhost",
        local_addr=(source, 0),
    )
    writer.write(
        (
            "GET /v1/vms/vm-a/console?mode=spectate HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: Bearer {bearer}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relayd.console.v1\r\n\r\n"
        ).encode()
    )
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        first = await reader.readexactly(64)
    writer.close()
    return first


async def test_handshakes_over_the_per_address_cap_are_closed_at_accept_others_served(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """Four idle connections hold 127.0.0.1's slots; its fifth is reset, 127.0.0.2 gets in."""
    config = write_config(
        vms=_vm(far_end),
        gateway=SLOW,
        limits={"max_handshakes_per_ip": 4, "max_handshakes": 100},
    )
    async with running(config) as gw:
        assert gw.listener is not None
        await wait_port_up(gw, "vm-a")
        async with (
            idle_connections(gw, "127.0.0.1", 4) as held,
            idle_connections(gw, "127.0.0.1", 1) as (fifth,),
        ):
            assert await refused_before_tls(fifth), gw.listener.handshake_failures
            assert b'"type":"hello"' in await hello_from(gw, "127.0.0.2", client_ssl, token("rita"))
            assert all(still_held(sock) for sock in held)
        assert gw.listener.handshake_failures["too_many_handshakes"] == 1


async def test_handshakes_over_the_global_cap_are_closed_at_accept(
    write_config: Callable[..., Any], far_end: FarEnd
) -> None:
    """With three handshakes in flight from three addresses, a fourth address is reset."""
    config = write_config(vms=_vm(far_end), gateway=SLOW, limits={"max_handshakes": 3})
    async with running(config) as gw:
        assert gw.listener is not None
        async with contextlib.AsyncExitStack() as stack:
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                await stack.enter_async_context(idle_connections(gw, source, 1))
            (fourth,) = await stack.enter_async_context(idle_connections(gw, "127.0.0.4", 1))
            assert await refused_before_tls(fourth)
        assert gw.listener.handshake_failures["too_many_handshakes"] == 1


async def test_connection_rate_per_address_is_applied_before_tls(
    write_config: Callable[..., Any], far_end: FarEnd, client_ssl: ssl.SSLContext
) -> None:
    """At 1 connection/s (burst 2), a quick run of ten gets some reset before any TLS."""
    config = write_config(
        vms=_vm(far_end), gateway=SLOW, limits={"connections_per_second_per_ip": 1}
    )
    async with running(config) as gw:
        assert gw.listener is not None
        async with idle_connections(gw, "127.0.0.1", 10) as socks:
            refused = [await refused_before_tls(sock) for sock in socks[2:]]
        assert any(refused)
        assert gw.listener.handshake_failures["rate_limited"] == sum(refused)


async def test_trusted_proxy_clients_are_capped_by_their_real_address(
    write_config: Callable[..., Any], far_end: FarEnd
) -> None:
    """Behind a trusted balancer the per-address cap counts the client named in the header."""
    config = write_config(
        vms=_vm(far_end),
        gateway={"trusted_proxies": ["127.0.0.0/8"], **SLOW},
        limits={"max_handshakes_per_ip": 2},
    )
    header = b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 443\r\n"
    async with running(config) as gw:
        assert gw.listener is not None
        async with idle_connections(gw, "127.0.0.1", 3) as socks:
            loop = asyncio.get_running_loop()
            for sock in socks:
                await loop.sock_sendall(sock, header)
            waits = [asyncio.create_task(refused_before_tls(sock)) for sock in socks]
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            assert [t.result() for t in done] == [True]
            for task in pending:
                task.cancel()
            assert gw.listener.in_handshake == 2
        assert gw.listener.handshake_failures["too_many_handshakes"] == 1
