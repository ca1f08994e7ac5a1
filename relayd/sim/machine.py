"""The simulated guest without I/O: keystrokes (and BREAKs) in, console output out.

`GuestMachine` plays the kernel's console (boot messages, magic SysRq after a
BREAK), the tty line discipline in cooked mode (echo, backspace, ^C, ^D, the
LF to CR LF mapping), getty/login, and `cat` reading the terminal; command
lines go to the shell (`shell.py`), files to the scratch filesystem
(`filesystem.py`). Output that is long (`seq`) and the boot itself are *jobs*:
iterators of chunks pulled with `GuestMachine.pull`, so a flood is produced
only as fast as the console reader takes it and never sits whole in memory.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .filesystem import ScratchFilesystem
from .shell import Job, Logout, ReadTerminal, Shell

__all__ = ["BREAK", "KERNEL_RELEASE", "KERNEL_VERSION", "Break", "GuestMachine"]

KERNEL_RELEASE = "6.1.0-sim"
KERNEL_VERSION = "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-sim (2024-01-01)"
SYSRQ_TIMEOUT = 5.0
"""Seconds after a BREAK during which the next key is a SysRq command (as Linux)."""
MAX_LINE = 4095
"""Bytes of one input line, as N_TTY's buffer; further keys are ignored until Enter."""
MAX_TYPEAHEAD = 4096
"""Bytes typed while a job runs, kept for the shell to read when it ends."""

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
        self.home = f"/home/{user}"
        self._files = ScratchFilesystem(self.home)
        self._files.write("/etc/hostname", f"{name}\n".encode(), append=False)
        self._files.write(
            "/etc/os-release",
            b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
            b'NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n',
            append=False,
        )
        self._files.write(
            f"{self.home}/notes.txt",
            b"This VM is simulated by relayd (relayd/sim/).\n"
            b"Try: seq 100000, cat > file then md5sum file, BREAK then h.\n",
            append=False,
        )
        self._shell = Shell(
            self._files,
            hostname=name,
            user=user,
            kernel_release=KERNEL_RELEASE,
            kernel_version=KERNEL_VERSION,
            wall_clock=wall_clock,
        )
        self._state = _State.OFF
        self._booted_at = 0.0
        self._line = bytearray()
        self._escape = 0  # 1 after ESC, 2 inside a CSI/SS3 sequence: arrow keys are dropped
        self._after_cr = False
        self._login_user = ""
        self._cat_target: str | None = None
        self._sysrq_deadline: float | None = None
        self._job: Iterator[bytes] | None = None
        self._job_interruptible = False
        self._typeahead = bytearray()

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

    # The shell, and `cat` reading the terminal.

    def _run(self, line: bytes) -> bytes:
        """Run one command line; returns its output and the next prompt."""
        outcome = self._shell.run(line)
        if isinstance(outcome, Logout):
            return self._logout()
        if isinstance(outcome, ReadTerminal):
            self._state = _State.CAT
            self._cat_target = outcome.path
            return b""
        if isinstance(outcome, Job):
            self._start_job(self._job_output(outcome))
            return b""
        return _onlcr(outcome.output) + self._prompt()

    def _job_output(self, job: Job) -> Iterator[bytes]:
        for chunk in job.chunks:
            yield _onlcr(chunk)
        yield self._prompt()

    def _cat_line(self, data: bytes) -> tuple[bytes, bool]:
        """One line read by `cat`: appended to its file, or printed back.

        Returns:
            The output, and whether `cat` is still running (a full disk ends it).
        """
        if self._cat_target is None:
            return _onlcr(data), True
        if not self._files.write(self._cat_target, data, append=True):
            self._state = _State.SHELL
            self._cat_target = None
            return b"cat: write error: No space left on device\r\n" + self._prompt(), False
        return b"", True

    def read_file(self, name: str) -> bytes | None:
        """A file's contents (relative names are in the home directory); None if absent."""
        return self._files.read(self._files.path(name))
