"""Tests for relayd.client: the escape parser, and `connect()` against a real TLS server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import termios
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from relayd import control
from relayd.client import (
    ESCAPE,
    MENU_TEXT,
    SYSRQ_PROMPT,
    Action,
    ApplySize,
    CancelMenu,
    EscapeParser,
    Quit,
    SendBreak,
    SendBytes,
    SendHook,
    SendSysrq,
    ShowMenu,
    UsageError,
    connect,
    console_url,
    describe_close,
    read_token,
)

TIMEOUT = 10.0
TOKEN = "eyJ0eXAi.s3cret-token.sig"
HELLO = {
    "type": "hello",
    "vm": "demo-1",
    "session": "abc",
    "role": "writer",
    "offset": 0,
    "replay": 0,
    "limits": {},
}

Handler = Callable[[ServerConnection], Awaitable[None]]


# --- EscapeParser -------------------------------------------------------------


def _coalesce(actions: list[Action]) -> list[Action]:
    merged: list[Action] = []
    for action in actions:
        if isinstance(action, SendBytes) and merged and isinstance(merged[-1], SendBytes):
            merged[-1] = SendBytes(merged[-1].data + action.data)
        else:
            merged.append(action)
    return merged


no_escape = st.binary().filter(lambda data: ESCAPE not in data)


@given(no_escape)
def test_escape_parser_input_without_escape_passes_through_unchanged(data: bytes) -> None:
    """Bytes without Ctrl-] come out as one SendBytes, unchanged and in order."""
    assert EscapeParser().feed(data) == ([SendBytes(data)] if data else [])


@given(st.lists(no_escape))
def test_escape_parser_chunks_without_escape_arrive_in_order(chunks: list[bytes]) -> None:
    """However plain input is split into reads, the bytes sent are the bytes typed."""
    parser = EscapeParser()
    sent = b"".join(
        action.data
        for chunk in chunks
        for action in parser.feed(chunk)
        if isinstance(action, SendBytes)
    )
    assert sent == b"".join(chunks)


@given(st.binary(max_size=64), st.data())
def test_escape_parser_any_split_gives_the_same_actions(data: bytes, draw: st.DataObject) -> None:
    """Feeding input in arbitrary pieces gives the same actions as feeding it whole."""
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    parser = EscapeParser()
    split = [action for piece in pieces for action in parser.feed(piece)]
    assert _coalesce(split) == EscapeParser().feed(data)


@given(no_escape, st.sampled_from([b"b", b"B", b"z", b"q", b"]", b"\x1d", b"sh", b"x", b"s!"]))
def test_escape_parser_menu_after_text_keeps_text_first(prefix: bytes, keys: bytes) -> None:
    """Text typed before Ctrl-] is sent before the menu opens."""
    actions = EscapeParser().feed(prefix + b"\x1d" + keys)
    expected_head: list[Action] = [SendBytes(prefix)] if prefix else []
    assert actions[: len(expected_head) + 1] == [*expected_head, ShowMenu(MENU_TEXT)]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (b"\x1db", [ShowMenu(MENU_TEXT), SendBreak()]),
        (b"\x1dB", [ShowMenu(MENU_TEXT), SendBreak()]),
        (b"\x1dsh", [ShowMenu(MENU_TEXT), ShowMenu(SYSRQ_PROMPT), SendSysrq("h")]),
        (b"\x1dsB", [ShowMenu(MENU_TEXT), ShowMenu(SYSRQ_PROMPT), SendSysrq("b")]),
        (b"\x1ds\x1b", [ShowMenu(MENU_TEXT), ShowMenu(SYSRQ_PROMPT), CancelMenu()]),
        (b"\x1dz", [ShowMenu(MENU_TEXT), ApplySize()]),
        (b"\x1dq", [ShowMenu(MENU_TEXT), Quit()]),
        (b"\x1d]", [ShowMenu(MENU_TEXT), SendBytes(b"\x1d")]),
        (b"\x1d\x1d", [ShowMenu(MENU_TEXT), SendBytes(b"\x1d")]),
        (b"\x1dx", [ShowMenu(MENU_TEXT), CancelMenu()]),
        (b"a\x1d]b", [SendBytes(b"a"), ShowMenu(MENU_TEXT), SendBytes(b"\x1db")]),
        (b"\x1dxls", [ShowMenu(MENU_TEXT), CancelMenu(), SendBytes(b"ls")]),
    ],
)
def test_escape_parser_menu_sequence_gives_its_actions(keys: bytes, expected: list[Action]) -> None:
    """Each menu key sequence produces its command, and the cancelling key is dropped."""
    assert EscapeParser().feed(keys) == expected


def test_escape_parser_menu_key_in_a_later_read_is_still_a_command() -> None:
    """The menu state survives between reads, as keys arrive one by one from a tty."""
    parser = EscapeParser()
    assert parser.feed(b"\x1d") == [ShowMenu(MENU_TEXT)]
    assert parser.feed(b"s") == [ShowMenu(SYSRQ_PROMPT)]
    assert parser.feed(b"c") == [SendSysrq("c")]
    assert parser.feed(b"c") == [SendBytes(b"c")]


# --- small sans-I/O helpers ------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://127.0.0.1:8443", "wss://127.0.0.1:8443/v1/vms/demo-1/console?mode=interactive"),
        ("wss://gw.test/", "wss://gw.test/v1/vms/demo-1/console?mode=interactive"),
        (
            "https://[::1]:8443/relay",
            "wss://[::1]:8443/relay/v1/vms/demo-1/console?mode=interactive",
        ),
    ],
)
def test_console_url_base_url_gets_console_path(base: str, expected: str) -> None:
    """https and wss bases, with or without a path prefix, map to the console URL."""
    assert console_url(base, "demo-1", spectate=False) == expected


def test_console_url_spectate_and_resume_go_in_the_query() -> None:
    """Spectate mode and a resume offset become `mode=spectate&from=N`."""
    url = console_url("https://gw.test", "a/b", spectate=True, resume_from=42)
    assert url == "wss://gw.test/v1/vms/a%2Fb/console?mode=spectate&from=42"


@pytest.mark.parametrize(
    "base", ["http://gw.test", "ws://gw.test", "gw.test:8443", "https://u:p@gw.test", "https://"]
)
def test_console_url_insecure_or_odd_base_is_a_usage_error(base: str) -> None:
    """Plain-text schemes, missing hosts and credentials in the URL are refused."""
    with pytest.raises(UsageError):
        console_url(base, "demo-1", spectate=False)


def test_describe_close_takeover_names_who() -> None:
    """A 4001 close reads as a takeover and keeps the server's reason."""
    text = describe_close(4001, "taken over by user:bob")
    assert text == "disconnected: taken over by another user (taken over by user:bob)"


def test_describe_close_every_protocol_code_has_words() -> None:
    """Each close code control.py defines (1007 included) reads as words, not a number."""
    codes = [v for k, v in vars(control).items() if k.startswith("CLOSE_")]
    assert 1007 in codes
    for code in codes:
        assert "code" not in describe_close(code, None), code


def test_describe_close_reason_control_characters_are_neutralised() -> None:
    """A reason cannot smuggle terminal escape sequences onto the user's screen."""
    assert "\x1b" not in describe_close(4003, "no\x1b[2Jpe")


def test_read_token_file_is_stripped(tmp_path: Path) -> None:
    """A token file's trailing newline is not part of the token."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token(None, path) == TOKEN


def test_read_token_literal_is_returned() -> None:
    """A token given on the command line is used as is."""
    assert read_token(TOKEN, None) == TOKEN


@pytest.mark.parametrize(
    ("token", "use_file"), [(None, False), (TOKEN, True), ("has space", False), ("", False)]
)
def test_read_token_neither_both_or_bad_is_a_usage_error(
    tmp_path: Path, token: str | None, use_file: bool
) -> None:
    """Neither or both sources, or a token with spaces, is refused without echoing it."""
    path = tmp_path / "token"
    path.write_text(TOKEN)
    with pytest.raises(UsageError) as caught:
        read_token(token, path if use_file else None)
    assert TOKEN not in str(caught.value)


def test_read_token_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    """An unreadable token file is a usage error naming the file."""
    with pytest.raises(UsageError, match="token file"):
        read_token(None, tmp_path / "missing")


# --- connect() against a real TLS WebSocket server -------------------------------


class EventfulStderr(io.StringIO):
    """A stderr stand-in that lets a test await a status line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[tuple[str, asyncio.Event]] = []

    def write(self, text: str) -> int:
        written = super().write(text)
        for needle, event in self._waiters:
            if needle in self.getvalue():
                event.set()
        return written

    async def wait_for(self, needle: str) -> None:
        event = asyncio.Event()
        self._waiters.append((needle, event))
        self.write("")
        async with asyncio.timeout(TIMEOUT):
            await event.wait()


@dataclass
class Gateway:
    """A scripted stand-in for relayd's console endpoint."""

    url: str
    ca_file: Path
    handler: Handler | None = None
    requests: list[Request] = field(default_factory=list)
    received: list[str | bytes] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def binary(self) -> bytes:
        return b"".join(m for m in self.received if isinstance(m, bytes))

    def controls(self) -> list[object]:
        return [json.loads(m) for m in self.received if isinstance(m, str)]

    async def recv_until(self, ws: ServerConnection, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not done():
                self.received.append(await ws.recv())

    async def drain_until_closed(self, ws: ServerConnection) -> None:
        """Record messages until the client closes."""
        async with asyncio.timeout(TIMEOUT):
            try:
                while True:
                    self.received.append(await ws.recv())
            except ConnectionClosed:
                pass


@pytest.fixture(scope="module")
def tls() -> tuple[trustme.CA, ssl.SSLContext]:
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return ca, context


@pytest.fixture
async def gateway(tls: tuple[trustme.CA, ssl.SSLContext], tmp_path: Path) -> AsyncIterator[Gateway]:
    ca, context = tls
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = Gateway(url="", ca_file=ca_file)

    async def handle(ws: ServerConnection) -> None:
        assert ws.request is not None
        gw.requests.append(ws.request)
        assert gw.handler is not None
        try:
            await gw.handler(ws)
        finally:
            gw.close_codes.append(ws.close_code)
            gw.done.set()

    async with serve(
        handle, "127.0.0.1", 0, ssl=context, subprotocols=[Subprotocol("relayd.console.v1")]
    ) as server:
        gw.url = f"https://127.0.0.1:{_port(server)}"
        yield gw


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int, int]]:
    """(stdin read end, stdin write end, stdout read end, stdout write end)."""
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    yield stdin_r, stdin_w, stdout_r, stdout_w
    for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
        os.close(fd)


def _port(server: Server) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


async def test_connect_takeover_session_relays_both_ways_and_reports_who(
    gateway: Gateway, pipes: tuple[int, int, int, int]
) -> None:
    """Output reaches stdout, keys reach the gateway, and a 4001 close names the new user."""
    stdin_r, stdin_w, stdout_r, stdout_w = pipes

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await ws.send(b"\r\nlogin: ")
        await ws.send(json.dumps({"type": "notice", "event": "port_down"}))
        await gateway.recv_until(ws, lambda: gateway.binary() == b"root\r")
        await ws.close(4001, "taken over by user:bob")

    gateway.handler = script
    os.write(stdin_w, b"root\r")
    stderr = EventfulStderr()
    async with asyncio.timeout(TIMEOUT):
        code = await connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            stderr=stderr,
        )

    assert code == 1
    assert _read_all(stdout_r) == b"\r\nlogin: "
    assert gateway.binary() == b"root\r"
    request = gateway.requests[0]
    assert request.path == "/v1/vms/demo-1/console?mode=interactive"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "[relayd] connected to vm demo-1 as writer (session abc)"
    assert "[relayd] port down" in lines
    assert "taken over" in lines[-1]
    assert "user:bob" in lines[-1]
    assert TOKEN not in stderr.getvalue()
    assert os.get_blocking(stdout_w)


@pytest.mark.parametrize("drop", [False, True])
async def test_connect_gateway_gone_says_the_offset_to_resume_from(
    gateway: Gateway, pipes: tuple[int, int, int, int], drop: bool
) -> None:
    """A drain (1001) or a dropped connection ends the client; its last line says which
    --from resumes it without a gap: hello's offset less its replay, plus output since, and
    past any output_gap."""
    stdin_r, _, stdout_r, stdout_w = pipes

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps({**HELLO, "offset": 100, "replay": 4}))
        await ws.send(b"tail")  # the replay: offsets 96..99
        await ws.send(b"live!")  # 100..104
        gap = {"type": "notice", "event": "output_gap", "first": 105, "last": 199, "bytes": 95}
        await ws.send(json.dumps(gap))
        await ws.send(b"xyz")  # 200..202
        if drop:
            ws.transport.abort()
        else:
            await ws.close(1001, "gateway shutting down")

    gateway.handler = script
    stderr = EventfulStderr()
    async with asyncio.timeout(TIMEOUT):
        code = await connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            stderr=stderr,
        )
    assert code == 1
    assert _read_all(stdout_r) == b"taillive!xyz"
    lines = stderr.getvalue().splitlines()
    assert lines[-1] == "[relayd] to resume where this left off, connect again with --from 203"


async def test_connect_escape_menu_sends_break_sysrq_literal_and_quits(
    gateway: Gateway, pipes: tuple[int, int, int, int]
) -> None:
    """Ctrl-] b, Ctrl-] s h, Ctrl-] ] and Ctrl-] q become break, sysrq, ^] and close 1000."""
    stdin_r, stdin_w, _, stdout_w = pipes

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await gateway.drain_until_closed(ws)

    gateway.handler = script
    os.write(stdin_w, b"ls\x1db\x1dsh\x1d]x\x1dq")
    stderr = EventfulStderr()
    async with asyncio.timeout(TIMEOUT):
        code = await connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            stderr=stderr,
        )
        await gateway.done.wait()

    assert code == 0
    assert gateway.binary() == b"ls\x1dx"
    assert gateway.controls() == [{"type": "break"}, {"type": "sysrq", "key": "h"}]
    assert gateway.close_codes == [1000]
    assert "[relayd] disconnected: closed" in stderr.getvalue()


async def test_connect_spectator_does_not_send_keys_and_uses_spectate_mode(
    gateway: Gateway, pipes: tuple[int, int, int, int]
) -> None:
    """A spectator's keystrokes stay local; the request asks for spectate mode from an offset."""
    stdin_r, stdin_w, _, stdout_w = pipes

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps({**HELLO, "role": "spectator"}))
        await gateway.drain_until_closed(ws)

    gateway.handler = script
    stderr = EventfulStderr()
    task = asyncio.create_task(
        connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=True,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            resume_from=7,
            stderr=stderr,
        )
    )
    await stderr.wait_for("as spectator")
    os.write(stdin_w, b"rm -rf /\r\x1dq")
    async with asyncio.timeout(TIMEOUT):
        assert await task == 0
        await gateway.done.wait()

    assert gateway.requests[0].path == "/v1/vms/demo-1/console?mode=spectate&from=7"
    assert gateway.received == []
    assert "read-only session" in stderr.getvalue()


async def test_connect_http_rejection_prints_status_and_json_error(
    tls: tuple[trustme.CA, ssl.SSLContext], tmp_path: Path, pipes: tuple[int, int, int, int]
) -> None:
    """A 403 before the upgrade prints the status and the JSON error, and exits 1."""
    ca, context = tls
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    body = json.dumps({"error": "forbidden", "message": "role reader may not write"}).encode()

    def refuse(ws: ServerConnection, request: Request) -> Response:
        return Response(403, "Forbidden", Headers([("Content-Type", "application/json")]), body)

    async def unreachable(ws: ServerConnection) -> None:
        raise AssertionError("the upgrade should have been refused")

    stdin_r, _, _, stdout_w = pipes
    stderr = EventfulStderr()
    async with serve(unreachable, "127.0.0.1", 0, ssl=context, process_request=refuse) as server:
        code = await connect(
            f"https://127.0.0.1:{_port(server)}",
            "demo-1",
            token=TOKEN,
            ca=ca_file,
            spectate=False,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            stderr=stderr,
        )

    assert code == 1
    assert stderr.getvalue() == (
        "[relayd] rejected by gateway: HTTP 403 Forbidden: forbidden: role reader may not write\n"
    )


async def test_connect_untrusted_certificate_fails_with_hint(
    gateway: Gateway, pipes: tuple[int, int, int, int]
) -> None:
    """Without the right CA the handshake fails, exit 1, and the message points at --ca."""
    stdin_r, _, _, stdout_w = pipes
    stderr = EventfulStderr()
    code = await connect(
        gateway.url,
        "demo-1",
        token=TOKEN,
        ca=None,
        spectate=False,
        stdin_fd=stdin_r,
        stdout_fd=stdout_w,
        stderr=stderr,
    )
    assert code == 1
    assert "--ca" in stderr.getvalue()
    assert not gateway.requests


@pytest.mark.parametrize(
    ("url", "ca_name"), [("http://127.0.0.1:1", None), ("https://127.0.0.1:1", "missing.pem")]
)
async def test_connect_bad_url_or_missing_ca_is_a_usage_error(
    tmp_path: Path, url: str, ca_name: str | None
) -> None:
    """A plain-text URL or an unreadable CA file exits 2 before connecting."""
    stderr = EventfulStderr()
    ca = tmp_path / ca_name if ca_name else None
    assert await connect(url, "demo-1", token=TOKEN, ca=ca, spectate=False, stderr=stderr) == 2
    assert stderr.getvalue().startswith("[relayd] error: ")


@pytest.fixture
def pty_stdin() -> Iterator[tuple[int, int]]:
    """(master, slave) of a pseudo-terminal sized 100x30, the slave standing in for stdin."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (30, 100))
    yield master, slave
    os.close(master)
    os.close(slave)


async def test_connect_tty_is_raw_while_attached_and_restored_after(
    gateway: Gateway, pty_stdin: tuple[int, int], pipes: tuple[int, int, int, int]
) -> None:
    """On a tty, ^C reaches the guest as a byte, resizes are sent, and the modes come back."""
    master, slave = pty_stdin
    _, _, _, stdout_w = pipes
    before = termios.tcgetattr(slave)

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await gateway.recv_until(ws, lambda: len(gateway.controls()) == 2)
        await gateway.recv_until(ws, lambda: gateway.binary() == b"\x03x")
        await ws.close(4008, "idle for 30m")

    gateway.handler = script
    stderr = EventfulStderr()
    task = asyncio.create_task(
        connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=slave,
            stdout_fd=stdout_w,
            stderr=stderr,
        )
    )
    await stderr.wait_for("connected to vm")
    assert termios.tcgetattr(slave) != before
    termios.tcsetwinsize(slave, (40, 120))
    os.kill(os.getpid(), signal.SIGWINCH)
    os.write(master, b"\x03x")
    async with asyncio.timeout(TIMEOUT):
        code = await task

    assert code == 1
    assert gateway.controls() == [
        {"type": "resize", "cols": 100, "rows": 30},
        {"type": "resize", "cols": 120, "rows": 40},
    ]
    assert termios.tcgetattr(slave) == before
    assert "idle timeout (idle for 30m)\r\n" in stderr.getvalue()


async def test_connect_cancelled_while_attached_restores_the_tty(
    gateway: Gateway, pty_stdin: tuple[int, int], pipes: tuple[int, int, int, int]
) -> None:
    """Cancelling the client mid-session still puts the terminal back as it was."""
    _, slave = pty_stdin
    _, _, _, stdout_w = pipes
    before = termios.tcgetattr(slave)

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await gateway.drain_until_closed(ws)

    gateway.handler = script
    stderr = EventfulStderr()
    task = asyncio.create_task(
        connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=slave,
            stdout_fd=stdout_w,
            stderr=stderr,
        )
    )
    await stderr.wait_for("connected to vm")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert termios.tcgetattr(slave) == before


async def test_connect_sigterm_closes_normally_and_restores_the_tty(
    gateway: Gateway, pty_stdin: tuple[int, int], pipes: tuple[int, int, int, int]
) -> None:
    """SIGTERM closes the session with 1000, exits 128+15 and restores the terminal."""
    _, slave = pty_stdin
    _, _, _, stdout_w = pipes
    before = termios.tcgetattr(slave)
    previous = signal.getsignal(signal.SIGTERM)

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await gateway.drain_until_closed(ws)

    gateway.handler = script
    stderr = EventfulStderr()
    task = asyncio.create_task(
        connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=slave,
            stdout_fd=stdout_w,
            stderr=stderr,
        )
    )
    await stderr.wait_for("connected to vm")
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(TIMEOUT):
        assert await task == 128 + signal.SIGTERM
        await gateway.done.wait()

    assert gateway.close_codes == [1000]
    assert termios.tcgetattr(slave) == before
    assert signal.getsignal(signal.SIGTERM) == previous


async def _read_exactly(fd: int, size: int) -> bytes:
    """Read `size` bytes from a pipe as the loop says they are ready."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    received = bytearray()
    while len(received) < size:
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        received += os.read(fd, 65536)
    return bytes(received)


async def test_connect_output_larger_than_buffers_arrives_whole_and_in_order(
    gateway: Gateway, pipes: tuple[int, int, int, int]
) -> None:
    """Megabytes of output through a small pipe arrive intact, with backpressure, not loss."""
    stdin_r, _, stdout_r, stdout_w = pipes
    chunks = [bytes([i % 251]) * 65536 for i in range(48)]

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        for chunk in chunks:
            await ws.send(chunk)
        await ws.close(1000, "done")

    gateway.handler = script
    reader = asyncio.create_task(_read_exactly(stdout_r, sum(map(len, chunks))))
    async with asyncio.timeout(TIMEOUT):
        code = await connect(
            gateway.url,
            "demo-1",
            token=TOKEN,
            ca=gateway.ca_file,
            spectate=False,
            stdin_fd=stdin_r,
            stdout_fd=stdout_w,
            stderr=EventfulStderr(),
        )
        assert await reader == b"".join(chunks)
    assert code == 0


async def test_connect_stdin_from_regular_file_is_read_and_sent(
    gateway: Gateway, pipes: tuple[int, int, int, int], tmp_path: Path
) -> None:
    """Keys redirected from a file (which epoll cannot watch) are still sent, then quit."""
    _, _, _, stdout_w = pipes
    keys = tmp_path / "keys"
    keys.write_bytes(b"uptime\r\x1dq")

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(HELLO))
        await gateway.drain_until_closed(ws)

    gateway.handler = script
    with keys.open("rb") as stdin:
        async with asyncio.timeout(TIMEOUT):
            code = await connect(
                gateway.url,
                "demo-1",
                token=TOKEN,
                ca=gateway.ca_file,
                spectate=False,
                stdin_fd=stdin.fileno(),
                stdout_fd=stdout_w,
                stderr=EventfulStderr(),
            )
            await gateway.done.wait()
    assert code == 0
    assert gateway.binary() == b"uptime\r"


def test_escape_menu_reset_and_nmi_need_confirmation() -> None:
    """Ctrl-] r y asks for reset, Ctrl-] n y for an NMI; any other key cancels."""
    parser = EscapeParser()
    assert parser.feed(b"\x1dr")[-1] == ShowMenu(
        "reset the vm (owners only)? press y to confirm, any other key: back"
    )
    assert parser.feed(b"y") == [SendHook("reset")]
    parser.feed(b"\x1dn")
    assert parser.feed(b"Y") == [SendHook("nmi")]
    parser.feed(b"\x1dr")
    assert parser.feed(b"x") == [CancelMenu()]
    assert parser.feed(b"ab") == [SendBytes(b"ab")]
