"""The simulated guest's serial chardev: one machine behind a socket, as QEMU serves it.

One console client at a time: by default a newcomer replaces the old one;
with `exclusive=True` a newcomer waits, connected but unserved, until the
current client hangs up, which is what QEMU's socket chardev does (it stops
accepting while a client is attached, so later connections sit in the
listen backlog). Output the machine produces while nobody is connected is
dropped; the machine's state survives reconnects. Over TCP it speaks telnet
as QEMU's telnet chardev does; over a unix socket it is raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import pathlib
from types import TracebackType

from ..telnet import BreakReceived, TelnetCodec
from .machine import BREAK, GuestMachine

__all__ = ["SimulatedGuest"]

READ_SIZE = 65536
"""Bytes read from the console client at a time (and the stream reader's limit)."""
CLOSE_TIMEOUT = 1.0
"""Seconds to wait for a dropped console client's socket to close."""


class SimulatedGuest:
    """One simulated VM listening as a serial chardev; its state survives reconnects.

    Args:
        name: the VM's hostname.
        user: the login name.
        password: its password.
        telnet: speak telnet on TCP (QEMU's `telnet` chardev) rather than raw bytes.
        exclusive: a newcomer waits for the current client to hang up (as QEMU
            does) instead of replacing it; what a cluster demo needs, where a
            second gateway opening the port must not steal it.
    """

    def __init__(
        self,
        name: str,
        *,
        user: str = "operator",
        password: str = "relayd",  # noqa: S107 - the demo guests' published login
        telnet: bool = True,
        exclusive: bool = False,
    ) -> None:
        self.name = name
        self.machine = GuestMachine(name, user=user, password=password)
        self._telnet = telnet
        self._exclusive = exclusive
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._port: int | None = None
        self._closing = False
        self._console: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: `start` has not been called.
        """
        if self._port is None:
            raise RuntimeError(f"simulated guest {self.name} is not listening on TCP")
        return self._port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP (telnet or raw, as constructed); returns the bound port."""
        accept = functools.partial(self._accept, telnet=self._telnet)
        server = await asyncio.start_server(accept, host, port, limit=READ_SIZE)
        self._servers.append(server)
        self._port = int(server.sockets[0].getsockname()[1])
        return self._port

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket, raw like QEMU's unix chardev (no telnet)."""
        accept = functools.partial(self._accept, telnet=False)
        server = await asyncio.start_unix_server(accept, path, limit=READ_SIZE)
        self._servers.append(server)
        self._unix_paths.append(path)

    def reboot(self) -> None:
        """Reset the VM: boot messages now if a console is attached, else on the next attach."""
        self.machine.power_off()
        if self._wake is not None:
            self.machine.boot()
            self._wake.set()

    async def close(self) -> None:
        """Stop listening, disconnect the console and wait for every task to end."""
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            # Python 3.11's unix server leaves its socket file behind. Unlinking a
            # socket inode does not block on anything worth a thread.
            pathlib.Path(path).unlink(missing_ok=True)  # noqa: ASYNC240
        self._unix_paths.clear()

    async def __aenter__(self) -> SimulatedGuest:
        """The guest, not yet listening: call `start` or `start_unix` inside the block."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, telnet: bool
    ) -> None:
        if self._closing:
            writer.transport.abort()
            return
        previous = self._console
        task = asyncio.create_task(
            self._serve(reader, writer, telnet=telnet, previous=previous),
            name=f"sim-console-{self.name}",
        )
        self._console = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if previous is not None and not self._exclusive:
            previous.cancel()  # one console client at a time: the newcomer wins

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        telnet: bool,
        previous: asyncio.Task[None] | None,
    ) -> None:
        wake = asyncio.Event()
        try:
            if previous is not None:
                # Replaced: it must let go of the machine first. Exclusive: wait our
                # turn, unserved, until every earlier client has hung up.
                await asyncio.wait({previous})
            self._wake = wake
            codec = TelnetCodec(server_side=True) if telnet else None
            if codec is not None:
                writer.write(codec.initial())
            if not self.machine.booted:
                self.machine.boot()
            async with asyncio.TaskGroup() as tasks:
                pump = tasks.create_task(self._pump(writer, codec, wake))
                wake.set()
                await self._read_loop(reader, writer, codec, wake)
                pump.cancel()
        except asyncio.CancelledError:
            writer.transport.abort()  # replaced or shut down: drop the line, as QEMU does
            raise
        finally:
            if self._wake is wake:
                self._wake = None
            if self._console is asyncio.current_task():
                self._console = None
                self.machine.discard()  # nobody is connected: output goes nowhere
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    async def _read_loop(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: TelnetCodec | None,
        wake: asyncio.Event,
    ) -> None:
        """Keys in, echo out, until the client hangs up."""
        machine = self.machine
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                return  # the client went away: a hangup, not an error
            if not data:
                return
            if codec is None:
                out = machine.feed(data)
            else:
                parts = [
                    machine.feed(BREAK if isinstance(event, BreakReceived) else event.data)
                    for event in codec.receive(data)
                ]
                # Like QEMU: options from the client are parsed but never answered,
                # and the guest's output goes out raw (QEMU does not double 0xFF).
                codec.data_to_send()
                out = b"".join(parts)
            if machine.busy:
                wake.set()
            if out and not writer.is_closing():
                writer.write(out)
                try:
                    await writer.drain()
                except ConnectionError:
                    return

    async def _pump(
        self, writer: asyncio.StreamWriter, codec: TelnetCodec | None, wake: asyncio.Event
    ) -> None:
        """Job output (boot, floods) out, as fast as the client drains it."""
        machine = self.machine
        while True:
            await wake.wait()
            wake.clear()
            while machine.busy:
                chunk = machine.pull()
                if chunk:
                    if writer.is_closing():
                        return
                    writer.write(chunk)  # raw, as QEMU sends it (see _read_loop)
                    try:
                        await writer.drain()
                    except ConnectionError:
                        return
                # drain() does not yield below the high-water mark; let the reader see ^C.
                await asyncio.sleep(0)
