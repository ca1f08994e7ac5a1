"""The whole pre-auth surface as one stream, fuzzed against a live gateway (issue 15).

Each Hypothesis example is one TCP connection to a real TLS listener, from a
trusted proxy address (127.0.0.1, so a PROXY header is read first) or from an
untrusted one (127.0.0.2): PROXY bytes (valid v1/v2, mutated, truncated or
garbage), then either a real TLS client (1.2 or 1.3) carrying an HTTP head, a
body and WebSocket frames, or raw ClientHello garbage. The bytes go out in
random slices, the stream is cut at a random point, and the connection ends
with a FIN, a TLS close_notify or a RST.

Properties, checked while the gateway keeps running across all examples:
nothing unexpected is logged at error and no exception reaches the event
loop's handler; after each connection every task it started ends and the
gateway holds no connection (waited for on the gateway's own events, never
slept); the Python heap held by the serving stack returns to its baseline
(tracemalloc); and the gateway still answers a normal request.

One event loop (an `asyncio.Runner`) serves the gateway; Hypothesis drives
examples synchronously between `runner.run` calls. `RELAYD_FUZZ_EXAMPLES`
raises the example count for a longer run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import socket
import ssl
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relayd.app import Gateway
from relayd.config import Config
from relayd.session import ConsoleSession

from .conftest import TIMEOUT, FarEnd, raw_console, running

TRUSTED = "127.0.0.1"  # the gateway's trusted proxy: it must send a PROXY header
UNTRUSTED = "127.0.0.2"  # any other client: TLS straight away
EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "60"))
# Heap growth allowed over the whole run: caches keyed by bounded sets (handshake failure
# reasons, rate-limit buckets of the few PROXY addresses used, outstanding tickets) and
# cancelled timers asyncio has not purged yet; 5-25 KiB in practice. One connection whose
# objects stayed alive costs more than this (a uvloop TLS transport alone holds 256 KiB).
MEMORY_TOLERANCE = 64 * 1024
# What the serving stack allocates; the harness (Hypothesis, pytest, this file) is left out.
SERVING_STACK = (
    "*/relayd/*",
    "*/asyncio/*",
    "*/ssl.py",
    "*/socket.py",
    "*/selectors.py",
    "*/h11/*",
    "*/websockets/*",
    "*/jwt/*",
    "*/uvloop/*",
    "*/json/*",
    "*/urllib/*",
    "*/ipaddress.py",
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the stream ------------------------------------------------------------------------

PROXY_SOURCES = ("192.0.2.7", "198.51.100.9", "2001:db8::5")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_v1(source: str) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "2001:db8::1" if ":" in source else "10.0.0.1"
    return f"PROXY {family} {source} {dest} 50000 443\r\n".encode()


def _proxy_v2(source: str | None) -> bytes:
    if source is None:  # LOCAL: a health check from the balancer itself
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("2001:db8::1" if src.version == 6 else "10.0.0.1")
    block = src.packed + dst.packed + struct.pack("!HH", 50000, 443)
    family = 0x21 if src.version == 6 else 0x11
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        if out:
            out[position % len(out)] = value
    return bytes(out)


flips = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4)
valid_proxy = st.one_of(
    st.sampled_from(PROXY_SOURCES).map(_proxy_v1),
    st.sampled_from((*PROXY_SOURCES, None)).map(_proxy_v2),
)
proxy_headers = st.one_of(
    st.just(b""),
    valid_proxy,
    valid_proxy,
    st.tuples(valid_proxy, flips).map(lambda t: _mutate(*t)),
    st.tuples(valid_proxy, st.integers(1, 40)).map(lambda t: t[0][: t[1]]),
    st.binary(max_size=120),
    st.just(b"PROXY TCP4 " + b"1" * 200 + b"\r\n"),  # over the 107-byte v1 cap
)


def _client_hello(version: ssl.TLSVersion) -> bytes:
    """The first flight of a real TLS client, captured without a network."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ctx.maximum_version = version
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # waiting for the ServerHello, as expected
        return outgoing.read()
    raise AssertionError("a TLS handshake cannot finish without a server")


HELLOS = (_client_hello(ssl.TLSVersion.TLSv1_2), _client_hello(ssl.TLSVersion.TLSv1_3))
hello_garbage = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from(HELLOS), flips).map(lambda t: _mutate(*t)),
    st.tuples(st.sampled_from(HELLOS), st.integers(0, 600)).map(lambda t: t[0][: t[1]]),
    st.just(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"),  # plain HTTP to the TLS port
    st.just(b"\x16\x03\x01\xff\xff" + b"\x01" * 64),  # a record that promises 64 KiB
)

TARGETS = (
    "/",
    "/v1/vms",
    "/v1/vms/vm-a/console",
    "/v1/vms/vm-a/console?mode=spectate",
    "/v1/vms/vm-a/console?mode=interactive&from=0",
    "/v1/vms/vm-a/console?ticket=abc",
    "/v1/vms/vm-b/console",
    "/v1/vms/vm-a/console-log?from=0&max_bytes=10",
    "/v1/vms/vm-a/console/tickets",
    "/v1/vms/vm-a/serial-console",
    "/v1/subscriptions/sub-1/serial-console",
    "//[",
    "/assets/../../etc/passwd",
    "*",
)
UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: relayd.console.v1\r\n"
)
CONTROLS = (
    b'{"type":"break"}',
    b'{"type":"sysrq","key":"h"}',
    b'{"type":"resize","cols":80,"rows":24}',
    b'{"type":"nmi"}',
    b'{"type":"reset"}',
    b'{"type":"resize","cols":-1}',
    b"{",
    b'"\xff\xfe"',
)


@st.composite
def fuzzy_heads(draw: st.DrawFn, bearer: dict[str, str]) -> bytes:
    """A request head assembled from good and bad parts, and maybe a body."""
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"G\x00T"]))
    target = draw(st.sampled_from(TARGETS)).encode()
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9", b""]))
    lines = [method + b" " + target + b" " + version]
    if draw(st.booleans()):
        lines.append(b"Host: localhost")
    who = draw(st.sampled_from(["alice", "rita", "expired", "garbage", None]))
    if who is not None:
        lines.append(b"Authorization: Bearer " + bearer[who].encode())
    if draw(st.booleans()):
        lines.append(UPGRADE.rstrip(b"\r\n"))
    body = draw(
        st.sampled_from([b"", b'{"enabled": false}', b'{"mode":"spectate"}'])
        | st.binary(max_size=64)
    )
    length = draw(st.sampled_from([None, len(body), len(body) + 5, -1]))
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    if draw(st.booleans()):
        lines.append(b"Transfer-Encoding: chunked")
    lines += draw(
        st.lists(
            st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=40)).map(
                lambda kv: kv[0] + b": " + kv[1]
            ),
            max_size=3,
        )
    )
    if draw(st.booleans()):
        lines.append(b"Origin: https://evil.example")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


UPGRADE_QUERIES = ("", "?mode=spectate", "?from=0", "?from=999999", "?mode=x")
UPGRADE_EXTRAS = (b"", b"Origin: https://localhost\r\n", b"X-A: \xff\r\n")
API_CALLS = (
    ("GET", "/v1/vms", b""),
    ("GET", "/v1/vms/vm-a/console-log?from=0", b""),
    ("POST", "/v1/vms/vm-a/console/tickets", b'{"mode":"spectate"}'),
    ("PUT", "/v1/vms/vm-a/serial-console", b'{"enabled": false}'),
    ("GET", "/", b""),
    ("GET", "/v1/vms/vm-a/console", b""),  # no upgrade headers
)


def console_upgrade(token: str, query: str = "", extra: bytes = b"") -> bytes:
    """A console upgrade request as a client sends it."""
    return (
        f"GET /v1/vms/vm-a/console{query} HTTP/1.1\r\nHost: localhost\r\n".encode()
        + f"Authorization: Bearer {token}\r\n".encode()
        + UPGRADE
        + extra
        + b"\r\n"
    )


def api_request(method: str, target: str, body: bytes, token: str | None) -> bytes:
    """An API request as a client sends it, with or without a bearer token."""
    auth = b"" if token is None else f"Authorization: Bearer {token}\r\n".encode()
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n".encode() + auth
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@st.composite
def console_upgrades(draw: st.DrawFn, bearer: dict[str, str]) -> bytes:
    """A console upgrade that succeeds (alice writes, rita spectates), give or take a header."""
    return console_upgrade(
        bearer[draw(st.sampled_from(["alice", "alice", "rita"]))],
        draw(st.sampled_from(UPGRADE_QUERIES)),
        draw(st.sampled_from(UPGRADE_EXTRAS)),
    )


@st.composite
def api_requests(draw: st.DrawFn, bearer: dict[str, str]) -> bytes:
    """A well-formed API request, authenticated or not."""
    who = draw(st.sampled_from(["alice", "rita", "expired", "garbage", None]))
    return api_request(*draw(st.sampled_from(API_CALLS)), None if who is None else bearer[who])


@st.composite
def http_heads(draw: st.DrawFn, bearer: dict[str, str]) -> bytes:
    """What follows the TLS handshake: often right, so that what lies behind is reached."""
    # Drawn by number: one_of flattens nested one_ofs, which would skew these weights.
    kind = draw(st.integers(0, 3))
    if kind <= 1:
        return draw(console_upgrades(bearer))
    return draw(api_requests(bearer) if kind == 2 else fuzzy_heads(bearer))


def _ws_frame(opcode: int, payload: bytes, fin: bool, masked: bool, rsv: int, key: bytes) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


ws_frames = st.lists(
    st.one_of(
        st.builds(
            _ws_frame,
            opcode=st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xF]),
            payload=st.one_of(st.sampled_from(CONTROLS), st.binary(max_size=300)),
            fin=st.booleans(),
            masked=st.booleans() | st.just(True),
            rsv=st.sampled_from([0, 0, 0, 1, 4]),
            key=st.binary(min_size=4, max_size=4),
        ),
        st.binary(min_size=1, max_size=40),  # not a frame at all
        st.just(b"\x82\xff" + b"\x7f" * 8 + b"\x00" * 4),  # a frame that claims 2**63 bytes
    ),
    max_size=6,
).map(b"".join)


@dataclass(frozen=True)
class Attempt:
    """One connection's bytes and how they are sent."""

    source: str
    proxy: bytes
    tls: ssl.TLSVersion | None  # None: `hello` is sent raw instead of a real handshake
    hello: bytes
    plaintext: bytes  # HTTP head, body, WebSocket frames: inside TLS
    wire_slices: tuple[int, ...]  # sizes of the socket writes, cycled
    record_slices: tuple[int, ...]  # sizes of the TLS records of the plaintext, cycled
    cut: int | None  # stop after this many bytes of the stage `cut_stage`
    cut_stage: str
    ending: str  # "fin", "close_notify" (TLS only), "rst"


@st.composite
def attempts(draw: st.DrawFn, bearer: dict[str, str]) -> Attempt:
    """Whole connections: mostly valid enough to reach the next stage, each stage fuzzed."""
    slices = st.lists(st.integers(1, 700), min_size=1, max_size=5).map(tuple)
    source = draw(st.sampled_from([TRUSTED, TRUSTED, UNTRUSTED]))
    # A trusted proxy mostly sends a good header, anyone else mostly none: else few
    # connections would get past the first stage.
    valid = st.just(b"") if source == UNTRUSTED else valid_proxy
    proxy = draw(valid if draw(st.integers(0, 4)) else proxy_headers)
    cut_stage = draw(st.sampled_from(["proxy", "hello", "plaintext", "plaintext"]))
    return Attempt(
        source=source,
        proxy=proxy,
        tls=draw(st.sampled_from([ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, None])),
        hello=draw(hello_garbage),
        plaintext=draw(http_heads(bearer)) + draw(ws_frames),
        wire_slices=draw(slices),
        record_slices=draw(slices),
        cut=draw(st.integers(0, 2000)) if draw(st.integers(0, 4)) < 2 else None,
        cut_stage=cut_stage,
        ending=draw(st.sampled_from(["fin", "fin", "close_notify", "rst"])),
    )


# -- a client that sends exactly what it is told, sliced and cut ------------------------


class Cut(Exception):
    """The attempt's cut point was reached: stop sending."""


class Wire:
    """A client socket that writes in the attempt's slices."""

    def __init__(self, sock: socket.socket, sizes: tuple[int, ...]) -> None:
        self.sock = sock
        self._sizes: Iterator[int] = cycle(sizes)
        self._loop = asyncio.get_running_loop()

    async def send(self, data: bytes, limit: int | None = None) -> None:
        """Send `data` (only its first `limit` bytes, then raise Cut, when given)."""
        cut = limit is not None and limit < len(data)
        if cut:
            data = data[:limit]
        while data:
            n = next(self._sizes)
            await self._loop.sock_sendall(self.sock, data[:n])
            data = data[n:]
        if cut:
            raise Cut


async def _tls_handshake(
    wire: Wire,
    tls: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    cut: int | None,
) -> bool:
    """Drive a real handshake; False when the server ended it."""
    loop = asyncio.get_running_loop()
    sent = 0
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            return False  # the server said no (a PROXY header it read differently, ...)
        out = outgoing.read()
        await wire.send(out, None if cut is None else max(0, cut - sent))
        sent += len(out)
        if done:
            return True
        data = await loop.sock_recv(wire.sock, 65536)
        if not data:
            return False
        incoming.write(data)


async def _connect(port: int, source: str) -> socket.socket:
    """A TCP connection to the gateway from `source` (any 127/8 address is this host)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Tls:
    """A client TLS connection over memory buffers, so every byte on the wire is ours to cut."""

    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


async def _drain_until_closed(sock: socket.socket, tls: Tls | None = None) -> bytes:
    """Half-close, then read until the gateway closes its end; the start of its answer."""
    loop = asyncio.get_running_loop()
    answer = b""
    try:
        sock.shutdown(socket.SHUT_WR)
        while data := await loop.sock_recv(sock, 65536):
            if tls is None:
                answer = (answer + data)[:64]
                continue
            tls.incoming.write(data)
            with contextlib.suppress(ssl.SSLError):  # want-read, or a record it cut
                while len(answer) < 64 and (plain := tls.obj.read(4096)):
                    answer += plain
    except OSError:  # a reset is also an end
        pass
    return answer


async def play(
    port: int, attempt: Attempt, client_ctx: dict[ssl.TLSVersion, ssl.SSLContext]
) -> str:
    """Send one attempt, cut it, end it; what came of it, for the tally ("HTTP/1.1 101", ...)."""
    sock = await _connect(port, attempt.source)
    try:
        return await _play_on(sock, attempt, client_ctx)
    finally:
        sock.close()


async def _play_on(
    sock: socket.socket, attempt: Attempt, client_ctx: dict[ssl.TLSVersion, ssl.SSLContext]
) -> str:
    wire = Wire(sock, attempt.wire_slices)
    tls: Tls | None = None
    limit = {attempt.cut_stage: attempt.cut}
    outcome = "refused"
    try:
        await wire.send(attempt.proxy, limit.get("proxy"))
        if attempt.tls is None:
            await wire.send(attempt.hello, limit.get("hello"))
        else:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = client_ctx[attempt.tls].wrap_bio(incoming, outgoing, server_hostname="localhost")
            if await _tls_handshake(wire, obj, incoming, outgoing, limit.get("hello")):
                tls = Tls(obj, incoming, outgoing)
                outcome = "no_answer"
                plain = attempt.plaintext
                if (at := limit.get("plaintext")) is not None:
                    plain = plain[:at]
                sizes = cycle(attempt.record_slices)
                while plain:
                    n = next(sizes)
                    obj.write(plain[:n])
                    plain = plain[n:]
                    await wire.send(outgoing.read())
    except Cut:
        outcome = "cut" if tls is None else "cut_in_tls"
    except OSError:
        pass  # the gateway closed first (an answer, then close; a refused handshake)
    if attempt.ending == "rst":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "reset"  # the close that follows sends the RST
    if attempt.ending == "close_notify" and tls is not None:
        with contextlib.suppress(ssl.SSLError):  # want-read: ours is out, theirs unread
            tls.obj.unwrap()
        with contextlib.suppress(OSError):
            await wire.send(tls.outgoing.read())
    answer = await _drain_until_closed(sock, tls)
    if answer.startswith(b"HTTP/"):
        return answer[:12].decode("ascii", "replace")
    return outcome


# -- the gateway side --------------------------------------------------------------------


class Discard(asyncio.Protocol):
    """The VM's serial far end: takes whatever the writer types."""

    def data_received(self, data: bytes) -> None:
        """Dropped."""


async def _settle(gw: Gateway, baseline: set[asyncio.Task[Any]]) -> None:
    """Wait until the gateway has finished with every connection made so far.

    A last connection that the gateway must close (an untrusted source sending a
    FIN before any TLS) proves that everything accepted before it has been
    accepted (one accept queue, in order); then every task started since the
    baseline must end, and every connection be forgotten.
    """
    sentinel = await _connect(gw.tls_port, UNTRUSTED)
    try:
        await _drain_until_closed(sentinel)
    finally:
        sentinel.close()
    current = asyncio.current_task()
    started = {t for t in asyncio.all_tasks() if t not in baseline and t is not current}
    if started:
        _, pending = await asyncio.wait(started, timeout=TIMEOUT)
        assert not pending, f"tasks still running after their connection ended: {pending}"
    async with asyncio.timeout(TIMEOUT):
        await gw._until(lambda: not gw.connections)
    assert not gw.sessions


async def _normal_request(gw: Gateway, ctx: ssl.SSLContext, bearer: str) -> dict[str, Any]:
    """GET /v1/vms through a valid PROXY header and TLS, as a balancer would pass it on."""
    loop = asyncio.get_running_loop()
    sock = await _connect(gw.tls_port, TRUSTED)
    await loop.sock_sendall(sock, _proxy_v1("192.0.2.7"))
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
    writer.write(
        b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Authorization: Bearer " + bearer.encode() + b"\r\n\r\n"
    )
    async with asyncio.timeout(TIMEOUT):
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    result: dict[str, Any] = json.loads(body)
    return result


def _heap(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    return snapshot.filter_traces([tracemalloc.Filter(True, p) for p in SERVING_STACK])


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_preauth_stream_fuzz_leaves_no_error_no_task_no_memory_and_still_serves(
    write_config: Callable[..., Config],
    pki: dict[str, Path],
    token: Callable[..., str],
    loop_name: str,
) -> None:
    """PROXY + ClientHello + HTTP + WebSocket bytes, sliced and cut: the gateway shrugs."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop_factory = uvloop.new_event_loop
    bearer = {
        "alice": token("alice"),
        "rita": token("rita"),
        "expired": token("alice", ttl=-600),
        "garbage": "eyJhbGciOiJIUzI1NiJ9.e30.AAAA",
    }
    client_ctx = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.minimum_version = ctx.maximum_version = version
        client_ctx[version] = ctx
    problems: list[dict[str, Any]] = []
    tally: dict[str, int] = {}  # what came of each connection: how deep the fuzz got

    with capture_logs() as events, asyncio.Runner(loop_factory=loop_factory) as runner:
        loop = runner.get_loop()
        loop.set_exception_handler(lambda _loop, context: problems.append(context))

        async def start() -> tuple[Gateway, asyncio.Task[None], asyncio.Server]:
            far = await loop.create_server(Discard, "127.0.0.1", 0)
            config = write_config(
                vms=[
                    {
                        "id": "vm-a",
                        "serial": f"tcp://127.0.0.1:{far.sockets[0].getsockname()[1]}",
                        "input_bytes_per_s": 10_000_000,
                    }
                ],
                # A stream that promises more than it sends (a PROXY v2 length, a TLS
                # record length) is ended by this deadline, as it would be in production.
                gateway={"trusted_proxies": [f"{TRUSTED}/32"], "handshake_timeout": "2s"},
                # High enough never to refuse: the fuzz is to reach what lies behind them.
                limits={
                    "connections_per_second_per_ip": 100_000,
                    "auth_failures_per_minute": 100_000,
                },
            )
            gw = Gateway(config)
            serving = asyncio.create_task(gw.serve())
            async with asyncio.timeout(TIMEOUT):
                await gw.ready.wait()
                await gw.hubs["vm-a"].first_attempt.wait()
            return gw, serving, far

        gw, serving, far = runner.run(start())
        try:

            async def warm_up() -> set[asyncio.Task[Any]]:
                """Each kind of request once: what is made once (caches, imports) is made now."""
                baseline = set(asyncio.all_tasks())
                plaintexts = [
                    api_request(*call, bearer[who] if who else None)
                    for call in API_CALLS
                    for who in ("alice", "rita", "expired", "garbage", None)
                ]
                frames = b"".join(_ws_frame(1, c, True, True, 0, b"abcd") for c in CONTROLS)
                plaintexts += [
                    console_upgrade(bearer[who], query, extra)
                    + frames
                    + _ws_frame(2, b"ls\r", True, True, 0, b"abcd")
                    for who in ("alice", "rita")
                    for query in UPGRADE_QUERIES
                    for extra in UPGRADE_EXTRAS
                ]
                for i, plaintext in enumerate(plaintexts):
                    for version in client_ctx:
                        attempt = Attempt(
                            TRUSTED, _proxy_v2(PROXY_SOURCES[i % 3]), version, b"", plaintext,
                            (1000,), (1000,), None, "proxy", ("fin", "close_notify")[i % 2],
                        )  # fmt: skip
                        await play(gw.tls_port, attempt, client_ctx)
                for hello in (*HELLOS, HELLOS[0][:50], b"GET / HTTP/1.1\r\n\r\n"):
                    for source, proxy in ((TRUSTED, _proxy_v1("192.0.2.7")), (UNTRUSTED, b"")):
                        attempt = Attempt(
                            source, proxy, None, hello, b"", (7,), (7,), None, "proxy", "rst"
                        )
                        await play(gw.tls_port, attempt, client_ctx)
                await _normal_request(gw, client_ctx[ssl.TLSVersion.TLSv1_3], bearer["alice"])
                await _settle(gw, baseline)
                return baseline

            baseline_tasks = runner.run(warm_up())
            assert not problems, problems
            assert not [e for e in events if e.get("log_level") in ("error", "critical")]
            events.clear()
            gc.collect()
            tracemalloc.start()
            try:
                before = _heap(tracemalloc.take_snapshot())

                @FUZZ
                @given(attempt=attempts(bearer))
                def one_connection(attempt: Attempt) -> None:
                    # Everything of the previous connection has settled: what comes now is ours.
                    events.clear()
                    problems.clear()

                    async def run() -> None:
                        async with asyncio.timeout(TIMEOUT):
                            outcome = await play(gw.tls_port, attempt, client_ctx)
                        tally[outcome] = tally.get(outcome, 0) + 1
                        event(outcome)  # --hypothesis-show-statistics: how deep the fuzz got
                        await _settle(gw, baseline_tasks)

                    runner.run(run())
                    errors = [e for e in events if e.get("log_level") in ("error", "critical")]
                    events.clear()  # the captured lines must not count as the gateway's memory
                    assert not errors, errors
                    assert not problems, problems
                    assert not serving.done()

                one_connection()
                gc.collect()
                after = _heap(tracemalloc.take_snapshot())
            finally:
                tracemalloc.stop()
            grown = after.compare_to(before, "lineno")
            total = sum(stat.size_diff for stat in grown)
            top = "\n".join(str(stat) for stat in grown[:10])
            assert total < MEMORY_TOLERANCE, f"heap grew {total} bytes:\n{top}"
            listed = runner.run(
                _normal_request(gw, client_ctx[ssl.TLSVersion.TLSv1_3], bearer["alice"])
            )
            assert [vm["id"] for vm in listed["vms"]] == ["vm-a"]
            # The fuzz reached HTTP, not only the handshake (about a third of connections do).
            assert any(outcome.startswith("HTTP/") for outcome in tally), tally
        finally:

            async def stop() -> None:
                gw.stop()
                async with asyncio.timeout(TIMEOUT):
                    await serving
                far.close()
                await far.wait_closed()

            runner.run(stop())
    assert not problems, problems
    assert not [e for e in events if e.get("log_level") in ("error", "critical")]


# -- found by the fuzz above ----------------------------------------------------------------


async def test_request_and_close_in_the_handshakes_last_flight_leave_the_listener_serving(
    write_config: Callable[..., Config], pki: dict[str, Path], token: Callable[..., str]
) -> None:
    """Finished, a `Connection: close` request and more records in one flight: one close.

    The gateway answered and closed; reading the records behind the request while
    closing, asyncio's TLS transport called eof_received, and the gateway closed
    again. A second close() makes that transport forget its protocol, so the
    listener's own next look at it (in debug mode, as CI runs) raised, and the
    listener's task group went down with it: one client stopped the gateway.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    far = await loop.create_server(Discard, "127.0.0.1", 0)
    port = far.sockets[0].getsockname()[1]
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{port}"}],
        gateway={"trusted_proxies": [f"{TRUSTED}/32"]},
    )
    gw = Gateway(config)
    serving = asyncio.create_task(gw.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            await gw.ready.wait()
        with capture_logs() as events:
            for _ in range(3):
                await _close_behind_a_request(gw.tls_port, ctx)
        assert not [e for e in events if e["log_level"] in ("error", "critical")], events
        listed = await _normal_request(gw, ctx, token("alice"))
        assert [vm["id"] for vm in listed["vms"]] == ["vm-a"]
        assert not serving.done()
        assert not problems, problems
    finally:
        gw.stop()
        async with asyncio.timeout(TIMEOUT):
            await serving
        far.close()
        await far.wait_closed()


async def _close_behind_a_request(port: int, ctx: ssl.SSLContext) -> None:
    """Hold back TLS's last flight; send it with a closing request and more records behind."""
    loop = asyncio.get_running_loop()
    sock = await _connect(port, TRUSTED)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        await loop.sock_sendall(sock, _proxy_v1("192.0.2.7"))
        while True:  # the handshake, but for the client's last flight
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(sock, outgoing.read())
                incoming.write(await loop.sock_recv(sock, 65536))
        flight = outgoing.read()
        tls.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        tls.write(b"GET / HTTP/1.1\r\n\r\n")  # one more record: read while closing
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.unwrap()  # and a close_notify
        await loop.sock_sendall(sock, flight + outgoing.read())
        await _drain_until_closed(sock)
    finally:
        sock.close()


async def test_a_session_closed_after_a_sweep_is_freed_before_the_next(
    write_config: Callable[..., Config],
    far_end: FarEnd,
    client_ssl: ssl.SSLContext,
    token: Callable[..., str],
) -> None:
    """The sweeper, sleeping between rounds, held the last session it swept (and its buffers)."""
    config = write_config(
        vms=[{"id": "vm-a", "serial": f"tcp://127.0.0.1:{far_end.port}"}],
        limits={"keepalive_interval": "1s"},  # a round a second; the first ping within it
    )
    async with running(config) as gw:
        reader, writer = await raw_console(gw, client_ssl, token("alice"))
        (session_id,) = gw.sessions  # no reference to the session itself is kept here
        async with asyncio.timeout(TIMEOUT):
            while True:  # a ping: the sweeper has just been through this session
                head = await reader.readexactly(2)
                size = head[1] & 0x7F
                if size == 126:
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                await reader.readexactly(size)
                if head[0] & 0x0F == 0x9:
                    break
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            await gw._until(lambda: not gw.sessions and not gw.connections)
        gc.collect()
        # Searched for, not weakly referenced: compiled (mypyc) classes take no weakrefs.
        alive = [
            o
            for o in gc.get_objects()
            if isinstance(o, ConsoleSession) and o.session_id == session_id
        ]
        assert not alive, "a closed session outlived its connection"
