"""The simulated guest's shell: one command line in, what it does out.

`Shell.run` parses a line (words, quotes, `> FILE`), runs the command against
the scratch filesystem and answers with one outcome the machine acts on:

- `Printed`: text to show before the next prompt;
- `Job`: output to pull chunk by chunk (`seq` to the terminal), so a flood is
  produced only as fast as the console takes it;
- `ReadTerminal`: `cat` reads the terminal until ^D, into a file or back out;
- `Logout`: `exit`, `logout`.

The shell writes LF line ends, as programs do; the machine's tty maps them to
CR LF. It knows nothing of the terminal, the login or the console.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from .filesystem import ScratchFilesystem

__all__ = ["MAX_SEQ", "SEQ_BATCH", "Job", "Logout", "Printed", "ReadTerminal", "Shell"]

MAX_SEQ = 10_000_000
"""Numbers one `seq` prints at most."""
SEQ_BATCH = 4096
"""Numbers per output chunk of `seq` (about 30 KiB)."""

_NO_SPACE = "write error: No space left on device"


@dataclass(frozen=True)
class Printed:
    """A command's output and errors, LF line ends; the prompt follows."""

    output: bytes


@dataclass(frozen=True)
class Job:
    """Output too long to print at once, pulled chunk by chunk; the prompt follows."""

    chunks: Iterator[bytes]


@dataclass(frozen=True)
class ReadTerminal:
    """`cat` reading the terminal until ^D: into the file at `path`, or back out if None."""

    path: str | None


@dataclass(frozen=True)
class Logout:
    """The shell exits; getty asks for a login again."""


Outcome = Printed | Job | ReadTerminal | Logout


class Shell:
    """A tiny sh with the handful of commands a console user tries first.

    Args:
        files: the scratch filesystem commands read and write.
        hostname: for `hostname` and `uname -n`.
        user: the logged-in account, for `whoami` and `id`.
        kernel_release: for `uname -r`.
        kernel_version: for `uname -v`.
        wall_clock: seconds since the epoch, for `date`.
    """

    def __init__(
        self,
        files: ScratchFilesystem,
        *,
        hostname: str,
        user: str,
        kernel_release: str,
        kernel_version: str,
        wall_clock: Callable[[], float],
    ) -> None:
        self._files = files
        self._hostname = hostname
        self._user = user
        self._kernel = (kernel_release, kernel_version)
        self._wall_clock = wall_clock
        self.tty_size = [24, 80]
        """Rows and columns, as `stty rows R cols C` set them ("Apply size to guest")."""
        self._commands: dict[str, Callable[[list[str]], tuple[bytes, bytes]]] = {
            "cat": self._cmd_cat,
            "date": self._cmd_date,
            "echo": self._cmd_echo,
            "false": lambda args: (b"", b""),
            "help": self._cmd_help,
            "hostname": lambda args: (f"{self._hostname}\n".encode(), b""),
            "id": self._cmd_id,
            "ls": self._cmd_ls,
            "md5sum": self._cmd_md5sum,
            "pwd": lambda args: (f"{self._files.home}\n".encode(), b""),
            "rm": self._cmd_rm,
            "stty": self._cmd_stty,
            "sync": lambda args: (b"", b""),
            "true": lambda args: (b"", b""),
            "uname": self._cmd_uname,
            "wc": self._cmd_wc,
            "whoami": lambda args: (f"{self._user}\n".encode(), b""),
        }

    def run(self, line: bytes) -> Outcome:
        """Run one command line (without its Enter)."""
        try:
            argv = shlex.split(line.decode("utf-8", errors="replace"))
        except ValueError:
            return Printed(b"-sh: syntax error: unterminated quoted string\n")
        target: str | None = None
        words: list[str] = []
        tokens = iter(argv)
        for word in tokens:
            if word == ">":
                target = next(tokens, "")
                if not target:
                    return Printed(b"-sh: syntax error near unexpected token `newline'\n")
            elif word.startswith(">"):
                target = word[1:]
            else:
                words.append(word)
        path = None if target is None else self._files.path(target)
        if not words:
            if path is not None and not self._files.write(path, b"", append=False):
                return Printed(f"-sh: {_NO_SPACE}\n".encode())
            return Printed(b"")
        name, args = words[0], words[1:]
        if name in ("exit", "logout"):
            return Logout()
        if name == "cat" and not args:
            if path is not None and not self._files.write(path, b"", append=False):
                return Printed(f"-sh: {_NO_SPACE}\n".encode())
            return ReadTerminal(path)
        if name == "seq":
            return self._seq(args, path)
        command = self._commands.get(name)
        if command is None:
            stdout, stderr = b"", f"-sh: {name}: command not found\n".encode()
        else:
            stdout, stderr = command(args)
        if path is not None:
            if not self._files.write(path, stdout, append=False):
                stderr += f"{name}: {_NO_SPACE}\n".encode()
            stdout = b""
        return Printed(stdout + stderr)

    def _seq(self, args: list[str], path: str | None) -> Printed | Job:
        numbers: list[int] = []
        for arg in args:
            try:
                numbers.append(int(arg))
            except ValueError:
                text = (
                    f"seq: invalid floating point argument: '{arg}'\n"
                    "Try 'seq --help' for more information.\n"
                )
                return Printed(text.encode())
        if len(numbers) not in (1, 2):
            return Printed(b"seq: missing operand\n")
        first, last = (1, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
        last = min(last, first + MAX_SEQ - 1)
        if path is None:
            return Job(_numbers(first, last))
        if not self._files.write(path, b"", append=False):
            return Printed(f"seq: {_NO_SPACE}\n".encode())
        for chunk in _numbers(first, last):
            if not self._files.write(path, chunk, append=True):
                return Printed(f"seq: {_NO_SPACE}\n".encode())
        return Printed(b"")

    # Commands: each takes its arguments and returns (stdout, stderr) with LF line ends.

    def _read_files(
        self, program: str, args: list[str], each: Callable[[str, bytes], bytes]
    ) -> tuple[bytes, bytes]:
        stdout, stderr = bytearray(), bytearray()
        for name in args:
            path = self._files.path(name)
            data = self._files.read(path)
            if data is not None:
                stdout += each(name, data)
            elif self._files.is_dir(path):
                stderr += f"{program}: {name}: Is a directory\n".encode()
            else:
                stderr += f"{program}: {name}: No such file or directory\n".encode()
        return bytes(stdout), bytes(stderr)

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
        u = self._user
        return f"uid=1000({u}) gid=1000({u}) groups=1000({u}),4(adm),27(sudo)\n".encode(), b""

    def _cmd_ls(self, args: list[str]) -> tuple[bytes, bytes]:
        names = [a for a in args if not a.startswith("-")] or ["."]
        stdout, stderr = [], bytearray()
        for name in names:
            path = self._files.path(name)
            if self._files.is_file(path):
                stdout.append(name)
            elif self._files.is_dir(path):
                stdout.extend(self._files.children(path))
            else:
                stderr += f"ls: cannot access '{name}': No such file or directory\n".encode()
        return (("  ".join(stdout) + "\n").encode() if stdout else b""), bytes(stderr)

    def _cmd_rm(self, args: list[str]) -> tuple[bytes, bytes]:
        stderr = bytearray()
        for name in args:
            if not self._files.remove(self._files.path(name)):
                stderr += f"rm: cannot remove '{name}': No such file or directory\n".encode()
        return b"", bytes(stderr)

    def _cmd_stty(self, args: list[str]) -> tuple[bytes, bytes]:
        """`stty rows R cols C` records the size; `stty size` shows it."""
        pairs = dict(zip(args[::2], args[1::2], strict=False))
        for key in ("rows", "cols", "columns"):
            value = pairs.get(key, "")
            if value.isdigit():
                self.tty_size[0 if key == "rows" else 1] = int(value)
        if args == ["size"]:
            return f"{self.tty_size[0]} {self.tty_size[1]}\n".encode(), b""
        return b"", b""

    def _cmd_uname(self, args: list[str]) -> tuple[bytes, bytes]:
        release, version = self._kernel
        fields = {
            "-s": "Linux",
            "-n": self._hostname,
            "-r": release,
            "-v": version,
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


def _numbers(first: int, last: int) -> Iterator[bytes]:
    """`seq`'s output from `first` to `last`, SEQ_BATCH numbers per chunk."""
    for start in range(first, last + 1, SEQ_BATCH):
        stop = min(last, start + SEQ_BATCH - 1)
        yield b"\n".join(str(n).encode() for n in range(start, stop + 1)) + b"\n"
