"""One client connection after TLS: HTTP/1.1 requests, then maybe a console session.

h11 parses requests (with a cap on header size and body size); plain requests
go to the owner's router, and a WebSocket upgrade on the console route to
the owner's admission (authentication, authorization, the takeover policy),
all *before* the 101, so a refusal is a plain HTTP status with a JSON body.
After the 101 the connection hands its transport to a `ConsoleSession`.

This module is HTTP mechanics only: what it needs of the gateway is the
`ConnectionOwner` protocol below, so it never imports its caller.

Every phase has a deadline: the request head must arrive within the
handshake timeout, and an idle keep-alive connection is closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import parse_qs, urlsplit

import h11
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from . import control
from .auth import Principal
from .cluster.forwarding import SessionClocks
from .cluster.relay import (
    MoveRefused,
    Reattach,
    Relay,
    adopt,
    reach_owner,
    refusal_close_code,
    relay,
)
from .config import Config, Role
from .errors import (
    ConflictError,
    OwnerUnavailableError,
    PeerError,
    PeerLinkError,
    ServiceUnavailableError,
)
from .http import HttpResponse, Request, encode_response, raw_error
from .hub import ConsoleHub
from .linger import reset_connection
from .log import get_logger
from .session import WS_LOGGER, ConsoleSession
from .tls import peer_certificate

log = get_logger("relayd.connection")

MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 65536
# What a client may send while its request is being answered: the owner of a forwarded
# console may take seconds to answer, and the bytes would pile up in h11 meanwhile.
# Past this, the client is not read until the answer is out.
MAX_PENDING_BYTES = 65536


CONSOLE_PATH = re.compile(r"^/v1/vms/([A-Za-z0-9][A-Za-z0-9._-]{0,127})/console$")
# Sent with every plain answer unless the answer sets the header itself.
DEFAULT_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Strict-Transport-Security", "max-age=31536000"),
)


def console_vm(path: str) -> str | None:
    """The VM id of the WebSocket console route, or None for any other path."""
    m = CONSOLE_PATH.match(path)
    return None if m is None else m.group(1)


@dataclass(frozen=True)
class ConsoleGrant:
    """An admitted console session: everything the upgrade needs, decided by the owner."""

    hub: ConsoleHub
    principal: Principal
    role: Role
    session_id: str
    want_writer: bool
    resume_from: int | None
    peer: str  # the client's real address, for audit (a forwarded session's, too)
    relayed: bool = False  # another gateway relays the client (and can move it)
    reattach: Reattach | None = None  # cluster: how the session follows a VM that moves away
    here: MoveHere | None = None  # cluster: admit it again here, should the VM come here
    clocks: SessionClocks | None = None  # a session that moved: its own; None: from now


@dataclass(frozen=True)
class ForwardGrant:
    """An admitted session for a VM another gateway owns: relay the client to it.

    `head` is the forwarded upgrade (cluster/forwarding.py); the owner's
    answer, a 101 or a refusal, goes to the client as the owner sent it.
    """

    host: str
    port: int
    head: bytes
    ssl_context: ssl.SSLContext
    timeout: float
    reattach: Reattach | None = None  # how to follow the session to the VM's next owner
    here: MoveHere | None = None  # admit it here, should this gateway become the owner
    session: tuple[str, str] | None = None  # (session id, principal id), for the caps


#: Admits a moving session at this gateway, resuming at an offset as the writer or not,
#: with its clocks (`PeerError` if it may not: 409 for a writer under `deny`, 503
#: without the hub).
MoveHere = Callable[[int, bool, SessionClocks], ConsoleGrant]

#: How long a session that moves here waits for the VM's port to come up (the
#: ownership round that named this gateway has just opened it: milliseconds, unless
#: the port is down). Well within the move's own wait (3 x lease_ttl + 2 s), which
#: closes the client when it runs out.
PORT_UP_WAIT = 1.0


class ConnectionOwner(Protocol):
    """What a connection needs of the gateway that accepted it."""

    @property
    def config(self) -> Config:
        """The configuration in force (deadlines and queue sizes)."""

    @property
    def draining(self) -> bool:
        """True once shutdown began: new requests get 503."""

    def admit_connection(self, peer: str) -> PeerError | None:
        """Count a new connection; the refusal for its first request, if any."""

    def check_client(self, peer: str) -> None:
        """Raise `PeerError` when the address may not use the gateway."""

    async def handle(self, request: Request) -> HttpResponse:
        """Answer a plain request, or raise `PeerError`."""

    def peer_identity(self, transport: asyncio.Transport) -> tuple[str | None, str | None]:
        """(user certificate CN, peer gateway id) of a verified client certificate."""

    async def open_console(self, request: Request) -> ConsoleGrant | ForwardGrant:
        """Admit a console upgrade (every check before the 101), or raise `PeerError`."""

    def connection_opened(self, conn: HttpConnection) -> None:
        """A connection is live (for drain and metrics)."""

    def session_moved(self, session: ConsoleSession) -> None:
        """A session ended here, its client now relayed to the VM's next owner."""

    def session_started(self, session: ConsoleSession) -> None:
        """A console session began on a connection."""

    def connection_closed(self, conn: HttpConnection) -> None:
        """A connection (and its session, if any) ended."""


class HttpConnection(asyncio.Protocol):
    """HTTP on a TLS (or, for tests of the health port, plain) transport."""

    def __init__(self, owner: ConnectionOwner, *, peer: str | None = None) -> None:
        self.owner = owner
        self.peer = peer or "-"
        self.transport: asyncio.Transport | None = None
        self.session: ConsoleSession | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._deadline: asyncio.TimerHandle | None = None
        self._cert_cn: str | None = None
        self._gateway: str | None = None
        self._relay: Relay | None = None
        self._here: MoveHere | None = None  # cluster: see `_take_here`
        self._relayed_session: tuple[str, str] | None = None  # see `relayed_session`
        self._switched = False  # a 101 went out: no HTTP answer may follow
        self._cert_not_after: float | None = None
        self._http_paused = False
        self._pending = 0  # bytes received while the current request is being answered
        self._reading_held = False  # not read until the answer is out (`MAX_PENDING_BYTES`)
        # The request being answered (the owner may wait on Redis); the next one waits.
        self._serving: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the request deadline."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peername = self.transport.get_extra_info("peername")
        if self.peer == "-" and isinstance(peername, tuple):
            self.peer = str(peername[0])
        self._cert_cn, self._gateway = self.owner.peer_identity(self.transport)
        _, self._cert_not_after = _client_cert(self.transport)
        self.owner.connection_opened(self)
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        """Feed HTTP (after the upgrade the session is the transport's protocol)."""
        self._h11.receive_data(data)
        if self._serving is not None:
            self._pending += len(data)
            if self._pending > MAX_PENDING_BYTES and not self._reading_held:
                self._reading_held = True
                assert self.transport is not None
                self.transport.pause_reading()
        self._process()

    def _release_reading(self) -> None:
        """The answer is out (or the transport is handed on): read the client again."""
        if self._reading_held:
            self._reading_held = False
            transport = self.transport
            if transport is not None and not transport.is_closing() and not self._http_paused:
                transport.resume_reading()

    def eof_received(self) -> bool | None:
        """Peer half-closed: let h11 know, then close."""
        self._h11.receive_data(b"")
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection ended before (or without) a session."""
        if self._serving is not None:
            self._serving.cancel()
        self._forget()

    def _forget(self) -> None:
        """Forget the connection: its transport is gone (a session's, or the HTTP phase's)."""
        self._cancel_deadline()
        self.owner.connection_closed(self)

    def pause_writing(self) -> None:
        """The client is not reading its answers: stop reading its requests until it does."""
        self._http_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """See `pause_writing`."""
        self._http_paused = False
        if self.transport is not None and not self.transport.is_closing():
            if not self._reading_held:
                self.transport.resume_reading()
            self._process()

    # -- deadlines ------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(
            self.owner.config.gateway.handshake_timeout, self._deadline_passed
        )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is not None and self.session is None:
            log.info("request_timeout", peer=self.peer)
            reset_connection(self.transport)  # nothing lingers for a client that may read nothing

    # -- HTTP ---------------------------------------------------------------------------

    def _process(self) -> None:
        # Not while the client is not reading its answers: pipelined requests wait in h11
        # and the socket is not read (pause_writing), so memory stays bounded.
        while (
            self.session is None
            and self.transport is not None
            and not self._http_paused
            and self._serving is None
            and self._relay is None
        ):
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._send_raw_error(exc.error_status_hint, "bad_request", str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                # h11 caps a head that arrives in pieces; this caps one that arrives whole.
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > MAX_HEAD_BYTES:
                    self._send_raw_error(431, "too_large", f"head exceeds {MAX_HEAD_BYTES} bytes")
                    return
                self._request = event
                self._body.clear()
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY_BYTES:
                    self._send_raw_error(413, "too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _dispatch(self) -> None:
        assert self._request is not None
        self._cancel_deadline()
        raw = self._request
        target = raw.target.decode("ascii", "replace")
        try:
            parts = urlsplit(target)
        except ValueError:  # e.g. "//[": an unclosed IPv6 literal
            self._send_response(HttpResponse.error(PeerError("malformed request target")))
            return
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        lines = tuple(
            (name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw.headers
        )
        request = Request(
            raw.method.decode("ascii", "replace"),
            parts.path,
            query,
            dict(lines),
            bytes(self._body),
            self.peer,
            self._cert_cn,
            self._gateway,
            self._cert_not_after,
            lines,
        )
        try:
            if self.owner.draining:
                raise ServiceUnavailableError("the gateway is shutting down")
            if self._gateway is None:
                # A gateway is no client: the owner checks the address of a client it relays
                # (`Relayd-Forwarded-For`) when it admits the session.
                self.owner.check_client(self.peer)
        except PeerError as exc:
            self._send_response(HttpResponse.error(exc))
            return
        self._pending = 0
        self._serving = asyncio.get_running_loop().create_task(self._serve(request, raw))

    async def _serve(self, request: Request, raw: h11.Request) -> None:
        """Answer one request (the owner may wait on shared state), then read the next."""
        try:
            try:
                if request.method == "GET" and console_vm(request.path) is not None:
                    grant = await self.owner.open_console(request)
                    if not isinstance(grant, ForwardGrant):
                        if self.transport is not None and not self.transport.is_closing():
                            self._upgrade(request, raw, grant)
                        return
                    refusal = await self._forward(grant)
                    if refusal is None:
                        return
                    response = refusal
                else:
                    response = await self.owner.handle(request)
            except PeerError as exc:
                response = HttpResponse.error(exc)
            except Exception:  # a bug: answer 500 and log it once, never a silent close
                log.exception("request_failed", peer=self.peer, path=request.path[:100])
                if self._switched:
                    # The stream is WebSocket now: HTTP bytes would be garbage to the client.
                    if self.transport is not None:
                        reset_connection(self.transport)
                    return
                response = HttpResponse.json(
                    500, {"error": "internal", "message": "internal error; see the gateway log"}
                )
            if self.transport is not None and not self.transport.is_closing():
                self._send_response(response)
        finally:
            self._serving = None
            self._release_reading()
        self._process()

    def _send_response(self, response: HttpResponse) -> None:
        assert self.transport is not None
        head_only = self._request is not None and self._request.method == b"HEAD"
        if response.status == 429:
            # A client told to slow down gets no more requests on this connection (h11 then
            # leaves the connection in MUST_CLOSE, and it is closed below).
            response.headers.append(("Connection", "close"))
        try:
            out = encode_response(
                self._h11, response, head_only=head_only, defaults=DEFAULT_HEADERS
            )
        except h11.LocalProtocolError:
            self._close()
            return
        self.transport.write(out)
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()  # _process's loop goes on with a pipelined request
            self._arm_deadline()
        else:
            self._close()

    def _send_raw_error(self, status: int, code: str, message: str) -> None:
        """An error when h11 cannot frame a response (the request itself was broken)."""
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(raw_error(status, code, message))
        self._close()

    def _close(self) -> None:
        """Close once. asyncio's TLS transport forgets its protocol on a second close(), and
        every later call on it raises: the listener's own, in debug mode, took it down."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- the console upgrade ------------------------------------------------------------

    def _upgrade(self, request: Request, raw: h11.Request, grant: ConsoleGrant) -> None:
        """Switch protocols for an admitted session and hand the transport over.

        Raises:
            PeerError: the request is not a valid WebSocket upgrade.
        """
        assert self.transport is not None
        ws_request = WsRequest(
            request.path,
            Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw.headers]),
        )
        handshake = ServerProtocol(
            subprotocols=[Subprotocol(control.SUBPROTOCOL)], logger=WS_LOGGER
        )
        response = handshake.accept(ws_request)
        if response.status_code != 101:
            body = response.body.decode("utf-8", "replace").strip()
            raise PeerError(body or "not a valid WebSocket upgrade", code="bad_upgrade")
        self.transport.write(response.serialize())
        self._switched = True
        leftover, _ = self._h11.trailing_data
        self._start_session(grant, bytes(leftover))

    def _start_session(
        self,
        grant: ConsoleGrant,
        leftover: bytes,
        *,
        moved_here: tuple[str, ...] | None = None,
        hold_until: float | None = None,
    ) -> None:
        """Hand the transport to a new session; `moved_here`: it came with its console from
        another gateway (no hello: these notices, if any, then the stream from its offset);
        `hold_until`: the deadline (loop time) of the input its relay held for an owner's
        port already (None: none did)."""
        assert self.transport is not None
        self._release_reading()  # before the session, which may hold reading back itself
        self._here = grant.here
        session = ConsoleSession(
            transport=self.transport,
            hub=grant.hub,
            session_id=grant.session_id,
            principal=grant.principal,
            role=grant.role,
            peer=grant.peer,
            region=self.owner.config.gateway.region,
            output_queue_bytes=self.owner.config.limits.output_queue_bytes,
            relayed=grant.relayed,
        )
        self.session = session
        self.owner.session_started(session)
        # From here the transport talks to the session (compiled) directly: no hop through
        # this interpreted protocol per keystroke. Its end comes back via `on_lost`.
        session.on_lost = self._forget
        reattach = grant.reattach
        if reattach is not None:
            session.on_move = lambda: self._move(session, reattach)
        self.transport.set_protocol(session)  # type: ignore[arg-type]
        if moved_here is not None:
            # The relay may have held its reading back; resumed first, so a pause the
            # session makes on the held input below is the one that stands.
            self.transport.resume_reading()
        for notice in moved_here or ():
            session.send_text(notice)
        clocks = grant.clocks
        session.start(
            want_writer=grant.want_writer,
            resume_from=grant.resume_from,
            hello=moved_here is None,
            started=None if clocks is None else clocks.started,
            last_active=None if clocks is None else clocks.last_active,
            warned=None if clocks is None else clocks.warned,
        )
        hold = 0.0
        if moved_here is not None and not grant.hub.port_up:  # the input waits, as a relay's
            hold = control.MOVED_INPUT_WAIT
            if hold_until is not None:  # no longer in all than it would have waited there
                hold = hold_until - asyncio.get_running_loop().time()
        if hold > 0:
            session.hold_input(leftover, hold)
        elif leftover:
            session.data_received(leftover)

    async def _forward(self, grant: ForwardGrant) -> HttpResponse | None:
        """Relay the client to the VM's owner: its 101 verbatim, then bytes both ways.

        Returns:
            The owner's refusal (409, 403, ...), to answer as this connection answers any
            request (the same bytes, and the connection kept for the next request, as the
            owner keeps a client's own); None once relayed (or the client is gone).

        Raises:
            PeerError: (503) the owner cannot be reached; the client may retry.
        """
        # Counted in this gateway's caps from its admission (no await since the check):
        # sessions admitted while others wait for their owners never pass the cap.
        self._relayed_session = grant.session
        try:
            peer, reattach = await reach_owner(
                grant.host, grant.port, grant.head, grant.ssl_context, grant.timeout, grant.reattach
            )
        except PeerLinkError as exc:
            self._relayed_session = None
            log.warning("peer_link_failed", peer=self.peer, error=str(exc))
            raise OwnerUnavailableError(
                "the gateway that owns this console cannot be reached; try again"
            ) from None
        except BaseException:
            self._relayed_session = None
            raise
        transport = self.transport
        if transport is None or transport.is_closing():
            self._relayed_session = None
            peer.abort()
            return None
        if peer.status != 101:  # a refusal: the link is closed already, never spliced
            self._relayed_session = None
            return _refusal(peer.status, peer.head, peer.rest)
        leftover, _ = self._h11.trailing_data
        self._cancel_deadline()
        self._release_reading()  # before the relay, which may hold reading back itself
        self._here = grant.here
        self._switched = True  # the relay writes the owner's 101 first
        self._relay = relay(
            transport,
            peer,
            reattach,
            client_data=bytes(leftover),
            on_done=self._relayed,
            on_here=self._take_here if grant.here is not None else None,
        )
        return None

    def _move(self, session: ConsoleSession, reattach: Reattach) -> None:
        """The VM moved away and the session ended here: relay the client to its next owner."""
        self.session = None
        self._relayed_session = (session.session_id, session.principal.id)
        self.owner.session_moved(session)
        transport = self.transport
        if transport is None or transport.is_closing():
            self._forget()
            return
        held, hold_until = session.held_input()  # keys it held for the port follow it
        self._relay = adopt(
            transport,
            reattach,
            position=session.cursor,
            writer=session.role == "writer",
            held=held,
            hold_until=hold_until,
            clocks=SessionClocks(session.started, session.last_input, session.idle_warned_at),
            on_done=self._relayed,
            on_here=self._take_here if self._here is not None else None,
        )

    async def _take_here(self, moving: Relay) -> bool:
        """The VM a relayed client follows came to this gateway: serve it here, not through a
        peer link to ourselves. False (try again next round) while this gateway does not
        hold the VM's hub.

        The round that named this gateway has just opened the port: the client's held
        keys go to the session once it is up, so it waits for that up to `PORT_UP_WAIT`.
        A port that stays down does not keep the client from its session (as at any
        owner, `port_up` comes when the port does): waiting longer would close it when
        the move's own wait runs out. Its input then waits in the session instead
        (`ConsoleSession.hold_input`), as a relay holds it for a new owner elsewhere.

        Raises:
            MoveRefused: this gateway refuses the session (its access rules, its caps).
        """
        here, vm, position = self._here, moving.vm, moving.position
        if here is None or vm is None or position is None:
            return False
        admitted = _admit_here(here, position, moving.writer, moving.clocks)
        if admitted is None:
            return False
        hub = admitted[0].hub
        if not hub.port_up:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PORT_UP_WAIT):
                    await _port_up(hub)
            # Again, with the same refusals: anything may have changed meanwhile (a writer
            # came under `deny`, the caps filled, the VM moved on).
            admitted = _admit_here(here, position, moving.writer, moving.clocks)
            if admitted is None:
                return False
        grant, notices = admitted
        transport = self.transport
        if transport is None or transport.is_closing() or moving is not self._relay:
            return False
        hold_until = moving.hold_deadline  # input it held for an owner's port already
        # A hub whose output ends before `position` (its log lost what the client saw: a
        # Redis that lost its data) resumes the session at its end, and the session says
        # so with `offsets_reused`, as it answers a `?from=` past the end.
        if grant.hub.port_up:
            notices.append(control.encode_notice("port_up", vm=vm))
        leftover = moving.release_client()
        self._relay = None
        self._relayed_session = None  # a session here from now on, counted as one
        self._start_session(grant, leftover, moved_here=tuple(notices), hold_until=hold_until)
        return True

    def peer_certificate(self) -> bytes | None:
        """The client's certificate (DER), verified at the handshake; None if it had none."""
        return None if self.transport is None else peer_certificate(self.transport)

    def owner_certificate(self) -> bytes | None:
        """The certificate (DER) of the owner a relayed session is linked to, if any."""
        return None if self._relay is None else self._relay.owner_certificate()

    @property
    def gateway(self) -> str | None:
        """The peer gateway this connection comes from (its certificate's name), if any."""
        return self._gateway

    def end(self, code: int, reason: str) -> None:
        """End what this connection carries with `code`: its session here, the session it
        relays, or its request (which has no close code to hear)."""
        if self.session is not None:
            self.session.close(code, reason)
        elif self._relay is not None:
            self._relay.end(code, reason)
        elif self.transport is not None:
            self.transport.close()

    def going_away(self, reason: str) -> None:
        """The gateway stops: a relayed session is closed with 1001 (others end with it)."""
        if self._relay is not None:
            self._relay.going_away(reason)

    def notify(self, text: str) -> None:
        """Pass a notice to a relayed session's client (the gateway drains)."""
        if self._relay is not None:
            self._relay.notify(text)

    @property
    def relayed_vm(self) -> str | None:
        """The VM of a session relayed to its owner (None: no relay, or one that cannot move)."""
        return None if self._relay is None else self._relay.vm

    def close_moving(self, code: int, reason: str) -> bool:
        """Close a relayed client waiting for its console's next owner (see `Relay`)."""
        return self._relay is not None and self._relay.close_moving(code, reason)

    @property
    def relayed_session(self) -> tuple[str, str] | None:
        """(session id, principal id) of the client session this connection relays to
        another gateway, or is about to (its owner being reached): the gateway's caps
        count it (`Gateway.session_counts`)."""
        return self._relayed_session

    @property
    def relaying(self) -> bool:
        """Whether this connection is a session relayed to the VM's owner."""
        return self._relay is not None

    def owners_moved(self, owners: Mapping[str, str]) -> None:
        """The region names new owners (vm -> gateway): a session relayed elsewhere follows."""
        relay = self._relay
        if relay is not None and relay.vm is not None and relay.vm in owners:
            relay.owner_moved(owners[relay.vm])

    def _relayed(self, relay: Relay) -> None:
        """Both ends of a relayed session are gone."""
        self._forget()


def _refusal(status: int, head: bytes, body: bytes) -> HttpResponse:
    """An owner's refusal of a forwarded upgrade, as this gateway's own answer.

    The owner framed it as this module frames every answer (`_send_response`), so
    framing it again gives the same bytes; only framing and connection headers are
    left to this connection's h11, which decides keep-alive for the client's request.
    """
    content_type = "application/json"
    headers: list[tuple[str, str]] = []
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        lower = name.lower()
        if lower == "content-type":
            content_type = value
        elif lower not in ("", "content-length", "connection") and (
            (name, value) not in DEFAULT_HEADERS
        ):
            headers.append((name, value))
    return HttpResponse(status, body, content_type, headers)


def _admit_here(
    here: MoveHere, position: int, writer: bool, clocks: SessionClocks
) -> tuple[ConsoleGrant, list[str]] | None:
    """Admit a moving session here (see `HttpConnection._take_here`): its grant and the
    notices it gets first; None while this gateway does not hold the VM.

    Raises:
        MoveRefused: this gateway refuses the session (its access rules, its caps).
    """
    notices: list[str] = []
    try:
        try:
            grant = here(position, writer, clocks)
        except ConflictError:  # `deny` and a writer here: spectate, and say why
            if not writer:
                raise
            grant = here(position, False, clocks)
            notices.append(
                control.encode_notice("demoted", by=None, writer=None, reason="writer_exists")
            )
    except OwnerUnavailableError:
        return None  # not (or no longer) the owner here: the next round says who is
    except PeerError as exc:
        code = refusal_close_code(exc.http_status, exc.code)
        raise MoveRefused(f"this gateway refused the session ({exc.http_status})", code) from None
    return grant, notices


async def _port_up(hub: ConsoleHub) -> None:
    """Wait until the hub's serial port is up."""
    while not hub.port_up:
        await hub.next_change()


def client_cert_cn(transport: asyncio.Transport) -> str | None:
    """The subject CN of a verified client certificate, if one was presented."""
    return _client_cert(transport)[0]


def _client_cert(transport: asyncio.Transport) -> tuple[str | None, float | None]:
    """The subject CN and notAfter of a verified client certificate, if one was presented."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None, None
    cert = ssl_object.getpeercert()
    if not cert:
        return None, None
    not_after = cert.get("notAfter")
    expires = ssl.cert_time_to_seconds(not_after) if isinstance(not_after, str) else None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value), expires
    return None, None
