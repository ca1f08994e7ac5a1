"""Accept, PROXY header, TLS handshake (listener.py), on real loopback sockets with real TLS.

`FakeListenerOwner` is a small real class implementing `ListenerOwner`: a real
server context (trustme certificates) and, per connection, a protocol that
records the peer address it was given. Failures are awaited through the
`handshake_failed` log event, never with a sleep.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relayd.config import AuthConfig, Config, GatewayConfig, TlsConfig
from relayd.listener import Listener, bind, plain_address
from relayd.tls import server_context

from .conftest import TIMEOUT
from .logevents import LogWaiter

PROXY_V1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 55555 443\r\n"


class Served(asyncio.Protocol):
    """What the gateway would serve after the handshake: here it only records its peer."""

    def __init__(self, owner: FakeListenerOwner, peer: str) -> None:
        self.owner = owner
        self.peer = peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: tell the test who the client is."""
        self.owner.transports.append(transport)
        self.owner.served.put_nowait(self.peer)


class FakeListenerOwner:
    """A `ListenerOwner` with a real TLS context and the trusted proxies it is given."""

    def __init__(self, pki: dict[str, Path], *, trusted: list[str], timeout: float) -> None:
        self.config = Config(
            path=Path("relayd.toml"),
            gateway=GatewayConfig(handshake_timeout=timeout, trusted_proxies=trusted),
            tls=TlsConfig(cert=pki["cert"], key=pki["key"]),
            auth=AuthConfig(issuer="i", audience="a", hs256_secret_file=pki["secret"]),
        )
        self.ssl_context = server_context(self.config.tls)
        self.served: asyncio.Queue[str] = asyncio.Queue()
        self.transports: list[asyncio.BaseTransport] = []

    def new_connection(self, peer: str) -> asyncio.Protocol:
        """A protocol that records `peer` once its handshake completes."""
        return Served(self, peer)

    def admit_connection(self, peer: str) -> object | None:
        """Every connection is within the rate (the rate itself: tests/test_listener.py)."""
        return None

    def is_gateway_address(self, peer: str) -> bool:
        """No cluster here."""
        return False

    def is_peer_link(self, protocol: asyncio.BaseProtocol) -> bool:
        """No cluster here."""
        return False


@asynccontextmanager
async def listening(
    pki: dict[str, Path], *, trusted: list[str] | None = None, deadline: float = TIMEOUT
) -> AsyncIterator[tuple[Listener, FakeListenerOwner]]:
    """A listener on 127.0.0.1, port 0, serving until the block ends."""
    owner = FakeListenerOwner(pki, trusted=trusted or [], timeout=deadline)
    listener = Listener(owner, bind("127.0.0.1", 0))
    task = asyncio.create_task(listener.serve())
    try:
        yield listener, owner
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for transport in owner.transports:
            transport.abort()


async def dial(port: int, prefix: bytes = b"") -> socket.socket:
    """A connected non-blocking socket that has sent `prefix` (a PROXY header, garbage)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    if prefix:
        await loop.sock_sendall(sock, prefix)
    return sock


@asynccontextmanager
async def tls_client(port: int, ctx: ssl.SSLContext, prefix: bytes = b"") -> AsyncIterator[None]:
    """A TLS connection (after `prefix`), held open until the block ends.

    Held, because a client that drops at once may cut the server's side of the
    handshake short (TLS 1.3: the client is done one flight before the server).

    Raises:
        ConnectionError, ssl.SSLError: the server ended the handshake.
    """
    sock = await dial(port, prefix)
    try:
        async with asyncio.timeout(TIMEOUT):
            _, writer = await asyncio.open_connection(
                sock=sock, ssl=ctx, server_hostname="localhost"
            )
    except BaseException:
        sock.close()
        raise
    try:
        yield
    finally:
        writer.transport.abort()  # closes the socket too


async def served_peer(owner: FakeListenerOwner) -> str:
    """The peer address of the next connection that completed its handshake."""
    async with asyncio.timeout(TIMEOUT):
        return await owner.served.get()


# -- PROXY headers: read from trusted sources only ----------------------------------------


async def test_listener_untrusted_source_is_served_with_its_own_address(
    pki: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    """With no trusted proxy, a TLS client is served as the address it connects from."""
    async with listening(pki) as (listener, owner):
        async with tls_client(listener.port, client_ssl):
            assert await served_peer(owner) == "127.0.0.1"
        assert listener.handshake_failures == {}


async def test_listener_trusted_proxy_header_gives_the_real_client_address(
    pki: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    """From a trusted proxy, the PROXY header is consumed exactly and names the client."""
    async with listening(pki, trusted=["127.0.0.0/8"]) as (listener, owner):
        async with tls_client(listener.port, client_ssl, PROXY_V1):
            assert await served_peer(owner) == "203.0.113.9"
        assert listener.handshake_failures == {}


async def test_listener_trusted_proxy_local_header_keeps_the_proxy_address(
    pki: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    """A header that names no client (UNKNOWN, as health checks send) leaves the proxy's own."""
    async with (
        listening(pki, trusted=["127.0.0.1/32"]) as (listener, owner),
        tls_client(listener.port, client_ssl, b"PROXY UNKNOWN\r\n"),
    ):
        assert await served_peer(owner) == "127.0.0.1"


async def test_listener_untrusted_source_proxy_header_is_not_believed(
    pki: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    """A PROXY header from an untrusted source is never parsed: its bytes fail the handshake."""
    logs = LogWaiter()
    with capture_logs(processors=[logs]):
        async with listening(pki, trusted=["10.0.0.0/8"]) as (listener, owner):
            with pytest.raises((ConnectionError, ssl.SSLError)):
                async with tls_client(listener.port, client_ssl, PROXY_V1):
                    pass
            await logs.wait_for(lambda: bool(logs.named("handshake_failed")))
    assert owner.served.empty()
    (failed,) = logs.named("handshake_failed")
    assert (failed["peer"], failed["reason"]) == ("127.0.0.1", "wrong_version_number")
    assert listener.handshake_failures == {"wrong_version_number": 1}


async def test_listener_trusted_source_without_header_is_closed_as_proxy_header(
    pki: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    """A trusted proxy must send a header: a bare ClientHello is refused and counted."""
    logs = LogWaiter()
    with capture_logs(processors=[logs]):
        async with listening(pki, trusted=["127.0.0.0/8"]) as (listener, owner):
            with pytest.raises((ConnectionError, ssl.SSLError)):
                async with tls_client(listener.port, client_ssl):
                    pass
            await logs.wait_for(lambda: bool(logs.named("handshake_failed")))
    assert owner.served.empty()
    assert listener.handshake_failures == {"proxy_header": 1}


# -- failed handshakes, counted by reason -------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "prefix", "close", "reason"),
    [
        ([], b"", False, "timeout"),
        ([], b"", True, "connection_closed"),
        ([], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "http_request"),
        (["127.0.0.0/8"], b"PROXY TCP4 203.0.113.9", True, "proxy_header"),
        (["127.0.0.0/8"], b"", False, "timeout"),
    ],
    ids=["silent", "closed", "plain-http", "cut-header", "no-header-in-time"],
)
async def test_listener_failed_handshake_is_counted_by_reason(
    pki: dict[str, Path], trusted: list[str], prefix: bytes, close: bool, reason: str
) -> None:
    """Each way a handshake fails is counted under one short reason and logged once."""
    logs = LogWaiter()
    with capture_logs(processors=[logs]):
        async with listening(pki, trusted=trusted, deadline=0.2) as (listener, owner):
            sock = await dial(listener.port, prefix)
            if close:
                sock.close()
            try:
                await logs.wait_for(lambda: bool(logs.named("handshake_failed")))
            finally:
                sock.close()
    assert listener.handshake_failures == {reason: 1}
    assert logs.named("handshake_failed")[0]["reason"] == reason
    assert listener.handshakes == 0
    assert owner.served.empty()


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "plain"),
    [("::ffff:192.0.2.1", "192.0.2.1"), ("192.0.2.1", "192.0.2.1"), ("2001:db8::1", "2001:db8::1")],
)
def test_listener_plain_address_unmaps_ipv4_in_ipv6(text: str, plain: str) -> None:
    """An IPv4 client on a dual-stack listener is compared as IPv4 (allow-lists, proxies)."""
    assert plain_address(text) == plain
