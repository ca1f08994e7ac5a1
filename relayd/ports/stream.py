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

CLOSE_TIMEOUT = 2.0


class LinkProtocol(asyncio.Protocol):
    """The asyncio side of a link: output to a callback, flow control for writes."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._consumer: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.paused = False  # the far end is not reading (asyncio flow control)
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's are transport-like, not subclasses)."""
        self.transport = cast(asyncio.Transport, transport)

    def set_consumer(self, consumer: Callable[[bytes], None]) -> None:
        """Where output goes from now on (bytes that came before are handed over first)."""
        self._consumer = consumer
        early, self._early = self._early, []
        for data in early:
            consumer(data)

    def data_received(self, data: bytes) -> None:
        """Console output from the port."""
        if self._consumer is None:
            self._early.append(data)
        else:
            self._consumer(data)

    def eof_received(self) -> bool | None:
        """The far end closed its side: the port is gone."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake whoever waits for the end or for a drain."""
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)
                self.closed.exception()  # retrieved here; the hub reads it via wait_closed
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("serial link lost"))

    def pause_writing(self) -> None:
        """The far end is not reading."""
        self.paused = True

    def resume_writing(self) -> None:
        """It reads again."""
        self.paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        """Wait while the transport pushes back."""
        while self.paused:
            if self.closed.done():
                raise ConnectionResetError("serial link lost")
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained


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

    async def wait_closed(self) -> None:
        """Return (or raise the transport's error) when the far end goes away."""
        await asyncio.shield(self._protocol.closed)

    @property
    def writable(self) -> bool:
        """Whether `write_now` would not have to wait."""
        return not self._protocol.paused and not self._transport.is_closing()

    def write_now(self, data: bytes) -> None:
        """Hand bytes to the transport at once (callers check `writable` first)."""
        if self._transport.is_closing():
            raise ConnectionResetError("serial link is closed")
        self._transport.write(self._encode(data))

    def _encode(self, data: bytes) -> bytes:
        return data

    async def write(self, data: bytes) -> None:
        """Write, then wait while the far end is not keeping up."""
        self.write_now(data)
        await self._protocol.drain()

    async def send_break(self) -> None:
        """Streams carry no BREAK."""
        raise NotImplementedError("this port cannot carry a BREAK")

    async def hangup(self) -> None:
        """Streams have no DTR."""
        raise NotImplementedError("this port has no DTR line")

    async def close(self) -> None:
        """Close the socket; abort it when the close does not finish in time.

        A far end that stopped reading never lets a graceful close flush, and the
        transport (its socket and its unsent bytes) would otherwise stay forever.
        """
        self._transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._protocol.closed)
        except TimeoutError:
            self._transport.abort()
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
    transport, protocol = await loop.create_connection(LinkProtocol, host, port)
    _tune(transport)
    return StreamLink(transport, protocol)


async def open_unix(path: str) -> StreamLink:
    """Connect to a unix-socket chardev."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_unix_connection(LinkProtocol, path)
    return StreamLink(transport, protocol)
