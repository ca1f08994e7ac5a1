"""`telnet://` ports: QEMU's telnet chardev, libvirt, ser2net.

The framing is `relayd.telnet.TelnetCodec` (sans-I/O); this is the socket
around it. BREAK goes in-band as IAC BRK, which QEMU turns into a break on
the emulated UART.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..telnet import DataReceived, TelnetCodec
from .stream import LinkProtocol, StreamLink, _tune


class TelnetLink(StreamLink):
    """A serial port behind a telnet server."""

    can_break = True

    def __init__(self, transport: asyncio.BaseTransport, protocol: LinkProtocol) -> None:
        super().__init__(transport, protocol)
        self._codec = TelnetCodec()
        self._transport.write(self._codec.initial())

    def start(self, on_output: Callable[[bytes], None]) -> None:
        """Unframe what arrives; answer negotiation inline; pass console bytes on."""

        def unframe(raw: bytes) -> None:
            events = self._codec.receive(raw)
            reply = self._codec.data_to_send()
            if reply and not self._transport.is_closing():
                self._transport.write(reply)
            for event in events:
                if isinstance(event, DataReceived):
                    on_output(event.data)

        super().start(unframe)

    def _encode(self, data: bytes) -> bytes:
        return self._codec.encode(data)

    async def send_break(self) -> None:
        """IAC BRK (written as is: it must not be escaped)."""
        if self._transport.is_closing():
            raise ConnectionResetError("serial link is closed")
        self._transport.write(self._codec.brk())
        await self._protocol.drain()


async def open_telnet(host: str, port: int) -> TelnetLink:
    """Connect to a telnet serial endpoint and start option negotiation."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(LinkProtocol, host, port)
    _tune(transport)
    return TelnetLink(transport, protocol)
