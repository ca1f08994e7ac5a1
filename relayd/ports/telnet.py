"""`telnet://` ports: QEMU's telnet chardev, libvirt, ser2net.

The framing is `relayd.telnet.TelnetCodec` (sans-I/O); this is the socket
around it. BREAK goes in-band as IAC BRK, which QEMU turns into a break on
the emulated UART.
"""

from __future__ import annotations

import asyncio
from typing import cast

from ..telnet import TelnetCodec
from .protocol import LinkProtocol
from .stream import StreamLink, _tune, new_protocol


class TelnetLink(StreamLink):
    """A serial port behind a telnet server."""

    can_break = True

    def __init__(self, transport: asyncio.BaseTransport, protocol: LinkProtocol) -> None:
        super().__init__(transport, protocol)
        # The protocol unframes output, escapes input and answers negotiation inline.
        self._codec = protocol.codec = TelnetCodec()
        protocol.write_raw(self._codec.initial())

    async def send_break(self) -> None:
        """IAC BRK (written as is: it must not be escaped)."""
        self._protocol.write_raw(self._codec.brk())
        await self.drain()


async def open_telnet(host: str, port: int) -> TelnetLink:
    """Connect to a telnet serial endpoint and start option negotiation."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(new_protocol, host, port)
    _tune(transport)
    return TelnetLink(transport, cast(LinkProtocol, protocol))
