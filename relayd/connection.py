"""One client connection after TLS: HTTP/1.1 requests, then maybe a console session.

h11 parses requests (with a cap on header size and body size); plain API
requests are answered by `api.py`; a WebSocket upgrade on the console route
is authenticated, authorized and checked against the takeover policy
*before* the 101, so a refusal is a plain HTTP status with a JSON body. After
the 101 the connection hands its transport to a `ConsoleSession`.

Every phase has a deadline: the request head must arrive within the
handshake timeout, and an idle keep-alive connection is closed after it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs, urlsplit

import h11
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from . import api, control
from .audit import audit
from .errors import ConflictError, PeerError
from .lease import Denied
from .log import get_logger
from .rbac import at_least
from .session import WS_LOGGER, ConsoleSession

if TYPE_CHECKING:
    from .app import Gateway

log = get_logger("relayd.connection")

MAX_HEAD_BYTES = 16384
MAX_BODY_BYTES = 65536


@dataclass
class HttpResponse:
    """A complete response for a non-upgrade request."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, obj: object, **headers: str) -> HttpResponse:
        """A JSON body."""
        body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        return cls(status, body, headers=[(k.replace("_", "-"), v) for k, v in headers.items()])

    @classmethod
    def error(cls, exc: PeerError) -> HttpResponse:
        """The contract's `{"error": CODE, "message": TEXT}` body for a peer error."""
        response = cls.json(exc.http_status, {"error": exc.code, "message": exc.message})
        if exc.http_status == 401:
            response.headers.append(("WWW-Authenticate", 'Bearer realm="relayd"'))
        if exc.allow is not None:
            response.headers.append(("Allow", exc.allow))
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response.headers.append(("Retry-After", str(max(1, round(retry_after)))))
        return response


@dataclass(frozen=True)
class Request:
    """What the API handlers see of a request."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str
    client_cert_cn: str | None = None


class ClientConnection(asyncio.Protocol):
    """HTTP on a TLS (or, for tests of the health port, plain) transport."""

    def __init__(self, gateway: Gateway, *, peer: str | None = None) -> None:
        self.gateway = gateway
        self.peer = peer or "-"
        self.transport: asyncio.Transport | None = None
        self.session: ConsoleSession | None = None
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._deadline: asyncio.TimerHandle | None = None
        self._cert_cn: str | None = None
        self._refusal: PeerError | None = None
        self._http_paused = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the request deadline."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        peername = self.transport.get_extra_info("peername")
        if self.peer == "-" and isinstance(peername, tuple):
            self.peer = str(peername[0])
        self._cert_cn = _client_cert_cn(self.transport)
        self._refusal = self.gateway.admit_connection(self.peer)
        self.gateway.connections.add(self)
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        """Feed HTTP (after the upgrade the session is the transport's protocol)."""
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        """Peer half-closed: let h11 know, then close."""
        self._h11.receive_data(b"")
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection ended before (or without) a session."""
        self._forget()

    def _forget(self) -> None:
        """Forget the connection: its transport is gone (a session's, or the HTTP phase's)."""
        self._cancel_deadline()
        self.gateway.connection_closed(self)

    def pause_writing(self) -> None:
        """The client is not reading its answers: stop reading its requests until it does."""
        self._http_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """See `pause_writing`."""
        self._http_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    # -- deadlines ------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(
            self.gateway.config.gateway.handshake_timeout, self._deadline_passed
        )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is not None and self.session is None:
            log.info("request_timeout", peer=self.peer)
            self.transport.abort()

    # -- HTTP ---------------------------------------------------------------------------

    def _process(self) -> None:
        # Not while the client is not reading its answers: pipelined requests wait in h11
        # and the socket is not read (pause_writing), so memory stays bounded.
        while self.session is None and self.transport is not None and not self._http_paused:
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
        headers: dict[str, str] = {}
        for name, value in raw.headers:
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        request = Request(
            raw.method.decode("ascii", "replace"),
            parts.path,
            query,
            headers,
            bytes(self._body),
            self.peer,
            self._cert_cn,
        )
        try:
            if self.gateway.draining:
                raise PeerError("the gateway is shutting down", code="draining")
            if self._refusal is not None:
                raise self._refusal
            self.gateway.check_client(self.peer)
            if api.is_console_path(request.path) and request.method == "GET":
                self._upgrade(request, raw)
                return
            response = api.handle(self.gateway, request)
        except PeerError as exc:
            response = HttpResponse.error(exc)
            if exc.code == "draining":
                response.status = 503
        self._send_response(response)

    def _send_response(self, response: HttpResponse) -> None:
        assert self.transport is not None
        own = {name.lower() for name, _ in response.headers}
        defaults = [
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Strict-Transport-Security", "max-age=31536000"),
        ]
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *(h for h in defaults if h[0].lower() not in own),
            *response.headers,
        ]
        head_only = self._request is not None and self._request.method == b"HEAD"
        try:
            out = self._h11.send(h11.Response(status_code=response.status, headers=headers))
            if not head_only:
                out = (out or b"") + (self._h11.send(h11.Data(data=response.body)) or b"")
            out = (out or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
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
        body = json.dumps({"error": code, "message": message}).encode()
        reason = {400: "Bad Request", 413: "Payload Too Large", 431: "Headers Too Large"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self._close()

    def _close(self) -> None:
        """Close once. asyncio's TLS transport forgets its protocol on a second close(), and
        every later call on it raises: the listener's own, in debug mode, took it down."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- the console upgrade ------------------------------------------------------------

    def _upgrade(self, request: Request, raw: h11.Request) -> None:
        """Authenticate, authorize, apply the takeover policy, then switch protocols."""
        gw = self.gateway
        assert self.transport is not None
        vm_id = api.console_vm(request.path)
        mode = request.query.get("mode", "interactive")
        if mode not in ("interactive", "spectate"):
            raise PeerError("mode must be interactive or spectate", code="bad_request")
        if "ticket" in request.query:
            ticket = gw.redeem_ticket(request, vm_id)
            principal = ticket.principal
            if "mode" in request.query and mode != ticket.mode:
                raise PeerError("mode differs from the ticket's", code="bad_request")
            mode = ticket.mode
        else:
            principal = gw.authenticate(request)
        hub, role = gw.authorize(principal, vm_id, request)
        fields = {"principal": principal.id, "peer": self.peer, "vm": vm_id}
        gw.check_origin(request)
        resume_from: int | None = None
        if "from" in request.query:
            try:
                resume_from = int(request.query["from"])
            except ValueError:
                raise PeerError("from must be a byte offset", code="bad_request") from None
            if resume_from < 0:
                raise PeerError("from must be a byte offset", code="bad_request")
        session_id = secrets.token_hex(8)
        want_writer = mode == "interactive" and at_least(role, "contributor")
        if want_writer and isinstance(hub.check_writer(session_id), Denied):
            audit("takeover_denied", region=gw.region, **fields)
            raise ConflictError(
                f"vm {vm_id!r} has a writer and its takeover policy is deny; "
                "connect with mode=spectate",
                code="writer_exists",
            )
        gw.check_session_limits(principal)
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
        leftover, _ = self._h11.trailing_data
        session = ConsoleSession(
            transport=self.transport,
            hub=hub,
            session_id=session_id,
            principal=principal,
            role=role,
            peer=self.peer,
            region=gw.region,
            output_queue_bytes=gw.config.limits.output_queue_bytes,
        )
        self.session = session
        gw.sessions[session_id] = session
        # From here the transport talks to the session (compiled) directly: no hop through
        # this interpreted protocol per keystroke. Its end comes back via `on_lost`.
        session.on_lost = self._forget
        self.transport.set_protocol(session)  # type: ignore[arg-type]
        session.start(want_writer=want_writer, resume_from=resume_from)
        if leftover:
            session.data_received(bytes(leftover))


def _client_cert_cn(transport: asyncio.Transport) -> str | None:
    """The subject CN of a verified client certificate, if one was presented."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return None
