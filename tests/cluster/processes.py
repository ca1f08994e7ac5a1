"""Real processes for a region: redis-server, `relayd serve` gateways, HAProxy, serial ends.

Nothing here is a fake. Each class owns one child process (or one asyncio
server), starts it, knows when it is ready and stops it, killing and reaping
whatever it started. Children run in a session of their own, so a Ctrl-C at
the terminal reaches only their owner, which stops them in order (HAProxy,
then the gateways, then Redis); and they are killed if their owner dies.
Processes are ready when they answer: redis-server a PING, a gateway
`/readyz`, HAProxy its monitor URI. Those three are polled with a deadline,
since another process has no event to wait on.

The serial end (`SerialEnd`) behaves like QEMU's socket chardev: it serves
one client at a time, and a second connection waits, accepted by the
kernel but unserved, until the first hangs up. It counts connections at the
socket level, so two gateways holding a VM's port at once is seen even
though only one of them is served.

The cluster tests (through harness.py), `make run-cluster`
(scripts/run-cluster.py) and bench/cluster.py run the same classes. Nothing
here imports pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
HAPROXY_CFG = ROOT / "docs" / "haproxy-relayd.cfg"
"""The operators' HAProxy config (docs/operations.md, "Cluster"); the tests run this file."""
LB_SOURCE = "127.0.0.10"
"""HAProxy connects to the gateways from here: the only trusted proxy. Peer links
between gateways come from 127.0.0.1 and so carry no PROXY header."""
START_TIMEOUT = 30.0
"""Seconds a process may take to become ready (two cores shared by several runs)."""
STOP_TIMEOUT = 15.0
"""Seconds a process may take to exit after SIGTERM before it is killed."""
PR_SET_PDEATHSIG = 1
POLL_INTERVAL = 0.05
"""Seconds between readiness probes of another process."""


def free_port(*hosts: str) -> int:
    """A TCP port that is free on every one of `hosts` right now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        if all(_can_bind(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no TCP port free on all of {', '.join(hosts)} after 200 tries")


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """One plain HTTP/1.1 GET (the health listener); returns status and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def https_get(
    host: str, port: int, ctx: ssl.SSLContext, path: str, bearer: str
) -> tuple[int, bytes]:
    """One HTTPS GET with a bearer token (the gateways' API); returns status and body."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def poll_until(
    probe: Callable[[], Any],
    what: str,
    timeout: float,  # noqa: ASYNC109 - a timeout error that names what was awaited
    alive: Callable[[], bool],
) -> None:
    """Call the async `probe` until it returns true, `alive()` turns false, or the deadline."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if not alive():
                    raise ProcessGoneError(f"{what} exited before it was ready")
                with contextlib.suppress(OSError):
                    if await probe():
                        return
                await asyncio.sleep(POLL_INTERVAL)
    except TimeoutError:
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s") from None


async def _true(value: bool) -> bool:
    """`value`, awaitable (for `poll_until` on a local condition, such as a log file's content)."""
    return value


class ProcessGoneError(RuntimeError):
    """A child process exited while it was expected to start or run."""


async def _reap(proc: asyncio.subprocess.Process, timeout: float = STOP_TIMEOUT) -> int:  # noqa: ASYNC109 - kill after it
    """Wait for `proc` to exit; kill it if it takes longer than `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG).

    Children run in sessions of their own (a Ctrl-C reaches only their owner,
    which stops them in order); this is the net for an owner killed outright.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _signal(proc: asyncio.subprocess.Process | None, sig: signal.Signals) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


# The hypervisor side.


class SerialEnd:
    """A VM's serial port as QEMU serves it on TCP: one client at a time, input echoed.

    A second connection is accepted (as the kernel's listen backlog would) but
    not served until every earlier one has hung up. `max_connections` is the
    most connections open at once, served or waiting: more than one means two
    gateways held the port at the same time.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.connections = 0
        self.max_connections = 0
        self.serves = 0
        """Clients served so far (a gateway (re)opening the port counts once)."""
        self.received = bytearray()
        """Every byte any served client sent, in order."""
        self.served_peer: tuple[str, int] | None = None
        self.holders: list[str] = []
        """Who each served client was, in order (`identify`'s answers)."""
        self.received_by: list[bytearray] = []
        """What each served client sent, in the order of `holders`."""
        self.identify: Callable[[tuple[str, int]], str] = lambda peer: f"{peer[0]}:{peer[1]}"
        """Names a client by its address, at the moment it is served."""
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._turn = asyncio.Lock()  # FIFO: waiters are served in the order they came
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on 127.0.0.1 (port 0 the first time, the same port again after `close`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def url(self) -> str:
        """The `serial =` URL of this end (a raw TCP chardev)."""
        return f"tcp://127.0.0.1:{self.port}"

    def emit(self, data: bytes) -> bool:
        """The VM prints `data`: to the client being served, or nowhere (as QEMU drops it)."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(data)
        return True

    def reset_max_connections(self) -> None:
        """Start counting the most connections at once again, from now."""
        self.max_connections = self.connections

    async def wait_for(self, predicate: Callable[[SerialEnd], bool], timeout: float) -> None:  # noqa: ASYNC109 - a timeout error that names what was awaited
        """Wait until `predicate(self)` holds; every change of state re-checks it."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"serial end {self.name}: condition not met after {timeout:.0f} s "
                f"(connections {self.connections}, serves {self.serves}, "
                f"served peer {self.served_peer}, {len(self.received)} bytes received)"
            ) from None

    async def wait_received(self, marker: bytes, timeout: float) -> None:  # noqa: ASYNC109 - a timeout error that names what was awaited
        """Wait until `marker` has arrived from a served client."""
        await self.wait_for(lambda end: marker in end.received, timeout)

    async def close(self) -> None:
        """Stop listening, drop every client, wait for their tasks."""
        if self._server is not None:
            self._server.close()
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.max_connections = max(self.max_connections, self.connections)
        task = asyncio.create_task(self._serve(reader, writer), name=f"serial-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._notify()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._turn:
                self._writer = writer
                self.served_peer = writer.get_extra_info("peername")[:2]
                self.holders.append(self.identify(self.served_peer))
                mine = bytearray()
                self.received_by.append(mine)
                self.serves += 1
                self._notify()
                with contextlib.suppress(ConnectionError):
                    while data := await reader.read(65536):
                        self.received += data
                        mine += data
                        writer.write(data)  # the guest's tty echoes what is typed
                        self._notify()
        finally:
            if self._writer is writer:
                self._writer = None
                self.served_peer = None
            self.connections -= 1
            writer.transport.abort()
            self._notify()


def pid_holding_connection(local_port: int, remote_port: int, pids: Iterable[int]) -> int | None:
    """Which of `pids` holds the loopback TCP connection from `local_port` to `remote_port`.

    Read from /proc: the connection's socket inode in /proc/net/tcp, then the
    process whose descriptors include that socket.
    """
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    inode = fields[9]
                    break
        if inode is not None:
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return pid
    return None


# Redis.


class RedisServer:
    """A redis-server on 127.0.0.1 with its data in `directory` (RDB only, saved on request)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port("127.0.0.1")
        self.proc: asyncio.subprocess.Process | None = None
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"

    @property
    def url(self) -> str:
        """The `[cluster] redis` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start and wait until it answers PING (loading the RDB file if one was saved)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--dbfilename", "dump.rdb",
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.directory / "redis.log"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        await poll_until(self._pong, f"redis-server on {self.port}", START_TIMEOUT, self.running)

    def running(self) -> bool:
        """The process is alive."""
        return self.proc is not None and self.proc.returncode is None

    async def _pong(self) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"PING\r\n")
            return await reader.readline() == b"+PONG\r\n"
        finally:
            writer.close()

    async def command(self, *args: str) -> bytes:
        """One command over a fresh connection; returns the raw first reply line."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            parts = [f"*{len(args)}\r\n".encode()]
            for arg in args:
                raw = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
            writer.write(b"".join(parts))
            return await reader.readline()
        finally:
            writer.close()

    async def stop(self, *, keep_data: bool = True) -> None:
        """Shut down (saving the dataset to disk first when `keep_data`) and reap."""
        if self.proc is None:
            return
        self.thaw()
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                await self.command("SHUTDOWN", "SAVE" if keep_data else "NOSAVE")
        await _reap(self.proc)
        self.proc = None
        if not keep_data:
            (self.directory / "dump.rdb").unlink(missing_ok=True)

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted, nothing is answered (a hung server)."""
        _signal(self.proc, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        _signal(self.proc, signal.SIGCONT)

    async def restart_empty(self) -> None:
        """Stop without saving and start again on the same port with nothing in it."""
        await self.stop(keep_data=False)
        await self.start()


# Gateways.


@dataclass
class GatewayProcess:
    """One `relayd serve --config` child process and where it listens."""

    gateway_id: str
    host: str
    tls_port: int
    health_port: int
    config_path: Path
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None, f"{self.gateway_id} is not running"
        return self.proc.pid

    @property
    def advertise(self) -> str:
        """HOST:PORT of the TLS listener (clients and peers alike)."""
        return f"{self.host}:{self.tls_port}"

    def running(self) -> bool:
        """The process is alive (possibly stopped by SIGSTOP)."""
        return self.proc is not None and self.proc.returncode is None

    async def start(self, python: str, *, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109 - a timeout error that names what was awaited
        """Spawn `relayd serve` and wait until its `/readyz` says 200."""
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                python,
                "-u",
                "-m",
                "relayd.cli",
                "serve",
                "--config",
                str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            await poll_until(self.ready, f"gateway {self.gateway_id}", timeout, self.running)
        except (TimeoutError, ProcessGoneError) as exc:
            raise ProcessGoneError(f"{exc}; its log ends:\n{self.log_tail()}") from None

    async def ready(self) -> bool:
        """`/readyz` answers 200."""
        status, _ = await http_get(self.host, self.health_port, "/readyz")
        return status == 200

    async def metrics(self) -> str:
        """The Prometheus text of `/metrics`."""
        _, body = await http_get(self.host, self.health_port, "/metrics")
        return body.decode()

    def kill(self) -> None:
        """SIGKILL: the process dies at once; the kernel closes its sockets."""
        _signal(self.proc, signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: sockets stay open, nothing answers, timers do not run."""
        _signal(self.proc, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        _signal(self.proc, signal.SIGCONT)

    async def wait_exit(self) -> int:
        """Reap the process (after `kill`, or a stop already under way)."""
        assert self.proc is not None
        return await _reap(self.proc)

    async def stop(self) -> None:
        """SIGTERM (the drain), then reap; a stopped process is continued first."""
        if self.proc is None:
            return
        _signal(self.proc, signal.SIGCONT)
        _signal(self.proc, signal.SIGTERM)
        await _reap(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the gateway's log (JSON events), for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_event(self, name: str, count: int) -> None:
        """Wait until the log holds `count` events called `name` (all runs together)."""
        await poll_until(
            lambda: _true(len(self.events(name)) >= count),
            f"{self.gateway_id}'s event {name} #{count}",
            START_TIMEOUT,
            self.running,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every log event called `name` this gateway wrote so far (all its runs)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == name:
                        found.append(event)
        return found


def toml_value(value: object) -> str:
    """Just enough TOML for the configs written here (JSON's escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(sections: Sequence[tuple[str, Mapping[str, object]]]) -> str:
    """`[name]` tables (and `[[name]]` when the name is written with brackets) in order."""
    out = []
    for name, values in sections:
        out.append(name if name.startswith("[[") else f"[{name}]")
        out += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        out.append("")
    return "\n".join(out)


# HAProxy.


def haproxy_config(
    template: str,
    *,
    frontend: str,
    servers: Mapping[str, tuple[str, int, int]],
    source: str = LB_SOURCE,
) -> str:
    """The operators' config with its addresses moved to loopback, nothing else changed.

    Args:
        template: docs/haproxy-relayd.cfg's text.
        frontend: HOST:PORT for the `bind` line.
        servers: gateway name -> (host, TLS port, health port); every `server`
            line of the template must be named here, and only those.
        source: the address HAProxy connects from (the gateways' trusted proxy).

    Raises:
        ValueError: the template has no `bind`, or its servers are not `servers`.
    """
    text, binds = re.subn(r"(?m)^(\s*bind\s+)\S+", lambda m: m.group(1) + frontend, template)
    if binds != 1:
        raise ValueError(f"expected one bind line in the HAProxy config, found {binds}")
    seen: list[str] = []

    def server(match: re.Match[str]) -> str:
        name = match.group(2)
        seen.append(name)
        host, tls_port, health_port = servers[name]
        rest = re.sub(r"\bport \d+", f"port {health_port}", match.group(4))
        return f"{match.group(1)}{name} {host}:{tls_port}{rest} source {source}"

    text = re.sub(r"(?m)^(\s*server\s+)(\S+)\s+(\S+)(.*)$", server, text)
    if sorted(seen) != sorted(servers):
        raise ValueError(f"HAProxy config names servers {seen}, expected {sorted(servers)}")
    # The health port is set on `default-server`; rewrite it there too.
    ports = {health for _, _, health in servers.values()}
    if len(ports) != 1:
        raise ValueError(f"the gateways must share one health port, not {sorted(ports)}")
    return re.sub(r"(?m)^(\s*default-server\b.*\bport )\d+", rf"\g<1>{ports.pop()}", text)


def hashed_haproxy_config(
    *,
    frontend: str,
    pem: Path,
    ca: Path,
    servers: Mapping[str, tuple[str, int, int]],
    source: str = LB_SOURCE,
    client_pem: Path | None = None,
) -> str:
    """HAProxy hashing each console's path to one gateway, which needs HTTP mode.

    HAProxy can read the path only with TLS ended at HAProxy (`pem`: its
    certificate and key) and started again to each gateway (verified against
    `ca`; `client_pem`: presenting that certificate to them). docs/operations.md
    says why the operators' config does not do this; it still must work, with
    forwarding covering what the hash gets wrong.
    """
    (health,) = {health for _, _, health in servers.values()}
    return "\n".join(
        [
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    timeout tunnel 60s",
            "frontend consoles_hashed",
            f"    bind {frontend} ssl crt {pem} alpn http/1.1",
            "    default_backend relayd_hashed",
            "backend relayd_hashed",
            "    balance uri path-only",
            "    hash-type consistent",
            "    option httpchk GET /readyz",
            f"    default-server check no-check-ssl port {health} inter 1s fall 2 rise 2"
            " on-marked-down shutdown-sessions send-proxy-v2"
            f" ssl verify required ca-file {ca} sni str(localhost) alpn http/1.1"
            + (f" crt {client_pem}" if client_pem else ""),
            *(
                f"    server {name} {host}:{port} source {source}"
                for name, (host, port, _) in servers.items()
            ),
            "",
        ]
    )


@dataclass
class Haproxy:
    """HAProxy in the foreground, in front of the gateways, with a monitor and a stats socket."""

    directory: Path
    config: str
    monitor_port: int = field(default_factory=lambda: free_port(LB_SOURCE))
    stats_port: int = field(default_factory=lambda: free_port(LB_SOURCE))
    proc: asyncio.subprocess.Process | None = None
    binary: str = field(default_factory=lambda: shutil.which("haproxy") or "/usr/sbin/haproxy")

    def running(self) -> bool:
        """The process is alive."""
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Write the two config files (ours, then the operators') and start HAProxy."""
        self.directory.mkdir(parents=True, exist_ok=True)
        local = self.directory / "haproxy-local.cfg"
        local.write_text(
            "# What the operators' file leaves to each site: process settings, a monitor.\n"
            "global\n"
            "    maxconn 4000\n"
            "    log stdout format raw local0 info\n"
            f"    stats socket ipv4@{LB_SOURCE}:{self.stats_port} level admin\n"
            "frontend monitor\n"
            "    mode http\n"
            f"    bind {LB_SOURCE}:{self.monitor_port}\n"
            "    monitor-uri /up\n"
            "    timeout client 5s\n"
        )
        main = self.directory / "haproxy.cfg"
        main.write_text(self.config)
        with (self.directory / "haproxy.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary,
                "-db",
                "-f",
                str(local),
                "-f",
                str(main),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        await poll_until(self._up, "haproxy", START_TIMEOUT, self.running)

    async def _up(self) -> bool:
        status, _ = await http_get(LB_SOURCE, self.monitor_port, "/up")
        return status == 200

    async def server_states(self) -> dict[str, str]:
        """Server name -> `UP`, `DOWN`, ... as HAProxy's checks see them now."""
        reader, writer = await asyncio.open_connection(LB_SOURCE, self.stats_port)
        try:
            writer.write(b"show stat\n")
            text = (await reader.read()).decode()
        finally:
            writer.close()
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        states = {}
        for line in lines:
            cols = line.split(",")
            if cols[1] not in ("FRONTEND", "BACKEND"):
                states[cols[1]] = cols[17].split(" ")[0]
        return states

    async def wait_state(self, server: str, state: str, timeout: float) -> None:  # noqa: ASYNC109 - a timeout error that names what was awaited
        """Wait until HAProxy's health checks put `server` in `state` (`UP`, `DOWN`)."""
        seen: dict[str, str] = {}

        async def reached() -> bool:
            nonlocal seen
            seen = await self.server_states()
            return seen.get(server) == state

        try:
            await poll_until(reached, f"haproxy server {server} {state}", timeout, self.running)
        except TimeoutError:
            raise AssertionError(f"haproxy never saw {server} {state}: {seen}") from None

    async def stop(self) -> None:
        """SIGTERM (immediate stop in the foreground) and reap."""
        if self.proc is not None:
            _signal(self.proc, signal.SIGTERM)
            await _reap(self.proc)


# The whole region.


class Cluster:
    """Redis, N gateways on 127.0.0.2, .3, ... (one TLS and one health port shared) and HAProxy.

    `write_configs(render)` must run before `start`: `render(gateway)` returns
    the TOML of one gateway (the VM list and auth are the caller's).
    """

    def __init__(
        self,
        directory: Path,
        *,
        size: int = 3,
        python: str,
        frontend_host: str = "127.0.0.1",
        frontend_port: int | None = None,
        haproxy_template: str | None = None,
    ) -> None:
        self.directory = directory
        self.python = python
        hosts = [f"127.0.0.{2 + i}" for i in range(size)]
        tls_port, health_port = free_port(*hosts), free_port(*hosts)
        self.redis = RedisServer(directory / "redis")
        self.gateways = [
            GatewayProcess(
                gateway_id=f"gw-{i + 1}",
                host=host,
                tls_port=tls_port,
                health_port=health_port,
                config_path=directory / f"gw-{i + 1}" / "relayd.toml",
                log_path=directory / f"gw-{i + 1}" / "relayd.log",
            )
            for i, host in enumerate(hosts)
        ]
        self.frontend = (frontend_host, frontend_port or free_port(frontend_host))
        template = haproxy_template if haproxy_template is not None else HAPROXY_CFG.read_text()
        self.haproxy = Haproxy(
            directory / "haproxy",
            haproxy_config(
                template,
                frontend=f"{self.frontend[0]}:{self.frontend[1]}",
                servers={g.gateway_id: (g.host, g.tls_port, g.health_port) for g in self.gateways},
            ),
        )

    def write_configs(self, render: Callable[[GatewayProcess], str]) -> None:
        """Write every gateway's config file (and make its directory)."""
        for gateway in self.gateways:
            gateway.config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            gateway.config_path.write_text(render(gateway))

    def state_dir(self, gateway: GatewayProcess) -> Path:
        """Where a gateway keeps its state."""
        return gateway.config_path.parent / "state"

    def gateway(self, gateway_id: str) -> GatewayProcess:
        """The gateway called `gateway_id`."""
        return next(g for g in self.gateways if g.gateway_id == gateway_id)

    async def start(self) -> None:
        """Redis first, then the gateways together, then HAProxy in front."""
        await self.redis.start()
        async with asyncio.TaskGroup() as tg:
            for gateway in self.gateways:
                tg.create_task(gateway.start(self.python))
        await self.haproxy.start()

    async def close(self) -> None:
        """HAProxy, then the gateways (drained together), then Redis; all reaped."""
        await self.haproxy.stop()
        async with asyncio.TaskGroup() as tg:
            for gateway in self.gateways:
                tg.create_task(gateway.stop())
        await self.redis.stop(keep_data=False)

    async def routes(
        self, gateway: GatewayProcess, ctx: ssl.SSLContext, token: str
    ) -> dict[str, str | None]:
        """VM -> the gateway `gateway` would serve it from (itself, when it holds the port).

        From `GET /v1/vms`: a VM with a hub here has `writer_attached`; one held
        elsewhere says `"port": "remote"` and its `owner`; None: nobody, as far as
        this gateway knows.
        """
        status, body = await https_get(gateway.host, gateway.tls_port, ctx, "/v1/vms", token)
        assert status == 200, body
        return {
            vm["id"]: gateway.gateway_id if "writer_attached" in vm else vm.get("owner")
            for vm in json.loads(body)["vms"]
        }

    async def wait_routed(self, ctx: ssl.SSLContext, token: str) -> dict[str, str | None]:
        """Wait until every VM has an owner and every running gateway routes it there."""
        agreed: dict[str, str | None] = {}

        async def routed() -> bool:
            running = [g for g in self.gateways if g.running()]
            views = [await self.routes(g, ctx, token) for g in running]
            agreed.clear()
            agreed.update(views[0])
            return None not in agreed.values() and all(v == views[0] for v in views)

        await poll_until(routed, "every gateway's routes", START_TIMEOUT, lambda: True)
        return agreed

    def owner_of(self, end: SerialEnd) -> GatewayProcess | None:
        """The gateway whose process holds the connection `end` is serving, if any."""
        peer = end.served_peer
        return None if peer is None else self._holder(peer, end.port)

    def track(self, end: SerialEnd) -> None:
        """Make `end` name the gateway of each client it serves (in `end.holders`)."""
        end.identify = lambda peer: getattr(self._holder(peer, end.port), "gateway_id", "?")

    def _holder(self, peer: tuple[str, int], port: int) -> GatewayProcess | None:
        live = {g.pid: g for g in self.gateways if g.running()}
        pid = pid_holding_connection(peer[1], port, live)
        return live.get(pid) if pid is not None else None

    async def wait_owner(
        self,
        end: SerialEnd,
        timeout: float,  # noqa: ASYNC109 - a timeout error that names what was awaited
        *,
        not_on: GatewayProcess | None = None,
    ) -> GatewayProcess:
        """Wait until a gateway (other than `not_on`) holds the VM's port and is served."""
        found: list[GatewayProcess] = []

        def owned(e: SerialEnd) -> bool:
            owner = self.owner_of(e)
            if owner is None or owner is not_on:
                return False
            found.append(owner)
            return True

        await end.wait_for(owned, timeout)
        return found[-1]
