"""Dropping a client with a TCP reset, never a FIN, when the gateway gives up on it.

A socket closed the usual way sends its FIN only after the output the kernel still holds,
which a client that reads nothing never takes: the client would not learn of its end, and
the orphaned socket would outlive the connection in FIN_WAIT, buffers and all. With
SO_LINGER on and zero seconds, closing resets the connection and frees it at once. The
listener refuses connections this way, and sessions, requests, shutdown, the health
listener's deadline and the cluster relays (a side that does not flush in time, a frozen
owner's link) drop them so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

# SO_LINGER on, zero seconds.
_RESET = struct.pack("ii", 1, 0)


def linger_zero(sock: socket.socket) -> None:
    """Make closing `sock` reset its connection (nothing to do if it does not linger: a pipe)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)


def reset_connection(transport: asyncio.Transport) -> None:
    """Abort `transport` and reset its connection.

    abort() alone discards only the transport's buffer: the socket is then closed as by
    close(), its FIN queued behind what the kernel holds.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_zero(sock)
    transport.abort()
