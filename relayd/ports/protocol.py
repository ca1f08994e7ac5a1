"""The asyncio protocol under every serial link, compiled with the rest of the keystroke path.

Each keystroke is written to the port and its echo read back through this class, and
at 1,000 typing sessions that is 20,000 calls a second. Interpreted, the link's
protocol callback, its `writable` check and its `write_now` were the last Python
frames left on the keystroke path, so they live here, where mypyc compiles them
(`relayd.native`), together with the telnet framing a `telnet://` port needs on both
paths. What waits (drains, closes, BREAKs) stays in the interpreted links around it:
compiled modules hold no coroutines.

No I/O of its own: it is handed a transport and writes to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from ..telnet import DataReceived, TelnetCodec


class LinkProtocol:
    """The transport's protocol: output to a callback, keystrokes to the transport, flow control.

    uvloop and pyserial-asyncio-fast call protocols by method name, so this is an
    `asyncio.Protocol` by shape rather than by subclass (mypyc compiles no subclass of
    a Python class).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False  # the far end is not reading (asyncio flow control)
        # telnet:// ports: unframe output, escape input, answer negotiation.
        self.codec: TelnetCodec | None = None
        self._consumer: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio's protocol callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's are transport-like, not subclasses)."""
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Console output (framed, on telnet ports) from the port."""
        if self._consumer is None:
            self._early.append(data)
        else:
            self._receive(data, self._consumer)

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

    # -- output -----------------------------------------------------------------------

    def set_consumer(self, consumer: Callable[[bytes], None]) -> None:
        """Where output goes from now on (bytes that came before are handed over first)."""
        self._consumer = consumer
        early, self._early = self._early, []
        for data in early:
            self._receive(data, consumer)

    def _receive(self, data: bytes, consumer: Callable[[bytes], None]) -> None:
        codec = self.codec
        if codec is None:
            consumer(data)
            return
        events = codec.receive(data)
        reply = codec.data_to_send()
        if reply:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(reply)
        for event in events:
            if isinstance(event, DataReceived):
                consumer(event.data)

    # -- input ------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether `write_now` would not have to wait for the far end."""
        transport = self.transport
        return transport is not None and not self.paused and not transport.is_closing()

    def write_now(self, data: bytes) -> None:
        """Keyboard input to the transport at once (escaped on telnet ports).

        Raises:
            ConnectionResetError: the link is closed.
        """
        codec = self.codec
        self.write_raw(data if codec is None else codec.encode(data))

    def write_raw(self, data: bytes) -> None:
        """Bytes to the transport as they are (telnet commands).

        Raises:
            ConnectionResetError: the link is closed.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("serial link is closed")
        transport.write(data)

    def drain_waiter(self) -> asyncio.Future[None] | None:
        """A future that resolves when the far end reads again; None when it reads now.

        Raises:
            ConnectionResetError: the link is gone while pushing back.
        """
        if not self.paused:
            return None
        if self.closed.done():
            raise ConnectionResetError("serial link lost")
        self._drained = asyncio.get_running_loop().create_future()
        return self._drained


__all__ = ["LinkProtocol"]
