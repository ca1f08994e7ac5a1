"""The relays under test, each a subprocess pinned to CPU 0.

* relayd: `relayd serve --config FILE` with a generated config (VMs whose
  serial ports are the bench's echo or flood server), logging JSON lines to
  a file as in production (session start/end audit events included).
* websockify: `websockify --cert --key 127.0.0.1:PORT 127.0.0.1:BACKEND`, the
  proxy OpenStack's serial console uses; it forks one process per client.
* HAProxy: TCP mode with TLS termination, one thread; clients speak a raw
  TLS byte stream, so this is the floor for "a TLS relay written in C".

Every process is started in its own session (process group) and RLIMIT_NOFILE
is raised before exec (the `ulimit -n` of a shell). `stop()` sends SIGTERM,
waits a bounded time, then SIGKILLs that process group only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import py_compile
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procfs
from .loadgen import Target

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RELAYD = VENV_BIN / "relayd"
WEBSOCKIFY = VENV_BIN / "websockify"
NOFILE = 200_000
# Two descriptors per session (client and server side): HAProxy refuses to start when
# maxconn does not fit RLIMIT_NOFILE, whose hard limit here is 20,000 (no CAP_SYS_RESOURCE).
HAPROXY_MAXCONN = 9_980
ISSUER = "https://login.bench/tenant"
AUDIENCE = "relayd"
RELAY_CPU = "0"
# The machine may be shared: at nice -20 (root only; otherwise nice is refused and the
# bench runs at the default priority) other tenants' jobs get little of the CPUs we use.
NICE = -20 if os.geteuid() == 0 else 0

_started: list[subprocess.Popen[bytes]] = []
# Where the snapshot of relayd/ taken at the start of a run lives (snapshot_relayd): relayd is
# run from it, so edits to the working tree during a run cannot mix two versions.
RELAYD_SRC: Path | None = None


def relayd_env() -> dict[str, str]:
    """The environment for relayd processes: the snapshot first on the import path."""
    env = dict(os.environ)
    if RELAYD_SRC is not None:
        env["PYTHONPATH"] = str(RELAYD_SRC)
    return env


def snapshot_relayd(dest: Path, source: Path = ROOT / "relayd") -> Path:
    """Copy relayd/ (or another relayd package) as it is now; retried while it does not compile.

    The working tree may be edited while the bench runs; every relayd process of
    the run imports this copy, so one run measures one version.

    Raises:
        RuntimeError: the tree did not compile for a minute.
    """
    for _ in range(20):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest / "relayd", ignore=shutil.ignore_patterns("__pycache__"))
        try:
            for path in (dest / "relayd").rglob("*.py"):
                py_compile.compile(str(path), doraise=True)
        except py_compile.PyCompileError as exc:
            print(f"relayd/ does not compile now ({exc.msg.strip()[:120]}); again in 3 s")
            time.sleep(3)
            continue
        return dest
    raise RuntimeError("relayd/ did not compile for a minute")


def relayd_source(src: Path) -> dict[str, Any]:
    """Which relayd was measured: the commit, and a digest of the snapshot's relayd/."""
    digest = hashlib.sha256()
    for path in sorted((src / "relayd").rglob("*.py")):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    out: dict[str, Any] = {"relayd_tree_sha256": digest.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(ROOT)]
        out["git_head"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "relayd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out["relayd_uncommitted_files"] = len(status.splitlines())
    return out


def free_port() -> int:
    """A loopback port nobody uses now (bind 0, read it, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _preexec() -> None:
    procfs.raise_nofile(NOFILE)


def spawn(
    argv: list[str], log: Path, *, cpu: str = RELAY_CPU, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` pinned to `cpu` at `NICE`, output to `log`; remembered for `kill_all`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["nice", "-n", str(NICE), "taskset", "-c", cpu, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_preexec,  # only setrlimit, before exec
        )
    _started.append(proc)
    return proc


async def terminate(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM, wait (bounded), then SIGKILL the process group we created."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def kill_all() -> None:
    """Last resort at exit: SIGKILL every process group this run started."""
    for proc in _started:
        if proc.returncode is not None:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError):
            proc.wait(2)


@dataclass(frozen=True)
class Pki:
    """One server certificate for all three relays (ECDSA P-256 from `relayd certs init`)."""

    directory: Path
    cert: Path
    key: Path
    combined: Path
    secret: bytes


def make_pki(directory: Path) -> Pki:
    """`relayd certs init`, plus the cert+key PEM HAProxy wants."""
    subprocess.run(
        [str(RELAYD), "certs", "init", str(directory)],
        check=True,
        capture_output=True,
        env=relayd_env(),
    )
    cert, key = directory / "server.crt", directory / "server.key"
    combined = directory / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    secret = (directory / "hs256.key").read_bytes().strip()
    return Pki(directory, cert, key, combined, secret)


def _log_tail(path: Path, n: int = 10) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


class Peer:
    """A relay under test."""

    name = "peer"
    kind = "ws"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        """The relay's process id (taskset execs it, so it is the Popen pid)."""
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        """The command line."""
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """The environment (None: inherit)."""
        return None

    async def start(self) -> None:
        """Spawn and wait (bounded) until it serves.

        Raises:
            RuntimeError: it exited or did not come up in time.
        """
        self.proc = spawn(self.argv(), self.log, env=self.env())
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {_log_tail(self.log)}")
            if await self.is_ready():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after 30 s: {_log_tail(self.log)}")

    async def is_ready(self) -> bool:
        """Listening (read from /proc/net/tcp; no probe connection)."""
        return procfs.listening(self.port)

    async def stop(self) -> None:
        """Terminate (bounded)."""
        if self.proc is not None:
            await terminate(self.proc)

    def target(self, vm: str = "", *, mode: str = "interactive") -> Target:
        """Where a session connects."""
        raise NotImplementedError


class Relayd(Peer):
    """relayd with a generated config."""

    name = "relayd"

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        vms: list[tuple[str, int]],
        *,
        log_level: str = "info",
        limits: dict[str, object] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        super().__init__(workdir)
        # The state directory holds the on-disk console logs; by default it is under the
        # bench's temporary directory (the root file system, like /var/lib/relayd).
        self.state_dir = (state_dir or workdir) / f"{workdir.name}-state"
        self.pki = pki
        self.vms = vms
        self.log_level = log_level
        self.health_port = free_port()
        self.config = workdir / "relayd.toml"
        from relayd.auth import issue_token
        from relayd.config import LimitsConfig

        wanted: dict[str, object] = {
            # Per-client output cap: set high so the bench measures relaying, not the cap.
            "output_bytes_per_s": 4 * 2**30,
            # Every bench client comes from 127.0.0.1: the per-IP connection rate limit
            # (meant for one abusive address) would refuse the load itself.
            "connections_per_second_per_ip": 1_000_000,
            # Every bench client is one principal (user:bench): the per-principal session
            # cap (10 by default) would refuse the load itself.
            "max_sessions_per_principal": 1_000_000,
            # ...and so would the caps on handshakes in flight (0: no cap).
            "max_handshakes": 0,
            "max_handshakes_per_ip": 0,
            **(limits or {}),
        }
        # Only keys this relayd knows (the config refuses unknown keys).
        self.limits = {k: v for k, v in wanted.items() if k in LimitsConfig.model_fields}

        self.token = issue_token(
            pki.secret, issuer=ISSUER, audience=AUDIENCE, sub="bench", ttl=6 * 3600
        )
        self._write_config()

    def _write_config(self) -> None:
        q = json.dumps
        lines = [
            "[gateway]",
            'region = "bench"',
            f"listen = {q(f'127.0.0.1:{self.port}')}",
            f"health_listen = {q(f'127.0.0.1:{self.health_port}')}",
            f"state_dir = {q(str(self.state_dir))}",
            "[tls]",
            f"cert = {q(str(self.pki.cert))}",
            f"key = {q(str(self.pki.key))}",
            "[auth]",
            f"issuer = {q(ISSUER)}",
            f"audience = {q(AUDIENCE)}",
            f"hs256_secret_file = {q(str(self.pki.directory / 'hs256.key'))}",
            "[limits]",
            *(f"{k} = {q(v)}" for k, v in self.limits.items()),
            "[[subscriptions]]",
            'id = "sub-1"',
        ]
        for vm_id, port in self.vms:
            lines += [
                "[[vms]]",
                f"id = {q(vm_id)}",
                'subscription = "sub-1"',
                f"serial = {q(f'tcp://127.0.0.1:{port}')}",
            ]
        lines += [
            "[[role_assignments]]",
            'principal = "user:bench"',
            'role = "contributor"',
            'scope = "/subscriptions/sub-1"',
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str] | None:
        """Import relayd from the run's snapshot."""
        return relayd_env()

    def argv(self) -> list[str]:
        """`relayd serve`."""
        return [
            str(RELAYD),
            "--log-level",
            self.log_level,
            "serve",
            "--config",
            str(self.config),
        ]

    async def _get(self, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.health_port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
            async with asyncio.timeout(5):
                data = await reader.read(-1)
        finally:
            writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return status, data.partition(b"\r\n\r\n")[2]

    async def is_ready(self) -> bool:
        """`/readyz` answers 200."""
        try:
            status, _ = await self._get("/readyz")
        except (OSError, TimeoutError, ValueError, IndexError):
            return False
        return status == 200

    async def metrics(self) -> dict[str, float]:
        """A few sums from /metrics (outside measured windows: scraping costs CPU)."""
        _, body = await self._get("/metrics")
        sums: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("#") or not line:
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            with contextlib.suppress(ValueError):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return sums

    def target(self, vm: str = "", *, mode: str = "interactive") -> Target:
        """The console route of one VM, with the bench's bearer token."""
        return Target(
            "ws",
            "127.0.0.1",
            self.port,
            f"/v1/vms/{vm}/console?mode={mode}",
            (
                ("Sec-WebSocket-Protocol", "relayd.console.v1"),
                ("Authorization", f"Bearer {self.token}"),
            ),
            expect_hello=True,
        )


class Websockify(Peer):
    """websockify doing its own TLS, relaying to one backend port."""

    name = "websockify"

    def __init__(self, workdir: Path, pki: Pki, backend_port: int) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.backend_port = backend_port

    def argv(self) -> list[str]:
        """`websockify --cert --key LISTEN TARGET`."""
        return [
            str(WEBSOCKIFY),
            "--cert",
            str(self.pki.cert),
            "--key",
            str(self.pki.key),
            f"127.0.0.1:{self.port}",
            f"127.0.0.1:{self.backend_port}",
        ]

    def target(self, vm: str = "", *, mode: str = "interactive") -> Target:
        """Any path; websockify's own subprotocol name."""
        return Target("ws", "127.0.0.1", self.port, "/", (("Sec-WebSocket-Protocol", "binary"),))


class Haproxy(Peer):
    """HAProxy, TCP mode, TLS terminated, one thread."""

    name = "haproxy"
    kind = "raw"

    def __init__(self, workdir: Path, pki: Pki, backend_port: int) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.backend_port = backend_port
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            "\n".join(
                [
                    "global",
                    f"    maxconn {HAPROXY_MAXCONN}",
                    "    nbthread 1",
                    "    ssl-default-bind-options ssl-min-ver TLSv1.2",
                    "defaults",
                    "    mode tcp",
                    "    timeout connect 5s",
                    "    timeout client 1h",
                    "    timeout server 1h",
                    "frontend relay",
                    f"    bind 127.0.0.1:{self.port} ssl crt {self.pki.combined}",
                    "    default_backend echo",
                    "backend echo",
                    f"    server echo 127.0.0.1:{self.backend_port}",
                    "",
                ]
            )
        )

    def argv(self) -> list[str]:
        """`haproxy -db -f CFG` (foreground, one process)."""
        return ["haproxy", "-db", "-f", str(self.config)]

    def target(self, vm: str = "", *, mode: str = "interactive") -> Target:
        """A raw TLS stream."""
        return Target("raw", "127.0.0.1", self.port)


class PyFloor(Peer):
    """bench/pyfloor.py: a bare TLS-to-TCP byte relay on relayd's stack (asyncio, uvloop, ssl)."""

    name = "pyfloor"
    kind = "raw"

    def __init__(self, workdir: Path, pki: Pki, backend_port: int) -> None:
        super().__init__(workdir)
        self.pki = pki
        self.backend_port = backend_port

    def argv(self) -> list[str]:
        """`python -m bench.pyfloor PORT PEM BACKEND_PORT`."""
        script = Path(__file__).with_name("pyfloor.py")
        return [sys.executable, str(script), str(self.port), str(self.pki.combined),
                str(self.backend_port)]  # fmt: skip

    def target(self, vm: str = "", *, mode: str = "interactive") -> Target:
        """A raw TLS stream."""
        return Target("raw", "127.0.0.1", self.port)


def versions() -> dict[str, str]:
    """Software versions for the report."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        vv = subprocess.run(["haproxy", "-vv"], capture_output=True, text=True, check=True).stdout
        out["haproxy"] = vv.splitlines()[0]
        for line in vv.splitlines():
            if "Running on OpenSSL version" in line:
                out["haproxy_openssl"] = line.split(":", 1)[1].strip()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("websockify", "websockets", "uvloop", "numpy", "relayd"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out
