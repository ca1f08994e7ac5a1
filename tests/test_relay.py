"""Tests for relayd.cluster.relay: a relayed session moved from one owner to the next.

Everything is real TLS on loopback and the client is the real websockets
client. The owners are small fakes that speak the owner's side of a peer link
byte for byte (a 101 or a refusal, a hello, frames), so a test decides exactly
what each owner says and when, which a pair of real gateways cannot promise:
a real region re-attaches a moved client in the same round the new owner
claims the VM, so no other writer can be there first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import h11
import pytest
import trustme
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode
from websockets.utils import accept_key

from relayd import control
from relayd.cluster.forwarding import (
    ForwardedSession,
    Mode,
    SessionClocks,
    encode_forwarded_request,
    parse_forwarded_headers,
)
from relayd.cluster.peerlink import open_peer, peer_client_context, trust_peer_ca
from relayd.cluster.relay import Reattach, Relay, relay
from relayd.config import TlsConfig
from relayd.tls import server_context

from .conftest import TIMEOUT

VM = "vm-a"
PATH = f"/v1/vms/{VM}/console"
FWD = ForwardedSession(
    principal="user:alice",
    role="contributor",
    mode="interactive",
    client_peer="127.0.0.1",
    session_id="0123456789abcdef",
)
LIMITS: dict[str, Any] = {}

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True)
class Pki:
    """One CA and one gateway certificate (both EKUs), used by every gateway here."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the owners, the relaying gateway and its client."""
    d = tmp_path_factory.mktemp("relay-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", common_name="gw.test")
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "gw.crt"))
    leaf.private_key_pem.write_to_path(str(d / "gw.key"))
    return Pki(d / "ca.crt", d / "gw.crt", d / "gw.key")


# -- what an owner sends ----------------------------------------------------------------------


def text(message: str) -> bytes:
    """One unmasked text frame, as an owner sends it."""
    return Frame(Opcode.TEXT, message.encode()).serialize(mask=False)


def binary(data: bytes) -> bytes:
    """One unmasked binary frame (console output), as an owner sends it."""
    return Frame(Opcode.BINARY, data).serialize(mask=False)


def hello(role: str, offset: int, *, port: str = "up") -> bytes:
    """An owner's hello with no replay: the stream goes on at `offset`."""
    return text(
        control.encode_hello(
            vm=VM,
            session=FWD.session_id,
            role=role,
            offset=offset,
            replay=0,
            limits=LIMITS,
            port=port,
        )
    )


def switching(request: bytes) -> bytes:
    """The owner's 101 to a forwarded upgrade (the client's key, passed through)."""
    key = dict(request_headers(request))["Sec-WebSocket-Key"]
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
    )


def refusal(status: int, code: str, message: str, *, close: bool = False) -> bytes:
    """An owner's refusal with its JSON body; `close`: it hangs up after it (as after a 429)."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = f"HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\n"
    if close:
        head += "Connection: close\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def request_headers(head: bytes) -> list[tuple[str, str]]:
    """A request head's headers as (name, value) pairs, parsed by h11 as an owner would."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]


async def client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next (masked) frame the client sent an owner: (opcode, unmasked payload)."""
    async with asyncio.timeout(TIMEOUT):
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length >= 126:
            length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
        mask = await reader.readexactly(4)
        payload = await reader.readexactly(length)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# -- the gateways -----------------------------------------------------------------------------


class FakeOwner:
    """An owning gateway's listener (relayd's server context plus `trust_peer_ca`).

    Each forwarded request waits in a queue; the test answers it.
    """

    def __init__(self, pki: Pki, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.context = server_context(TlsConfig(cert=pki.cert, key=pki.key))
        trust_peer_ca(self.context, pki.ca)
        self.requests: asyncio.Queue[tuple[Streams, bytes]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.address = ""

    async def __aenter__(self) -> FakeOwner:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.context)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.put_nowait(((reader, writer), head))

    @property
    def named(self) -> tuple[str, str]:
        """How the region names this owner: (gateway id, advertise address)."""
        return self.gateway_id, self.address

    async def next_request(self) -> tuple[Streams, bytes, ForwardedSession]:
        """The next forwarded request: its streams, its head, what it forwards."""
        async with asyncio.timeout(TIMEOUT):
            streams, head = await self.requests.get()
        return streams, head, parse_forwarded_headers(request_headers(head))


class Directory:
    """The relaying gateway's view of ownership (`OwnerDirectory`), set by the test."""

    def __init__(self, owner: tuple[str, str] | None, fence: int | None = None) -> None:
        self.owner = owner
        self.fence = fence
        self._round = asyncio.Condition()
        self.failed_links: list[str] = []  # the gateways `link_failed` named, in order
        self.waited = asyncio.Event()  # set while a relay waits in `next_round`
        self.link_failure = asyncio.Event()  # set at each

    def owner_of(self, vm_id: str) -> tuple[str, str] | None:
        """The owner the test last named."""
        return self.owner if vm_id == VM else None

    def fence_of(self, vm_id: str) -> int | None:
        """The fencing token the test last named with it (None: unknown)."""
        return self.fence if vm_id == VM else None

    async def next_round(self) -> None:
        """Until the test names an owner again (or runs a round: `tick`)."""
        async with self._round:
            self.waited.set()
            await self._round.wait()

    async def tick(self) -> None:
        """A round that names the same owner, once a relay waits for one (a round nobody
        waits for would be lost)."""
        async with asyncio.timeout(TIMEOUT):
            await self.waited.wait()
        self.waited.clear()
        async with self._round:
            self._round.notify_all()

    def link_failed(self, gateway: str) -> None:
        """Recorded for the test."""
        self.failed_links.append(gateway)
        self.link_failure.set()

    async def name(self, owner: tuple[str, str] | None, fence: int | None = None) -> None:
        """An ownership round that names `owner` (and its lease's `fence`)."""
        self.owner, self.fence = owner, fence
        async with self._round:
            self._round.notify_all()


class Resuming:
    """`Reattach.request`: the forwarded upgrade again, at an offset, as writer or not.

    `broken`: it raises instead (a bug in building the request).
    """

    def __init__(self, headers: list[tuple[str, str]], *, broken: bool = False) -> None:
        self.headers = headers
        self.broken = broken
        self.clocks: list[SessionClocks] = []  # what each resumed request carried

    def __call__(self, offset: int, writer: bool, clocks: SessionClocks) -> bytes:
        if self.broken:
            raise ValueError("a bug in the resumed request")
        mode: Mode = "interactive" if writer else "spectate"
        self.clocks.append(clocks)
        return encode_forwarded_request(
            PATH, self.headers, dataclasses.replace(FWD, resume_from=offset, mode=mode)
        )


class _FrontProtocol(asyncio.Protocol):
    """The relaying gateway's HTTP phase, cut down: one upgrade request, then relay it."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.forwarding = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.forwarding or b"\r\n\r\n" not in self.buf:
            return
        assert self.transport is not None
        self.forwarding = True
        self.transport.pause_reading()  # as the gateway's connection does while the link opens
        self.front.tasks.append(asyncio.create_task(self.front.forward(self)))


class Front:
    """The relaying gateway: forwards a client's upgrade to the named owner, relays it."""

    def __init__(
        self,
        pki: Pki,
        owners: Directory,
        *,
        wait: float = TIMEOUT,
        broken: bool = False,
        lease_ttl: float | None = None,
    ) -> None:
        self.owners = owners
        self.wait = wait
        self.broken = broken
        self.lease_ttl = lease_ttl
        self.peer_context = peer_client_context(pki.cert, pki.key, pki.ca)
        self.client_context = server_context(TlsConfig(cert=pki.cert, key=pki.key))
        self.relays: asyncio.Queue[Relay] = asyncio.Queue()
        self.all: list[Relay] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.port = 0

    async def __aenter__(self) -> Front:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _FrontProtocol(self), "127.0.0.1", 0, ssl=self.client_context
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        for r in self.all:
            r.abort()
        self.server.close()
        await self.server.wait_closed()

    async def forward(self, proto: _FrontProtocol) -> None:
        """What the gateway's connection does for a VM owned elsewhere (connection._forward)."""
        assert proto.transport is not None
        head, _, _ = bytes(proto.buf).partition(b"\r\n\r\n")
        headers = request_headers(head + b"\r\n\r\n")
        owner = self.owners.owner_of(VM)
        assert owner is not None
        host, _, port = owner[1].rpartition(":")
        peer = await open_peer(
            host,
            int(port),
            self.peer_context,
            encode_forwarded_request(PATH, headers, FWD),
            TIMEOUT,
        )
        assert peer.status == 101
        reattach = Reattach(
            vm=VM,
            owner=owner[0],
            fence=self.owners.fence_of(VM),
            owners=self.owners,
            request=Resuming(headers, broken=self.broken),
            ssl_context=self.peer_context,
            timeout=TIMEOUT,
            wait=self.wait,
            lease_ttl=self.lease_ttl,
        )
        leftover = bytes(proto.buf[len(head) + 4 :])
        r = relay(proto.transport, peer, reattach, client_data=leftover)
        self.all.append(r)
        self.relays.put_nowait(r)

    async def next_relay(self) -> Relay:
        """The relay of the next client."""
        async with asyncio.timeout(TIMEOUT):
            return await self.relays.get()


async def connecting(pki: Pki, front: Front) -> ClientConnection:
    """The real websockets client, through the relaying gateway (the owner answers its 101)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    return await connect(
        f"wss://127.0.0.1:{front.port}{PATH}",
        ssl=ctx,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        ping_interval=None,  # no keepalive frames of its own: the test reads every frame
    )


async def received(ws: ClientConnection) -> dict[str, Any] | bytes:
    """The client's next message: a control message decoded, console output as bytes."""
    async with asyncio.timeout(TIMEOUT):
        message = await ws.recv()
    if isinstance(message, bytes):
        return message
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


async def control_message(ws: ClientConnection) -> dict[str, Any]:
    """The client's next message, which must be a control message."""
    message = await received(ws)
    assert isinstance(message, dict), message
    return message


async def notice(ws: ClientConnection) -> str:
    """The event of the client's next message, which must be a notice."""
    message = await control_message(ws)
    assert message["type"] == "notice", message
    return str(message["event"])


async def close_on_purpose(
    ws: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The client ends the session: its Close reaches the owner, whose answer ends it."""
    closing = asyncio.create_task(ws.close())
    opcode, payload = await client_frame(reader)
    assert opcode == Opcode.CLOSE.value
    writer.write(Frame(Opcode.CLOSE, payload).serialize(mask=False))
    writer.close()
    await closing


# -- moving to a new owner --------------------------------------------------------------------


async def test_writer_refused_by_deny_on_the_new_owner_resumes_there_as_a_spectator(
    pki: Pki,
) -> None:
    """The first owner hands the console off cleanly; the next one has a writer and
    `deny` (409 to an interactive request): the client is asked back as a spectator at
    its position, told it was demoted before port_up, and stays connected there."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, fwd = await first.next_request()
        assert fwd.mode == "interactive"
        w1.write(switching(request) + hello("writer", 100) + binary(b"abc"))
        ws = await upgrading
        async with ws:
            relayed = await front.next_relay()
            assert (await control_message(ws))["role"] == "writer"
            assert await received(ws) == b"abc"

            with capture_logs() as logs:
                w1.close()  # a hand-off: TLS close_notify between frames, no Close frame
                assert await notice(ws) == "port_down"
                await directory.name(second.named)

                (r409, w409), _, fwd = await second.next_request()
                assert (fwd.mode, fwd.resume_from) == ("interactive", 103)
                # As relayd answers (it keeps the connection): the relay closes the link itself.
                w409.write(refusal(409, "writer_exists", "takeover policy is deny"))
                spectating = asyncio.create_task(second.next_request())
                ended = asyncio.create_task(ws.wait_closed())
                await asyncio.wait({spectating, ended}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if not spectating.done():
                    spectating.cancel()
                    pytest.fail(
                        f"no spectate request; client closed: {ws.close_code} {ws.close_reason}"
                    )
                (r2, w2), request, fwd = spectating.result()
                assert (fwd.mode, fwd.resume_from) == ("spectate", 103)
                assert (fwd.principal, fwd.session_id) == (FWD.principal, FWD.session_id)
                w2.write(switching(request) + hello("spectator", 103) + binary(b"def"))

                demoted = await control_message(ws)
                assert demoted == {
                    "type": "notice",
                    "event": "demoted",
                    "by": None,
                    "writer": None,
                    "reason": "writer_exists",
                }
                assert await notice(ws) == "port_up"
                assert await received(ws) == b"def"  # the new owner's 101 and hello are swallowed
                assert relayed.reattached == 1
            moved = [e for e in logs if e["event"] == "relay_reattached"]
            assert [(e["owner"], e["role"], e["demoted"]) for e in moved] == [
                ("gw-2", "spectator", True)
            ]
            refused = [e for e in logs if e["event"] == "relay_writer_refused"]
            assert [(e["owner"], e["status"]) for e in refused] == [("gw-2", 409)]
            async with asyncio.timeout(TIMEOUT):
                assert await r409.read() == b""

            await ws.send('{"type":"resize","cols":80,"rows":24}')  # reaches the new owner
            assert await client_frame(r2) == (
                Opcode.TEXT.value,
                b'{"type":"resize","cols":80,"rows":24}',
            )
            w2.write(binary(b"ghi"))
            assert await received(ws) == b"ghi"
            assert second.requests.empty()

            await close_on_purpose(ws, r2, w2)
        assert ws.close_code == 1000


async def test_a_new_owner_that_cannot_be_reached_is_counted_and_the_next_one_taken(
    pki: Pki,
) -> None:
    """The region names an owner this gateway cannot link to (a firewall between them,
    here nothing listening): the failed link is counted for that gateway, for /metrics,
    and the client waits at port_down for the next owner named, where it goes on."""
    with socket.socket() as probe:  # an address where nothing listens
        probe.bind(("127.0.0.1", 0))
        unreachable = ("gw-cut-off", f"127.0.0.1:{probe.getsockname()[1]}")
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100) + binary(b"abc"))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            assert await received(ws) == b"abc"
            w1.close()  # a hand-off
            assert await notice(ws) == "port_down"
            await directory.name(unreachable)
            async with asyncio.timeout(TIMEOUT):
                await directory.link_failure.wait()
            assert directory.failed_links == ["gw-cut-off"]
            await directory.name(second.named)
            (r2, w2), request, fwd = await second.next_request()
            assert fwd.resume_from == 103
            w2.write(switching(request) + hello("writer", 103) + binary(b"def"))
            assert await notice(ws) == "port_up"
            assert await received(ws) == b"def"
            await close_on_purpose(ws, r2, w2)
        assert directory.failed_links == ["gw-cut-off"]


async def test_a_link_that_breaks_while_its_owner_stays_the_owner_is_made_again(
    pki: Pki,
) -> None:
    """The link to the owner breaks without a Close (a reset between the gateways) and the
    region goes on naming the same owner under the same lease: once rounds that began a
    lease period later still do, the owner is alive, and the session is made there again
    at the client's position, instead of waiting for another owner and closing the client
    with 1001. (The lease period is 0 here: the rounds the test runs are the wait.)"""
    async with (
        FakeOwner(pki, "gw-1") as owner,
        Front(pki, directory := Directory(owner.named, 7), lease_ttl=0.0) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await owner.next_request()
        w1.write(switching(request) + hello("writer", 100) + binary(b"abc"))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            assert await received(ws) == b"abc"
            w1.transport.abort()  # a reset: no Close frame, no close_notify
            assert await notice(ws) == "port_down"
            await directory.tick()  # the same lease, a round later: it may have begun early
            async with asyncio.timeout(TIMEOUT):
                await directory.waited.wait()  # the relay waits for one more
            assert owner.requests.empty()
            await directory.tick()  # this one began after the lease period: the owner renewed
            (r2, w2), request, fwd = await owner.next_request()
            assert (fwd.mode, fwd.resume_from) == ("interactive", 103)
            w2.write(switching(request) + hello("writer", 103) + binary(b"def"))
            assert await notice(ws) == "port_up"
            assert await received(ws) == b"def"
            await close_on_purpose(ws, r2, w2)
        assert ws.close_code == 1000


async def test_input_held_for_a_new_owner_whose_port_stays_down_goes_after_the_wait(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new owner's port is down (its hello says so) and stays down: the input held
    for it goes after `MOVED_INPUT_WAIT` (shortened here) for the owner to refuse, pong
    and all, rather than waiting until the owner drops the client for a missing pong."""
    monkeypatch.setattr(control, "MOVED_INPUT_WAIT", 0.2)
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            w1.close()
            assert await notice(ws) == "port_down"
            await ws.send(b"held")
            await directory.name(second.named)
            (r2, w2), request, fwd = await second.next_request()
            assert fwd.resume_from == 100
            w2.write(switching(request) + hello("writer", 100, port="down"))
            assert await client_frame(r2) == (Opcode.BINARY.value, b"held")
            await ws.send(b"more")  # and from then on, straight through
            assert await client_frame(r2) == (Opcode.BINARY.value, b"more")

            await close_on_purpose(ws, r2, w2)


async def test_owner_that_hung_up_and_took_the_console_back_is_asked_again(pki: Pki) -> None:
    """The owner lets go and, by this gateway's next round, holds the console again
    under a new lease (this gateway saw no round in between: frozen, or its rounds
    failed). The relay asks it again, where a gateway id alone would look unchanged
    and keep the client at port_down until the move gave up."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        Front(pki, directory := Directory(first.named, fence=7)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100) + binary(b"abc"))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            assert await received(ws) == b"abc"
            w1.close()
            assert await notice(ws) == "port_down"
            await directory.name(first.named, fence=9)
            (r2, w2), request, fwd = await first.next_request()
            assert (fwd.mode, fwd.resume_from) == ("interactive", 103)
            w2.write(switching(request) + hello("writer", 103) + binary(b"def"))
            assert await notice(ws) == "port_up"
            assert await received(ws) == b"def"

            await close_on_purpose(ws, r2, w2)


@pytest.mark.parametrize(
    ("status", "error", "close_code", "hint"),
    [
        (429, "session_limit", 4029, ""),
        (403, "console_disabled", 4009, ""),
        (403, "forbidden", 4003, ""),
        (404, "unknown_vm", 4004, ""),
        (500, "internal", 1001, "; reconnect"),
    ],
)
async def test_new_owner_that_refuses_and_hangs_up_closes_the_client_with_its_status(
    pki: Pki, status: int, error: str, close_code: int, hint: str
) -> None:
    """A new owner refuses the moving session and closes at once (as relayd does): the
    client is closed naming the refusal, not left waiting at port_down, with the contract's
    close code for that refusal where it has one (a reconnect would meet it again), else
    1001 (reconnect)."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            await directory.name(second.named)
            w1.close()
            assert await notice(ws) == "port_down"
            (_, w2), _, _ = await second.next_request()
            w2.write(refusal(status, error, "refused for the test", close=True))
            w2.close()
            async with asyncio.timeout(TIMEOUT):
                await ws.wait_closed()
            assert ws.close_code == close_code
            assert ws.close_reason == (
                f"console moved: gateway gw-2 refused the session with {status}{hint}"
            )


async def test_a_bug_while_moving_closes_the_client_instead_of_stranding_it(pki: Pki) -> None:
    """Whatever goes wrong in a move ends it like a refusal: 1001, and the error logged
    with its traceback; the client is never left at port_down for good."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        Front(pki, directory := Directory(first.named), broken=True) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100))
        ws = await upgrading
        async with ws:
            assert (await control_message(ws))["role"] == "writer"
            with capture_logs() as logs:
                await directory.name(second.named)
                w1.close()
                assert await notice(ws) == "port_down"
                async with asyncio.timeout(TIMEOUT):
                    await ws.wait_closed()
            assert ws.close_code == 1001
            assert ws.close_reason == "console moved: internal error; reconnect"
            failed = [e for e in logs if e["event"] == "relay_move_crashed"]
            assert [(e["vm"], e["exc_info"]) for e in failed] == [(VM, True)]


async def test_a_new_owner_whose_log_is_behind_the_client_resumes_it_with_offsets_reused(
    pki: Pki,
) -> None:
    """The new owner's output ends before the client's position (Redis lost the log and its
    marks, and no gateway put them back): it resumes the session at its own end and says
    so with `offsets_reused`, as it answers a `?from=` past the end. The relay goes on
    there, at the new owner's position, rather than closing the client with 1001 only for
    it to reconnect and get the same; the next move resumes from that position."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        FakeOwner(pki, "gw-3") as third,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100) + binary(b"abc"))
        ws = await upgrading
        async with ws:
            relayed = await front.next_relay()
            assert (await control_message(ws))["role"] == "writer"
            assert await received(ws) == b"abc"
            w1.close()
            assert await notice(ws) == "port_down"
            await directory.name(second.named)

            (_, w2), request, fwd = await second.next_request()
            assert (fwd.mode, fwd.resume_from) == ("interactive", 103)
            reused = control.encode_notice(
                "offsets_reused", first=40, last=102, bytes=63, message="past the end"
            )
            w2.write(switching(request) + hello("writer", 40) + text(reused) + binary(b"new"))
            assert await notice(ws) == "port_up"
            told = await control_message(ws)
            assert (told["event"], told["first"], told["last"]) == ("offsets_reused", 40, 102)
            assert await received(ws) == b"new"
            assert relayed.position == 43
            assert relayed.reattached == 1

            w2.close()
            assert await notice(ws) == "port_down"
            await directory.name(third.named)
            (r3, w3), request, fwd = await third.next_request()
            assert fwd.resume_from == 43
            w3.write(switching(request) + hello("writer", 43) + binary(b"more"))
            assert await notice(ws) == "port_up"
            assert await received(ws) == b"more"
            await close_on_purpose(ws, r3, w3)
        assert ws.close_code == 1000


async def test_input_held_for_a_new_owner_follows_the_console_when_it_moves_again(
    pki: Pki,
) -> None:
    """The console moves again while the relay holds the client's input for the new
    owner's port (its hello said the port is down): the relay follows it to the next owner
    with the input still held, and lets it go at that owner's port_up. The hold keeps the
    deadline it had from the first owner that took the session (input waits at most
    `MOVED_INPUT_WAIT` in all), and the client's pong held with the input does not make
    the relay take the hang-up for a drop of an unresponsive client."""
    async with (
        FakeOwner(pki, "gw-1") as first,
        FakeOwner(pki, "gw-2") as second,
        FakeOwner(pki, "gw-3") as third,
        Front(pki, directory := Directory(first.named)) as front,
    ):
        upgrading = asyncio.create_task(connecting(pki, front))
        (_, w1), request, _ = await first.next_request()
        w1.write(switching(request) + hello("writer", 100))
        ws = await upgrading
        async with ws:
            relayed = await front.next_relay()
            assert (await control_message(ws))["role"] == "writer"
            w1.close()
            assert await notice(ws) == "port_down"
            await ws.send(b"held")
            await directory.name(second.named)
            (_, w2), request, fwd = await second.next_request()
            assert fwd.resume_from == 100
            w2.write(switching(request) + hello("writer", 100, port="down") + binary(b"x"))
            assert await received(ws) == b"x"  # attached: the hold for its port has begun
            attached = asyncio.get_running_loop().time()
            w2.write(Frame(Opcode.PING, b"").serialize(mask=False) + binary(b"z"))
            assert await received(ws) == b"z"  # the ping came first: the pong has gone
            await ws.send(b" and more")
            w2.close()  # the console moves on before gw-2's port comes up
            assert await notice(ws) == "port_down"
            await directory.name(third.named)
            (r3, w3), request, fwd = await third.next_request()
            assert (fwd.mode, fwd.resume_from) == ("interactive", 102)
            w3.write(switching(request) + hello("writer", 102, port="down") + binary(b"y"))
            assert await received(ws) == b"y"
            deadline = relayed.hold_deadline
            assert deadline is not None
            assert deadline <= attached + control.MOVED_INPUT_WAIT  # gw-2's, not a new one
            w3.write(text(control.encode_notice("port_up", vm=VM)))
            assert await notice(ws) == "port_up"
            assert await client_frame(r3) == (Opcode.BINARY.value, b"held")
            assert await client_frame(r3) == (Opcode.PONG.value, b"")
            assert await client_frame(r3) == (Opcode.BINARY.value, b" and more")
            assert relayed.hold_deadline is None
            await ws.send(b"straight through")
            assert await client_frame(r3) == (Opcode.BINARY.value, b"straight through")
            await close_on_purpose(ws, r3, w3)
        assert ws.close_code == 1000
