"""Tests for relayd.cluster.peerlink: mutual TLS between gateways, the forwarded hop, the splice.

Everything is real TLS on loopback. `Owner` stands in for the owning
gateway's listener (relayd's own server context, extended with `trust_peer_ca`),
`Front` for the receiving gateway (a cut-down HTTP phase, then `open_peer`
and `splice`, as the lead's connection code will do), and clients are plain
TLS streams that speak the bytes themselves.
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, cast

import h11
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from relayd.cluster.forwarding import (
    ForwardedSession,
    PeerLinkError,
    encode_forwarded_request,
    parse_forwarded_headers,
)
from relayd.cluster.peerlink import (
    CLOSE_TIMEOUT,
    HIGH_WATER,
    PeerConnection,
    PeerTrust,
    Splice,
    open_peer,
    peer_client_context,
    splice,
    trust_peer_ca,
)
from relayd.cluster.relay import relay as relay_session
from relayd.config import TlsConfig
from relayd.errors import ConfigError
from relayd.tls import server_context

TIMEOUT = 10.0
PATH = "/v1/vms/vm-a/console"
BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
CLIENT_REQUEST = (
    f"GET {PATH}?mode=interactive HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\nRelayd-Forwarded-Role: owner\r\n\r\n"
).encode()
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
FWD = ForwardedSession(
    principal="user:alice",
    role="contributor",
    mode="interactive",
    client_peer="127.0.0.1",
    session_id="0123456789abcdef",
)
#: What a spliced transport's write buffer may hold: its mark plus one TLS read (256 KiB)
#: and slack.
BUFFER_BOUND = HIGH_WATER + 512 * 1024
#: Relayed but not yet read by a slow reader: both write buffers of the relay, TLS's own
#: (a 256 KiB read each way) and the reader's. Without flow control: everything sent.
IN_FLIGHT_BOUND = 2 << 20
Version = Literal["1.2", "1.3"]


# -- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The peer CA, another CA, and the leaves the tests present."""

    peer_ca: Path
    other_ca: Path
    owner: Leaf  # peer CA, serverAuth+clientAuth, CN gw-owner
    receiver: Leaf  # peer CA, serverAuth+clientAuth, CN gw-recv
    user: Leaf  # peer CA, clientAuth only, CN user-1
    server_only: Leaf  # peer CA, serverAuth only (a server certificate before peer links)
    rogue: Leaf  # other CA, serverAuth+clientAuth, CN gw-rogue
    far: Leaf  # peer CA, named gw.example.test only
    expired: Leaf  # peer CA, serverAuth+clientAuth, CN gw-expired, expired yesterday
    indirect: Leaf  # an intermediate under the peer CA (chain sent), both EKUs, CN gw-sub


def issue(
    ca: trustme.CA,
    directory: Path,
    cn: str,
    usages: Sequence[ObjectIdentifier] = BOTH,
    names: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    expired: bool = False,
) -> Leaf:
    """A leaf signed by `ca` with exactly these extended key usages and names (`expired`:
    valid until yesterday); its file holds the chain up to, not including, the root."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=3 if expired else 0, hours=1))
        .not_valid_after(now + datetime.timedelta(days=-1 if expired else 1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = Leaf(directory / f"{cn}.crt", directory / f"{cn}.key")
    chain = ca.cert_pem.bytes() if ca.parent_cert is not None else b""  # an intermediate
    leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    leaf.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Two CAs and every kind of leaf the tests need."""
    d = tmp_path_factory.mktemp("peer-pki")
    peer_ca, other_ca = trustme.CA(), trustme.CA()
    peer_ca.cert_pem.write_to_path(str(d / "peer-ca.pem"))
    other_ca.cert_pem.write_to_path(str(d / "other-ca.pem"))
    client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    server = (ExtendedKeyUsageOID.SERVER_AUTH,)
    return Pki(
        peer_ca=d / "peer-ca.pem",
        other_ca=d / "other-ca.pem",
        owner=issue(peer_ca, d, "gw-owner"),
        receiver=issue(peer_ca, d, "gw-recv"),
        user=issue(peer_ca, d, "user-1", client),
        server_only=issue(peer_ca, d, "gw-old", server),
        rogue=issue(other_ca, d, "gw-rogue"),
        far=issue(peer_ca, d, "gw-far", names=["gw.example.test"]),
        expired=issue(peer_ca, d, "gw-expired", expired=True),
        indirect=issue(peer_ca.create_child_ca(), d, "gw-sub"),
    )


def peer_ctx(pki: Pki, leaf: Leaf | None = None, version: Version = "1.2") -> ssl.SSLContext:
    """A gateway's peer-link client context, presenting `leaf` (default: the receiver's)."""
    leaf = leaf or pki.receiver
    return peer_client_context(leaf.cert, leaf.key, pki.peer_ca, min_version=version)


# -- the owner's listener, the receiving gateway, a client ----------------------------------------

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Owner:
    """The owner's TLS listener with relayd's server context plus `trust_peer_ca`.

    Accepted connections wait in a queue; the test speaks for the owner.
    """

    def __init__(
        self,
        pki: Pki,
        *,
        leaf: Leaf | None = None,
        client_ca: Path | None = None,
        max_version: Version | None = None,
        small_rcvbuf: bool = False,
    ) -> None:
        leaf = leaf or pki.owner
        self.small_rcvbuf = small_rcvbuf
        self.context = server_context(TlsConfig(cert=leaf.cert, key=leaf.key, client_ca=client_ca))
        trust_peer_ca(self.context, pki.peer_ca)
        if max_version == "1.2":
            self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.trust = PeerTrust.load(pki.peer_ca, client_ca)
        self.accepted: asyncio.Queue[Streams] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> Owner:
        sock = socket.socket()
        if self.small_rcvbuf:  # accepted sockets inherit it: the owner's TCP window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._accept, sock=sock, ssl=self.context)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.accepted.put_nowait((reader, writer))

    async def next(self) -> Streams:
        """The next connection that completed its handshake."""
        async with asyncio.timeout(TIMEOUT):
            return await self.accepted.get()

    async def next_request(self) -> tuple[Streams, bytes, str | None]:
        """The next connection, its request head, and the gateway it came from."""
        reader, writer = await self.next()
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        identity = self.trust.gateway_identity(writer.get_extra_info("ssl_object"))
        return (reader, writer), head, identity

    async def accept_session(self, early: bytes = b"") -> tuple[Streams, ForwardedSession]:
        """Answer the next forwarded request with a 101 (and `early` stream bytes with it)."""
        streams, head, identity = await self.next_request()
        assert identity == "gw-recv"
        streams[1].write(SWITCHING + early)
        return streams, parse_forwarded_headers(request_headers(head))


def request_headers(head: bytes) -> list[tuple[str, str]]:
    """A request head's headers as (name, value) pairs, parsed by h11 as the owner would."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]


@dataclass
class Relay:
    """One forwarded client as the receiving gateway holds it."""

    client: asyncio.Transport
    peer: PeerConnection
    splice: Splice | None = None
    done: list[Splice] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def on_done(self, relay: Splice) -> None:
        """The splice's end callback."""
        self.done.append(relay)
        self.finished.set()

    async def wait_done(self) -> None:
        """Until the splice has ended."""
        async with asyncio.timeout(TIMEOUT):
            await self.finished.wait()


class _FrontProtocol(asyncio.Protocol):
    """The receiving gateway's HTTP phase, cut down: one upgrade request, then forward."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.forwarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are only alike
        sock = self.transport.get_extra_info("socket")
        if self.front.small_sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)  # after the request, bytes wait in h11's trailing data
        if self.forwarding:
            return
        event = self.h11.next_event()
        if isinstance(event, h11.Request):
            assert self.transport is not None
            self.forwarding = True
            self.transport.pause_reading()  # as the lead's code must, while the link opens
            self.front.tg.create_task(self.front.forward(self, event))

    def leftover(self) -> bytes:
        """What the client sent after its request (WebSocket frames sent early)."""
        return bytes(self.h11.trailing_data[0])


class Front:
    """The receiving gateway: reads a client's upgrade, forwards it, splices on a 101."""

    def __init__(
        self,
        pki: Pki,
        owner_port: int,
        tg: asyncio.TaskGroup,
        *,
        context: ssl.SSLContext | None = None,
        small_sndbuf: bool = False,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.owner_port = owner_port
        self.tg = tg
        self.peer_context = context or peer_ctx(pki)
        self.client_context = server_context(
            TlsConfig(cert=pki.receiver.cert, key=pki.receiver.key)
        )
        self.small_sndbuf = small_sndbuf
        self.close_timeout = close_timeout
        self.relays: asyncio.Queue[Relay] = asyncio.Queue()
        self.port = 0

    async def __aenter__(self) -> Front:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _FrontProtocol(self), "127.0.0.1", 0, ssl=self.client_context
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def forward(self, proto: _FrontProtocol, request: h11.Request) -> None:
        """What the lead's connection code does for a VM owned elsewhere."""
        assert proto.transport is not None
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw_items()]
        head = encode_forwarded_request(PATH, pairs, FWD)
        peer = await open_peer("127.0.0.1", self.owner_port, self.peer_context, head, TIMEOUT)
        relay = Relay(proto.transport, peer)
        if peer.status == 101:
            relay.splice = splice(
                proto.transport,
                peer,
                client_data=proto.leftover(),
                on_done=relay.on_done,
                close_timeout=self.close_timeout,
            )
        else:
            proto.transport.write(peer.response)
            proto.transport.close()
        self.relays.put_nowait(relay)

    async def next_relay(self) -> Relay:
        """The next forwarded client."""
        async with asyncio.timeout(TIMEOUT):
            return await self.relays.get()


def kernel_send_queue(sock: socket.socket) -> int:
    """Bytes a socket's kernel send queue holds (Linux SIOCOUTQ)."""
    (queued,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
    return int(queued)


async def tls_client(
    port: int, ctx: ssl.SSLContext, *, rcvbuf: int | None = None, server_hostname: str = "localhost"
) -> Streams:
    """A TLS client to a loopback port, with a small receive buffer if asked."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    async with asyncio.timeout(TIMEOUT):
        await loop.sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=server_hostname)


async def console_client(
    pki: Pki, front: Front, *, early: bytes = b"", rcvbuf: int | None = None
) -> Streams:
    """A client that sends its upgrade (and `early` bytes right behind it) and reads the 101."""
    reader, writer = await tls_client(
        front.port, ssl.create_default_context(cafile=pki.peer_ca), rcvbuf=rcvbuf
    )
    writer.write(CLIENT_REQUEST + early)
    async with asyncio.timeout(TIMEOUT):
        assert await reader.readexactly(len(SWITCHING)) == SWITCHING
    return reader, writer


async def read_all(
    reader: asyncio.StreamReader,
    n: int,
    *,
    pace: bool = False,
    progress: Callable[[int], None] | None = None,
) -> bytes:
    """Read exactly `n` bytes; with `pace`, as a slow reader (16 KiB per loop turn and ms).

    `progress` is told the running total after each read.
    """
    out = bytearray()
    async with asyncio.timeout(TIMEOUT * 3):
        while len(out) < n:
            chunk = await reader.read(min(16384, n - len(out)))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
            if progress is not None:
                progress(len(out))
            if pace:
                await asyncio.sleep(0.001)  # the workload is slow on purpose; no synchronization
    return bytes(out)


async def at_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the stream ends (EOF or reset), within the test timeout."""
    out = bytearray()
    async with asyncio.timeout(TIMEOUT):
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    return bytes(out)


# -- mutual TLS and who is a gateway --------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_peer_link_gateway_certificates_identify_both_ends(
    pki: Pki, version: Version
) -> None:
    """Certificates from peer_ca: the owner sees gw-recv, the receiver sees gw-owner."""
    async with Owner(pki, max_version=version) as owner:
        head = encode_forwarded_request(PATH, request_headers(CLIENT_REQUEST), FWD)
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki, version=version), head, TIMEOUT)
        )
        (_, writer), got, identity = await owner.next_request()
        assert identity == "gw-recv"
        assert got == head
        assert parse_forwarded_headers(request_headers(got)) == FWD
        assert writer.get_extra_info("ssl_object").version() == f"TLSv{version}"
        writer.write(SWITCHING)
        peer = await opening
        assert (peer.status, peer.head, peer.rest, peer.owner) == (101, SWITCHING, b"", "gw-owner")
        assert not peer.transport.is_closing()
        peer.abort()


async def test_open_peer_owner_certificate_from_other_ca_is_refused(pki: Pki) -> None:
    """An owner whose certificate peer_ca did not issue is not talked to."""
    async with Owner(pki, leaf=pki.rogue) as owner:
        with pytest.raises(PeerLinkError, match="certificate verify failed"):
            await open_peer(
                "127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT
            )


async def test_open_peer_owner_certificate_for_other_name_is_refused(pki: Pki) -> None:
    """The owner's certificate must name the advertised host (here an IP it lacks)."""
    async with Owner(pki, leaf=pki.far) as owner:
        with pytest.raises(PeerLinkError, match="IP address mismatch"):
            await open_peer(
                "127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT
            )


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("leaf_name", ["rogue", "server_only", "expired"])
async def test_peer_link_unacceptable_client_certificate_is_refused_by_owner(
    pki: Pki, version: Version, leaf_name: str
) -> None:
    """A certificate from another CA, one without clientAuth, or an expired one from the
    peer CA fails the owner's handshake."""
    leaf = getattr(pki, leaf_name)
    async with Owner(pki, max_version=version) as owner:
        with pytest.raises(PeerLinkError):
            await open_peer(
                "127.0.0.1",
                owner.port,
                peer_ctx(pki, leaf, version),
                b"GET / HTTP/1.1\r\n\r\n",
                TIMEOUT,
            )
        assert owner.accepted.empty()


async def identify(owner: Owner, leaf: Leaf | None, pki: Pki) -> tuple[str | None, bool]:
    """Connect to `owner` presenting `leaf` (or nothing): (gateway identity, user allowed)."""
    ctx = ssl.create_default_context(cafile=pki.peer_ca)
    if leaf is not None:
        ctx.load_cert_chain(leaf.cert, leaf.key)
    _, client = await tls_client(owner.port, ctx)
    _, writer = await owner.next()
    ssl_object = writer.get_extra_info("ssl_object")
    client.close()
    return owner.trust.gateway_identity(ssl_object), owner.trust.user_certificate_allowed(
        ssl_object
    )


async def test_gateway_identity_client_auth_only_certificate_from_peer_ca_is_not_a_gateway(
    pki: Pki,
) -> None:
    """A user's certificate (clientAuth only) from the same CA passes TLS but is no gateway."""
    async with Owner(pki, client_ca=pki.peer_ca) as owner:
        assert await identify(owner, pki.user, pki) == (None, True)
        assert await identify(owner, pki.receiver, pki) == ("gw-recv", False)
        assert await identify(owner, None, pki) == (None, False)


async def test_gateway_identity_certificate_from_an_intermediate_is_not_a_gateway(
    pki: Pki,
) -> None:
    """A certificate with both EKUs that verifies through an intermediate under the peer CA
    (its chain sent) passes TLS, but only one issued directly by a peer_ca certificate is a
    gateway's: an intermediate (a sub-CA for other uses) issues no gateways unless listed."""
    async with Owner(pki, client_ca=pki.peer_ca) as owner:
        assert await identify(owner, pki.indirect, pki) == (None, False)


async def test_user_certificate_allowed_without_client_ca_is_false(pki: Pki) -> None:
    """With only peer_ca, no certificate it issued may log in as a user."""
    async with Owner(pki) as owner:
        assert await identify(owner, pki.user, pki) == (None, False)
        assert await identify(owner, pki.receiver, pki) == ("gw-recv", False)


async def test_gateway_identity_server_certificate_from_client_ca_is_not_a_gateway(
    pki: Pki,
) -> None:
    """A serverAuth certificate that only client_ca vouches for is a user, never a gateway."""
    async with Owner(pki, client_ca=pki.other_ca) as owner:
        assert await identify(owner, pki.rogue, pki) == (None, True)
        assert await identify(owner, pki.user, pki) == (None, False)


def test_peer_trust_missing_file_raises_config_error(pki: Pki, tmp_path: Path) -> None:
    """A missing or non-PEM CA file is an operator error naming file and key."""
    with pytest.raises(ConfigError, match=r"cluster\.peer_ca: file not found"):
        PeerTrust.load(tmp_path / "nope.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"tls\.client_ca: not PEM"):
        PeerTrust.load(pki.peer_ca, tmp_path / "bad.pem")
    with pytest.raises(ConfigError, match=r"cluster\.peer_ca"):
        trust_peer_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tmp_path / "bad.pem")
    with pytest.raises(ConfigError, match=r"tls\.cert"):
        peer_client_context(pki.receiver.cert, pki.owner.key, pki.peer_ca)


def test_trust_peer_ca_keeps_client_ca_and_asks_for_certificates(pki: Pki) -> None:
    """The listener asks for optional certificates and still trusts client_ca."""
    ctx = server_context(TlsConfig(cert=pki.owner.cert, key=pki.owner.key))
    before = ctx.verify_mode
    trust_peer_ca(ctx, pki.peer_ca)
    assert (before, ctx.verify_mode) == (ssl.CERT_NONE, ssl.CERT_OPTIONAL)
    both = server_context(TlsConfig(cert=pki.owner.cert, key=pki.owner.key, client_ca=pki.other_ca))
    trust_peer_ca(both, pki.peer_ca)
    assert both.cert_store_stats()["x509_ca"] == 2


# -- the owner's answer and the deadlines ---------------------------------------------------------


async def test_open_peer_refusal_returns_complete_response_and_closes(pki: Pki) -> None:
    """A 409 comes back whole (head and JSON body), and the link is closed."""
    body = b'{"error":"writer_exists","message":"takeover policy is deny"}\n'
    refusal = b"HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n"
    refusal += b"Content-Length: %d\r\n\r\n" % len(body) + body
    async with Owner(pki) as owner:
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (reader, writer), _, _ = await owner.next_request()
        writer.write(refusal[:20])
        await writer.drain()
        writer.write(refusal[20:])
        peer = await opening
        assert (peer.status, peer.response, peer.rest) == (409, refusal, body)
        assert peer.transport.is_closing()
        assert await at_eof(reader) == b""


async def test_open_peer_refusal_from_an_owner_that_hangs_up_at_once_is_returned(
    pki: Pki,
) -> None:
    """An owner that closes right behind its refusal (relayd does after a 429): the answer
    comes back whole, as from one that keeps the connection, even when its close_notify
    arrives with it and the link is already closing when `open_peer` takes the answer."""
    body = b'{"error":"session_limit","message":"gateway session limit 1 reached"}\n'
    refusal = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
    refusal += b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    async with Owner(pki) as owner:
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (reader, writer), _, _ = await owner.next_request()
        # The answer and the close_notify in one segment (corked: the kernel sends them together).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        writer.write(refusal)
        writer.close()
        peer = await opening
        assert (peer.status, peer.response, peer.owner) == (429, refusal, "gw-owner")
        assert peer.transport.is_closing()
        assert await at_eof(reader) == b""


async def test_open_peer_silent_listener_deadline_fires(pki: Pki) -> None:
    """A listener that never completes TLS is given up on at the deadline."""
    loop = asyncio.get_running_loop()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the TCP handshake completes in the backlog; nothing answers TLS
        port = silent.getsockname()[1]
        start = loop.time()
        with pytest.raises(PeerLinkError, match=r"no TLS connection to owner .* within 0.3 s"):
            await open_peer("127.0.0.1", port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", 0.3)
        assert 0.3 <= loop.time() - start < TIMEOUT


async def test_open_peer_owner_never_answers_deadline_fires(pki: Pki) -> None:
    """An owner that reads the request and says nothing is given up on; the link is dropped."""
    loop = asyncio.get_running_loop()
    async with Owner(pki) as owner:
        start = loop.time()
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", 0.3)
        )
        (reader, _), _, _ = await owner.next_request()
        with pytest.raises(PeerLinkError, match=r"no answer from owner .* within 0.3 s"):
            await opening
        assert 0.3 <= loop.time() - start < TIMEOUT
        assert await at_eof(reader) == b""


async def test_open_peer_half_a_head_then_close_raises(pki: Pki) -> None:
    """An owner that hangs up in the middle of its answer: PeerLinkError saying how far it got."""
    async with Owner(pki) as owner:
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (_, writer), _, _ = await owner.next_request()
        writer.write(SWITCHING[:30])
        await writer.drain()
        writer.close()
        with pytest.raises(PeerLinkError, match="closed the peer link after 30 bytes"):
            await opening


async def test_open_peer_endless_head_is_cut_at_the_cap(pki: Pki) -> None:
    """An answer head that never ends is refused once it passes the cap."""
    async with Owner(pki) as owner:
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (_, writer), _, _ = await owner.next_request()
        writer.write(b"HTTP/1.1 101 OK\r\n" + b"X-Pad: " + b"a" * 20000)
        with pytest.raises(PeerLinkError, match="exceeds 16384 bytes"):
            await opening


async def test_open_peer_closed_port_raises_peer_link_error(pki: Pki) -> None:
    """Nobody listening: PeerLinkError at once, naming the address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerLinkError, match=f"peer link to 127.0.0.1:{port} failed"):
        await open_peer("127.0.0.1", port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)


async def test_open_peer_cancelled_drops_the_link(pki: Pki) -> None:
    """A caller cancelled while waiting for the answer leaves no link behind."""
    async with Owner(pki) as owner:
        opening = asyncio.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (reader, _), _, _ = await owner.next_request()
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert await at_eof(reader) == b""


# -- the splice ---------------------------------------------------------------------------------


async def test_splice_megabytes_both_ways_are_byte_exact(pki: Pki) -> None:
    """4 MiB each way at once, the owner's early bytes and the client's pipelined ones included."""
    up, down = os.urandom(4 << 20), os.urandom(4 << 20)
    async with asyncio.TaskGroup() as tg, Owner(pki) as owner, Front(pki, owner.port, tg) as front:
        client_task = tg.create_task(console_client(pki, front, early=b"EARLY"))
        (o_reader, o_writer), fwd = await owner.accept_session(early=b"HELLO")
        assert fwd == FWD
        reader, writer = await client_task
        relay = await front.next_relay()
        assert await read_all(reader, 5) == b"HELLO"
        assert await read_all(o_reader, 5) == b"EARLY"

        async def send(w: asyncio.StreamWriter, data: bytes) -> None:
            for i in range(0, len(data), 100_000):
                w.write(data[i : i + 100_000])
                await w.drain()

        tg.create_task(send(writer, up))
        tg.create_task(send(o_writer, down))
        got_up, got_down = await asyncio.gather(
            read_all(o_reader, len(up)), read_all(reader, len(down))
        )
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
        assert relay.splice is not None
        assert relay.splice.bytes_to_peer == len(up) + 5
        assert relay.splice.bytes_to_client == len(SWITCHING) + 5 + len(down)
        writer.close()
        await relay.wait_done()
        assert relay.done == [relay.splice]


@pytest.mark.parametrize("slow", ["client", "owner"])
async def test_splice_slow_reader_keeps_buffers_bounded(pki: Pki, slow: str) -> None:
    """A side that reads slowly makes the other wait: what the relay holds stays bounded.

    Two measures: each spliced transport's write buffer, sampled after every
    send; and every byte the relay has taken in but the slow side has not yet
    read, less what the kernel holds in the relay's socket (autotuned to
    megabytes), sampled after every read: the relay's buffers, including the
    TCP transport under TLS that `get_write_buffer_size` does not count, and
    the reader's own. Without flow control both grow to megabytes.
    """
    data = os.urandom(8 << 20)
    async with (
        asyncio.TaskGroup() as tg,
        Owner(pki, small_rcvbuf=True) as owner,
        Front(pki, owner.port, tg, small_sndbuf=True) as front,
    ):
        client_task = tg.create_task(console_client(pki, front, rcvbuf=4096))
        (o_reader, o_writer), _ = await owner.accept_session()
        reader, writer = await client_task
        relay = await front.next_relay()
        assert relay.splice is not None
        spliced = relay.splice
        buffered: list[int] = []
        in_flight: list[int] = []

        async def send(w: asyncio.StreamWriter) -> None:
            for i in range(0, len(data), 65536):
                w.write(data[i : i + 65536])
                await w.drain()
                buffered.append(relay.client.get_write_buffer_size())
                buffered.append(relay.peer.transport.get_write_buffer_size())

        sender, receiver = (o_writer, reader) if slow == "client" else (writer, o_reader)
        toward_slow = (relay.client if slow == "client" else relay.peer.transport).get_extra_info(
            "socket"
        )

        def progress(received: int) -> None:
            relayed = (
                spliced.bytes_to_client - len(SWITCHING)
                if slow == "client"
                else spliced.bytes_to_peer
            )
            in_flight.append(relayed - received - kernel_send_queue(toward_slow))

        tg.create_task(send(sender))
        got = await read_all(receiver, len(data), pace=True, progress=progress)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert max(buffered) <= BUFFER_BOUND, max(buffered)
        assert max(in_flight) <= IN_FLIGHT_BOUND, max(in_flight)
        writer.close()
        await relay.wait_done()


async def test_splice_client_close_closes_owner_side(pki: Pki) -> None:
    """The client hangs up: the owner's connection ends, after what the client sent last."""
    async with asyncio.TaskGroup() as tg, Owner(pki) as owner, Front(pki, owner.port, tg) as front:
        client_task = tg.create_task(console_client(pki, front))
        (o_reader, _), _ = await owner.accept_session()
        _, writer = await client_task
        relay = await front.next_relay()
        writer.write(b"last words")
        await writer.drain()
        writer.close()
        assert await at_eof(o_reader) == b"last words"
        await relay.wait_done()
        assert len(relay.done) == 1


async def test_splice_owner_close_flushes_then_closes_client(pki: Pki) -> None:
    """The owner ends the session: the client gets every byte, then the end."""
    tail = os.urandom(1 << 20)
    async with asyncio.TaskGroup() as tg, Owner(pki) as owner, Front(pki, owner.port, tg) as front:
        client_task = tg.create_task(console_client(pki, front))
        (_, o_writer), _ = await owner.accept_session()
        reader, _ = await client_task
        relay = await front.next_relay()
        o_writer.write(tail)
        o_writer.close()
        assert await at_eof(reader) == tail
        await relay.wait_done()


async def test_splice_client_abort_ends_owner_side(pki: Pki) -> None:
    """A client whose connection is reset: the owner's connection ends too."""
    async with asyncio.TaskGroup() as tg, Owner(pki) as owner, Front(pki, owner.port, tg) as front:
        client_task = tg.create_task(console_client(pki, front))
        (o_reader, _), _ = await owner.accept_session()
        _, writer = await client_task
        relay = await front.next_relay()
        writer.transport.abort()
        assert await at_eof(o_reader) == b""
        await relay.wait_done()


async def test_splice_close_stuck_client_is_aborted_after_close_timeout(pki: Pki) -> None:
    """Closing a relay whose client reads nothing ends it at the close deadline, not never."""
    # The owner side closes at once; the client side cannot flush and is aborted.
    loop = asyncio.get_running_loop()
    async with (
        asyncio.TaskGroup() as tg,
        Owner(pki) as owner,
        Front(pki, owner.port, tg, small_sndbuf=True, close_timeout=0.5) as front,
    ):
        client_task = tg.create_task(console_client(pki, front, rcvbuf=4096))
        await owner.accept_session()
        _, writer = await client_task
        relay = await front.next_relay()
        assert relay.splice is not None
        # Bytes the client will never read, queued where the splice queues the owner's.
        relay.client.write(os.urandom(4 << 20))
        start = loop.time()
        relay.splice.close()
        await relay.wait_done()
        assert 0.5 <= loop.time() - start < TIMEOUT
        writer.transport.abort()


@pytest.mark.parametrize("join", ["splice", "relay"])
async def test_splice_stuck_client_given_up_on_is_reset_not_sent_a_fin(
    pki: Pki, join: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client the close deadline gives up on is reset: a FIN would wait behind unread bytes.

    Its socket would linger orphaned in FIN_WAIT, holding them, and the client would not
    learn of its end while it reads nothing. "relay": `Front` joins the two with
    cluster/relay.py's `relay` (no re-attachment) instead of `splice`, its own close timer.
    """
    if join == "relay":
        monkeypatch.setattr(
            f"{__name__}.splice",
            lambda client, peer, **kw: relay_session(client, peer, None, **kw),
        )
    async with (
        asyncio.TaskGroup() as tg,
        Owner(pki) as owner,
        Front(pki, owner.port, tg, small_sndbuf=True, close_timeout=0.2) as front,
    ):
        client_task = tg.create_task(console_client(pki, front, rcvbuf=4096))
        await owner.accept_session()
        reader, writer = await client_task
        relay = await front.next_relay()
        assert relay.splice is not None
        relay.client.write(os.urandom(4 << 20))  # never read
        relay.splice.close()
        await relay.wait_done()
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(ConnectionResetError):
                await reader.read()  # to the end: a FIN would come after what the kernels hold
        writer.transport.abort()


async def test_splice_refuses_a_non_101_or_a_closing_client(pki: Pki) -> None:
    """Only a 101 is spliced, and only onto a client that is still there."""
    async with asyncio.TaskGroup() as tg, Owner(pki) as owner, Front(pki, owner.port, tg) as front:
        opening = tg.create_task(
            open_peer("127.0.0.1", owner.port, peer_ctx(pki), b"GET / HTTP/1.1\r\n\r\n", TIMEOUT)
        )
        (o_reader, o_writer), _, _ = await owner.next_request()
        o_writer.write(SWITCHING)
        peer = await opening
        _, client = await tls_client(front.port, ssl.create_default_context(cafile=pki.peer_ca))
        client.transport.abort()
        closing = cast(asyncio.Transport, client.transport)
        with pytest.raises(ValueError, match="closing"):
            splice(closing, peer)
        assert await at_eof(o_reader) == b""
        refused = PeerConnection(409, b"", b"", None, peer.transport, peer._reader)
        with pytest.raises(ValueError, match="409"):
            splice(closing, refused)
