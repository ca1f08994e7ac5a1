"""Local ttys and ptys through pyserial-asyncio-fast.

BREAK is the tty's break condition, set and cleared around an asyncio sleep
(pyserial's own `send_break` sleeps in the calling thread, which would stall
the loop). Linux ptys silently drop BREAK, so a pty path reports
`can_break = False` and the VM needs a `break_command` for SysRq.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import serial
import serial_asyncio_fast

from .protocol import LinkProtocol
from .stream import StreamLink, new_protocol

BREAK_SECONDS = 0.25
HANGUP_SECONDS = 0.5
_PARITY = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD}


class TtyLink(StreamLink):
    """A serial port that is a tty device."""

    can_hangup = True

    def __init__(
        self, transport: asyncio.BaseTransport, protocol: LinkProtocol, *, is_pty: bool
    ) -> None:
        super().__init__(transport, protocol)
        self.can_break = not is_pty

    def _serial(self) -> Any:
        return self._transport.serial  # type: ignore[attr-defined]

    async def send_break(self) -> None:
        """Hold the line in BREAK for a quarter second."""
        port = self._serial()
        port.break_condition = True
        try:
            await asyncio.sleep(BREAK_SECONDS)
        finally:
            port.break_condition = False

    async def hangup(self) -> None:
        """Drop DTR so a getty on a real UART sees a hangup."""
        port = self._serial()
        port.dtr = False
        try:
            await asyncio.sleep(HANGUP_SECONDS)
        finally:
            port.dtr = True


def _is_pty(path: str) -> bool:
    real = os.path.realpath(path)
    return real.startswith("/dev/pts/") or real == "/dev/ptmx"


async def open_tty(path: str, *, baud: int, parity: str) -> TtyLink:
    """Open a tty in raw mode at the configured line settings."""
    loop = asyncio.get_running_loop()
    transport, protocol = await serial_asyncio_fast.create_serial_connection(
        loop, new_protocol, path, baudrate=baud, parity=_PARITY[parity], exclusive=True
    )
    return TtyLink(transport, cast(LinkProtocol, protocol), is_pty=_is_pty(path))
