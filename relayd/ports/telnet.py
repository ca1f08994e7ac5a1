"""`telnet://` ports: QEMU's telnet chardev, libvirt, ser2net.

The framing is `relayd.telnet.TelnetCodec` (sans-I/O); this is the socket
around it. BREAK goes in-band as IAC BRK, which QEMU turns into a break on
the emulated UART.
"""

from __future__ import annotations

import asyncio

from ..telnet import DataReceived, TelnetCodec
from .stream import READ_SIZE, StreamLink, _tune


class TelnetLink(StreamLink):
    """A serial port behind a telnet server."""

    can_break = True

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self._codec = TelnetCodec()
        writer.write(self._codec.initial())

    async def read(self) -> bytes:
        """Console bytes with the telnet framing removed; negotiation answered inline."""
        while True:
            raw = await self._reader.read(READ_SIZE)
            if not raw:
                return b""
            events = self._codec.receive(raw)
            reply = self._codec.data_to_send()
            if reply and not self._writer.is_closing():
                self._writer.write(reply)
            data = b"".join(e.data for e in events if isinstance(e, DataReceived))
            if data:
                return data

    async def write(self, data: bytes) -> None:
        """Keyboard input with 0xFF escaped."""
        await super().write(self._codec.encode(data))

    async def send_break(self) -> None:
        """IAC BRK."""
        await super().write(self._codec.brk())


async def open_telnet(host: str, port: int) -> TelnetLink:
    """Connect to a telnet serial endpoint and start option negotiation."""
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    _tune(writer)
    return TelnetLink(reader, writer)
