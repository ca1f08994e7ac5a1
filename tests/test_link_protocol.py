"""The serial links' asyncio protocol (compiled with the keystroke path), on a real socket pair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest

from relayd.ports.protocol import LinkProtocol
from relayd.ports.stream import new_protocol
from relayd.telnet import BINARY, BRK, DO, IAC, WILL, TelnetCodec

from .conftest import TIMEOUT


@asynccontextmanager
async def linked() -> AsyncIterator[tuple[LinkProtocol, socket.socket]]:
    """A LinkProtocol on one end of a socket pair; the other end is the 'port'."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_unix_connection(new_protocol, sock=ours)
    try:
        yield cast(LinkProtocol, protocol), theirs
    finally:
        transport.close()
        theirs.close()


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    """What the far end receives, `n` bytes of it."""
    loop = asyncio.get_running_loop()
    out = b""
    async with asyncio.timeout(TIMEOUT):
        while len(out) < n:
            chunk = await loop.sock_recv(sock, n - len(out))
            assert chunk, "closed early"
            out += chunk
    return out


async def test_link_protocol_output_before_start_is_kept_and_unframed_once_started() -> None:
    """Output that comes before the consumer is set is handed over first, unframed."""
    async with linked() as (protocol, port):
        protocol.codec = TelnetCodec()
        # What the transport hands over before the hub starts reading the link.
        protocol.data_received(b"boot" + bytes([IAC, IAC]) + b"!" + bytes([IAC, WILL, BINARY]))
        got: list[bytes] = []
        protocol.set_consumer(got.append)
        assert b"".join(got) == b"boot\xff!"
        # The negotiation was answered on the wire (WILL BINARY -> DO BINARY).
        assert await read_exactly(port, 3) == bytes([IAC, DO, BINARY])


async def test_link_protocol_typing_is_escaped_on_telnet_and_raw_commands_are_not() -> None:
    """write_now escapes 0xFF on telnet ports; write_raw sends commands as they are."""
    async with linked() as (protocol, port):
        protocol.codec = TelnetCodec()
        assert protocol.writable
        protocol.write_now(b"a\xffb")
        protocol.write_raw(bytes([IAC, BRK]))
        assert await read_exactly(port, 6) == b"a\xff\xffb" + bytes([IAC, BRK])


async def test_link_protocol_closed_link_refuses_writes_and_wakes_a_drain() -> None:
    """A drain waits while paused and ends on resume; a lost link fails it and refuses writes."""
    async with linked() as (protocol, port):
        assert protocol.drain_waiter() is None
        protocol.pause_writing()
        assert not protocol.writable
        waiter = protocol.drain_waiter()
        assert waiter is not None
        assert not waiter.done()
        protocol.resume_writing()
        assert waiter.done()
        assert waiter.exception() is None
        protocol.pause_writing()
        waiter = protocol.drain_waiter()
        assert waiter is not None
        port.close()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.shield(protocol.closed)
        assert isinstance(waiter.exception(), ConnectionResetError)
        with pytest.raises(ConnectionResetError):
            protocol.drain_waiter()
        with pytest.raises(ConnectionResetError):
            protocol.write_now(b"late")


async def test_link_protocol_link_lost_with_an_error_hands_it_to_the_waiter() -> None:
    """A transport error ends `closed` with that error, for the hub to report it."""
    async with linked() as (protocol, _):
        error = OSError(5, "Input/output error")
        protocol.connection_lost(error)
        assert protocol.closed.exception() is error
        protocol.connection_lost(None)  # a second report changes nothing
        assert protocol.closed.exception() is error


async def test_link_protocol_raw_port_hands_output_over_unchanged() -> None:
    """Without a codec, every byte (0xFF included) goes to the consumer as it came."""
    async with linked() as (protocol, _):
        got: list[bytes] = []
        protocol.set_consumer(got.append)
        protocol.data_received(bytes([IAC, IAC, WILL]))
        assert got == [bytes([IAC, IAC, WILL])]
