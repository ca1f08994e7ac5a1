"""Serial backends: one module per kind of port, behind the `SerialLink` interface.

A link is one open connection to a VM's serial port. The hub owns it: output
arrives through a callback (an asyncio protocol, no reader task), input is
written in order by the hub's writer, and a new link is opened with backoff
when one is lost. Every backend is asynchronous: sockets on the event loop,
ttys through pyserial-asyncio-fast's transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..config import VmConfig
from ..errors import PortUnavailableError
from .protocol import LinkProtocol
from .stream import open_tcp, open_unix
from .telnet import open_telnet
from .tty import open_tty


class SerialLink(Protocol):
    """An open serial port: bytes in, bytes out, and BREAK where the medium has one."""

    can_break: bool
    can_hangup: bool

    def start(self, on_output: Callable[[bytes], None]) -> None:
        """Hand console output to `on_output` as it arrives (never blocks, never awaits)."""
        ...

    async def wait_closed(self) -> None:
        """Return, or raise the transport's error, when the far end goes away."""
        ...

    @property
    def writer(self) -> LinkProtocol:
        """Where the hub writes typing at once: no task, no interpreted frame in between."""
        ...

    async def write(self, data: bytes) -> None:
        """Write keyboard input and wait while the far end is not keeping up."""
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
            return await open_tty(url.target, baud=vm.baud, parity=vm.parity)
        if url.kind == "unix":
            return await open_unix(url.target)
        if url.kind == "telnet":
            return await open_telnet(url.target, url.port)
        return await open_tcp(url.target, url.port)
    except OSError as exc:
        raise PortUnavailableError(f"{url}: {exc.strerror or exc}") from exc


__all__ = ["SerialLink", "open_link"]
