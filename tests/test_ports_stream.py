"""Raw byte-stream links (ports/stream.py): tcp:// and unix:// against real listeners.

The far end is a real asyncio server on loopback or a unix socket in the test's
directory; its connection can stop reading, to show the link waits (and only
then), and close, to show the link notices.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relayd.ports.stream import StreamLink, open_tcp, open_unix

from .conftest import TIMEOUT


class Peer:
    """The far end's side of one accepted connection."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Keep the connection for the test (it reads and writes on it itself)."""
        self.reader, self.writer = reader, writer
        self.accepted.set()

    async def connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The accepted connection, once the link has connected."""
        async with asyncio.timeout(TIMEOUT):
            await self.accepted.wait()
        assert self.reader is not None
        assert self.writer is not None
        return self.reader, self.writer


Opener = Callable[[], Awaitable[StreamLink]]


@asynccontextmanager
async def serving(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Peer, Opener]]:
    """A listening far end of `kind` (tcp or unix) and how to open a link to it."""
    peer = Peer()
    opener: Opener
    if kind == "tcp":
        server = await asyncio.start_server(peer.on_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def opener() -> Awaitable[StreamLink]:
            return open_tcp("127.0.0.1", port)
    else:
        path = str(tmp_path / "console.sock")
        server = await asyncio.start_unix_server(peer.on_client, path)

        def opener() -> Awaitable[StreamLink]:
            return open_unix(path)

    try:
        yield peer, opener
    finally:
        if peer.writer is not None:
            peer.writer.close()
        server.close()
        await server.wait_closed()


class Output:
    """What a link hands to its consumer, with a wake-up for each chunk."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._arrived = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        self.data += data
        self._arrived.set()

    async def until(self, expected: bytes) -> None:
        """Wait until exactly `expected` has arrived."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.data) < len(expected):
                self._arrived.clear()
                await self._arrived.wait()
        assert bytes(self.data) == expected


@asynccontextmanager
async def linked(
    kind: str, tmp_path: Path
) -> AsyncIterator[tuple[StreamLink, asyncio.StreamReader, asyncio.StreamWriter]]:
    """An open link of `kind` and the far end's side of its connection."""
    async with serving(kind, tmp_path) as (peer, opener):
        link = await opener()
        try:
            reader, writer = await peer.connection()
            yield link, reader, writer
        finally:
            await link.close()


KINDS = pytest.mark.parametrize("kind", ["tcp", "unix"])


@KINDS
async def test_stream_link_output_reaches_the_consumer_in_order(kind: str, tmp_path: Path) -> None:
    """Console output from the far end is handed to the consumer as it arrives, in order."""
    async with linked(kind, tmp_path) as (link, _, writer):
        output = Output()
        link.start(output)
        for line in (b"[    0.000000] Linux version 6.1\r\n", b"login: "):
            writer.write(line)
            await writer.drain()
        await output.until(b"[    0.000000] Linux version 6.1\r\nlogin: ")


@KINDS
async def test_stream_link_write_reaches_the_far_end(kind: str, tmp_path: Path) -> None:
    """Input written to the link arrives at the far end byte for byte (no framing on raw ports)."""
    async with linked(kind, tmp_path) as (link, reader, _):
        await link.write(b"root\r\xff\x00")
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(7) == b"root\r\xff\x00"


@KINDS
async def test_stream_link_waits_while_the_far_end_does_not_read(kind: str, tmp_path: Path) -> None:
    """Past what the transport holds the link is not writable; drain waits for the far end."""
    async with linked(kind, tmp_path) as (link, reader, _):
        big = bytes(range(256)) * 32768  # 8 MiB: more than the kernel and the transport hold
        link.writer.write_now(big)
        assert not link.writer.writable
        waiter = link.writer.drain_waiter()
        assert waiter is not None
        assert not waiter.done()
        drained = asyncio.create_task(link.drain())
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(len(big)) == big
            await drained
        assert link.writer.writable


@KINDS
async def test_stream_link_notices_the_far_end_going_away(kind: str, tmp_path: Path) -> None:
    """When the far end closes, wait_closed returns: the hub then reconnects."""
    async with linked(kind, tmp_path) as (link, _, writer):
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            await link.wait_closed()
        assert not link.writer.writable


@KINDS
async def test_stream_link_close_ends_the_connection(kind: str, tmp_path: Path) -> None:
    """close() ends the connection: the far end reads end of stream."""
    async with linked(kind, tmp_path) as (link, reader, _):
        await link.close()
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""


@KINDS
async def test_stream_link_has_no_break_and_no_dtr(kind: str, tmp_path: Path) -> None:
    """A socket carries no BREAK and has no DTR: the link says so and refuses both."""
    async with linked(kind, tmp_path) as (link, _, _):
        assert (link.can_break, link.can_hangup) == (False, False)
        with pytest.raises(NotImplementedError, match="cannot carry a BREAK"):
            await link.send_break()
        with pytest.raises(NotImplementedError, match="no DTR"):
            await link.hangup()


async def test_stream_link_tcp_sends_keystrokes_without_delay(tmp_path: Path) -> None:
    """TCP links set TCP_NODELAY (a keystroke is not held back) and keepalive."""
    async with linked("tcp", tmp_path) as (link, _, _):
        assert link.writer.transport is not None
        sock = link.writer.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


async def test_stream_link_to_a_missing_socket_raises_oserror(tmp_path: Path) -> None:
    """Nothing listening: opening fails with the OSError the hub turns into a retry."""
    with pytest.raises(FileNotFoundError):
        await open_unix(str(tmp_path / "absent.sock"))


async def test_a_tcp_link_whose_far_end_stopped_reading_is_reset_when_given_up(
    tmp_path: Path,
) -> None:
    """A far end that reads nothing (a hung guest, its UART full) never lets a graceful close
    flush. After the close's deadline the connection is reset, not handed to the kernel to
    finish: the orphan would keep a single-client chardev serving it, and deliver input
    typed for a console that moved on, instead of the next gateway's connection."""
    async with linked("tcp", tmp_path) as (link, reader, _):
        queued = bytes(16 << 20)  # more than both sockets' buffers hold
        link.writer.write_now(queued)
        await link.close()  # gives up after CLOSE_TIMEOUT: nothing is read meanwhile

        async def read_all() -> int:
            got = 0
            async with asyncio.timeout(TIMEOUT):
                while chunk := await reader.read(1 << 20):
                    got += len(chunk)
            return got

        with pytest.raises(ConnectionResetError):
            await read_all()  # before: every queued byte, then end of stream
