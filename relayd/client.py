"""`relayd connect`: a raw terminal client for the `relayd.console.v1` WebSocket protocol.

Two layers, as in websockets itself:

- `EscapeParser` (sans-I/O) turns keyboard bytes into actions: bytes for the
  guest, or a command picked from the escape menu that `Ctrl-]` opens.
- `connect()` does the I/O: TLS WebSocket, raw local terminal, stdin read with
  `loop.add_reader`, console output to stdout, status lines to stderr.

Status lines end in CRLF because a raw terminal does not turn LF into CRLF.
The token is only ever put in the `Authorization` header: it is never printed,
and websockets' debug logging (which dumps request headers) is kept off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import ssl
import stat
import sys
import termios
import tty
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from relayd import control
from relayd.errors import UsageError

__all__ = [
    "ESCAPE",
    "Action",
    "ApplySize",
    "CancelMenu",
    "EscapeParser",
    "Quit",
    "SendBreak",
    "SendBytes",
    "SendHook",
    "SendSysrq",
    "ShowMenu",
    "UsageError",
    "connect",
    "console_url",
    "describe_close",
    "read_token",
]

SUBPROTOCOL = Subprotocol(control.SUBPROTOCOL)

#: Ctrl-], as in telnet: rare in shells and editors, one keystroke to reach.
ESCAPE = 0x1D

MENU_TEXT = (
    "menu: b break, s sysrq, z apply window size, r reset, n nmi, q quit, ] send ^], "
    "other key: back"
)
HOOK_PROMPT = "{name} the vm (owners only)? press y to confirm, any other key: back"
SYSRQ_PROMPT = "sysrq: press the key (h for help on the guest console)"
SYSRQ_KEYS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz")

#: Words for the close codes (control.py's); the server's reason text is added to them.
CLOSE_REASONS = {
    control.CLOSE_NORMAL: "closed",
    control.CLOSE_GOING_AWAY: "gateway shutting down",
    control.CLOSE_PROTOCOL_ERROR: "protocol error",
    control.CLOSE_ABNORMAL: "connection lost",
    control.CLOSE_INVALID_DATA: "invalid data (text that is not UTF-8)",
    control.CLOSE_MESSAGE_TOO_BIG: "message too big",
    control.CLOSE_INTERNAL_ERROR: "gateway internal error",
    control.CLOSE_TAKEN_OVER: "taken over by another user",
    control.CLOSE_FORBIDDEN: "forbidden",
    control.CLOSE_UNKNOWN_VM: "unknown vm",
    control.CLOSE_IDLE: "idle timeout",
    control.CLOSE_DISABLED: "serial console disabled",
    control.CLOSE_SESSION_LIMIT: "session limit reached",
}

OPEN_TIMEOUT = 15.0
FLUSH_TIMEOUT = 5.0
READ_SIZE = 4096
MAX_OUTPUT_BUFFER = 1 << 20

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# websockets logs every request header at DEBUG, Authorization included.
# A logger of our own, capped at INFO, keeps the token out of any log setup.
_WS_LOGGER = logging.getLogger("relayd.client.websocket")
_WS_LOGGER.setLevel(logging.INFO)


def read_token(token: str | None, token_file: Path | None) -> str:
    """The bearer token from `--token` or `--token-file`: exactly one must be given.

    A file keeps the token out of the process list and shell history; its
    surrounding whitespace (the trailing newline) is dropped.

    Raises:
        UsageError: neither or both are given, the file cannot be read, or the
            token is empty or holds whitespace or control characters.
    """
    if token is not None and token_file is not None:
        raise UsageError("give only one of --token and --token-file")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read token file {token_file}: {exc}") from exc
    if token is None:
        raise UsageError("give --token or --token-file")
    if not token or not all(33 <= ord(char) <= 126 for char in token):
        # Never echo the token itself: say what is wrong with it.
        raise UsageError("the token must be non-empty printable ASCII without spaces")
    return token


# --- keyboard: the escape menu, sans-I/O -------------------------------------


@dataclass(frozen=True)
class SendBytes:
    """Keyboard bytes for the guest."""

    data: bytes


@dataclass(frozen=True)
class SendBreak:
    """Send a serial BREAK."""


@dataclass(frozen=True)
class SendSysrq:
    """Send BREAK then `key`: Linux magic SysRq over serial."""

    key: str


@dataclass(frozen=True)
class SendHook:
    """Ask the gateway to run the VM's reset or NMI hook (owners; confirmed first)."""

    name: str  # "reset" or "nmi"


@dataclass(frozen=True)
class ApplySize:
    """Type `stty rows R cols C` into the guest from the local terminal size."""


@dataclass(frozen=True)
class Quit:
    """Close the session normally."""


@dataclass(frozen=True)
class ShowMenu:
    """Show a menu or prompt line to the user."""

    text: str


@dataclass(frozen=True)
class CancelMenu:
    """The menu was left without a command; the key that left it is dropped."""


Action = SendBytes | SendBreak | SendSysrq | SendHook | ApplySize | Quit | ShowMenu | CancelMenu

_TEXT, _MENU, _SYSRQ, _RESET, _NMI = "text", "menu", "sysrq", "reset", "nmi"


class EscapeParser:
    """Split keyboard input into guest bytes and escape-menu commands.

    The whole machine (any key is matched case-insensitively in the menu):

    ========  =============  ==========================  ======
    state     byte           action                      next
    ========  =============  ==========================  ======
    text      ``^]``         ShowMenu(menu)              menu
    text      other          SendBytes (runs coalesced)  text
    menu      ``b``          SendBreak                   text
    menu      ``s``          ShowMenu(sysrq prompt)      sysrq
    menu      ``z``          ApplySize                   text
    menu      ``r`` / ``n``  ShowMenu(confirm prompt)    reset / nmi
    menu      ``q``          Quit                        text
    menu      ``]`` / ``^]`` SendBytes(``^]``)           text
    menu      other          CancelMenu                  text
    sysrq     ``0-9a-z``     SendSysrq(key)              text
    sysrq     other          CancelMenu                  text
    reset     ``y``          SendHook("reset")           text
    nmi       ``y``          SendHook("nmi")             text
    reset/nmi other          CancelMenu                  text
    ========  =============  ==========================  ======

    State survives between `feed` calls, so a menu key may arrive in a later read.
    """

    def __init__(self) -> None:
        self._state = _TEXT

    def feed(self, data: bytes) -> list[Action]:
        """Consume keyboard bytes and return what to do, in order."""
        actions: list[Action] = []
        start = 0  # start of the pending run of plain bytes in `data`
        for index, byte in enumerate(data):
            if self._state == _TEXT:
                if byte == ESCAPE:
                    _append(actions, SendBytes(data[start:index]))
                    actions.append(ShowMenu(MENU_TEXT))
                    self._state = _MENU
                continue
            if self._state == _MENU:
                action = self._menu_key(byte)
            elif self._state == _SYSRQ:
                action = self._sysrq_key(byte)
            else:
                action = self._confirm_key(byte)
            _append(actions, action)
            start = index + 1
        if self._state == _TEXT:
            _append(actions, SendBytes(data[start:]))
        return actions

    def _menu_key(self, byte: int) -> Action:
        self._state = _TEXT
        key = chr(byte).lower()
        if key == "b":
            return SendBreak()
        if key == "s":
            self._state = _SYSRQ
            return ShowMenu(SYSRQ_PROMPT)
        if key == "z":
            return ApplySize()
        if key in ("r", "n"):
            self._state = _RESET if key == "r" else _NMI
            return ShowMenu(HOOK_PROMPT.format(name="reset" if key == "r" else "send an NMI to"))
        if key == "q":
            return Quit()
        if byte in (ord("]"), ESCAPE):
            return SendBytes(bytes([ESCAPE]))
        return CancelMenu()

    def _confirm_key(self, byte: int) -> Action:
        hook = "reset" if self._state == _RESET else "nmi"
        self._state = _TEXT
        return SendHook(hook) if chr(byte).lower() == "y" else CancelMenu()

    def _sysrq_key(self, byte: int) -> Action:
        self._state = _TEXT
        key = bytes([byte]).lower()
        if key[0] in SYSRQ_KEYS:
            return SendSysrq(key.decode("ascii"))
        return CancelMenu()


def _append(actions: list[Action], action: Action) -> None:
    """Append `action`, merging adjacent SendBytes and dropping empty ones."""
    if isinstance(action, SendBytes):
        if not action.data:
            return
        if actions and isinstance(actions[-1], SendBytes):
            actions[-1] = SendBytes(actions[-1].data + action.data)
            return
    actions.append(action)


# --- what the user is told, sans-I/O -----------------------------------------


def console_url(base: str, vm: str, *, spectate: bool, resume_from: int | None = None) -> str:
    """The console WebSocket URL for `vm` under a gateway base URL.

    Args:
        base: `https://HOST[:PORT][/prefix]` or the same with `wss://`.
        vm: the VM id, percent-encoded into the path.
        spectate: ask for a read-only session.
        resume_from: an output offset to resume from (`?from=`).

    Raises:
        UsageError: the URL is not https/wss, has no host, or carries
            credentials, a query or a fragment.
    """
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("https", "wss"):
        raise UsageError(f"gateway URL must start with https:// or wss://, not {base!r}")
    if not parts.hostname:
        raise UsageError(f"gateway URL {base!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise UsageError("gateway URL must not carry credentials; use --token or --token-file")
    if parts.query or parts.fragment:
        raise UsageError(f"gateway URL {base!r} must not have a query or fragment")
    if not vm:
        raise UsageError("--vm must not be empty")
    if resume_from is not None and resume_from < 0:
        raise UsageError(f"resume offset must be >= 0, not {resume_from}")
    query = {"mode": "spectate" if spectate else "interactive"}
    if resume_from is not None:
        query["from"] = str(resume_from)
    path = f"{parts.path.rstrip('/')}/v1/vms/{urllib.parse.quote(vm, safe='')}/console"
    return urllib.parse.urlunsplit(("wss", parts.netloc, path, urllib.parse.urlencode(query), ""))


#: Closes after which the same console is there to reconnect to: the gateway went away
#: (a drain, a restart) or the connection dropped; `--from` then misses nothing.
RESUMABLE_CLOSES = frozenset({control.CLOSE_GOING_AWAY, control.CLOSE_ABNORMAL, None})


def describe_close(code: int | None, reason: str | None) -> str:
    """One status line for a close code and the server's reason text."""
    words = CLOSE_REASONS.get(code or control.CLOSE_ABNORMAL, f"closed with code {code}")
    if reason and reason != words:
        return f"disconnected: {words} ({_printable(reason)})"
    return f"disconnected: {words}"


def describe_rejection(status: int, reason_phrase: str, body: bytes) -> str:
    """One status line for an HTTP refusal of the upgrade and its JSON error body."""
    text = f"rejected by gateway: HTTP {status} {_printable(reason_phrase)}".rstrip()
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if isinstance(error, dict):
        details = [str(error[k]) for k in ("error", "message") if error.get(k)]
        if details:
            text += ": " + _printable(": ".join(details))
    if status == 401:
        text += " (check --token or --token-file)"
    return text


def describe_notice(message: dict[str, Any]) -> str:
    """One status line for a `notice`: its event in words, then its other fields."""
    text = str(message.get("event", "notice")).replace("_", " ")
    if message.get("message"):
        text += f": {message['message']}"
    extra = {k: v for k, v in message.items() if k not in ("type", "event", "message")}
    if extra:
        text += " (" + ", ".join(f"{key}={value}" for key, value in extra.items()) + ")"
    return _printable(text)


def _printable(text: str, limit: int = 500) -> str:
    """Server-supplied text without control characters, which could drive the terminal."""
    return "".join(char if char.isprintable() else "?" for char in text[:limit])


def _ssl_context(ca: Path | None) -> ssl.SSLContext:
    """A verifying client context, TLS 1.2 or newer, trusting `ca` or the system roots."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load CA file {ca}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


# --- I/O ---------------------------------------------------------------------


class _Status:
    """Status lines on stderr, with the line ending the terminal mode needs."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.eol = "\n"

    def line(self, text: str) -> None:
        self.stream.write(f"[relayd] {text}{self.eol}")
        self.stream.flush()


class _Output:
    """Console output to a file descriptor, with a bounded buffer for pipes and sockets.

    Pipes and sockets are made non-blocking (and restored on close) so a slow
    reader never stalls the loop; when the buffer is full `write` waits, which
    stops reading the WebSocket and lets TCP push back on the gateway. A tty is
    left blocking: its file description is usually shared with stderr and
    stdin, and a terminal emulator drains fast.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()
        self._error: OSError | None = None
        self._was_blocking = os.get_blocking(fd)
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.set_blocking(fd, False)

    async def write(self, data: bytes) -> None:
        """Write `data`, waiting while more than MAX_OUTPUT_BUFFER bytes are pending.

        Raises:
            OSError: the output is gone (closed pipe, hung-up terminal).
        """
        if self._error is not None:
            raise self._error
        if not self._buffer:
            written = self._write_some(data)
            if written == len(data):
                return
            self._loop.add_writer(self._fd, self._on_writable)
            data = data[written:]
        self._buffer += data
        if len(self._buffer) > MAX_OUTPUT_BUFFER:
            self._drained.clear()
            await self._drained.wait()
            if self._error is not None:
                raise self._error

    async def flush(self) -> None:
        """Wait until everything buffered is written or the output fails."""
        while self._buffer and self._error is None:
            self._drained.clear()
            await self._drained.wait()

    def close(self) -> None:
        """Stop writing and give the descriptor back its blocking mode."""
        if self._buffer:
            self._loop.remove_writer(self._fd)
            self._buffer.clear()
        os.set_blocking(self._fd, self._was_blocking)

    def _write_some(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0

    def _on_writable(self) -> None:
        try:
            del self._buffer[: self._write_some(self._buffer)]
        except OSError as exc:
            self._error = exc
            self._buffer.clear()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
        if len(self._buffer) <= MAX_OUTPUT_BUFFER // 2:
            self._drained.set()


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[bool]:
    """Put `fd` in raw mode if it is a terminal, and always put it back."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)  # TCSADRAIN keeps keys typed ahead
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signal_handlers(handlers: dict[signal.Signals, Callable[[], None]]) -> Iterator[None]:
    """Install loop signal handlers, then restore whatever was there before."""
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    try:
        for signo, callback in handlers.items():
            previous = signal.getsignal(signo)
            try:
                loop.add_signal_handler(signo, callback)
            except (RuntimeError, ValueError):
                continue  # not the main thread: signals keep their default behaviour
            installed.append((signo, previous))
        yield
    finally:
        for signo, previous in installed:
            loop.remove_signal_handler(signo)
            if previous is not None:
                signal.signal(signo, previous)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _ConsoleSession:
    """One attached console: output pump, keyboard pump, resize and interrupt watchers."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        stdin_fd: int,
        output: _Output,
        status: _Status,
        terminal_fd: int | None,
    ) -> None:
        self._ws = ws
        self._stdin_fd = stdin_fd
        self._stdin_is_file = stat.S_ISREG(os.fstat(stdin_fd).st_mode)
        self._output = output
        self._status = status
        self._terminal_fd = terminal_fd
        self._parser = EscapeParser()
        self._role: str | None = None
        self._told_read_only = False
        self._resized = asyncio.Event()
        self._interrupted = asyncio.Event()
        self._signal: int | None = None
        self._quit = False
        self._failure: str | None = None
        # The offset of the next output byte (hello's offset - replay, plus what came):
        # where a reconnect resumes (`--from`) to miss nothing.
        self._position: int | None = None

    def interrupt(self, signo: int) -> None:
        """Signal handler: end the session with a normal close."""
        self._signal = signo
        self._interrupted.set()

    def resized(self) -> None:
        """SIGWINCH handler: send the new size (coalesced) from the resize task."""
        self._resized.set()

    async def run(self) -> int:
        """Relay until either side closes; return the exit code."""
        async with asyncio.TaskGroup() as group:
            helpers = [
                group.create_task(self._pump_input()),
                group.create_task(self._watch_resize()),
                group.create_task(self._watch_interrupt()),
            ]
            await self._pump_output()
            for task in helpers:
                task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self._output.flush()
        return self._outcome()

    def _outcome(self) -> int:
        if self._signal is not None:
            self._status.line(f"interrupted by {signal.Signals(self._signal).name}")
            return 128 + self._signal
        if self._failure is not None:
            self._status.line(self._failure)
            return EXIT_ERROR
        code = self._ws.close_code
        self._status.line(describe_close(code, self._ws.close_reason))
        if self._position is not None and code in RESUMABLE_CLOSES and not self._quit:
            self._status.line(
                f"to resume where this left off, connect again with --from {self._position}"
            )
        return EXIT_OK if self._quit or code == control.CLOSE_NORMAL else EXIT_ERROR

    async def _pump_output(self) -> None:
        """Console bytes to stdout, control messages to status lines, until closed."""
        while True:
            try:
                message = await self._ws.recv()
            except ConnectionClosed:
                return
            if isinstance(message, str):
                self._on_control(message)
                continue
            if self._position is not None:
                self._position += len(message)
            try:
                await self._output.write(message)
            except OSError as exc:
                self._failure = f"cannot write console output: {exc}"
                await self._ws.close(control.CLOSE_NORMAL, "client output closed")
                return

    def _on_control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._status.line("ignored a control message that is not a JSON object")
            return
        kind = message.get("type")
        if kind == "hello":
            self._role = str(message.get("role"))
            offset, replay = message.get("offset"), message.get("replay", 0)
            if isinstance(offset, int) and isinstance(replay, int):
                self._position = max(0, offset - replay)
            self._status.line(
                _printable(
                    f"connected to vm {message.get('vm')} as {self._role} "
                    f"(session {message.get('session')})"
                )
            )
            self._resized.set()  # tell the gateway our size once we know our role
        elif kind == "notice":
            if message.get("event") == "demoted":
                self._role = "spectator"
            if message.get("event") == "output_gap":
                self._skip_past(message.get("last"))
            self._status.line(describe_notice(message))
        elif kind == "error":
            code, text = message.get("code", "error"), message.get("message", "")
            self._status.line(_printable(f"error: {code}: {text}".rstrip(": ")))
        else:
            self._status.line(_printable(f"ignored control message of type {kind}"))

    def _skip_past(self, last: object) -> None:
        """An `output_gap` ending at offset `last`: the next byte is after it."""
        if isinstance(last, int) and self._position is not None:
            self._position = max(self._position, last + 1)

    async def _pump_input(self) -> None:
        """Keyboard bytes through the escape parser to the gateway."""
        try:
            while True:
                await self._readable()
                try:
                    data = os.read(self._stdin_fd, READ_SIZE)
                except BlockingIOError:
                    continue  # another reader of a shared terminal took the bytes
                if not data:
                    if self._terminal_fd == self._stdin_fd:
                        await self._ws.close(control.CLOSE_NORMAL, "client terminal closed")
                    return  # a pipe ran dry: keep showing output
                for action in self._parser.feed(data):
                    if not await self._perform(action):
                        return
        except ConnectionClosed:
            return  # the output pump sees the close and reports it
        except OSError as exc:
            self._failure = f"cannot read keyboard input: {exc}"
            await self._ws.close(control.CLOSE_NORMAL, "client input failed")

    async def _readable(self) -> None:
        """Wait until stdin can be read without blocking."""
        if self._stdin_is_file:
            await asyncio.sleep(0)  # always readable, and epoll refuses regular files
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._stdin_fd, _resolve, future)
        try:
            await future
        finally:
            asyncio.get_running_loop().remove_reader(self._stdin_fd)

    async def _perform(self, action: Action) -> bool:
        """Carry out one keyboard action; False ends the input pump."""
        match action:
            case SendBytes(data):
                if self._role == "spectator":
                    if not self._told_read_only:
                        self._status.line("read-only session: keyboard input is not sent")
                        self._told_read_only = True
                else:
                    await self._ws.send(data)
            case SendBreak():
                await self._send_control({"type": "break"})
                self._status.line("break sent")
            case SendSysrq(key):
                await self._send_control({"type": "sysrq", "key": key})
                self._status.line(f"sysrq {key} sent")
            case SendHook(name):
                await self._send_control({"type": name})
                self._status.line(f"{name} requested")
            case ApplySize():
                size = self._terminal_size()
                if size is None:
                    self._status.line("no local terminal size to apply")
                else:
                    cols, rows = size
                    await self._perform(SendBytes(f"stty rows {rows} cols {cols}\r".encode()))
            case Quit():
                self._quit = True
                await self._ws.close(control.CLOSE_NORMAL, "client quit")
                return False
            case ShowMenu(text):
                self._status.line(text)
            case CancelMenu():
                self._status.line("menu closed")
        return True

    async def _watch_resize(self) -> None:
        """Send `resize` on hello and on SIGWINCH, for writers with a terminal."""
        try:
            while True:
                await self._resized.wait()
                self._resized.clear()
                size = self._terminal_size()
                if size is not None and self._role == "writer":
                    cols, rows = size
                    await self._send_control({"type": "resize", "cols": cols, "rows": rows})
        except ConnectionClosed:
            return

    async def _watch_interrupt(self) -> None:
        await self._interrupted.wait()
        await self._ws.close(control.CLOSE_NORMAL, "client interrupted")

    async def _send_control(self, message: dict[str, Any]) -> None:
        await self._ws.send(json.dumps(message, separators=(",", ":")))

    def _terminal_size(self) -> tuple[int, int] | None:
        """(cols, rows) of the local terminal, or None without one (or a 0x0 pty)."""
        if self._terminal_fd is None:
            return None
        try:
            cols, rows = os.get_terminal_size(self._terminal_fd)
        except OSError:
            return None
        return (cols, rows) if cols and rows else None


async def connect(
    url: str,
    vm: str,
    *,
    token: str | None,
    ca: Path | None,
    spectate: bool,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    resume_from: int | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Attach the local terminal to a VM console through the gateway.

    Args:
        url: the gateway base URL, `https://HOST:PORT` (or `wss://`).
        vm: the VM id.
        token: a bearer token (see `read_token`); None sends no credentials.
        ca: a CA file to verify the gateway with; None uses the system roots.
        spectate: ask for a read-only session.
        stdin_fd: keyboard input; put in raw mode while attached if it is a tty.
        stdout_fd: where console output goes, byte for byte.
        resume_from: resume output from this offset (`?from=`).
        stderr: where status lines go; defaults to `sys.stderr` at call time.

    When stdin is a pipe or file that runs dry, output keeps flowing until the
    gateway closes or a signal arrives, so `printf 'cmd\\r' | relayd connect`
    shows what the command printed.

    Returns:
        0 after a normal close or `Ctrl-] q`, 1 after an error, a refusal or
        any other close code, 2 for a usage problem, 128+N after signal N.
    """
    status = _Status(stderr if stderr is not None else sys.stderr)
    try:
        ws_url = console_url(url, vm, spectate=spectate, resume_from=resume_from)
        context = _ssl_context(ca)
    except UsageError as exc:
        status.line(f"error: {exc}")
        return EXIT_USAGE
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    where = urllib.parse.urlsplit(ws_url).netloc
    try:
        ws = await ws_connect(
            ws_url,
            ssl=context,
            subprotocols=[SUBPROTOCOL],
            additional_headers=headers,
            open_timeout=OPEN_TIMEOUT,
            logger=_WS_LOGGER,
        )
    except InvalidStatus as exc:
        response = exc.response
        status.line(
            describe_rejection(response.status_code, response.reason_phrase, bytes(response.body))
        )
        return EXIT_ERROR
    except InvalidURI as exc:
        status.line(f"error: bad gateway URL: {exc}")
        return EXIT_USAGE
    except ssl.SSLCertVerificationError as exc:
        status.line(f"cannot verify gateway {where}: {exc.verify_message} (see --ca)")
        return EXIT_ERROR
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        status.line(f"cannot connect to {where}: {exc or type(exc).__name__}")
        return EXIT_ERROR
    async with ws:
        if ws.subprotocol != SUBPROTOCOL:
            status.line(f"gateway did not accept subprotocol {SUBPROTOCOL}")
            await ws.close(control.CLOSE_PROTOCOL_ERROR, "subprotocol required")
            return EXIT_ERROR
        return await _attach(ws, stdin_fd=stdin_fd, stdout_fd=stdout_fd, status=status)


async def _attach(ws: ClientConnection, *, stdin_fd: int, stdout_fd: int, status: _Status) -> int:
    """Run the session with the terminal raw and signals handled, restoring both after."""
    terminal_fd = next((fd for fd in (stdin_fd, stdout_fd) if os.isatty(fd)), None)
    output = _Output(stdout_fd)
    session = _ConsoleSession(
        ws, stdin_fd=stdin_fd, output=output, status=status, terminal_fd=terminal_fd
    )
    handlers: dict[signal.Signals, Callable[[], None]] = {
        signo: functools.partial(session.interrupt, signo)
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    if terminal_fd is not None:
        handlers[signal.SIGWINCH] = session.resized
    try:
        with _signal_handlers(handlers), _raw_terminal(stdin_fd) as raw:
            if raw:
                status.eol = "\r\n"
            try:
                return await session.run()
            finally:
                status.eol = "\n"
    finally:
        output.close()
