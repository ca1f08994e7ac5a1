"""The keystroke path on uvloop, the daemon's loop (the rest of the suite runs on asyncio's).

Keystrokes cut into one-byte TLS records go through the frame reader on
uvloop's TLS protocol, and output keeps flowing through a new serial link
after a port reconnect. This directory's conftest.py
`pytest_asyncio_loop_factories` puts this module on uvloop.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from typing import Any

import uvloop

from ..conftest import TIMEOUT, FarEnd, raw_console, running, wait_port_up

KEY = b"\x0a\x0b\x0c\x0d"


def keystroke(payload: bytes) -> bytes:
    """A masked final binary frame, as a browser sends a key."""
    body = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x82, 0x80 | len(payload)) + KEY + body


async def read_until(reader: asyncio.StreamReader, marker: bytes, seen: bytearray) -> None:
    """Read the raw WebSocket stream until `marker` has appeared in it."""
    async with asyncio.timeout(TIMEOUT):
        while marker not in seen:
            data = await reader.read(65536)
            assert data, f"connection closed before {marker!r}"
            seen += data
    del seen[: seen.index(marker) + len(marker)]


async def test_keys_and_output_flow_on_uvloop_across_a_port_reconnect(
    write_config: Callable[..., Any],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    config = write_config(vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}])
    async with running(config) as gw:
        await wait_port_up(gw, "vm-a")
        reader, writer = await raw_console(gw, client_ssl, token("alice"))
        seen = bytearray()
        typed = b"hello" + b"X" * 125 + b"!"
        stream = b"".join(keystroke(bytes([c])) for c in b"hello")
        stream += keystroke(b"X" * 125) + keystroke(b"") + keystroke(b"!")
        for i in range(len(stream)):  # one byte per TLS record: frames cut everywhere
            writer.write(stream[i : i + 1])
            await writer.drain()
        await far_end.wait_received(lambda b: b == typed)
        await far_end.send(b"from-the-vm-1")
        await read_until(reader, b"from-the-vm-1", seen)

        await far_end.stop()  # the VM's port goes away and comes back: a new link
        far_end.received.clear()
        await far_end.start()
        await read_until(reader, b'"port_down"', seen)
        await read_until(reader, b'"port_up"', seen)
        writer.write(keystroke(b"again"))
        await writer.drain()
        await far_end.wait_received(lambda b: b == b"again")
        await far_end.send(b"from-the-vm-2")
        await read_until(reader, b"from-the-vm-2", seen)
        (session,) = gw.sessions.values()
        assert session.bytes_in == len(typed) + len(b"again")
        # The session is the TLS transport's protocol since the upgrade: its end must
        # still reach the gateway's books (connection and session both forgotten).
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            await gw._until(lambda: not gw.connections)
        assert not gw.sessions
        assert session.end_reason == "connection lost" or session.end_reason.startswith(
            "client closed"
        )
