"""Accept → PROXY header (trusted sources only) → TLS handshake → `ClientConnection`.

relayd accepts on its own listening socket instead of `loop.create_server`
so that it can (a) read a PROXY header from a trusted load balancer off the
raw socket before TLS, consuming exactly the header's bytes, and (b) see
every failed handshake and count it by reason. One short task per
connection does both under the handshake deadline; after the handshake the
connection is callback-driven and costs no task.

A PROXY header from an untrusted source is not looked for (its bytes fail
the TLS handshake); a connection from a trusted proxy without a valid
header is closed and counted. `X-Forwarded-For` is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections import Counter
from typing import TYPE_CHECKING

from . import proxy_protocol
from .connection import ClientConnection
from .log import get_logger

if TYPE_CHECKING:
    from .app import Gateway

log = get_logger("relayd.listener")

BACKLOG = 4096


def bind(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket (dual-stack when the host is `::`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def plain_address(text: str) -> str:
    """An address as `allow_clients` and `trusted_proxies` compare it.

    On a dual-stack ``[::]`` listener an IPv4 client arrives as ``::ffff:a.b.c.d``,
    which no IPv4 network contains: it is turned back into ``a.b.c.d``.
    """
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _reason(exc: BaseException) -> str:
    """A short, bounded label for a failed handshake (a metric label, not a message)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, proxy_protocol.ProxyProtocolError):
        return "proxy_header"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "ssl_error").lower()
        return reason if len(reason) <= 48 else "ssl_error"
    if isinstance(exc, ConnectionError | EOFError):
        return "connection_closed"
    return type(exc).__name__.lower()


class Listener:
    """One TLS listening socket of the gateway."""

    def __init__(self, gateway: Gateway, sock: socket.socket) -> None:
        self.gateway = gateway
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.handshake_failures: Counter[str] = Counter()
        self.handshakes = 0

    async def serve(self) -> None:
        """Accept until cancelled; each handshake is a child task with a deadline."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        conn, addr = await loop.sock_accept(self.sock)
                    except OSError as exc:  # EMFILE and friends: log, breathe, keep serving
                        log.warning("accept_failed", error=str(exc))
                        await asyncio.sleep(0.1)
                        continue
                    tg.create_task(self._handshake(conn, plain_address(addr[0])))
        finally:
            self.sock.close()

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        gw = self.gateway
        loop = asyncio.get_running_loop()
        timeout = gw.config.gateway.handshake_timeout
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout):
                if self._trusted(peer):
                    peer = await self._read_proxy_header(conn, peer)
                await loop.connect_accepted_socket(
                    lambda: ClientConnection(gw, peer=peer),
                    conn,
                    ssl=gw.ssl_context,
                    ssl_handshake_timeout=timeout,
                )
            self.handshakes += 1
        except (OSError, TimeoutError, EOFError, proxy_protocol.ProxyProtocolError) as exc:
            reason = _reason(exc)
            self.handshake_failures[reason] += 1
            log.info("handshake_failed", peer=peer, reason=reason)
            conn.close()
        except Exception:
            # A bug, not the peer: this connection ends; the listener (a task group of every
            # handshake) must not end with it, or one client would stop the gateway.
            self.handshake_failures["internal_error"] += 1
            log.exception("handshake_crashed", peer=peer)
            conn.close()

    def _trusted(self, peer: str) -> bool:
        proxies = self.gateway.config.gateway.trusted_proxies
        if not proxies:
            return False
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(peer)
            return any(address in net for net in proxies)
        return False

    async def _read_proxy_header(self, conn: socket.socket, peer: str) -> str:
        """The real client address from the PROXY header; exactly the header is consumed.

        Raises:
            ProxyProtocolError: no valid header.
        """
        loop = asyncio.get_running_loop()
        buf = b""
        while isinstance(result := proxy_protocol.parse(buf), proxy_protocol.NeedData):
            chunk = await loop.sock_recv(conn, result.at_least - len(buf))
            if not chunk:
                raise proxy_protocol.ProxyProtocolError(
                    f"connection closed after {len(buf)} header bytes"
                )
            buf += chunk
        if result.source is None:  # LOCAL (health checks) or an unknown family
            return peer
        return plain_address(result.source[0])
