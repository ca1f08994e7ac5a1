"""Accept → PROXY header (trusted sources only) → TLS handshake → the owner's protocol.

relayd accepts on its own listening socket instead of `loop.create_server`
so that it can (a) read a PROXY header from a trusted load balancer off the
raw socket before TLS, consuming exactly the header's bytes, and (b) see
every failed handshake and count it by reason. One short task per
connection does both under the handshake deadline; after the handshake the
connection is callback-driven and costs no task.

A PROXY header from an untrusted source is not looked for (its bytes fail
the TLS handshake); a connection from a trusted proxy without a valid
header is closed and counted. `X-Forwarded-For` is never read.

Before any TLS work, a new connection must pass the per-address connection
rate and find a handshake slot: at most `max_handshakes` connections are
between accept and the end of their handshake, `max_handshakes_per_ip` of
them from one address (IPv4, or IPv6 /64: `ratelimit.address_key`). One that
does not is reset at once, so idle connections from one address cost the
gateway a few dozen handshakes, never a task, TLS state and a descriptor
each. Behind a trusted proxy the address is the one in the PROXY header,
read first (it is a few bytes, under the same deadline). In a cluster, another
gateway's address is not limited per address (only by `max_handshakes`): each
of its peer links relays one client that gateway admitted under its own limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections import Counter
from typing import Protocol

from . import proxy_protocol
from .config import Config
from .linger import linger_zero, reset_connection
from .log import get_logger
from .ratelimit import HandshakeSlots, address_key

log = get_logger("relayd.listener")


class ListenerOwner(Protocol):
    """What the listener needs of the gateway: settings, and a protocol per connection."""

    @property
    def config(self) -> Config:
        """Deadlines and trusted proxies."""

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The server context in force (a reload swaps it for new handshakes)."""

    def new_connection(self, peer: str) -> asyncio.Protocol:
        """The protocol that serves a connection from `peer` after its handshake."""

    def admit_connection(self, peer: str) -> object | None:
        """Count a new connection from `peer`; not None when it is over the rate."""

    def is_gateway_address(self, peer: str) -> bool:
        """Whether `peer` is another gateway of the region: no per-address limits for it."""

    def is_peer_link(self, protocol: asyncio.BaseProtocol) -> bool:
        """Whether a connection (its protocol, after the handshake) is a verified gateway's."""


BACKLOG = 4096
# Accepts between two yields to the loop: a flood of connections waiting in the backlog
# must not hold up the handshakes and sessions already running.
ACCEPT_BATCH = 64


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


def is_trusted_proxy(config: Config, peer: str) -> bool:
    """Whether `peer` (a TCP peer address) is in `trusted_proxies`: its connections carry
    a PROXY header, and each is a client's that came through the load balancer."""
    proxies = config.gateway.trusted_proxies
    if not proxies:
        return False
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(peer)
        return any(address in net for net in proxies)
    return False


def _reset(conn: socket.socket) -> None:
    """Close a refused connection with a reset: nothing is sent, nothing lingers.

    No FIN_WAIT or TIME_WAIT is left behind for each refused connection of a flood.
    """
    linger_zero(conn)
    conn.close()


#: What a failed handshake most likely means, for the reasons a misconfigured load
#: balancer produces (the PROXY protocol on one side only).
HINTS = {
    "wrong_version_number": (
        "not TLS: a PROXY header from an address not in trusted_proxies (list the "
        "balancer's source address there), or a client that does not speak TLS"
    ),
    "crl_missing": "tls.crl holds no CRL of the CA that issued the client's certificate",
    "crl_expired": "a CRL in tls.crl is past its nextUpdate: load a fresh one (SIGHUP)",
    "proxy_header": (
        "no valid PROXY header from an address in trusted_proxies: enable send-proxy-v2 "
        "on the balancer, or take the address out of trusted_proxies (peer links and "
        "health checkers never send one)"
    ),
}


#: OpenSSL's verify codes (X509_V_ERR_*) that `[tls] crl` brings, as handshake failure reasons.
_VERIFY_REASONS = {3: "crl_missing", 12: "crl_expired", 23: "certificate_revoked"}


def _reason(exc: BaseException) -> str:
    """A short, bounded label for a failed handshake (a metric label, not a message)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, proxy_protocol.ProxyProtocolError):
        return "proxy_header"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "certificate_verify_failed")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "ssl_error").lower()
        return reason if len(reason) <= 48 else "ssl_error"
    if isinstance(exc, ConnectionError | EOFError):
        return "connection_closed"
    return type(exc).__name__.lower()


class Listener:
    """One TLS listening socket of the gateway."""

    def __init__(self, gateway: ListenerOwner, sock: socket.socket) -> None:
        self.gateway = gateway
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        # Refused connections count here too ("rate_limited", "too_many_handshakes").
        self.handshake_failures: Counter[str] = Counter()
        self.handshakes = 0
        self.slots = HandshakeSlots()

    @property
    def in_handshake(self) -> int:
        """Connections accepted whose TLS handshake has not ended yet."""
        return self.slots.total

    async def serve(self) -> None:
        """Accept until cancelled; each admitted handshake is a child task with a deadline."""
        loop = asyncio.get_running_loop()
        accepted = 0
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    try:
                        conn, addr = await loop.sock_accept(self.sock)
                    except OSError as exc:  # EMFILE and friends: log, breathe, keep serving
                        log.warning("accept_failed", error=str(exc))
                        await asyncio.sleep(0.1)
                        continue
                    peer = plain_address(addr[0])
                    # A trusted proxy's connection is keyed once its header names the client;
                    # a gateway's (each peer link relays a client it admitted) is not keyed.
                    proxied = self._trusted(peer)
                    gateway = not proxied and self.gateway.is_gateway_address(peer)
                    key = None if proxied or gateway else address_key(peer)
                    if self._admit(peer, key):
                        tg.create_task(
                            self._handshake(conn, peer, key, proxied=proxied, gateway=gateway)
                        )
                    else:
                        _reset(conn)
                    accepted += 1
                    if accepted % ACCEPT_BATCH == 0:
                        await asyncio.sleep(0)
        finally:
            self.sock.close()

    def _admit(self, peer: str, key: str | None) -> bool:
        """Count a new connection against its address's rate and take a handshake slot."""
        limits = self.gateway.config.limits
        if key is not None and self.gateway.admit_connection(peer) is not None:
            self.handshake_failures["rate_limited"] += 1
            return False
        if not self.slots.enter(
            key, max_total=limits.max_handshakes, max_per_key=limits.max_handshakes_per_ip
        ):
            self.handshake_failures["too_many_handshakes"] += 1
            return False
        return True

    async def _handshake(
        self, conn: socket.socket, peer: str, key: str | None, *, proxied: bool, gateway: bool
    ) -> None:
        """TLS (after the PROXY header of a trusted proxy), then the connection's protocol.

        Args:
            gateway: `peer` is a gateway's address, so the connection was not counted at
                accept; it is now unless it proves to be a gateway's (a client sharing
                the address, behind one NAT, gets the address's limits).
        """
        gw = self.gateway
        loop = asyncio.get_running_loop()
        timeout = gw.config.gateway.handshake_timeout
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.timeout(timeout):
                if proxied:
                    peer = await self._read_proxy_header(conn, peer)
                    key = self._admit_behind_proxy(peer)
                    if key is None:
                        _reset(conn)
                        return
                transport, protocol = await loop.connect_accepted_socket(
                    lambda: gw.new_connection(peer),
                    conn,
                    ssl=gw.ssl_context,
                    ssl_handshake_timeout=timeout,
                )
            self.handshakes += 1
            if gateway and not gw.is_peer_link(protocol) and gw.admit_connection(peer):
                self.handshake_failures["rate_limited"] += 1
                log.info("connection_refused", peer=peer, reason="rate_limited")
                reset_connection(transport)
        except (OSError, TimeoutError, EOFError, proxy_protocol.ProxyProtocolError) as exc:
            reason = _reason(exc)
            self.handshake_failures[reason] += 1
            hint = {"hint": HINTS[reason]} if reason in HINTS else {}
            log.info("handshake_failed", peer=peer, reason=reason, **hint)
            conn.close()
        except Exception:
            # A bug, not the peer: this connection ends; the listener (a task group of every
            # handshake) must not end with it, or one client would stop the gateway.
            self.handshake_failures["internal_error"] += 1
            log.exception("handshake_crashed", peer=peer)
            conn.close()
        finally:
            self.slots.leave(key)

    def _admit_behind_proxy(self, peer: str) -> str | None:
        """The real client's key once its header is read; None when it is refused."""
        if self.gateway.admit_connection(peer) is not None:
            self.handshake_failures["rate_limited"] += 1
            return None
        key = address_key(peer)
        if not self.slots.assign(key, max_per_key=self.gateway.config.limits.max_handshakes_per_ip):
            self.handshake_failures["too_many_handshakes"] += 1
            return None
        return key

    def _trusted(self, peer: str) -> bool:
        return is_trusted_proxy(self.gateway.config, peer)

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
