"""Raw byte-stream ports: `tcp://` (QEMU/libvirt raw TCP chardevs) and `unix://` sockets.

Neither medium can carry a BREAK; a VM that needs one sets `break_command`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

READ_SIZE = 65536
CLOSE_TIMEOUT = 2.0


class StreamLink:
    """A serial port reached through an asyncio stream."""

    can_break = False
    can_hangup = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        """Console output; b"" when the far end has gone away."""
        return await self._reader.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        """Write and wait for the socket buffer to drain."""
        if self._writer.is_closing():
            raise ConnectionResetError("serial link is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def send_break(self) -> None:
        """Streams carry no BREAK."""
        raise NotImplementedError("this port cannot carry a BREAK")

    async def hangup(self) -> None:
        """Streams have no DTR."""
        raise NotImplementedError("this port has no DTR line")

    async def close(self) -> None:
        """Close the socket, waiting a bounded time for the close to finish."""
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Keystrokes are tiny and latency matters more than segment count.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def open_tcp(host: str, port: int) -> StreamLink:
    """Connect to a raw TCP serial endpoint."""
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    _tune(writer)
    return StreamLink(reader, writer)


async def open_unix(path: str) -> StreamLink:
    """Connect to a unix-socket chardev."""
    reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
    return StreamLink(reader, writer)
