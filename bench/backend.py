"""The far ends every relay talks to, served from the load generator's own loop.

* Echo server: every byte received is written straight back. It is a relayd
  VM's serial port (the "guest" echoes keystrokes) and, for websockify and
  HAProxy, the backend each client connection is relayed to.
* Flood server: a connection first names its flood group (a line
  ``F<gid>\\n``, which the client sends through the relay: keyboard input for
  relayd, the first bytes of the stream for the peers); once the group is
  started it writes exactly `total` bytes of console-like text.

The flood is credit-based: the server keeps at most `window` bytes in flight
between what it wrote and what the *slowest client of the group* has read
(the client counters live in this same process). That way no relay is ever
asked to buffer or drop output because the generator is slower than it, and
every relay moves exactly the same number of bytes, so CPU per GB compares
like with like. (relayd never pushes back on its serial port by design, and
websockify reads its target whatever its client's state, so an unpaced flood
would measure dropped or buffered bytes, not relayed ones.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any, cast

CHUNK = 65536
LINE = b"[  123.456789] systemd[1]: Started Journal Service; console flood for bench.\r\n"
PATTERN = (LINE * (CHUNK // len(LINE) + 1))[:CHUNK]
WINDOW = 512 * 1024


class Counter:
    """Something that counts the bytes one client has read."""

    rx: int


class FloodGroup:
    """One flood source and the clients that read it (1, or many spectators on relayd)."""

    def __init__(self, gid: int, total: int, window: int = WINDOW) -> None:
        self.gid = gid
        self.total = total
        self.window = window
        self.clients: list[Counter] = []
        self.source: FloodSource | None = None
        self.sent = 0
        self.started = False
        self.attached = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()

    def floor(self) -> int:
        """Bytes every client of the group has read."""
        return min(c.rx for c in self.clients) if self.clients else 0

    def start(self) -> None:
        """Begin writing."""
        self.started = True
        self.pump()

    def pump(self) -> None:
        """Write while the window allows."""
        src = self.source
        if not self.started or src is None or src.paused or src.transport is None:
            return
        avail = self.window - (self.sent - self.floor())
        while avail > 0 and self.sent < self.total and not src.paused:
            n = min(CHUNK, self.total - self.sent, avail)
            src.transport.write(PATTERN if n == CHUNK else PATTERN[:n])
            self.sent += n
            avail -= n

    def progress(self) -> None:
        """A client read something: finish, or top the window up."""
        if self.done.done():
            return
        floor = self.floor()
        if floor >= self.total:
            self.done.set_result(None)
        elif self.sent - floor <= self.window // 2:
            self.pump()


class FloodSource(asyncio.Protocol):
    """The server side of one flood connection."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._head = b""
        self.group: FloodGroup | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Wait for the group line."""
        self.transport = cast(asyncio.Transport, transport)
        self.backend.flood_conns += 1

    def data_received(self, data: bytes) -> None:
        """The first line names the group; everything after it is ignored."""
        if self.group is not None:
            return
        self._head += data
        if b"\n" not in self._head:
            if len(self._head) > 64:
                assert self.transport is not None
                self.transport.close()
            return
        line = self._head.split(b"\n", 1)[0].strip()
        group = self.backend.groups.get(int(line[1:])) if line[:1] == b"F" else None
        if group is None or group.source is not None:
            assert self.transport is not None
            self.transport.close()
            return
        self.group = group
        group.source = self
        if not group.attached.done():
            group.attached.set_result(None)
        group.pump()

    def pause_writing(self) -> None:
        """The relay is not reading fast enough: wait."""
        self.paused = True

    def resume_writing(self) -> None:
        """Carry on."""
        self.paused = False
        if self.group is not None:
            self.group.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        self.backend.flood_conns -= 1
        self.transport = None


class EchoProtocol(asyncio.Protocol):
    """Writes back what it reads."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count it (relayd's hubs connect at start-up; the harness waits for them)."""
        self.transport = cast(asyncio.Transport, transport)
        self.backend.echo_conns += 1
        self.backend.notify()

    def data_received(self, data: bytes) -> None:
        """Echo."""
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        """Count it."""
        self.backend.echo_conns -= 1
        self.backend.notify()


class Backend:
    """The echo and flood listeners on loopback."""

    def __init__(self) -> None:
        self.echo_port = 0
        self.flood_port = 0
        self.echo_conns = 0
        self.flood_conns = 0
        self.groups: dict[int, FloodGroup] = {}
        self._servers: list[asyncio.Server] = []
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Bind both listeners on ephemeral ports."""
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(
            lambda: EchoProtocol(self), "127.0.0.1", 0, backlog=4096, reuse_address=True
        )
        flood = await loop.create_server(
            lambda: FloodSource(self), "127.0.0.1", 0, backlog=4096, reuse_address=True
        )
        self._servers = [echo, flood]
        self.echo_port = echo.sockets[0].getsockname()[1]
        self.flood_port = flood.sockets[0].getsockname()[1]
        for server in self._servers:
            for sock in server.sockets:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def notify(self) -> None:
        """Wake `wait_echo_conns`."""
        self._changed.set()

    async def wait_echo_conns(self, predicate: Callable[[int], bool], within: float) -> bool:
        """Wait (bounded) until the number of echo connections satisfies `predicate`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not predicate(self.echo_conns):
                    self._changed.clear()
                    await self._changed.wait()
        return predicate(self.echo_conns)

    def new_groups(self, count: int, total: int) -> list[FloodGroup]:
        """Fresh flood groups (ids never reused within a run)."""
        base = max(self.groups, default=-1) + 1
        groups = [FloodGroup(base + i, total) for i in range(count)]
        self.groups.update({g.gid: g for g in groups})
        return groups

    def drop_groups(self, groups: list[FloodGroup]) -> None:
        """Forget finished groups (their sources stay connected for relayd)."""
        for g in groups:
            self.groups.pop(g.gid, None)
            if not g.done.done():
                g.done.cancel()
            if not g.attached.done():
                g.attached.cancel()

    async def close(self) -> None:
        """Stop listening."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def info(self) -> dict[str, Any]:
        """For the results file."""
        return {"echo_port": self.echo_port, "flood_port": self.flood_port, "window": WINDOW}


def serve_echo(port: int) -> None:
    """Run only an echo server on `port` until SIGTERM (a separate process, see run.py).

    The idle phase uses it for websockify and HAProxy: with two descriptors per
    relayed session on the generator's side (client and backend) one process
    would hit this machine's 20,000-descriptor hard limit before the relay does.
    """
    import signal

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        backend = Backend()
        server = await loop.create_server(
            lambda: EchoProtocol(backend), "127.0.0.1", port, backlog=4096, reuse_address=True
        )
        await stop.wait()
        server.close()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
