"""Boot and kill the test guest (tests/guest/build-guest.sh) under QEMU.

One `GuestVM` is one QEMU process whose ttyS0 is a chardev of one kind:

    telnet  -chardev socket,...,server=on,wait=off,telnet=on   relayd: telnet://127.0.0.1:PORT
    tcp     -chardev socket,...,server=on,wait=off             relayd: tcp://127.0.0.1:PORT
    unix    -chardev socket,path=...,server=on,wait=off        relayd: unix:///.../ttyS0.sock
    pty     -chardev pty                                       relayd: /dev/pts/N

Every listening socket is made here and handed to QEMU as an inherited file
descriptor (`fd=N`), so nothing waits for QEMU to create a socket and no
port is picked and then raced for: a client can connect the moment the
process exists (the connection waits in the backlog until QEMU accepts it).
Only loopback addresses are used. Two QMP monitors: one over a socketpair
for this harness, one on a unix socket (`qmp_path`) for relayd's hooks
(`break_command`, `reset_command`), since a QMP chardev serves one client
at a time.

Accelerator: TCG unless KVM really runs a stock kernel here. Some hosts
expose a /dev/kvm that cannot (QEMU aborts on an MSR, or the guest spins
with no output), so KVM is used only after a probe boot of the kernel with
`-accel kvm` reaches its panic for want of a root filesystem within a few
seconds; the answer is cached in out/accel. `RELAYD_GUEST_ACCEL=tcg|kvm`
skips the probe.

Facts of real QEMU the callers must live with: a socket or pty chardev
drops console output while no client is connected; its telnet server sends
WILL ECHO/SGA/BINARY, DO BINARY on connect and doubles 0xFF; a pty drops
BREAK (use `break_command`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .qmp import QmpClient

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BUILD_SCRIPT = HERE / "build-guest.sh"
QMP_SCRIPT = HERE / "qmp.py"
QEMU = "qemu-system-x86_64"
CHARDEV_ID = "serial0"
Kind = Literal["telnet", "tcp", "unix", "pty"]
KINDS: tuple[Kind, ...] = ("telnet", "tcp", "unix", "pty")
LOGIN_PROMPT = b"login: "
PROBE_TIMEOUT = 10.0
_KVM_GET_API_VERSION = 0xAE00


class GuestUnavailableError(Exception):
    """The guest image cannot be built or QEMU is not installed."""


@dataclass(frozen=True)
class GuestImage:
    """What build-guest.sh made, as recorded in out/guest.env."""

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str
    user: str
    password: str
    hostname: str
    digest: str

    @classmethod
    def load(cls, out: Path = OUT) -> GuestImage:
        """Read out/guest.env; prefer the uncompressed kernel (PVH boot) when present."""
        env = dict(
            line.split("=", 1) for line in (out / "guest.env").read_text().splitlines() if line
        )
        vmlinux = out / "vmlinux"
        return cls(
            kernel=vmlinux if vmlinux.exists() else out / "vmlinuz",
            initrd=out / "initramfs.cpio.gz",
            cmdline=(out / "cmdline").read_text().strip(),
            kernel_version=env["KERNEL_VERSION"],
            user=env["GUEST_USER"],
            password=env["GUEST_PASSWORD"],
            hostname=env["GUEST_HOSTNAME"],
            digest=env["VMLINUZ_SHA256"][:16] + "-" + env["INITRAMFS_SHA256"][:16],
        )

    @property
    def prompt(self) -> bytes:
        """The shell prompt after login (PS1 in the image's /etc/profile)."""
        return f"{self.user}@{self.hostname}:~$ ".encode()


def ensure_image() -> GuestImage:
    """The built guest, building it (and installing packages, as root) when missing.

    Raises:
        GuestUnavailableError: no QEMU, or the build failed.
    """
    out = OUT
    needed = ("guest.env", "cmdline", "initramfs.cpio.gz", "vmlinuz")
    if not all((out / name).exists() for name in needed) or shutil.which(QEMU) is None:
        result = subprocess.run(
            [str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=900
        )
        if result.returncode != 0:
            raise GuestUnavailableError(
                f"{BUILD_SCRIPT.name} failed ({result.returncode}): "
                + (result.stderr.strip().splitlines() or [""])[-1]
            )
    if shutil.which(QEMU) is None:
        raise GuestUnavailableError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return GuestImage.load(out)


# -- accelerator ------------------------------------------------------------------


def _kvm_device_opens() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def probe_kvm(image: GuestImage, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether `-accel kvm` boots the stock kernel: it must reach its no-root panic in time."""
    argv = [
        QEMU,
        *("-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "256"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-kernel", str(image.kernel)),
        *("-append", "console=ttyS0,115200 panic=-1 loglevel=4"),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while b"Kernel panic" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                return False
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return False
            seen += chunk
        return True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def choose_accel(image: GuestImage) -> str:
    """`tcg`, or `kvm` where a probe showed that it really works (cached in out/accel)."""
    wanted = os.environ.get("RELAYD_GUEST_ACCEL", "auto")
    if wanted in ("tcg", "kvm"):
        return wanted
    if not _kvm_device_opens():
        return "tcg"
    cache = OUT / "accel"
    with contextlib.suppress(OSError, ValueError):
        key, accel = cache.read_text().split()
        if key == image.digest and accel in ("tcg", "kvm"):
            return accel
    accel = "kvm" if probe_kvm(image) else "tcg"
    with contextlib.suppress(OSError):
        cache.write_text(f"{image.digest} {accel}\n")
    return accel


def accel_args(accel: str) -> list[str]:
    """QEMU options for the accelerator."""
    return ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg"]


# -- one VM -----------------------------------------------------------------------


class GuestVM:
    """A QEMU process running the test guest, ttyS0 on a chardev of `kind`.

    `start()` may be called again after `kill()`: the VM comes back on the
    same TCP port or socket path (a new pty, though: ptys are not stable).
    """

    def __init__(
        self,
        image: GuestImage,
        kind: Kind,
        workdir: Path,
        *,
        accel: str = "tcg",
        memory_mb: int = 256,
    ) -> None:
        self.image = image
        self.kind = kind
        self.workdir = workdir
        self.accel = accel
        self.memory_mb = memory_mb
        self.port = 0
        self.socket_path = workdir / "ttyS0.sock"
        self.qmp_path = workdir / "qmp.sock"
        self.log_path = workdir / "qemu.log"
        self.pty: str | None = None
        self.boot_seconds: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._log: IO[bytes] | None = None
        self._watch: _Serial | None = None
        self._started = 0.0

    # -- what relayd is told ---------------------------------------------------------

    @property
    def serial_url(self) -> str:
        """relayd's `serial =` for this VM's ttyS0."""
        if self.kind in ("telnet", "tcp"):
            return f"{self.kind}://127.0.0.1:{self.port}"
        if self.kind == "unix":
            return f"unix://{self.socket_path}"
        assert self.pty is not None, "start() the VM first"
        return self.pty

    def qmp_hook(self, command: str, arguments: dict[str, object] | None = None) -> list[str]:
        """An argv for relayd's `break_command`/`reset_command`/`nmi_command`."""
        argv = [sys.executable, str(QMP_SCRIPT), str(self.qmp_path), command]
        if arguments:
            argv.append(json.dumps(arguments, separators=(",", ":")))
        return argv

    @property
    def break_command(self) -> list[str]:
        """`chardev-send-break` on ttyS0's chardev: SysRq where the medium has no BREAK."""
        return self.qmp_hook("chardev-send-break", {"id": CHARDEV_ID})

    @property
    def pid(self) -> int | None:
        """QEMU's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether the QEMU process is running."""
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle ------------------------------------------------------------------

    def _listen_serial(self) -> socket.socket | None:
        if self.kind in ("telnet", "tcp"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(8)
            self.port = sock.getsockname()[1]
            return sock
        if self.kind == "unix":
            return _listen_unix(self.socket_path)
        return None

    def argv(self, serial_fd: int | None, hook_qmp_fd: int, harness_fd: int) -> list[str]:
        """The QEMU command line for the inherited descriptors."""
        if self.kind == "pty":
            chardev = f"pty,id={CHARDEV_ID}"
        else:
            chardev = f"socket,id={CHARDEV_ID},fd={serial_fd},server=on,wait=off"
            if self.kind == "telnet":
                chardev += ",telnet=on"
        return [
            QEMU,
            *("-name", f"relayd-guest-{self.kind}"),
            *accel_args(self.accel),
            *("-machine", "pc", "-m", str(self.memory_mb), "-smp", "1"),
            *("-nodefaults", "-no-user-config", "-display", "none", "-nic", "none"),
            *("-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)),
            *("-append", self.image.cmdline),
            *("-chardev", chardev, "-serial", f"chardev:{CHARDEV_ID}"),
            *("-chardev", f"socket,id=qmp-hook,fd={hook_qmp_fd},server=on,wait=off"),
            *("-mon", "chardev=qmp-hook,mode=control"),
            *("-chardev", f"socket,id=qmp-harness,fd={harness_fd}"),
            *("-mon", "chardev=qmp-harness,mode=control"),
        ]

    def start(self, *, watch: bool = True) -> None:
        """Start QEMU (not waiting for the guest to boot); returns once QMP answers.

        With `watch`, this harness connects to ttyS0 at once and holds the
        connection until `wait_for_login`, so no boot output is dropped and
        the prompt is not missed. Without it, ttyS0 is left for relayd.
        """
        assert not self.alive, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as passed:
            # Only QEMU keeps these: when it dies, connections are refused.
            serial = self._listen_serial()
            if serial is not None:
                passed.enter_context(serial)
            hook_qmp = passed.enter_context(_listen_unix(self.qmp_path))
            ours, theirs = socket.socketpair()
            passed.enter_context(theirs)
            argv = self.argv(
                serial.fileno() if serial is not None else None, hook_qmp.fileno(), theirs.fileno()
            )
            try:
                self._log = self.log_path.open("ab")
                self._log.write(f"\n$ {' '.join(argv)}\n".encode())
                self._log.flush()
                self._started = time.monotonic()
                self._proc = subprocess.Popen(
                    argv,
                    pass_fds=[s.fileno() for s in (serial, hook_qmp, theirs) if s is not None],
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                )
            except BaseException:
                ours.close()
                self._close_log()
                raise
        try:
            self._qmp = QmpClient(ours, timeout=60.0)
            if self.kind == "pty":
                self.pty = self._query_pty()
            if watch:
                self._watch = _Serial.open(self)
        except BaseException:
            ours.close()
            self.kill()
            raise

    def _query_pty(self) -> str:
        assert self._qmp is not None
        for chardev in self._qmp.execute("query-chardev"):
            if chardev["label"] == CHARDEV_ID:
                filename = str(chardev["filename"])
                assert filename.startswith("pty:"), filename
                return filename[len("pty:") :]
        raise AssertionError(f"no chardev {CHARDEV_ID}")

    def qmp(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run a QMP command on the harness monitor."""
        assert self._qmp is not None, "not running"
        return self._qmp.execute(command, arguments)

    def kill(self) -> None:
        """SIGKILL QEMU by pid and reap it; a no-op when it is not running."""
        proc, self._proc = self._proc, None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        """The end of QEMU's own output (errors, warnings), for failure messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- waiting for the guest, without relayd ----------------------------------------

    def wait_for_login(self, timeout: float) -> bytes:
        """Read ttyS0 directly until getty's `login: `, then let go of it.

        Uses the connection `start()` opened, or opens one (output printed
        while nobody was connected is gone: QEMU drops it). Returns what
        ttyS0 printed. Raises TimeoutError (with QEMU's log) when the prompt
        does not come, or RuntimeError when QEMU exits.
        """
        deadline = time.monotonic() + timeout
        transcript = bytearray()
        serial, self._watch = self._watch or _Serial.open(self), None
        try:
            while LOGIN_PROMPT not in transcript:
                if not self.alive:
                    raise RuntimeError(f"QEMU exited while booting:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {LOGIN_PROMPT!r} from the {self.kind} guest in {timeout:g}s; "
                        f"ttyS0 said: {bytes(transcript[-400:])!r}\nQEMU: {self.log_tail()}"
                    )
                transcript += serial.read(min(left, 1.0))
        finally:
            serial.close()
        self.boot_seconds.append(time.monotonic() - self._started)
        return bytes(transcript)


class _Serial:
    """This harness's own connection to a VM's ttyS0 (socket or pty slave)."""

    def __init__(self, fd: int, sock: socket.socket | None) -> None:
        self.fd = fd
        self._sock = sock

    @classmethod
    def open(cls, vm: GuestVM) -> _Serial:
        if vm.kind == "pty":
            assert vm.pty is not None
            fd = os.open(vm.pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            # Raw at once: a cooked pty would echo the guest's output back as input.
            tty.setraw(fd, termios.TCSANOW)
            return cls(fd, None)
        if vm.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = str(vm.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = ("127.0.0.1", vm.port)
        try:
            sock.settimeout(10.0)
            sock.connect(target)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock.fileno(), sock)

    def read(self, timeout: float) -> bytes:
        """What arrived within `timeout` (maybe nothing).

        Raises:
            RuntimeError: the socket was closed by QEMU.
        """
        if not select.select([self.fd], [], [], timeout)[0]:
            return b""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return b""
        except OSError:  # EIO: a pty whose QEMU side is not there
            return b""
        if not chunk and self._sock is not None:
            raise RuntimeError("QEMU closed ttyS0")
        return chunk

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self.fd)


def _listen_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


__all__ = [
    "CHARDEV_ID",
    "KINDS",
    "GuestImage",
    "GuestUnavailableError",
    "GuestVM",
    "Kind",
    "accel_args",
    "choose_accel",
    "ensure_image",
    "probe_kvm",
]
