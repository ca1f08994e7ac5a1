"""One console session (session.py) over a real socket pair, against a real hub.

The session gets the server end of a `socket.socketpair()` as its transport,
as `HttpConnection` hands it over after the 101; the test speaks WebSocket on
the other end with websockets' own sans-I/O client, so every frame is real and
masked. No TLS and no HTTP: those are the connection's (test_connection.py).
How a dropped client learns of its end (a FIN or a reset) is TCP's, so those
tests use a loopback TCP connection instead.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from relayd import control
from relayd.config import LimitsConfig, Role, VmConfig
from relayd.hub import ConsoleHub
from relayd.keeper import wait_until
from relayd.principal import Principal
from relayd.session import ConsoleSession

from .conftest import TIMEOUT, FarEnd
from .hubclient import RecordingClient, keeping


class WsPeer:
    """The client end of a session: websockets' sans-I/O client on a real socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.ws = ClientProtocol(parse_uri("ws://localhost/"), state=State.OPEN, max_size=None)
        self.output = bytearray()
        # Everything that arrived, in order: bytes for output, dicts for control messages.
        self.received: list[bytes | dict[str, Any]] = []
        self.eof = False

    async def send(self, data: bytes | str | dict[str, Any]) -> None:
        """Keystrokes (bytes) or a control message (dict, or raw text)."""
        if isinstance(data, bytes):
            self.ws.send_binary(data)
        else:
            text = json.dumps(data) if isinstance(data, dict) else data
            self.ws.send_text(text.encode())
        await self._flush()

    async def send_raw_text(self, payload: bytes) -> None:
        """A text frame with any payload (not checked to be UTF-8)."""
        self.ws.send_text(payload)
        await self._flush()

    async def close(self, code: int = 1000) -> None:
        """Start the closing handshake from the client side."""
        self.ws.send_close(code, "bye")
        await self._flush()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for chunk in self.ws.data_to_send():
            if chunk:
                await loop.sock_sendall(self.sock, chunk)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(self.sock, 65536)
        if data:
            self.ws.receive_data(data)
        else:
            self.eof = True
            self.ws.receive_eof()
        for event in self.ws.events_received():
            assert isinstance(event, Frame)
            if event.opcode is Opcode.BINARY:
                self.output += event.data
                self.received.append(bytes(event.data))
            elif event.opcode is Opcode.TEXT:
                self.received.append(json.loads(event.data))
        await self._flush()  # pongs, the answer to a Close

    async def message(self, **match: Any) -> dict[str, Any]:
        """Read until a control message with these fields has arrived; returns the first."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for item in self.received:
                    if isinstance(item, dict) and all(item.get(k) == v for k, v in match.items()):
                        return item
                await self._read()

    async def read_output(self, n: int) -> bytes:
        """Read until `n` bytes of console output have arrived."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.output) < n:
                await self._read()
        return bytes(self.output)

    async def read_to_end(self) -> None:
        """Read (and answer) until the end of the stream; a reset raises."""
        async with asyncio.timeout(TIMEOUT):
            while not self.eof:
                await self._read()

    async def closed(self) -> tuple[int, str]:
        """Read until the server's Close and the end of the stream; (code, reason)."""
        async with asyncio.timeout(TIMEOUT):
            while not self.eof:
                await self._read()
        assert self.ws.close_rcvd is not None
        return self.ws.close_rcvd.code, self.ws.close_rcvd.reason


def make_hub(serial: str = "tcp://127.0.0.1:1", **limits: Any) -> ConsoleHub:
    """A hub without a port or an on-disk log; no output cap unless asked for."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial=serial)
    return ConsoleHub(vm, LimitsConfig(**{"output_bytes_per_s": None, **limits}))


@asynccontextmanager
async def attached(
    hub: ConsoleHub,
    *,
    principal: str = "user:alice",
    role: Role = "contributor",
    writer: bool = True,
    resume_from: int | None = None,
    session_id: str = "a1b2c3d4e5f60718",
    sndbuf: int | None = None,
    tcp: bool = False,
    **moved: float,
) -> AsyncIterator[tuple[ConsoleSession, WsPeer]]:
    """A session started on one end of a socket pair; the peer on the other end.

    `tcp`: a loopback TCP connection instead, the peer's receive buffer as small as
    the kernel allows (a client that reads nothing holds the gateway's output at once).
    `moved`: the clocks of a session that moved here (`started`, `last_active`, `warned`).
    """
    ours, theirs = _tcp_pair() if tcp else socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=ours)
    session = ConsoleSession(
        transport=transport,  # type: ignore[arg-type]
        hub=hub,
        session_id=session_id,
        principal=Principal(principal),
        role=role,
        peer="192.0.2.7",
        region="test",
        output_queue_bytes=hub.limits.output_queue_bytes,
    )
    transport.set_protocol(session)  # type: ignore[arg-type]
    session.start(want_writer=writer, resume_from=resume_from, **moved)
    peer = WsPeer(theirs)
    try:
        yield session, peer
    finally:
        transport.abort()
        theirs.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server end, client end) of a loopback TCP connection; the client's buffers small."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        theirs = socket.socket()
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.connect(listening.getsockname())
        ours, _ = listening.accept()
    return ours, theirs


async def detached(hub: ConsoleHub, session_id: str) -> None:
    """Wait until the hub no longer holds the session (its transport is gone)."""
    async with asyncio.timeout(TIMEOUT):
        await wait_until(hub, lambda: session_id not in hub.clients)


# -- hello and output ---------------------------------------------------------------------


async def test_session_hello_then_replay_of_recent_output() -> None:
    """The first message is hello (vm, role, offsets, limits, port), then the replay as binary."""
    hub = make_hub(replay_bytes=8)
    hub.publish(b"0123456789abcdef")
    async with attached(hub) as (session, peer):
        hello = await peer.message(type="hello")
        assert peer.received[0] is hello
        assert hello == {
            "type": "hello",
            "vm": "vm-a",
            "session": "a1b2c3d4e5f60718",
            "role": "writer",
            "offset": 16,
            "replay": 8,
            "limits": hub.limits_for("writer"),
            "port": "down",
            "previous_session_logged_out": None,  # there was no writer before
        }
        assert await peer.read_output(8) == b"89abcdef"
        assert session.cursor == 16


async def test_session_resume_from_offset_replays_from_there() -> None:
    """A session resumed at an offset gets exactly the output after it."""
    hub = make_hub()
    hub.publish(b"0123456789")
    async with attached(hub, resume_from=4, writer=False) as (_, peer):
        hello = await peer.message(type="hello")
        assert (hello["role"], hello["offset"], hello["replay"]) == ("spectator", 10, 6)
        assert await peer.read_output(6) == b"456789"


@pytest.mark.parametrize(("warned_after", "warned_again"), [(4.0, False), (0.5, True)])
async def test_session_that_moved_here_is_warned_once_per_idle_period(
    warned_after: float, warned_again: bool
) -> None:
    """A session that moves here 5 s into an idle period (the warning due at 3 s) is not
    warned again when its client was warned in that period (4 s in); it is when the
    warning it had came 0.5 s after its last message (that message was on its way to the
    old owner as it warned: the period before's warning)."""
    hub = make_hub(idle_timeout=10.0, idle_warning=7.0)
    now = time.monotonic()
    last = now - 5.0
    warned = last + warned_after
    async with attached(hub, writer=False, started=last - 1.0, last_active=last, warned=warned) as (
        session,
        peer,
    ):
        await peer.message(type="hello")
        session.sweep(now)
        session.send_text(control.encode_notice("marker"))
        await peer.message(type="notice", event="marker")
        warnings = [
            m for m in peer.received if isinstance(m, dict) and m.get("event") == "idle_warning"
        ]
        assert len(warnings) == (1 if warned_again else 0)
        assert session.idle_warned_at == (now if warned_again else warned)


async def test_session_live_output_arrives_as_binary_frames_in_order() -> None:
    """Output the hub publishes after the hello reaches the client in order, counted."""
    hub = make_hub()
    async with attached(hub, writer=False) as (session, peer):
        await peer.message(type="hello")
        for chunk in (b"Linux ", b"version ", b"6.1\r\n"):
            hub.publish(chunk)
        assert await peer.read_output(19) == b"Linux version 6.1\r\n"
        assert [m for m in peer.received if isinstance(m, bytes)] == [
            b"Linux ",
            b"version ",
            b"6.1\r\n",
        ]
        assert session.bytes_out == 19


async def test_session_slow_client_skips_ahead_with_exact_output_gap() -> None:
    """A client that stops reading holds back no one; later it is told exactly what it missed."""
    hub = make_hub(
        output_buffer_bytes=4096, console_log_bytes=4096, replay_bytes=0, output_queue_bytes=4096
    )
    fast = RecordingClient("f1", "user:sam")
    hub.attach(fast, writer=False)
    async with attached(hub, writer=False, sndbuf=4096) as (session, peer):
        data = b"".join(b"%07d\n" % i for i in range(8192))  # 64 KiB, each line numbered
        for i in range(0, len(data), 1024):
            hub.publish(data[i : i + 1024])
        assert bytes(fast.output) == data  # fan-out went on while this client did not read
        assert session.transport.get_write_buffer_size() <= 4096 + 1024 + 4
        gap = await peer.message(type="notice", event="output_gap")
        await peer.read_output(len(data) - gap["bytes"])
        first, last = gap["first"], gap["last"]
        assert gap["bytes"] == last - first + 1
        assert last + 1 == hub.ring.start
        assert bytes(peer.output) == data[:first] + data[last + 1 :]
        before_gap = peer.received[: peer.received.index(gap)]
        assert b"".join(m for m in before_gap if isinstance(m, bytes)) == data[:first]
        assert hub.stats.output_gaps == 1
        assert hub.stats.skipped_bytes == gap["bytes"]


# -- input and control messages -----------------------------------------------------------


async def test_session_writer_keys_reach_the_serial_port(far_end: FarEnd) -> None:
    """A writer's binary messages go to the port, in order."""
    hub = make_hub(f"tcp://127.0.0.1:{far_end.port}")
    async with keeping(hub), attached(hub) as (session, peer):
        hello = await peer.message(type="hello")
        assert hello["port"] == "up"
        for key in (b"r", b"o", b"o", b"t", b"\r"):
            await peer.send(key)
        await far_end.wait_received(lambda got: got == b"root\r")
        assert session.bytes_in == 5


async def test_session_spectator_keys_and_break_are_refused_read_only() -> None:
    """A spectator's keystrokes and BREAK are answered read_only; nothing is queued."""
    hub = make_hub()
    async with attached(hub, principal="user:rita", role="reader", writer=False) as (
        session,
        peer,
    ):
        await peer.message(type="hello", role="spectator")
        await peer.send(b"rm -rf /\r")
        error = await peer.message(type="error")
        assert error == {
            "type": "error",
            "code": "read_only",
            "message": "this session is read-only (spectator)",
        }
        await peer.send({"type": "break"})
        await peer.message(type="error", message="only the writer may send BREAK or SysRq")
        assert session.bytes_in == 0


async def test_session_bad_control_message_gets_bad_message_and_goes_on() -> None:
    """Malformed or unknown control messages are answered bad_message; the session continues."""
    hub = make_hub()
    async with attached(hub) as (_, peer):
        await peer.message(type="hello")
        await peer.send("{not json")
        await peer.message(
            type="error", code="bad_message", message="control message is not valid JSON"
        )
        await peer.send({"type": "resize", "cols": 132, "rows": 43})
        await peer.send({"type": "teleport"})
        await peer.message(type="error", message="unknown control message type 'teleport'")
        assert hub.resize == (132, 43)  # handled before the message after it was answered
        assert peer.ws.close_rcvd is None


async def test_session_paste_over_max_paste_is_refused_whole() -> None:
    """A binary message over max_paste_bytes is refused with the limit; nothing is sent."""
    hub = make_hub(max_paste_bytes=16)
    async with attached(hub) as (session, peer):
        await peer.message(type="hello")
        await peer.send(b"x" * 17)
        error = await peer.message(type="error", code="paste_too_long")
        assert error["limit"] == 16
        assert error["message"] == "input of 17 bytes exceeds max_paste_bytes 16"
        assert hub.stats.pastes_refused == 1
        assert session.bytes_in == 0


async def test_session_keys_while_port_down_are_refused_port_down() -> None:
    """With the port down, a writer's input is refused with port_down, not queued."""
    hub = make_hub()
    async with attached(hub) as (_, peer):
        await peer.message(type="hello", port="down")
        await peer.send(b"ls\r")
        await peer.message(type="error", code="port_down")


# -- closing --------------------------------------------------------------------------------


async def test_session_invalid_utf8_text_closes_1007() -> None:
    """A text message that is not UTF-8 ends the session with 1007."""
    hub = make_hub()
    async with attached(hub) as (_, peer):
        await peer.message(type="hello")
        await peer.send_raw_text(b"\xff\xfe")
        assert await peer.closed() == (
            control.CLOSE_INVALID_DATA,
            "text message is not valid UTF-8",
        )
        await detached(hub, "a1b2c3d4e5f60718")


async def test_session_evicted_writer_is_told_and_closed_4001() -> None:
    """A writer taken over hears who took over, then gets 4001; the summary names the reason."""
    hub = make_hub()
    with capture_logs() as events:
        async with attached(hub) as (_, alice):
            await alice.message(type="hello", role="writer")
            async with attached(hub, principal="user:bob", session_id="b0b0b0b0b0b0b0b0") as (
                _,
                bob,
            ):
                await bob.message(type="hello", role="writer")
                notice = await alice.message(type="notice", event="writer_changed")
                assert (notice["writer"], notice["you"]) == ("user:bob", "evicted")
                assert await alice.closed() == (control.CLOSE_TAKEN_OVER, "taken over by user:bob")
                await detached(hub, "a1b2c3d4e5f60718")
                assert hub.lease.holder == "b0b0b0b0b0b0b0b0"
    ended = [e for e in events if e["event"] == "session_ended"]
    assert ended[0]["session_id"] == "a1b2c3d4e5f60718"
    assert ended[0]["reason"] == "taken over by user:bob"
    assert ended[0]["role"] == "spectator"


async def test_session_client_close_detaches_and_releases_the_lease() -> None:
    """A client's Close is answered, the transport closed, and the writer's lease released."""
    hub = make_hub()
    with capture_logs() as events:
        async with attached(hub) as (_, peer):
            await peer.message(type="hello")
            assert hub.lease.holder == "a1b2c3d4e5f60718"
            await peer.close(1000)
            assert (await peer.closed())[0] == 1000
            await detached(hub, "a1b2c3d4e5f60718")
            assert hub.lease.holder is None
    (ended,) = [e for e in events if e["event"] == "session_ended"]
    assert ended["reason"] == "client closed (1000)"
    assert ended["principal"] == "user:alice"
    assert ended["peer"] == "192.0.2.7"


async def test_session_closed_by_the_gateway_gets_its_code() -> None:
    """close_all (shutdown, VM removed) reaches the client as its close code and reason."""
    hub = make_hub()
    async with attached(hub, writer=False) as (_, peer):
        await peer.message(type="hello")
        hub.close_all(control.CLOSE_GOING_AWAY, "relayd is shutting down")
        assert await peer.closed() == (control.CLOSE_GOING_AWAY, "relayd is shutting down")
        await detached(hub, "a1b2c3d4e5f60718")


# -- a client that reads nothing ----------------------------------------------------------


def _hold_output(hub: ConsoleHub, session: ConsoleSession) -> None:
    """Publish until the kernel holds output the client has not read, and the transport more."""
    while session.transport.get_write_buffer_size() == 0:
        hub.publish(b"x" * 16384)


async def test_session_dropped_for_its_keepalive_is_reset_not_sent_a_fin_behind_its_output() -> (
    None
):
    """A dropped client that reads nothing must get a reset: a FIN waits behind unread output.

    Neither the client nor the gateway's socket would end but on TCP's retry timers:
    a ping flood that was dropped at two seconds once kept its sender waiting a minute.
    """
    hub = make_hub(output_queue_bytes=4096)
    async with attached(hub, writer=False, tcp=True, sndbuf=4096) as (session, peer):
        _hold_output(hub, session)
        assert session.keepalive()  # a ping it will never read
        with capture_logs() as events:
            assert not session.keepalive()
        assert [e["event"] for e in events] == ["keepalive_timeout"]
        with pytest.raises(ConnectionResetError):
            await peer.read_to_end()


async def test_session_close_it_cannot_flush_is_reset_after_the_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends Close and reads nothing: closing must not wait for ever to flush."""
    monkeypatch.setattr("relayd.session.CLOSE_TIMEOUT", 0.2)
    hub = make_hub(output_queue_bytes=4096)
    async with attached(hub, writer=False, tcp=True, sndbuf=4096) as (session, peer):
        _hold_output(hub, session)
        await peer.close(1000)  # answered with a Close the transport cannot flush
        await detached(hub, "a1b2c3d4e5f60718")
        assert session.end_reason == "client closed (1000)"
        with pytest.raises(ConnectionResetError):
            await peer.read_to_end()


async def test_session_client_that_half_closes_and_reads_nothing_is_reset_after_the_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its end of stream closes the transport, which must not wait for ever to flush."""
    monkeypatch.setattr("relayd.session.CLOSE_TIMEOUT", 0.2)
    hub = make_hub(output_queue_bytes=4096)
    async with attached(hub, writer=False, tcp=True, sndbuf=4096) as (session, peer):
        _hold_output(hub, session)
        peer.sock.shutdown(socket.SHUT_WR)
        await detached(hub, "a1b2c3d4e5f60718")
        assert session.end_reason == "client closed (1006)"  # its end of stream
        with pytest.raises(ConnectionResetError):
            await peer.read_to_end()
