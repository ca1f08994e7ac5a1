"""HTTP/1.1 on one connection (connection.py), over a real socket pair, with a fake owner.

`FakeOwner` is a small real class implementing `ConnectionOwner`: it answers
requests with a coroutine the test can hold open, raises the `PeerError` it is
given, and records what the connection told it. No TLS (that is the listener's),
no routing (api.py's): only what the connection itself does with bytes.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from relayd.config import AuthConfig, Config, GatewayConfig, LimitsConfig, TlsConfig, VmConfig
from relayd.connection import MAX_BODY_BYTES, MAX_HEAD_BYTES, ConsoleGrant, HttpConnection
from relayd.errors import (
    AuthError,
    ConflictError,
    MethodNotAllowedError,
    PeerError,
    RateLimitedError,
)
from relayd.http import HttpResponse, Request
from relayd.hub import ConsoleHub
from relayd.principal import Principal
from relayd.session import ConsoleSession

from .conftest import TIMEOUT


def make_config(handshake_timeout: float = 10.0) -> Config:
    """A configuration whose files are never read (the connection reads only numbers)."""
    return Config(
        path=Path("relayd.toml"),
        gateway=GatewayConfig(handshake_timeout=handshake_timeout),
        tls=TlsConfig(cert=Path("unused.crt"), key=Path("unused.key")),
        auth=AuthConfig(issuer="i", audience="a", hs256_secret_file=Path("unused")),
    )


class FakeOwner:
    """A `ConnectionOwner` that answers with JSON describing the request."""

    def __init__(self, config: Config | None = None) -> None:
        self._config = config or make_config()
        self.draining = False
        self.error: Exception | None = None  # raised by handle()
        self.gate: asyncio.Event | None = None  # handle() waits for it when set
        self.handled: list[Request] = []
        self.request_seen = asyncio.Event()
        self.grant: ConsoleGrant | None = None
        self.opened: list[HttpConnection] = []
        self.closed: list[HttpConnection] = []
        self.sessions: list[ConsoleSession] = []
        self.session_error: Exception | None = None  # raised by session_started()
        self.gone = asyncio.Event()

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self._config

    def peer_identity(self, transport: asyncio.Transport) -> tuple[str | None, str | None]:
        """No client certificates on a socket pair."""
        return None, None

    def check_client(self, peer: str) -> None:
        """Every address is allowed except 203.0.113.66."""
        if peer == "203.0.113.66":
            raise PeerError("not you", code="client_not_allowed")

    async def handle(self, request: Request) -> HttpResponse:
        """Echo the request as JSON, after the gate opens (when there is one)."""
        self.handled.append(request)
        self.request_seen.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return HttpResponse.json(
            200,
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "body": request.body.decode(),
                "peer": request.peer,
            },
        )

    async def open_console(self, request: Request) -> ConsoleGrant:
        """The grant the test set, else the error it set."""
        if self.grant is None:
            assert self.error is not None
            raise self.error
        return self.grant

    def connection_opened(self, conn: HttpConnection) -> None:
        """Record the live connection."""
        self.opened.append(conn)

    def session_started(self, session: ConsoleSession) -> None:
        """Record the session (or raise the error the test set: a bug past the 101)."""
        if self.session_error is not None:
            raise self.session_error
        self.sessions.append(session)

    def connection_closed(self, conn: HttpConnection) -> None:
        """Record the end, and wake the test."""
        self.closed.append(conn)
        self.gone.set()


class HttpPeer:
    """The client end: raw bytes out, responses parsed by Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        """Bytes to the connection."""
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def fill(self) -> bool:
        """Read what has arrived into the buffer; False at the end of the stream."""
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        self.buffer += data
        return bool(data)

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, lower-cased headers, body."""
        async with asyncio.timeout(TIMEOUT):
            while b"\r\n\r\n" not in self.buffer:
                assert await self.fill(), f"closed before a response: {self.buffer!r}"
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = 0 if head_only else int(headers.get("content-length", "0"))
            while len(self.buffer) < length:
                assert await self.fill(), "closed inside a body"
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    async def at_eof(self) -> bool:
        """Whether the connection closes (or aborts) with nothing more sent."""
        async with asyncio.timeout(TIMEOUT):
            try:
                return not await self.fill() and not self.buffer
            except ConnectionResetError:
                return not self.buffer


@asynccontextmanager
async def connected(
    owner: FakeOwner, peer: str = "192.0.2.7", *, tcp: bool = False
) -> AsyncIterator[HttpPeer]:
    """An HttpConnection on one end of a socket pair; the client on the other.

    `tcp`: a loopback TCP connection instead, where a reset differs from a FIN.
    """
    ours, theirs = _tcp_pair() if tcp else socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(
        lambda: HttpConnection(owner, peer=peer), sock=ours
    )
    try:
        yield HttpPeer(theirs)
    finally:
        transport.abort()
        theirs.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server end, client end) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        theirs = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    return ours, theirs


def get(path: str, *, close: bool = False, extra: str = "") -> bytes:
    """A GET request's bytes."""
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{connection}{extra}\r\n".encode()


# -- requests and answers -------------------------------------------------------------------


async def test_connection_answers_with_the_owners_response_and_default_headers() -> None:
    """The owner gets the request parsed (path, query, peer); its answer gets safety headers."""
    owner = FakeOwner()
    async with connected(owner) as client:
        await client.send(get("/v1/vms?x=1&x=2&empty="))
        status, headers, body = await client.response()
    assert status == 200
    assert json.loads(body) == {
        "method": "GET",
        "path": "/v1/vms",
        "query": {"x": "2", "empty": ""},
        "body": "",
        "peer": "192.0.2.7",
    }
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=31536000"
    assert len(owner.opened) == 1


async def test_connection_pipelined_requests_wait_for_the_owner_in_order() -> None:
    """A second pipelined request is not read while the owner still answers the first."""
    owner = FakeOwner()
    owner.gate = asyncio.Event()
    async with connected(owner) as client:
        body = b'{"enabled": true}'
        await client.send(
            get("/first")
            + b"PUT /second HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with asyncio.timeout(TIMEOUT):
            await owner.request_seen.wait()
        # A second request dispatched at once would have started in the same loop turn.
        assert [r.path for r in owner.handled] == ["/first"]
        owner.gate.set()
        first = await client.response()
        second = await client.response()
    assert [json.loads(r[2])["path"] for r in (first, second)] == ["/first", "/second"]
    assert json.loads(second[2])["body"] == body.decode()


async def test_connection_head_request_gets_the_length_without_a_body() -> None:
    """HEAD is answered with the GET's Content-Length and no body; the connection goes on."""
    owner = FakeOwner()
    async with connected(owner) as client:
        await client.send(b"HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n" + get("/next"))
        status, headers, body = await client.response(head_only=True)
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0
        status, _, body = await client.response()
        assert json.loads(body)["path"] == "/next"


async def test_connection_close_is_honoured_and_the_owner_told() -> None:
    """Connection: close ends the connection after the answer, and the owner forgets it."""
    owner = FakeOwner()
    async with connected(owner) as client:
        await client.send(get("/", close=True))
        _, headers, _ = await client.response()
        assert headers["connection"] == "close"
        assert await client.at_eof()
        async with asyncio.timeout(TIMEOUT):
            await owner.gone.wait()
    assert owner.closed == owner.opened


# -- limits and deadlines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("whole", "code"), [(True, "too_large"), (False, "bad_request")], ids=["whole", "unfinished"]
)
async def test_connection_oversized_head_is_431(whole: bool, code: str) -> None:
    """A head over MAX_HEAD_BYTES is refused with 431, whether it is complete or not yet."""
    owner = FakeOwner()
    big = get("/", extra=f"X-Filler: {'a' * MAX_HEAD_BYTES}\r\n")
    async with connected(owner) as client:
        # Unfinished: h11's own cap on what it buffers; whole: the connection's own count.
        await client.send(big if whole else big[:-2])
        status, _, body = await client.response()
        assert (status, json.loads(body)["error"]) == (431, code)
        assert await client.at_eof()
    assert owner.handled == []


async def test_connection_oversized_body_is_413() -> None:
    """A body over MAX_BODY_BYTES is refused with 413 before the owner sees it."""
    owner = FakeOwner()
    n = MAX_BODY_BYTES + 1
    async with connected(owner) as client:
        await client.send(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n)
        await client.send(b"a" * n)
        status, _, body = await client.response()
        assert status == 413
        assert json.loads(body) == {
            "error": "too_large",
            "message": f"body exceeds {MAX_BODY_BYTES} bytes",
        }
    assert owner.handled == []


async def test_connection_malformed_request_is_400_and_closed() -> None:
    """Bytes that are not HTTP get a 400 JSON error and the connection closes."""
    owner = FakeOwner()
    async with connected(owner) as client:
        await client.send(b"HELLO THERE\r\n\r\n")
        status, _, body = await client.response()
        assert status == 400
        assert json.loads(body)["error"] == "bad_request"
        assert await client.at_eof()


async def test_connection_without_a_request_head_in_time_is_aborted() -> None:
    """A client that does not finish its head within handshake_timeout is dropped and logged."""
    owner = FakeOwner(make_config(handshake_timeout=0.2))
    with capture_logs() as events:
        async with connected(owner) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert await client.at_eof()
            async with asyncio.timeout(TIMEOUT):
                await owner.gone.wait()
    assert {"event": "request_timeout", "peer": "192.0.2.7", "log_level": "info"} in events
    assert owner.handled == []


async def test_connection_without_a_request_head_in_time_is_reset_not_sent_a_fin() -> None:
    """A client we give up on is reset, as a dropped session is: nothing lingers for it."""
    owner = FakeOwner(make_config(handshake_timeout=0.2))
    async with connected(owner, tcp=True) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(TIMEOUT):
            await owner.gone.wait()
            with pytest.raises(ConnectionResetError):
                await client.fill()


# -- errors: what a PeerError says goes on the wire -----------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "header"),
    [
        (AuthError("token expired", code="token_expired"), 401, ("www-authenticate", "Bearer")),
        (MethodNotAllowedError("DELETE", allow="GET, HEAD"), 405, ("allow", "GET, HEAD")),
        (RateLimitedError("slow down", retry_after=2.4), 429, ("retry-after", "2")),
        (ConflictError("has a writer"), 409, None),
    ],
)
async def test_connection_peer_error_becomes_its_status_headers_and_body(
    error: PeerError, status: int, header: tuple[str, str] | None
) -> None:
    """The owner's PeerError is answered with its class's status and headers and a JSON body."""
    owner = FakeOwner()
    owner.error = error
    async with connected(owner) as client:
        await client.send(get("/x") + get("/y"))
        got, headers, body = await client.response()
        assert got == status
        assert json.loads(body) == {"error": error.code, "message": error.message}
        if header is not None:
            assert headers[header[0]].startswith(header[1])
        if status == 429:  # told to slow down: no more requests on this connection
            assert headers["connection"] == "close"
            assert await client.at_eof()
        else:
            got, _, _ = await client.response()  # the connection serves the next request
            assert got == status


async def test_connection_while_draining_answers_503() -> None:
    """Once the gateway drains, every request is answered 503 draining."""
    owner = FakeOwner()
    owner.draining = True
    async with connected(owner) as client:
        await client.send(get("/v1/vms"))
        status, _, body = await client.response()
    assert (status, json.loads(body)["error"]) == (503, "draining")
    assert owner.handled == []


async def test_connection_from_a_disallowed_address_is_refused() -> None:
    """check_client's refusal is the answer, before the owner handles anything."""
    owner = FakeOwner()
    async with connected(owner, peer="203.0.113.66") as client:
        await client.send(get("/"))
        status, _, body = await client.response()
    assert (status, json.loads(body)["error"]) == (400, "client_not_allowed")
    assert owner.handled == []


async def test_connection_owner_bug_is_500_and_logged_once() -> None:
    """An unexpected exception in the owner is a 500 JSON answer and one request_failed log."""
    owner = FakeOwner()
    owner.error = RuntimeError("a bug")
    with capture_logs() as events:
        async with connected(owner) as client:
            await client.send(get("/boom"))
            status, _, body = await client.response()
    assert (status, json.loads(body)["error"]) == (500, "internal")
    assert [e["path"] for e in events if e["event"] == "request_failed"] == ["/boom"]


# -- the console upgrade --------------------------------------------------------------------

UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: relayd.console.v1\r\n"
)


def console_grant() -> ConsoleGrant:
    """A spectator's grant on a hub with no port."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    hub = ConsoleHub(vm, LimitsConfig())
    return ConsoleGrant(
        hub, Principal("user:rita"), "reader", "c0ffee0000000001", False, None, "192.0.2.7"
    )


async def test_connection_admitted_upgrade_switches_to_a_console_session() -> None:
    """An admitted upgrade gets 101 with the subprotocol; the session's hello follows."""
    owner = FakeOwner()
    owner.grant = console_grant()
    async with connected(owner) as client:
        await client.send(get("/v1/vms/vm-a/console", extra=UPGRADE))
        status, headers, _ = await client.response()
        assert status == 101
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert headers["sec-websocket-protocol"] == "relayd.console.v1"
        ws = ClientProtocol(parse_uri("ws://localhost/"), state=State.OPEN)
        async with asyncio.timeout(TIMEOUT):
            while not (frames := ws.events_received()):
                if not client.buffer:
                    assert await client.fill()
                ws.receive_data(client.buffer)
                client.buffer = b""
        hello = json.loads(frames[0].data)
        assert (hello["type"], hello["role"], hello["session"]) == (
            "hello",
            "spectator",
            "c0ffee0000000001",
        )
    assert [s.session_id for s in owner.sessions] == ["c0ffee0000000001"]
    assert owner.handled == []


async def test_connection_bug_after_the_101_resets_instead_of_writing_http() -> None:
    """A bug once the 101 is out cannot be answered with a 500: the stream is WebSocket
    now, and HTTP bytes in it are garbage to the client. The connection is reset, and
    the bug logged once."""
    owner = FakeOwner()
    owner.grant = console_grant()
    owner.session_error = RuntimeError("a bug")
    with capture_logs() as events:
        async with connected(owner, tcp=True) as client:
            await client.send(get("/v1/vms/vm-a/console", extra=UPGRADE))
            status, _, _ = await client.response()
            assert status == 101
            assert await client.at_eof()
            assert b"HTTP/1.1" not in client.buffer
    assert [e["path"] for e in events if e["event"] == "request_failed"] == ["/v1/vms/vm-a/console"]


async def test_connection_refused_upgrade_is_a_plain_http_error() -> None:
    """A refusal before the 101 (here the takeover policy) is a JSON status, not a close code."""
    owner = FakeOwner()
    owner.error = ConflictError("vm 'vm-a' has a writer", code="writer_exists")
    async with connected(owner) as client:
        await client.send(get("/v1/vms/vm-a/console", extra=UPGRADE))
        status, _, body = await client.response()
    assert (status, json.loads(body)["error"]) == (409, "writer_exists")
    assert owner.sessions == []


async def test_connection_upgrade_without_websocket_headers_is_400_bad_upgrade() -> None:
    """A GET on the console route that is not a WebSocket handshake is refused 400."""
    owner = FakeOwner()
    owner.grant = console_grant()
    async with connected(owner) as client:
        await client.send(get("/v1/vms/vm-a/console"))
        status, _, body = await client.response()
    assert (status, json.loads(body)["error"]) == (400, "bad_upgrade")
    assert owner.sessions == []
