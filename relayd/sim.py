"""A simulated VM on a serial console, for `relayd demo` and the tests.

`GuestMachine` is the guest with no I/O: keystrokes (and BREAKs) in, console
output out. It plays the kernel's console (boot messages, magic SysRq after a
BREAK), the tty line discipline in cooked mode (echo, backspace, ^C, ^D),
getty/login and a tiny shell with an in-memory scratch filesystem. Commands
that print a lot (`seq`) and the boot itself are *jobs*: iterators of output
chunks pulled with `GuestMachine.pull`, so a flood is produced only as fast as
the console reader takes it and never sits whole in memory.

`SimulatedGuest` is the thin asyncio server around one machine, behaving like
QEMU's socket chardev: one console client at a time (a newcomer replaces the
old one), output produced while nobody is connected is dropped, and the
guest's state survives reconnects. Over TCP it speaks telnet as QEMU's telnet
chardev does; over a unix socket it is raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import pathlib
import posixpath
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from .telnet import BreakReceived, TelnetCodec

__all__ = ["BREAK", "Break", "GuestMachine", "SimulatedGuest"]

KERNEL_RELEASE = "6.1.0-sim"
KERNEL_VERSION = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-sim (2024-01-01)"
SYSRQ_TIMEOUT = 5.0
"""Seconds after a BREAK during which the next key is a SysRq command (as Linux)."""
MAX_LINE = 4095
"""Bytes of one input line, as N_TTY's buffer; further keys are ignored until Enter."""
MAX_TYPEAHEAD = 4096
"""Bytes typed while a job runs, kept for the shell to read when it ends."""
MAX_SEQ = 10_000_000
"""Numbers one `seq` prints at most."""
SEQ_BATCH = 4096
"""Numbers per output chunk of `seq` (about 30 KiB)."""
MAX_FS_BYTES = 16 * 1024 * 1024
"""Size of the scratch filesystem; writes beyond it fail with ENOSPC."""
READ_SIZE = 65536
CLOSE_TIMEOUT = 1.0

_BS, _CTRL_C, _CTRL_D, _LF, _CR, _CTRL_U, _ESC, _DEL, _NUL = 8, 3, 4, 10, 13, 21, 27, 127, 0

_SYSRQ_HELP = (
    "sysrq: HELP : loglevel(0-9) reboot(b) crash(c) show-all-locks(d) terminate-all-tasks(e) "
    "memory-full-oom-kill(f) kill-all-tasks(i) thaw-filesystems(j) sak(k) "
    "show-backtrace-all-active-cpus(l) show-memory-usage(m) nice-all-RT-tasks(n) poweroff(o) "
    "show-registers(p) show-all-timers(q) unraw(r) sync(s) show-task-states(t) unmount(u) "
    "show-blocked-tasks(w) dump-ftrace-buffer(z)"
)
_SYSRQ: dict[str, tuple[str, ...]] = {
    "d": ("sysrq: Show Locks Held",),
    "e": ("sysrq: Terminate All Tasks",),
    "f": ("sysrq: Manual OOM execution",),
    "i": ("sysrq: Kill All Tasks",),
    "j": ("sysrq: Emergency Thaw of all frozen filesystems",),
    "k": ("sysrq: SAK",),
    "l": ("sysrq: Show backtrace of all active CPUs",),
    "m": (
        "sysrq: Show Memory",
        "Mem-Info:",
        "active_anon:2210 inactive_anon:5123 isolated_anon:0",
        "free:201332 free_pcp:312 free_cma:0",
        "Node 0 DMA32 free:805328kB min:44748kB low:55932kB high:67116kB",
        "262013 pages RAM",
    ),
    "n": ("sysrq: Nice All RT Tasks",),
    "o": ("sysrq: Power Off",),
    "p": ("sysrq: Show Regs",),
    "q": ("sysrq: Show clockevent devices & pending hrtimers (no others)",),
    "r": ("sysrq: Keyboard mode set to system default",),
    "s": ("sysrq: Emergency Sync", "Emergency Sync complete"),
    "t": ("sysrq: Show State",),
    "u": ("sysrq: Emergency Remount R/O", "Emergency Remount complete"),
    "w": ("sysrq: Show Blocked State",),
    "z": ("sysrq: Dump ftrace buffer",),
}

# (uptime, message) of the boot log; "{name}" is the guest's hostname.
_BOOT_LOG = (
    (
        0.0,
        f"Linux version {KERNEL_RELEASE} (relayd@sim) (gcc (Debian 12.2.0-14) 12.2.0) "
        f"{KERNEL_VERSION}",
    ),
    (
        0.0,
        f"Command line: BOOT_IMAGE=/boot/vmlinuz-{KERNEL_RELEASE} root=/dev/vda1 ro "
        "console=ttyS0,115200n8",
    ),
    (0.0, "DMI: QEMU Standard PC (i440FX + PIIX, 1996), BIOS 1.16.2-debian-1.16.2-1 04/01/2014"),
    (0.0, "Hypervisor detected: KVM"),
    (0.012873, "tsc: Detected 2394.454 MHz processor"),
    (0.104512, "Memory: 1004520K/1048036K available (16384K kernel code, 2476K rwdata)"),
    (0.231877, "Serial: 8250/16550 driver, 4 ports, IRQ sharing enabled"),
    (0.232410, "00:04: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A"),
    (0.240153, "printk: console [ttyS0] enabled"),
    (0.911820, "EXT4-fs (vda1): mounted filesystem with ordered data mode. Quota mode: none."),
    (1.204311, "systemd[1]: systemd 252.22-1~deb12u1 running in system mode"),
    (1.532876, "systemd[1]: Hostname set to <{name}>."),
    (2.418310, "random: crng init done"),
)
_BOOT_UPTIME = 3.0
"""Uptime in seconds when the login prompt appears; later kernel messages count from it."""


@dataclass(frozen=True)
class Break:
    """A serial BREAK on the guest's UART (IAC BRK over telnet)."""


BREAK = Break()


class _State(enum.Enum):
    OFF = enum.auto()
    LOGIN = enum.auto()
    PASSWORD = enum.auto()  # login asking for the password, echo off
    SHELL = enum.auto()
    CAT = enum.auto()  # `cat` reading the terminal until ^D


def _kmsg(uptime: float, message: str) -> bytes:
    return f"[{uptime:12.6f}] {message}\r\n".encode()


def _onlcr(text: bytes) -> bytes:
    """The tty's output mapping: programs write LF, the terminal gets CR LF."""
    return text.replace(b"\n", b"\r\n")


class GuestMachine:
    """A small Linux guest seen from its serial console, without I/O.

    The machine starts powered off; `boot` starts the boot job. Feed it input
    with `feed` and write what it returns; while `busy`, also write what
    `pull` returns, chunk by chunk, as fast as the console takes it.

    Args:
        name: hostname, shown in boot messages and prompts.
        user: the one account that can log in.
        password: its password.
        clock: monotonic seconds, for the SysRq window and kernel timestamps.
        wall_clock: seconds since the epoch, for `date`.
    """

    def __init__(
        self,
        name: str,
        *,
        user: str = "operator",
        password: str = "relayd",  # noqa: S107 - the demo guests' published login
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.user = user
        self._password = password.encode()
        self._clock = clock
        self._wall_clock = wall_clock
        self.home = f"/home/{user}"
        self._files: dict[str, bytearray] = {}
        self._fs_used = 0
        self._write("/etc/hostname", f"{name}\n".encode(), append=False)
        self._write(
            "/etc/os-release",
            b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
            b'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n',
            append=False,
        )
        self._write(
            f"{self.home}/notes.txt",
            b"This VM is simulated by relayd (relayd/sim.py).\n"
            b"Try: seq 100000, cat > file then md5sum file, BREAK then h.\n",
            append=False,
        )
        self._state = _State.OFF
        self._booted_at = 0.0
        self._line = bytearray()
        self._escape = 0  # 1 after ESC, 2 inside a CSI/SS3 sequence: arrow keys are dropped
        self._after_cr = False
        self._login_user = ""
        self.tty_size = [24, 80]
        self._cat_target: str | None = None
        self._sysrq_deadline: float | None = None
        self._job: Iterator[bytes] | None = None
        self._job_interruptible = False
        self._typeahead = bytearray()
        self._commands: dict[str, Callable[[list[str]], tuple[bytes, bytes]]] = {
            "cat": self._cmd_cat,
            "date": self._cmd_date,
            "echo": self._cmd_echo,
            "false": lambda args: (b"", b""),
            "help": self._cmd_help,
            "hostname": lambda args: (f"{self.name}\n".encode(), b""),
            "id": self._cmd_id,
            "ls": self._cmd_ls,
            "md5sum": self._cmd_md5sum,
            "pwd": lambda args: (f"{self.home}\n".encode(), b""),
            "rm": self._cmd_rm,
            "stty": self._cmd_stty,
            "sync": lambda args: (b"", b""),
            "true": lambda args: (b"", b""),
            "uname": self._cmd_uname,
            "wc": self._cmd_wc,
            "whoami": lambda args: (f"{self.user}\n".encode(), b""),
        }

    # Power and output jobs.

    @property
    def booted(self) -> bool:
        """Whether the machine is running (it has booted since the last power-off)."""
        return self._state is not _State.OFF

    @property
    def logged_in(self) -> bool:
        """Whether a shell session is open on the console."""
        return self._state in (_State.SHELL, _State.CAT)

    @property
    def busy(self) -> bool:
        """Whether a job has output waiting for `pull`."""
        return self._job is not None

    def boot(self) -> None:
        """Reset and boot: logged out, boot messages and a login prompt as a job.

        Files survive, as a disk does.
        """
        self._reset(_State.LOGIN)
        self._booted_at = self._clock()
        self._start_job(self._boot_output(), interruptible=False)

    def power_off(self) -> None:
        """Stop the machine; input is ignored until the next `boot`."""
        self._reset(_State.OFF)

    def pull(self) -> bytes:
        """The next chunk of the running job's output; b"" when there is none.

        When a job ends, keys typed meanwhile are read by the shell, which may
        print or start another job.
        """
        while self._job is not None:
            chunk = next(self._job, None)
            if chunk is None:
                self._job = None
                typed = bytes(self._typeahead)
                self._typeahead.clear()
                return self.feed(typed)
            if chunk:
                return chunk
        return b""

    def discard(self) -> None:
        """Drop the running job's output: nobody is there to read it (as QEMU drops it)."""
        self._job = None
        self._typeahead.clear()

    def _reset(self, state: _State) -> None:
        self._state = state
        self._line.clear()
        self._escape = 0
        self._after_cr = False
        self._cat_target = None
        self._sysrq_deadline = None
        self.discard()

    def _start_job(self, output: Iterator[bytes], *, interruptible: bool = True) -> None:
        self._job = output
        self._job_interruptible = interruptible

    def _boot_output(self) -> Iterator[bytes]:
        for uptime, message in _BOOT_LOG:
            yield _kmsg(uptime, message.format(name=self.name))
        yield f"\r\nDebian GNU/Linux 12 {self.name} ttyS0\r\n\r\n".encode() + self._prompt()

    def _uptime(self) -> float:
        return _BOOT_UPTIME + max(0.0, self._clock() - self._booted_at)

    # Input.

    def feed(self, data: bytes | Break) -> bytes:
        """Keys (or a BREAK) from the console.

        Returns:
            What the guest prints at once: echo, command output, prompts.
        """
        if isinstance(data, Break):
            if self.booted:
                self._sysrq_deadline = self._clock() + SYSRQ_TIMEOUT
            return b""
        out = bytearray()
        for byte in data:
            out += self._key(byte)
        return bytes(out)

    def _key(self, byte: int) -> bytes:
        if self._sysrq_deadline is not None:
            deadline, self._sysrq_deadline = self._sysrq_deadline, None
            if self._clock() <= deadline:
                return self._sysrq(byte)
        if self._state is _State.OFF:
            return b""
        if self._job is not None:
            if byte == _CTRL_C and self._job_interruptible:
                self.discard()
                return b"^C\r\n" + self._prompt()
            if len(self._typeahead) < MAX_TYPEAHEAD:
                self._typeahead.append(byte)
            return b""
        return self._discipline(byte)

    def _discipline(self, byte: int) -> bytes:
        """The tty in cooked mode (N_TTY with ICRNL, ECHO, ECHOE, ECHOCTL, ISIG)."""
        if self._after_cr and byte in (_LF, _NUL):
            # CR LF and CR NUL from a terminal are one Enter.
            self._after_cr = False
            return b""
        self._after_cr = byte == _CR
        if self._escape and byte >= 0x20:
            if self._escape == 1:
                self._escape = 2 if byte in b"[O" else 0
            elif 0x40 <= byte <= 0x7E:
                self._escape = 0
            return b""
        self._escape = 0
        if byte in (_CR, _LF):
            return self._enter()
        if byte == _CTRL_C:
            return self._interrupt()
        if byte == _CTRL_D:
            return self._end_of_file()
        if byte in (_DEL, _BS):
            return self._erase()
        if byte == _CTRL_U:
            return self._kill_line()
        if byte == _ESC:
            self._escape = 1
            return b""
        if byte < 0x20 or len(self._line) >= MAX_LINE:
            return b""
        self._line.append(byte)
        return b"" if self._state is _State.PASSWORD else bytes((byte,))

    def _erase(self) -> bytes:
        if not self._line:
            return b""
        # IUTF8: one backspace erases one character, not one byte.
        while len(self._line) > 1 and self._line[-1] & 0xC0 == 0x80:
            self._line.pop()
        self._line.pop()
        return b"" if self._state is _State.PASSWORD else b"\b \b"

    def _kill_line(self) -> bytes:
        chars = sum(1 for b in self._line if b & 0xC0 != 0x80)
        self._line.clear()
        return b"" if self._state is _State.PASSWORD else b"\b \b" * chars

    def _interrupt(self) -> bytes:
        self._line.clear()
        if self._state is _State.PASSWORD:
            # login dies on SIGINT and getty starts over; with echo off there is no ^C.
            self._state = _State.LOGIN
            return b"\r\n" + self._prompt()
        if self._state is _State.CAT:
            self._state = _State.SHELL
            self._cat_target = None
        return b"^C\r\n" + self._prompt()

    def _end_of_file(self) -> bytes:
        if self._state is _State.CAT:
            # Simplified: one ^D ends `cat`, even after a partial line (which is kept).
            out = b""
            if self._line:
                out, running = self._cat_line(bytes(self._line))
                self._line.clear()
                if not running:
                    return out  # the write failed and said so
                out = b"\r\n" + out
            self._state = _State.SHELL
            self._cat_target = None
            return out + self._prompt()
        if self._state is _State.SHELL and not self._line:
            return self._logout()
        return b""  # getty ignores ^D; in a non-empty line it is not EOF

    def _enter(self) -> bytes:
        line = bytes(self._line)
        self._line.clear()
        if self._state is _State.LOGIN:
            self._login_user = line.decode(errors="replace").strip()
            if not self._login_user:
                return b"\r\n" + self._prompt()
            self._state = _State.PASSWORD
            return b"\r\nPassword: "
        if self._state is _State.PASSWORD:
            if self._login_user == self.user and line == self._password:
                self._state = _State.SHELL
                motd = f"Linux {self.name} {KERNEL_RELEASE} {KERNEL_VERSION} x86_64\r\n\r\n"
                return b"\r\n" + motd.encode() + self._prompt()
            self._state = _State.LOGIN
            return b"\r\n\r\nLogin incorrect\r\n" + self._prompt()
        if self._state is _State.CAT:
            out, _ = self._cat_line(line + b"\n")
            return b"\r\n" + out
        return b"\r\n" + self._run(line)

    def _prompt(self) -> bytes:
        if self._state in (_State.SHELL, _State.CAT):
            return f"{self.user}@{self.name}:~$ ".encode()
        if self._state is _State.PASSWORD:
            return b"Password: "
        if self._state is _State.LOGIN:
            return f"{self.name} login: ".encode()
        return b""

    def _logout(self) -> bytes:
        self._state = _State.LOGIN
        return b"logout\r\n\r\n" + self._prompt()

    # Magic SysRq.

    def _sysrq(self, byte: int) -> bytes:
        key = chr(byte).lower() if 0x20 < byte < 0x7F else ""
        uptime = self._uptime()
        if key == "b":
            out = b"\r\n" + _kmsg(uptime, "sysrq: Resetting")
            self.boot()
            return out
        if key == "c":
            lines: tuple[str, ...] = (
                "sysrq: Trigger a crash",
                "Kernel panic - not syncing: sysrq triggered crash",
                "Rebooting in 1 seconds..",
            )
            out = b"\r\n" + b"".join(_kmsg(uptime, line) for line in lines)
            self.boot()
            return out
        if key.isdigit():
            lines = ("sysrq: Changing Loglevel", f"sysrq: Loglevel set to {key}")
        else:
            lines = _SYSRQ.get(key, (_SYSRQ_HELP,))
        return b"\r\n" + b"".join(_kmsg(uptime, line) for line in lines)

    # The shell.

    def _run(self, line: bytes) -> bytes:
        """Run one command line; returns its output and the next prompt."""
        try:
            argv = shlex.split(line.decode("utf-8", errors="replace"))
        except ValueError:
            return b"-sh: syntax error: unterminated quoted string\r\n" + self._prompt()
        target: str | None = None
        words: list[str] = []
        tokens = iter(argv)
        for word in tokens:
            if word == ">":
                target = next(tokens, "")
                if not target:
                    return b"-sh: syntax error near unexpected token `newline'\r\n" + self._prompt()
            elif word.startswith(">"):
                target = word[1:]
            else:
                words.append(word)
        if not words:
            if target is not None and not self._write(self._path(target), b"", append=False):
                return b"-sh: write error: No space left on device\r\n" + self._prompt()
            return self._prompt()
        name, args = words[0], words[1:]
        if name in ("exit", "logout"):
            return self._logout()
        if name == "cat" and not args:
            self._state = _State.CAT
            self._cat_target = None
            if target is not None:
                self._cat_target = self._path(target)
                if not self._write(self._cat_target, b"", append=False):
                    self._state = _State.SHELL
                    return b"-sh: write error: No space left on device\r\n" + self._prompt()
            return b""
        if name == "seq":
            return self._seq(args, target)
        command = self._commands.get(name)
        if command is None:
            stdout, stderr = b"", f"-sh: {name}: command not found\n".encode()
        else:
            stdout, stderr = command(args)
        if target is not None:
            if not self._write(self._path(target), stdout, append=False):
                stderr += f"{name}: write error: No space left on device\n".encode()
            stdout = b""
        return _onlcr(stdout + stderr) + self._prompt()

    def _seq(self, args: list[str], target: str | None) -> bytes:
        numbers: list[int] = []
        for arg in args:
            try:
                numbers.append(int(arg))
            except ValueError:
                text = (
                    f"seq: invalid floating point argument: '{arg}'\r\n"
                    "Try 'seq --help' for more information.\r\n"
                )
                return text.encode() + self._prompt()
        if len(numbers) not in (1, 2):
            return b"seq: missing operand\r\n" + self._prompt()
        first, last = (1, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
        last = min(last, first + MAX_SEQ - 1)
        if target is None:
            self._start_job(self._seq_output(first, last, b"\r\n"))
            return b""
        path = self._path(target)
        if not self._write(path, b"", append=False):
            return b"seq: write error: No space left on device\r\n" + self._prompt()
        for chunk in self._seq_output(first, last, b"\n", prompt=False):
            if not self._write(path, chunk, append=True):
                return b"seq: write error: No space left on device\r\n" + self._prompt()
        return self._prompt()

    def _seq_output(
        self, first: int, last: int, newline: bytes, *, prompt: bool = True
    ) -> Iterator[bytes]:
        for start in range(first, last + 1, SEQ_BATCH):
            stop = min(last, start + SEQ_BATCH - 1)
            yield newline.join(str(n).encode() for n in range(start, stop + 1)) + newline
        if prompt:
            yield self._prompt()

    def _cat_line(self, data: bytes) -> tuple[bytes, bool]:
        """One line read by `cat`: appended to its file, or printed back.

        Returns:
            The output, and whether `cat` is still running (a full disk ends it).
        """
        if self._cat_target is None:
            return _onlcr(data), True
        if not self._write(self._cat_target, data, append=True):
            self._state = _State.SHELL
            self._cat_target = None
            return b"cat: write error: No space left on device\r\n" + self._prompt(), False
        return b"", True

    # The scratch filesystem.

    def _path(self, name: str) -> str:
        if name == "~" or name.startswith("~/"):
            name = self.home + name[1:]
        return posixpath.normpath(posixpath.join(self.home, name))

    def read_file(self, name: str) -> bytes | None:
        """A file's contents (relative names are in the home directory); None if absent."""
        data = self._files.get(self._path(name))
        return None if data is None else bytes(data)

    def _write(self, path: str, data: bytes, *, append: bool) -> bool:
        """Create, truncate or append; False (and nothing written) when the disk is full."""
        file = self._files.setdefault(path, bytearray())
        if not append:
            self._fs_used -= len(file)
            file.clear()
        if self._fs_used + len(data) > MAX_FS_BYTES:
            return False
        file += data
        self._fs_used += len(data)
        return True

    def _is_dir(self, path: str) -> bool:
        return path in ("/", self.home) or any(p.startswith(path + "/") for p in self._files)

    def _read_files(
        self, program: str, args: list[str], each: Callable[[str, bytes], bytes]
    ) -> tuple[bytes, bytes]:
        stdout, stderr = bytearray(), bytearray()
        for name in args:
            path = self._path(name)
            data = self._files.get(path)
            if data is not None:
                stdout += each(name, bytes(data))
            elif self._is_dir(path):
                stderr += f"{program}: {name}: Is a directory\n".encode()
            else:
                stderr += f"{program}: {name}: No such file or directory\n".encode()
        return bytes(stdout), bytes(stderr)

    # Commands: each takes its arguments and returns (stdout, stderr) with LF line ends.

    def _cmd_cat(self, args: list[str]) -> tuple[bytes, bytes]:
        return self._read_files("cat", args, lambda name, data: data)

    def _cmd_md5sum(self, args: list[str]) -> tuple[bytes, bytes]:
        if not args:
            return b"", b"md5sum: reading standard input is not supported here\n"

        def line(name: str, data: bytes) -> bytes:
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            return f"{digest}  {name}\n".encode()

        return self._read_files("md5sum", args, line)

    def _cmd_wc(self, args: list[str]) -> tuple[bytes, bytes]:
        flags = [a for a in args if a.startswith("-")]
        names = [a for a in args if not a.startswith("-")]
        if not names:
            return b"", b"wc: reading standard input is not supported here\n"

        def line(name: str, data: bytes) -> bytes:
            counts = {"-l": data.count(b"\n"), "-w": len(data.split()), "-c": len(data)}
            shown = [counts[f] for f in flags if f in counts] or list(counts.values())
            return (" ".join(str(c) for c in shown) + f" {name}\n").encode()

        return self._read_files("wc", names, line)

    def _cmd_echo(self, args: list[str]) -> tuple[bytes, bytes]:
        if args[:1] == ["-n"]:
            return " ".join(args[1:]).encode(), b""
        return (" ".join(args) + "\n").encode(), b""

    def _cmd_date(self, args: list[str]) -> tuple[bytes, bytes]:
        now = datetime.fromtimestamp(self._wall_clock(), tz=UTC)
        return now.strftime("%a %b %e %H:%M:%S UTC %Y\n").encode(), b""

    def _cmd_id(self, args: list[str]) -> tuple[bytes, bytes]:
        u = self.user
        return f"uid=1000({u}) gid=1000({u}) groups=1000({u}),4(adm),27(sudo)\n".encode(), b""

    def _cmd_ls(self, args: list[str]) -> tuple[bytes, bytes]:
        names = [a for a in args if not a.startswith("-")] or ["."]
        stdout, stderr = [], bytearray()
        for name in names:
            path = self._path(name)
            if path in self._files:
                stdout.append(name)
            elif self._is_dir(path):
                prefix = path.rstrip("/") + "/"
                children = {
                    p[len(prefix) :].split("/")[0] for p in self._files if p.startswith(prefix)
                }
                stdout.extend(sorted(children))
            else:
                stderr += f"ls: cannot access '{name}': No such file or directory\n".encode()
        return (("  ".join(stdout) + "\n").encode() if stdout else b""), bytes(stderr)

    def _cmd_rm(self, args: list[str]) -> tuple[bytes, bytes]:
        stderr = bytearray()
        for name in args:
            data = self._files.pop(self._path(name), None)
            if data is None:
                stderr += f"rm: cannot remove '{name}': No such file or directory\n".encode()
            else:
                self._fs_used -= len(data)
        return b"", bytes(stderr)

    def _cmd_stty(self, args: list[str]) -> tuple[bytes, bytes]:
        """`stty rows R cols C` records the size ("Apply size to guest"); `stty size` shows it."""
        pairs = dict(zip(args[::2], args[1::2], strict=False))
        for key in ("rows", "cols", "columns"):
            value = pairs.get(key, "")
            if value.isdigit():
                self.tty_size[0 if key == "rows" else 1] = int(value)
        if args == ["size"]:
            return f"{self.tty_size[0]} {self.tty_size[1]}\n".encode(), b""
        return b"", b""

    def _cmd_uname(self, args: list[str]) -> tuple[bytes, bytes]:
        fields = {
            "-s": "Linux",
            "-n": self.name,
            "-r": KERNEL_RELEASE,
            "-v": KERNEL_VERSION,
            "-m": "x86_64",
            "-o": "GNU/Linux",
        }
        if "-a" in args:
            shown = list(fields.values())
        else:
            shown = [fields[a] for a in args if a in fields] or ["Linux"]
        return (" ".join(shown) + "\n").encode(), b""

    def _cmd_help(self, args: list[str]) -> tuple[bytes, bytes]:
        names = sorted([*self._commands, "cat > FILE", "exit", "logout", "seq"])
        return ("commands: " + ", ".join(names) + "\n").encode(), b""


class SimulatedGuest:
    """One simulated VM listening as a serial chardev; its state survives reconnects.

    Args:
        name: the VM's hostname.
        user: the login name.
        password: its password.
        telnet: speak telnet on TCP (QEMU's `telnet` chardev) rather than raw bytes.
    """

    def __init__(
        self,
        name: str,
        *,
        user: str = "operator",
        password: str = "relayd",  # noqa: S107 - the demo guests' published login
        telnet: bool = True,
    ) -> None:
        self.name = name
        self.machine = GuestMachine(name, user=user, password=password)
        self._telnet = telnet
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._port: int | None = None
        self._closing = False
        self._console: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: `start` has not been called.
        """
        if self._port is None:
            raise RuntimeError(f"simulated guest {self.name} is not listening on TCP")
        return self._port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP (telnet or raw, as constructed); returns the bound port."""
        accept = functools.partial(self._accept, telnet=self._telnet)
        server = await asyncio.start_server(accept, host, port, limit=READ_SIZE)
        self._servers.append(server)
        self._port = int(server.sockets[0].getsockname()[1])
        return self._port

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket, raw like QEMU's unix chardev (no telnet)."""
        accept = functools.partial(self._accept, telnet=False)
        server = await asyncio.start_unix_server(accept, path, limit=READ_SIZE)
        self._servers.append(server)
        self._unix_paths.append(path)

    def reboot(self) -> None:
        """Reset the VM: boot messages now if a console is attached, else on the next attach."""
        self.machine.power_off()
        if self._wake is not None:
            self.machine.boot()
            self._wake.set()

    async def close(self) -> None:
        """Stop listening, disconnect the console and wait for every task to end."""
        self._closing = True
        for server in self._servers:
            server.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            # Python 3.11's unix server leaves its socket file behind. Unlinking a
            # socket inode does not block on anything worth a thread.
            pathlib.Path(path).unlink(missing_ok=True)  # noqa: ASYNC240
        self._unix_paths.clear()

    async def __aenter__(self) -> SimulatedGuest:
        """The guest, not yet listening: call `start` or `start_unix` inside the block."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, telnet: bool
    ) -> None:
        if self._closing:
            writer.transport.abort()
            return
        previous = self._console
        task = asyncio.create_task(
            self._serve(reader, writer, telnet=telnet, previous=previous),
            name=f"sim-console-{self.name}",
        )
        self._console = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if previous is not None:
            previous.cancel()  # one console client at a time: the newcomer wins

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        telnet: bool,
        previous: asyncio.Task[None] | None,
    ) -> None:
        wake = asyncio.Event()
        try:
            if previous is not None:
                await asyncio.wait({previous})  # it must let go of the machine first
            self._wake = wake
            codec = TelnetCodec(server_side=True) if telnet else None
            if codec is not None:
                writer.write(codec.initial())
            if not self.machine.booted:
                self.machine.boot()
            async with asyncio.TaskGroup() as tasks:
                pump = tasks.create_task(self._pump(writer, codec, wake))
                wake.set()
                await self._read_loop(reader, writer, codec, wake)
                pump.cancel()
        except asyncio.CancelledError:
            writer.transport.abort()  # replaced or shut down: drop the line, as QEMU does
            raise
        finally:
            if self._wake is wake:
                self._wake = None
            if self._console is asyncio.current_task():
                self._console = None
                self.machine.discard()  # nobody is connected: output goes nowhere
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await writer.wait_closed()

    async def _read_loop(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: TelnetCodec | None,
        wake: asyncio.Event,
    ) -> None:
        """Keys in, echo out, until the client hangs up."""
        machine = self.machine
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except ConnectionError:
                return  # the client went away: a hangup, not an error
            if not data:
                return
            if codec is None:
                out = machine.feed(data)
            else:
                parts = [
                    machine.feed(BREAK if isinstance(event, BreakReceived) else event.data)
                    for event in codec.receive(data)
                ]
                # Like QEMU: options from the client are parsed but never answered,
                # and the guest's output goes out raw (QEMU does not double 0xFF).
                codec.data_to_send()
                out = b"".join(parts)
            if machine.busy:
                wake.set()
            if out and not writer.is_closing():
                writer.write(out)
                try:
                    await writer.drain()
                except ConnectionError:
                    return

    async def _pump(
        self, writer: asyncio.StreamWriter, codec: TelnetCodec | None, wake: asyncio.Event
    ) -> None:
        """Job output (boot, floods) out, as fast as the client drains it."""
        machine = self.machine
        while True:
            await wake.wait()
            wake.clear()
            while machine.busy:
                chunk = machine.pull()
                if chunk:
                    if writer.is_closing():
                        return
                    writer.write(chunk)  # raw, as QEMU sends it (see _read_loop)
                    try:
                        await writer.drain()
                    except ConnectionError:
                        return
                # drain() does not yield below the high-water mark; let the reader see ^C.
                await asyncio.sleep(0)
