"""The floor for a TLS relay in Python: TLS in, TCP out, bytes copied, nothing else.

An optional bench peer (`bench/run.py --only pyfloor`), not part of the
default set: it does what HAProxy does in the bench (terminate TLS, open one
backend connection per client, copy bytes both ways) with the same stack as
relayd (asyncio on uvloop, the stdlib `ssl` module) and no WebSocket, no
authentication, no hub, no console log. What it costs per keystroke round
trip is what any relay on this stack costs before doing any work of its own.

    python -m bench.pyfloor PORT CERT_AND_KEY_PEM BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import ssl
import sys


class _Backend(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.backend: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            backend, _ = await loop.create_connection(
                lambda: _Backend(self.transport),  # type: ignore[arg-type]
                "127.0.0.1",
                self.backend_port,
            )
        except OSError:
            self.transport.close()
            return
        self.backend = backend
        for chunk in self.early:
            backend.write(chunk)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.backend is None:
            self.early.append(data)
        else:
            self.backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.close()


async def serve(port: int, pem: str, backend_port: int) -> None:
    """Listen until killed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0
    ctx.load_cert_chain(pem)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(backend_port), "127.0.0.1", port, ssl=ctx, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> int:
    """Parse argv and serve."""
    port, pem, backend_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    import uvloop

    uvloop.run(serve(port, pem, backend_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
