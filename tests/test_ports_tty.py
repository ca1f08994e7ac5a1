"""tty links (ports/tty.py) on real ptys from `os.openpty()`.

The pty's master is the "VM": what the link writes is read there, what is
written there is console output, and closing it unplugs the port. The slave
is opened by its stable symlink, as /dev/serial/by-id paths are.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relayd.config import VmConfig
from relayd.errors import PortUnavailableError
from relayd.ports import open_link
from relayd.ports.tty import TtyLink, open_tty

from .conftest import TIMEOUT

PtyPair = Callable[[], tuple[int, Path]]


async def read_master(master: int, n: int) -> bytes:
    """Read `n` bytes the link wrote, from the pty's master, as they become readable."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    got = b""
    loop.add_reader(master, readable.set)
    try:
        async with asyncio.timeout(TIMEOUT):
            while len(got) < n:
                readable.clear()
                await readable.wait()
                try:
                    got += os.read(master, n - len(got))
                except BlockingIOError:
                    continue
    finally:
        loop.remove_reader(master)
    return got


@asynccontextmanager
async def tty(path: Path, *, baud: int = 115200, parity: str = "none") -> AsyncIterator[TtyLink]:
    """A tty link on `path`, closed when the block ends."""
    link = await open_tty(str(path), baud=baud, parity=parity)
    try:
        yield link
    finally:
        await link.close()


async def test_tty_link_output_and_input_pass_unchanged(pty_pair: PtyPair) -> None:
    """In raw mode nothing is translated or echoed: bytes pass as they are, both ways."""
    master, path = pty_pair()
    async with tty(path) as link:
        got = bytearray()
        arrived = asyncio.Event()

        def on_output(data: bytes) -> None:
            got.extend(data)
            arrived.set()

        link.start(on_output)
        os.write(master, b"login: \r\n\x00\xff")
        async with asyncio.timeout(TIMEOUT):
            while len(got) < 11:
                arrived.clear()
                await arrived.wait()
        assert bytes(got) == b"login: \r\n\x00\xff"
        await link.write(b"root\r\x03")
        assert await read_master(master, 6) == b"root\r\x03"


async def test_tty_link_on_a_pty_cannot_break_but_can_hang_up(pty_pair: PtyPair) -> None:
    """Linux ptys drop BREAK, so a pty reports can_break False (the VM needs break_command)."""
    _, path = pty_pair()
    async with tty(path) as link:
        assert (link.can_break, link.can_hangup) == (False, True)


async def test_tty_link_notices_the_port_being_unplugged(pty_pair: PtyPair) -> None:
    """Closing the master (the VM or its cable goes away) ends the link."""
    master, path = pty_pair()
    async with tty(path) as link:
        link.start(lambda data: None)
        os.close(master)
        # It ends, or fails with EIO from the vanished master: either way it is gone.
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(OSError):
                await link.wait_closed()
        assert not link.writer.writable


async def test_tty_link_is_opened_exclusively(pty_pair: PtyPair) -> None:
    """A second opener (another relayd, a stray screen) is refused while the link holds the tty."""
    _, path = pty_pair()
    vm = VmConfig(id="vm-tty", subscription="sub-1", serial=str(path))
    async with tty(path):
        with pytest.raises(PortUnavailableError, match=str(path)):
            await open_link(vm)


async def test_tty_link_is_what_open_link_gives_for_a_device_path(pty_pair: PtyPair) -> None:
    """A `serial = "/dev/..."` VM opens a TtyLink at its baud rate, and input gets through."""
    master, path = pty_pair()
    vm = VmConfig(id="vm-tty", subscription="sub-1", serial=str(path), baud=9600)
    link = await open_link(vm)
    try:
        assert isinstance(link, TtyLink)
        # pyserial-asyncio-fast connects the protocol one loop turn after it returns (unlike
        # the socket links); output arriving shows it has, and then input gets through.
        arrived = asyncio.Event()
        link.start(lambda data: arrived.set())
        os.write(master, b"$ ")
        async with asyncio.timeout(TIMEOUT):
            await arrived.wait()
        await link.write(b"hello\r")
        assert await read_master(master, 6) == b"hello\r"
    finally:
        await link.close()


async def test_tty_link_missing_device_is_port_unavailable(tmp_path: Path) -> None:
    """A device path that does not exist is PortUnavailableError naming it (the hub retries)."""
    path = tmp_path / "ttyGone"
    vm = VmConfig(id="vm-tty", subscription="sub-1", serial=str(path))
    with pytest.raises(PortUnavailableError, match="ttyGone"):
        await open_link(vm)
