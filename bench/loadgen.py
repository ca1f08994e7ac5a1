"""The load generator's client: TLS, then either a WebSocket or a raw byte stream.

One `Conn` per session, callback-driven on the event loop (no task per
connection), so the generator can hold tens of thousands of sessions and
move bytes with little overhead per byte:

* the WebSocket upgrade is written by hand and the server's frames are
  parsed incrementally; binary payloads are counted, never copied;
* client frames are masked as RFC 6455 requires (relayd's server rejects
  unmasked ones); pings are answered with pongs (relayd's keepalive drops
  a session that does not answer);
* relayd's first text frame is its `hello`; the replayed tail of the console
  log it announces is skipped so `rx` counts only new output.

For HAProxy (TCP mode) the same class speaks the raw TLS byte stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from websockets.speedups import apply_mask  # C: the generator's core is shared with the echo side

_SHORT_HEAD = struct.Struct("!BB")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
OPEN_TIMEOUT = 15.0
CLOSE_TIMEOUT = 5.0


def client_context() -> ssl.SSLContext:
    """TLS client context: same defaults for every relay (TLS 1.3), no verification cost."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set), with a fresh random key as RFC 6455 asks."""
    n = len(payload)
    if n < 126:
        head = _SHORT_HEAD.pack(0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = random.randbytes(4)
    return head + key + apply_mask(payload, key) if n else head + key


@dataclass(frozen=True)
class Target:
    """How to open a session on one relay."""

    kind: str  # "ws" or "raw"
    host: str
    port: int
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    expect_hello: bool = False  # relayd sends a hello text frame first

    def with_path(self, path: str) -> Target:
        """The same relay, another path (a relayd VM)."""
        return Target(self.kind, self.host, self.port, path, self.headers, self.expect_hello)


class Conn(asyncio.Protocol):
    """One client session."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.rx = 0  # payload bytes of console output received (replay excluded)
        self.sink: Callable[[int], None] | None = None
        self.hello: dict[str, Any] = {}
        self.texts = 0
        self.close_code: int | None = None
        self.error = ""
        self.pongs = 0
        self._pong_waiter: asyncio.Future[None] | None = None
        self._upgraded = target.kind == "raw"
        self._head = bytearray()
        self._hdr = bytearray()
        self._remaining = 0
        self._op = 0
        self._msg_op = 0
        self._fin = True
        self._ctl = bytearray()
        self._skip = 0
        self._close_sent = False

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """TLS is up: send the upgrade (WebSocket) or be ready (raw)."""
        self.transport = cast(asyncio.Transport, transport)
        t = self.target
        if t.kind == "raw":
            self._set_ready()
            return
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {t.path} HTTP/1.1",
            f"Host: localhost:{t.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in t.headers),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        """Raw: count. WebSocket: upgrade response, then frames."""
        if not self._upgraded:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 16384:
                    self._fail("response head too large")
                return
            status = bytes(self._head[: self._head.find(b"\r\n")])
            rest = bytes(self._head[end + 4 :])
            self._head = bytearray()
            if b" 101 " not in status + b" ":
                body = rest[:200].decode("utf-8", "replace")
                self._fail(f"upgrade refused: {status.decode('latin-1')} {body}")
                return
            self._upgraded = True
            if not self.target.expect_hello:
                self._set_ready()
            if rest:
                self._frames(memoryview(rest))
            return
        n = len(data)
        if self.target.kind == "raw" or (
            # An echoed key: one whole final binary frame of 0..125 bytes, between frames.
            # Counted without the general parser, which costs the generator's shared core
            # a few µs per key that the raw peers' clients do not spend.
            n >= 2
            and data[0] == 0x82
            and data[1] < 126
            and data[1] == n - 2
            and not self._remaining
            and not self._hdr
            and not self._skip
        ):
            if self.target.kind != "raw":
                n -= 2
            self.rx += n
            if self.sink is not None:
                self.sink(n)
            return
        self._frames(memoryview(data))

    def eof_received(self) -> bool:
        """The server half-closed: close."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Done, one way or another."""
        if not self.ready.done():
            self._fail(f"connection lost before ready: {exc!r}")
        if not self.lost.done():
            self.lost.set_result(None)
        self.transport = None

    # -- frames ------------------------------------------------------------------

    def _frames(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                self._payload(data[i : i + take])
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._frame_end()
                continue
            hdr = self._hdr
            take = min(14 - len(hdr), n - i)
            hdr += data[i : i + take]
            if len(hdr) < 2:
                i += take
                continue
            length = hdr[1] & 0x7F
            hlen = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            hlen += 4 if hdr[1] & 0x80 else 0
            if len(hdr) < hlen:
                i += take
                continue
            i += take - (len(hdr) - hlen)
            if length == 126:
                length = struct.unpack_from("!H", hdr, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", hdr, 2)[0]
            op = hdr[0] & 0x0F
            self._fin = bool(hdr[0] & 0x80)
            hdr.clear()
            if op != OP_CONT:
                self._op = op
                if op < 0x8:
                    self._msg_op = op
            else:
                self._op = self._msg_op
            if op != OP_CONT and self._op != OP_BINARY:
                self._ctl.clear()
            self._remaining = length
            if not length:
                self._frame_end()

    def _payload(self, chunk: memoryview) -> None:
        if self._op != OP_BINARY:
            self._ctl += chunk
            return
        n = len(chunk)
        if self._skip:
            skipped = min(self._skip, n)
            self._skip -= skipped
            n -= skipped
            if not n:
                return
        self.rx += n
        if self.sink is not None:
            self.sink(n)

    def _frame_end(self) -> None:
        op = self._op
        if op == OP_TEXT and self._fin:
            self.texts += 1
            if self.target.expect_hello and not self.hello:
                try:
                    hello = json.loads(bytes(self._ctl))
                except ValueError:
                    self._fail("first text frame is not JSON")
                    return
                if hello.get("type") != "hello":
                    self._fail(f"expected hello, got {hello.get('type')!r}")
                    return
                self.hello = hello
                self._skip = int(hello.get("replay") or 0)
                self._set_ready()
        elif op == OP_PING:
            self._send(mask_frame(OP_PONG, bytes(self._ctl)))
        elif op == OP_PONG:
            self.pongs += 1
            if self._pong_waiter is not None and not self._pong_waiter.done():
                self._pong_waiter.set_result(None)
        elif op == OP_CLOSE:
            ctl = bytes(self._ctl)
            self.close_code = struct.unpack("!H", ctl[:2])[0] if len(ctl) >= 2 else 1005
            if not self._close_sent:
                self._close_sent = True
                self._send(mask_frame(OP_CLOSE, ctl[:2]))
            if self.transport is not None:
                self.transport.close()

    # -- helpers ------------------------------------------------------------------

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- operations -----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Connected and not closing."""
        return self.transport is not None and not self.transport.is_closing()

    def send_input(self, data: bytes) -> None:
        """Keystrokes: a binary frame (WebSocket) or the bytes themselves (raw)."""
        self._send(mask_frame(OP_BINARY, data) if self.target.kind == "ws" else data)

    async def ping(self, within: float = 10.0) -> None:
        """A WebSocket ping answered by the relay itself.

        Raises:
            TimeoutError: no pong in time.
        """
        self._pong_waiter = asyncio.get_running_loop().create_future()
        self._send(mask_frame(OP_PING, b"bench"))
        async with asyncio.timeout(within):
            await self._pong_waiter

    async def echo(self, data: bytes = b"k", within: float = 10.0) -> float:
        """Send input and wait for that many bytes of output; returns the round trip (s).

        Raises:
            TimeoutError: the echo did not come back in time.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        want = self.rx + len(data)

        def sink(_n: int) -> None:
            if self.rx >= want and not fut.done():
                fut.set_result(None)

        self.sink = sink
        t0 = time.perf_counter()
        self.send_input(data)
        try:
            async with asyncio.timeout(within):
                await fut
        finally:
            self.sink = None
        return time.perf_counter() - t0

    async def close(self) -> None:
        """Closing handshake (WebSocket) or TLS close, then wait (bounded) for the end."""
        if self.transport is None:
            return
        if self.target.kind == "ws" and not self._close_sent:
            self._close_sent = True
            self._send(mask_frame(OP_CLOSE, struct.pack("!H", 1000)))
        else:
            self.transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.lost
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abort()


async def open_conn(target: Target, ctx: ssl.SSLContext, within: float = OPEN_TIMEOUT) -> Conn:
    """Connect, TLS, upgrade; returns when the session is usable.

    Raises:
        OSError, ConnectionError, TimeoutError: the session could not be opened.
    """
    loop = asyncio.get_running_loop()
    conn: Conn | None = None

    def factory() -> Conn:
        nonlocal conn
        conn = Conn(target)
        return conn

    async with asyncio.timeout(within):
        await loop.create_connection(
            factory,
            target.host,
            target.port,
            ssl=ctx,
            server_hostname="localhost",
            ssl_handshake_timeout=within,
        )
        assert conn is not None
        try:
            await conn.ready
        except BaseException:
            conn.abort()
            raise
    return conn


@dataclass
class Tally:
    """Errors seen by a batch of operations, by kind."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def fail(self, exc: BaseException) -> None:
        """Count one failure."""
        key = type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1
        if not self.first_error:
            self.first_error = f"{key}: {exc}"[:300]

    @property
    def failed(self) -> int:
        """Total failures."""
        return sum(self.errors.values())


async def bounded_gather(
    jobs: list[Callable[[], Any]], concurrency: int, tally: Tally, stop_on_error: bool = False
) -> list[Any]:
    """Run coroutine factories, at most `concurrency` at once; failures go to `tally`."""
    results: list[Any] = [None] * len(jobs)
    it = iter(range(len(jobs)))
    stop = False

    async def worker() -> None:
        nonlocal stop
        for i in it:
            if stop:
                return
            try:
                results[i] = await jobs[i]()
                tally.ok += 1
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError, ValueError) as exc:
                tally.fail(exc)
                if stop_on_error:
                    stop = True

    async with asyncio.TaskGroup() as tg:
        for _ in range(max(1, min(concurrency, len(jobs)))):
            tg.create_task(worker())
    return results


async def close_all(conns: list[Conn], concurrency: int = 500) -> None:
    """Close many sessions politely (bounded), aborting stragglers."""
    live = [c for c in conns if c is not None and c.transport is not None]
    tally = Tally()
    await bounded_gather([c.close for c in live], concurrency, tally)
    for c in live:
        with contextlib.suppress(Exception):
            c.abort()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


class LoopLag:
    """How late the generator's own loop runs timers (its contribution to latency)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        """Begin sampling."""
        self._schedule()

    def _schedule(self) -> None:
        self._due = time.perf_counter() + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.samples.append(max(0.0, time.perf_counter() - self._due))
        self._schedule()

    def stop(self) -> dict[str, float]:
        """Stop; returns p50/p99/max lateness in ms."""
        if self._handle is not None:
            self._handle.cancel()
        s = sorted(self.samples)
        return {
            "p50_ms": percentile(s, 50) * 1e3,
            "p99_ms": percentile(s, 99) * 1e3,
            "max_ms": (s[-1] * 1e3) if s else float("nan"),
        }
