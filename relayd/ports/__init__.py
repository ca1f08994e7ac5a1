"""Serial backends: one module per kind of port, behind the `SerialLink` interface.

A link is one open connection to a VM's serial port. The hub owns it, reads
from it in one task and writes to it from one other task, and opens a new
one with backoff when it is lost. Every backend is asynchronous: sockets on
the event loop, ttys through pyserial-asyncio-fast's transport.
"""

from __future__ import annotations

from typing import Protocol

from ..config import VmConfig
from ..errors import PortUnavailableError


class SerialLink(Protocol):
    """An open serial port: bytes in, bytes out, and BREAK where the medium has one."""

    can_break: bool
    can_hangup: bool

    async def read(self) -> bytes:
        """Console output; b"" when the far end has gone away."""
        ...

    async def write(self, data: bytes) -> None:
        """Queue keyboard input and wait until the link has taken it."""
        ...

    async def send_break(self) -> None:
        """A serial BREAK condition (only when `can_break`)."""
        ...

    async def hangup(self) -> None:
        """Drop DTR for a moment so getty hangs up (only when `can_hangup`)."""
        ...

    async def close(self) -> None:
        """Release the port; never raises."""
        ...


async def open_link(vm: VmConfig) -> SerialLink:
    """Open the VM's serial port.

    Raises:
        PortUnavailableError: the port cannot be reached now.
    """
    url = vm.serial
    try:
        if url.kind == "tty":
            from .tty import open_tty

            return await open_tty(url.target, baud=vm.baud, parity=vm.parity)
        if url.kind == "unix":
            from .stream import open_unix

            return await open_unix(url.target)
        if url.kind == "telnet":
            from .telnet import open_telnet

            return await open_telnet(url.target, url.port)
        from .stream import open_tcp

        return await open_tcp(url.target, url.port)
    except OSError as exc:
        raise PortUnavailableError(f"{url}: {exc.strerror or exc}") from exc


__all__ = ["SerialLink", "open_link"]
