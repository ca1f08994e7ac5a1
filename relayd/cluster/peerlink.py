"""Peer links: a console session relayed to the gateway that owns the VM's port.

A gateway that receives a console request for a VM owned elsewhere
authenticates and authorizes the client itself, then:

1. opens a TLS connection to the owner's ordinary listener (its `advertise`
   address) with `peer_client_context`: it presents its own server
   certificate as a client certificate and verifies the owner's against
   `peer_ca`, host name (or IP) included;
2. sends the forwarded upgrade (forwarding.py) and reads the owner's answer
   (`open_peer`, under one deadline): a 101, or a refusal with its body;
3. on a 101, hands both transports to `splice`, which writes the owner's
   answer to the client verbatim and then relays bytes both ways. The owner's
   session produces every byte the client sees; this gateway parses none of
   them, so the contract (hello, offsets, notices, close codes) holds as is.

On the owner, the same listener serves clients and gateways. `trust_peer_ca`
makes its context ask for a client certificate (optional) and verify it
against `peer_ca` as well as any `client_ca`; `PeerTrust` then says whether a
verified certificate is a gateway's: issued directly by a `peer_ca`
certificate and carrying serverAuth in its extended key usage. A user's
certificate (clientAuth only) is never a gateway's, even from the same CA; and
`PeerTrust.user_certificate_allowed` keeps a gateway's certificate (or any
certificate only `peer_ca` vouches for) from authenticating as a user.

The relay is two `asyncio.Protocol` objects, one per transport, with
flow control through the transports' own marks: when one side's write
buffer passes its high-water mark, the other side stops being read until it
drains. So a forwarded session holds at most about two write buffers (plus
what TLS and the kernel hold), whatever the speeds. When either side ends,
cleanly or not, the other is closed after its buffer is flushed (so the
owner's close frame reaches the client), and reset (linger.py) if the flush
takes longer than `close_timeout`: a side that reads nothing would otherwise
keep the socket, orphaned, its FIN queued behind bytes nobody takes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError, PeerLinkError
from ..linger import reset_connection
from ..tls import CIPHERS_TLS12, apply_crl, read_certificates
from .forwarding import parse_response_head

__all__ = [
    "CLOSE_TIMEOUT",
    "HIGH_WATER",
    "PeerConnection",
    "PeerLinkError",
    "PeerTrust",
    "Splice",
    "check_own_certificate",
    "open_peer",
    "peer_client_context",
    "splice",
    "trust_peer_ca",
]

#: Write-buffer high-water mark of each spliced transport: reading the other side
#: stops above it.
HIGH_WATER = 65536
#: How long a side closed by its partner's end may take to flush before it is reset.
CLOSE_TIMEOUT = 10.0


# -- TLS: both ends of a peer link ---------------------------------------------------------


def peer_client_context(
    cert: Path,
    key: Path,
    peer_ca: Path,
    *,
    min_version: Literal["1.2", "1.3"] = "1.2",
    crl: Path | None = None,
) -> ssl.SSLContext:
    """The context a gateway uses to reach an owner.

    It presents `cert` (the gateway's server certificate, which must also
    allow clientAuth) and trusts only `peer_ca`, checking the owner's name
    against the host it dials (an IP address is checked against IP SANs).

    Args:
        cert, key: the gateway's own certificate chain and key (`[tls]`).
        peer_ca: the CA file that issues gateway certificates (`[cluster]`).
        min_version: the TLS floor, as `[tls] min_version`.
        crl: `[tls] crl`: an owner whose certificate it revokes is refused.

    Raises:
        ConfigError: a file cannot be loaded (the message names it and the key).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(cert), "tls.cert", f"cannot load certificate/key: {exc}") from None
    _load_cas(ctx, peer_ca)
    if crl is not None:
        apply_crl(ctx, crl)
    return ctx


def trust_peer_ca(ctx: ssl.SSLContext, peer_ca: Path) -> None:
    """Extend the listener's server context so that gateways can present certificates.

    The context asks every client for a certificate without requiring one
    (CERT_OPTIONAL, unless `client_ca` already made it so) and verifies a
    presented one against `peer_ca` in addition to `client_ca`. A presented
    certificate that verifies against neither fails the handshake. Which CA
    vouched is not visible after the handshake: ask `PeerTrust`.

    Raises:
        ConfigError: `peer_ca` cannot be loaded.
    """
    _load_cas(ctx, peer_ca)
    if ctx.verify_mode == ssl.CERT_NONE:
        ctx.verify_mode = ssl.CERT_OPTIONAL


def check_own_certificate(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    trust: PeerTrust,
    advertise_host: str,
) -> tuple[str, str] | None:
    """What keeps the other gateways from accepting this one, as they would check it.

    One handshake in memory, this gateway's certificate on both sides: the
    client side checks it as a gateway reaching this one does (`peer_ca` and
    the advertised host), the server side as an owner checks a gateway that
    relays to it (`peer_ca`, clientAuth, then `PeerTrust`: issued directly by
    a `peer_ca` certificate, serverAuth, a subject CN). Every gateway of a
    region has the same `peer_ca`, so what fails here fails on each of them.

    Args:
        server_ctx: the listener's context (`trust_peer_ca` applied).
        client_ctx: `peer_client_context(...)`.
        trust: `PeerTrust.load(peer_ca, client_ca)`.
        advertise_host: `[cluster] advertise`'s host.

    Returns:
        None when the certificate would be accepted, else the config key to
        change and what is wrong.
    """
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname=advertise_host)
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    pending = [("client", client), ("server", server)]
    for _ in range(8):  # a handshake takes a few flights; the server's ends last
        for side, end in list(pending):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLCertVerificationError as exc:
                reason = exc.verify_message
                if side == "client" and "mismatch" in reason:
                    return "cluster.advertise", (
                        f"this gateway's certificate (tls.cert) does not name {advertise_host}, "
                        f"where the other gateways reach it and check its name ({reason})"
                    )
                who = "reaching" if side == "client" else "reached by"
                return "cluster.peer_ca", (
                    f"this gateway's certificate (tls.cert) does not verify against peer_ca "
                    f"({reason}), so a gateway {who} it refuses the peer link: issue every "
                    f"gateway's certificate from the CA that peer_ca holds"
                )
            except ssl.SSLError as exc:
                return "cluster.peer_ca", f"a peer link to this gateway fails: {exc}"
            pending.remove((side, end))
        if not pending:
            break
    else:
        return "cluster.peer_ca", "a peer link to this gateway does not finish its handshake"
    if trust.gateway_identity(server) is None:
        return "tls.cert", (
            "the other gateways would not take this certificate for a gateway's: it must "
            "be issued directly by a peer_ca certificate, carry serverAuth and clientAuth, "
            "and have a subject common name"
        )
    return None


def _load_cas(ctx: ssl.SSLContext, peer_ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=peer_ca)
    except FileNotFoundError:
        raise ConfigError(str(peer_ca), "cluster.peer_ca", "file not found") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(peer_ca), "cluster.peer_ca", f"cannot load: {exc}") from None


class PeerTrust:
    """Tells, on the owner's listener, gateway certificates from user certificates.

    OpenSSL verifies a client certificate against every CA the context
    holds (`client_ca` and `peer_ca` together) and does not say which one
    vouched. So the leaf is checked again here: a gateway's is issued
    *directly* by a `peer_ca` certificate (list the issuing intermediate,
    with its root, if there is one) and carries serverAuth; a user's, in
    cluster mode, is issued directly by a `client_ca` certificate and is no
    gateway's.
    """

    def __init__(
        self,
        peer_cas: Sequence[x509.Certificate],
        client_cas: Sequence[x509.Certificate] | None = None,
    ) -> None:
        self._peer_cas = tuple(peer_cas)
        self._client_cas = None if client_cas is None else tuple(client_cas)

    @classmethod
    def load(cls, peer_ca: Path, client_ca: Path | None = None) -> PeerTrust:
        """Read the CA files (`[cluster] peer_ca`, `[tls] client_ca`).

        Raises:
            ConfigError: a file cannot be read or holds no PEM certificate.
        """
        peer_cas = read_certificates(peer_ca, "cluster.peer_ca")
        client_cas = None if client_ca is None else read_certificates(client_ca, "tls.client_ca")
        return cls(peer_cas, client_cas)

    def gateway_identity(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
        """The peer gateway's name (its certificate's subject CN), or None if it is no gateway.

        A gateway's certificate verified in the handshake, is issued directly
        by a `peer_ca` certificate, carries serverAuth in its extended key
        usage and has a subject CN.

        Args:
            ssl_object: the transport's `get_extra_info("ssl_object")`.
        """
        cert = _verified_peer_certificate(ssl_object)
        if cert is None or not _is_gateway_certificate(cert, self._peer_cas):
            return None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or not isinstance(names[0].value, str) or not names[0].value:
            return None
        return names[0].value

    def user_certificate_allowed(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bool:
        """Whether the verified client certificate may authenticate a user (`cert:<CN>`).

        Only with `client_ca` set, only for a certificate issued directly by a
        `client_ca` certificate, and never for a gateway's certificate. Without
        this check, adding `peer_ca` to the listener would let any certificate
        that CA issued log in as a user.
        """
        if self._client_cas is None:
            return False
        cert = _verified_peer_certificate(ssl_object)
        if cert is None or _is_gateway_certificate(cert, self._peer_cas):
            return False
        return _issued_by_one_of(cert, self._client_cas)


def _verified_peer_certificate(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
) -> x509.Certificate | None:
    """The peer's leaf certificate, only if the handshake verified it."""
    if ssl_object is None or not ssl_object.getpeercert():  # {} when not verified
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _is_gateway_certificate(cert: x509.Certificate, peer_cas: Sequence[x509.Certificate]) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    except ValueError:  # a malformed extension
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usage and _issued_by_one_of(cert, peer_cas)


def _issued_by_one_of(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


# -- the forwarded request and the owner's answer ----------------------------------------------


class PeerConnection:
    """An open peer link whose request the owner has answered.

    Attributes:
        status: the owner's HTTP status; 101 when it accepted the session.
        head: the owner's response head, blank line included, verbatim.
        rest: for a 101, the first bytes of the WebSocket stream that arrived
            with the head; otherwise the complete body of the refusal.
        owner: the subject CN of the owner's certificate.
        transport: the TLS transport (closed already unless the status is 101).
    """

    def __init__(
        self,
        status: int,
        head: bytes,
        rest: bytes,
        owner: str | None,
        transport: asyncio.Transport,
        reader: _ResponseReader,
    ) -> None:
        self.status = status
        self.head = head
        self.rest = rest
        self.owner = owner
        self.transport = transport
        self._reader = reader

    @property
    def response(self) -> bytes:
        """The owner's whole answer so far (head, then body or first stream bytes)."""
        return self.head + self.rest

    def abort(self) -> None:
        """Drop the link (for a 101 that will not be spliced: the client went away)."""
        self.transport.abort()


class _ResponseReader(asyncio.Protocol):
    """The peer transport's protocol until the splice: collects the owner's answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.status = 0
        self.head_length = 0
        self.body_end = 0
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.answered.done():
            return  # a 101's early stream bytes, read before pause_reading took effect
        try:
            if self.status == 0:
                head = parse_response_head(bytes(self.buf))
                if head is None:
                    return
                self.status = head.status
                self.head_length = head.length
                self.body_end = head.length + head.content_length
            if self.status == 101:
                assert self.transport is not None
                self.transport.pause_reading()  # the splice reads on, with flow control
                self.answered.set_result(None)
            elif len(self.buf) >= self.body_end:
                del self.buf[self.body_end :]
                self.answered.set_result(None)
        except PeerLinkError as exc:
            self.answered.set_exception(exc)
            assert self.transport is not None
            self.transport.abort()  # read no more of an answer already refused

    def eof_received(self) -> bool | None:
        return None  # close: an answer cut short is reported by connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if not self.answered.done():
            self.answered.set_exception(
                PeerLinkError(
                    f"owner closed the peer link after {len(self.buf)} bytes of its answer"
                )
            )


async def open_peer(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    head: bytes,
    timeout: float,  # noqa: ASYNC109 - it also bounds the TLS handshake, and errors name it
) -> PeerConnection:
    """Connect to an owner, send a forwarded request and read its answer.

    Args:
        host, port: the owner's `advertise` address (an IPv6 host without brackets);
            `host` is also the name its certificate must carry.
        ssl_ctx: `peer_client_context(...)`.
        head: `forwarding.encode_forwarded_request(...)`.
        timeout: one deadline for the connection, the TLS handshake and the
            whole answer (the head, and a refusal's body).

    Returns:
        The link, answered. For a 101 its transport is open with reading
        paused: pass it to `splice` (or `abort` it). For any other status the
        transport is already closed and `response` is the complete answer,
        ready to be passed on to the client.

    Raises:
        PeerLinkError: the owner cannot be reached in time, its certificate
            does not verify, or its answer is late, too large or malformed.
    """
    loop = asyncio.get_running_loop()
    reader = _ResponseReader()
    transport: asyncio.Transport | None = None
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: reader,
                host,
                port,
                ssl=ssl_ctx,
                server_hostname=host,
                ssl_handshake_timeout=timeout,
            )
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.write(head)
            await reader.answered
    except TimeoutError:
        _drop(reader, transport)
        stage = "answer from" if transport is not None else "TLS connection to"
        raise PeerLinkError(f"no {stage} owner {where} within {timeout:g} s") from None
    except PeerLinkError as exc:
        _drop(reader, transport)
        raise PeerLinkError(f"owner {where}: {exc}") from None
    except (OSError, ssl.SSLError) as exc:  # SSLCertVerificationError is both
        _drop(reader, transport)
        raise PeerLinkError(f"peer link to {where} failed: {exc}") from None
    except BaseException:  # cancelled: the link must not outlive its caller
        _drop(reader, transport)
        raise
    assert transport is not None
    head_bytes = bytes(reader.buf[: reader.head_length])
    rest = bytes(reader.buf[reader.head_length :])
    reader.buf.clear()
    owner = _owner_name(transport)
    # An owner that hung up right behind its refusal (after a 429) has closed the link
    # already: a second close() makes asyncio's TLS transport (3.11) forget its protocol,
    # and every call on it then raises.
    if reader.status != 101 and not transport.is_closing():
        transport.close()
    return PeerConnection(reader.status, head_bytes, rest, owner, transport, reader)


def _drop(reader: _ResponseReader, transport: asyncio.Transport | None) -> None:
    """Abandon a link that failed; the answer's future is settled so nothing logs it later."""
    reader.answered.cancel()
    if transport is not None:
        transport.abort()


def _owner_name(transport: asyncio.Transport) -> str | None:
    cert = transport.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None


# -- the splice --------------------------------------------------------------------------------

Side = Literal["client", "peer"]


class _End(asyncio.Protocol):
    """One transport of a splice: what it reads is written to the other end."""

    def __init__(self, splice: Splice, side: Side, transport: asyncio.Transport) -> None:
        self.splice = splice
        self.side = side
        self.transport = transport
        self.other: _End = self  # set once both ends exist
        self.lost = False
        self.close_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        out = self.other.transport
        if out.is_closing():
            return  # the other side is going; nothing more can reach it
        out.write(data)
        self.splice._count(self.side, len(data))

    def eof_received(self) -> bool | None:
        return None  # no half-close over TLS: connection_lost follows

    def pause_writing(self) -> None:
        """This side's buffer passed its mark: stop reading the side that fills it."""
        if not self.other.transport.is_closing():
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        """See `pause_writing`."""
        if not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice._lost(self, exc)

    def close(self, close_timeout: float) -> None:
        """Flush, then close; reset if the flush takes longer than `close_timeout`."""
        if self.lost or self.close_timer is not None:
            return
        # Never close twice: asyncio's SSL transport (3.11) forgets its connection on a second
        # close(), after which abort() does nothing and the socket leaks.
        if not self.transport.is_closing():
            self.transport.close()
        loop = asyncio.get_running_loop()
        self.close_timer = loop.call_later(close_timeout, reset_connection, self.transport)

    def abort(self) -> None:
        if not self.lost:
            reset_connection(self.transport)


class Splice:
    """A client transport and a peer link, relayed to each other until either ends.

    Attributes:
        bytes_to_peer: bytes relayed from the client to the owner.
        bytes_to_client: bytes relayed from the owner to the client (the
            owner's answer included).
        closed: done when both transports are gone.
    """

    def __init__(
        self,
        client: asyncio.Transport,
        peer: PeerConnection,
        *,
        on_done: Callable[[Splice], None] | None,
        close_timeout: float,
    ) -> None:
        self.bytes_to_peer = 0
        self.bytes_to_client = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._on_done = on_done
        self._close_timeout = close_timeout
        self._client = _End(self, "client", client)
        self._peer = _End(self, "peer", peer.transport)
        self._client.other = self._peer
        self._peer.other = self._client

    def close(self) -> None:
        """End the relay: flush and close both sides (reset after `close_timeout`)."""
        self._client.close(self._close_timeout)
        self._peer.close(self._close_timeout)

    def abort(self) -> None:
        """End the relay at once: both connections reset, whatever is buffered dropped."""
        self._client.abort()
        self._peer.abort()

    async def wait_closed(self) -> None:
        """Wait until both transports are gone."""
        await asyncio.shield(self.closed)

    def _count(self, from_side: Side, n: int) -> None:
        if from_side == "client":
            self.bytes_to_peer += n
        else:
            self.bytes_to_client += n

    def _start(self, peer: PeerConnection, client_data: bytes, high_water: int) -> None:
        client, link = self._client.transport, self._peer.transport
        for end in (self._client, self._peer):
            end.transport.set_write_buffer_limits(high=high_water)
        client.set_protocol(self._client)
        self._write(self._client, peer.response)
        self.bytes_to_client += len(peer.response)
        reader = peer._reader
        if reader.buf:  # stream bytes that arrived after open_peer returned
            self._write(self._client, bytes(reader.buf))
            self.bytes_to_client += len(reader.buf)
            reader.buf.clear()
        if reader.lost:  # the owner hung up between its answer and now
            self._lost(self._peer, reader.lost_exc)
            return
        link.set_protocol(self._peer)
        if client_data:
            self._write(self._peer, client_data)
            self.bytes_to_peer += len(client_data)
        # A transport paused before our protocols took over tells them nothing until it
        # drains (then resume_writing reaches us); so read a side only while the other's
        # buffer is below its mark.
        for end in (self._client, self._peer):
            if end.transport.get_write_buffer_size() <= high_water:
                end.other.transport.resume_reading()

    @staticmethod
    def _write(end: _End, data: bytes) -> None:
        if not end.transport.is_closing():
            end.transport.write(data)

    def _lost(self, end: _End, exc: Exception | None) -> None:
        end.lost = True
        if end.close_timer is not None:
            end.close_timer.cancel()
            end.close_timer = None
        other = end.other
        if not other.lost:
            # Flush even after a reset: what this side sent before it went (a close frame
            # with its code, say) belongs to the other side.
            other.close(self._close_timeout)
            return
        if not self.closed.done():
            self.closed.set_result(None)
            if self._on_done is not None:
                self._on_done(self)


def splice(
    client: asyncio.Transport,
    peer: PeerConnection,
    *,
    client_data: bytes = b"",
    on_done: Callable[[Splice], None] | None = None,
    high_water: int = HIGH_WATER,
    close_timeout: float = CLOSE_TIMEOUT,
) -> Splice:
    """Relay a client to the owner: the owner's answer first, then bytes both ways.

    Takes over `client` (its protocol is replaced) and `peer.transport`.
    The owner's answer (`peer.response`) is written to the client first, so
    the caller writes nothing itself. Reading resumes on both sides (also on
    a client whose reading the HTTP layer had paused).

    Args:
        client: the client's TLS transport, open (`not client.is_closing()`).
        peer: a 101 answer from `open_peer`.
        client_data: bytes the client sent after its upgrade request
            (h11's trailing data); they go to the owner first.
        on_done: called once, with the splice, when both transports are gone.
        high_water: each transport's write-buffer mark; above it the other
            side is not read.
        close_timeout: how long a side may take to flush after the other ended.

    Raises:
        ValueError: `peer` is not a 101, or `client` is closing (the peer
            link is aborted then; the caller forgets the client as it would
            anyway).
    """
    if peer.status != 101:
        raise ValueError(f"only a 101 answer can be spliced, not {peer.status}")
    if client.is_closing():
        peer.abort()
        raise ValueError("the client transport is closing")
    relay = Splice(client, peer, on_done=on_done, close_timeout=close_timeout)
    relay._start(peer, client_data, high_water)
    return relay
