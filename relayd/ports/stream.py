"""Raw byte-stream ports: `tcp://` (QEMU/libvirt raw TCP chardevs) and `unix://` sockets.

Links are asyncio protocols, not streams: bytes from the port are handed to
the hub's callback in `data_received`, so console output costs no task
wake-up per chunk, and writes go straight to the transport, waiting only
while the transport pushes back. Neither medium can carry a BREAK; a VM
that needs one sets `break_command`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from ..linger import reset_connection
from .protocol import LinkProtocol

CLOSE_TIMEOUT = 2.0


def new_protocol() -> asyncio.Protocol:
    """A `LinkProtocol`, typed as asyncio's factories want (it is a protocol by shape)."""
    return cast(asyncio.Protocol, LinkProtocol())


class StreamLink:
    """A serial port reached through a socket."""

    can_break = False
    can_hangup = False

    def __init__(self, transport: asyncio.BaseTransport, protocol: LinkProtocol) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._protocol = protocol

    def start(self, on_output: Callable[[bytes], None]) -> None:
        """Deliver console output to `on_output` from now on."""
        self._protocol.set_consumer(on_output)

    @property
    def writer(self) -> LinkProtocol:
        """Where the hub writes typing straight through (compiled: the keystroke path)."""
        return self._protocol

    async def wait_closed(self) -> None:
        """Return (or raise the transport's error) when the far end goes away."""
        await asyncio.shield(self._protocol.closed)

    async def write(self, data: bytes) -> None:
        """Write, then wait while the far end is not keeping up."""
        self._protocol.write_now(data)
        await self.drain()

    async def drain(self) -> None:
        """Wait while the transport pushes back."""
        while (waiter := self._protocol.drain_waiter()) is not None:
            await waiter

    async def send_break(self) -> None:
        """Streams carry no BREAK."""
        raise NotImplementedError("this port cannot carry a BREAK")

    async def hangup(self) -> None:
        """Streams have no DTR."""
        raise NotImplementedError("this port has no DTR line")

    async def close(self) -> None:
        """Close the socket; abort it when the close does not finish in time.

        A far end that stopped reading never lets a graceful close flush, and the
        transport (its socket and its unsent bytes) would otherwise stay forever. The
        abort resets the connection: closed the usual way, the orphaned socket would
        keep a single-client chardev (QEMU's) serving it, not the gateway that opens
        the port next, and deliver input typed for a console that moved on.
        """
        self._transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._protocol.closed)
        except TimeoutError:
            reset_connection(self._transport)
        except OSError:
            pass


def _tune(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        # Keystrokes are tiny and latency matters more than segment count.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def open_tcp(host: str, port: int) -> StreamLink:
    """Connect to a raw TCP serial endpoint."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(new_protocol, host, port)
    _tune(transport)
    return StreamLink(transport, cast(LinkProtocol, protocol))


async def open_unix(path: str) -> StreamLink:
    """Connect to a unix-socket chardev."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_unix_connection(new_protocol, path)
    return StreamLink(transport, cast(LinkProtocol, protocol))
