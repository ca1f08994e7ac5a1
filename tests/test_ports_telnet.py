"""telnet:// links (ports/telnet.py) against a real TCP far end that speaks raw bytes.

The framing itself is `relayd.telnet`'s (test_telnet.py); this checks the socket
around it: the opening negotiation goes out first, input is escaped, BREAK goes
in-band unescaped, and output is unframed before the consumer sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relayd.ports.telnet import TelnetLink, open_telnet
from relayd.telnet import BRK, IAC, TelnetCodec

from .conftest import TIMEOUT

OPENING = TelnetCodec().initial()


@asynccontextmanager
async def telnet_link() -> AsyncIterator[
    tuple[TelnetLink, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """A link to a loopback server, and the server's side of the connection."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait((reader, writer))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    link = await open_telnet("127.0.0.1", server.sockets[0].getsockname()[1])
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await accepted.get()
        yield link, reader, writer
    finally:
        await link.close()
        if writer is not None:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_telnet_link_sends_the_opening_negotiation_first() -> None:
    """The far end's first bytes are the codec's opening requests (BINARY both ways, SGA)."""
    async with telnet_link() as (_, reader, _):
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(len(OPENING)) == OPENING


async def test_telnet_link_escapes_input_but_not_its_break() -> None:
    """Typed 0xFF goes out doubled; BREAK goes out as one IAC BRK command."""
    async with telnet_link() as (link, reader, _):
        assert (link.can_break, link.can_hangup) == (True, False)
        await link.write(b"a\xffb")
        await link.send_break()
        expected = OPENING + b"a\xff\xffb" + bytes([IAC, BRK])
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(len(expected)) == expected


async def test_telnet_link_unframes_output_for_the_consumer() -> None:
    """IAC IAC from the far end reaches the consumer as one 0xFF; commands do not reach it."""
    async with telnet_link() as (link, _, writer):
        got = bytearray()
        arrived = asyncio.Event()

        def on_output(data: bytes) -> None:
            got.extend(data)
            arrived.set()

        link.start(on_output)
        writer.write(b"x" + bytes([IAC, IAC]) + b"y" + bytes([IAC, 241]) + b"z")  # 241: NOP
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            while len(got) < 4:
                arrived.clear()
                await arrived.wait()
        assert bytes(got) == b"x\xffyz"
