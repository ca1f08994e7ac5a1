"""Shared fixtures: real TLS gateways on loopback, real far ends, a console client.

Everything binds port 0 and waits on readiness events; nothing sleeps to
synchronize. The far ends are real sockets and ptys, never mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relayd import native
from relayd.app import Gateway
from relayd.auth import issue_token
from relayd.config import Config, load_config
from relayd.hub import ConsoleHub
from relayd.keeper import wait_until


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source (edited since `make native`)."""
    stale = native.find_stale()
    if stale:
        pytest.exit(
            f"compiled {', '.join(stale)} out of date with the source: run `make native`", 2
        )


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`). A real
# region (redis-server, three `relayd serve`, HAProxy) is a CPU-heavy load: the modules that
# start one keep to one worker, one after another, so two regions never compete for the
# cores, and their tests run in file order on the module's one region. The QEMU guests are
# booted once per worker that asks (tests/guest/conftest.py's session pool), so their tests
# keep to one worker too. Every other test binds port 0 and keeps to its own tmp_path, so it
# may run beside any of them. (xdist's own `xdist_group` marks do nothing on pytest 9.2,
# which no longer lets a plugin rename a test: hence a scheduler that groups by path.)
XDIST_GROUPS = {
    "tests/cluster/test_chaos.py": "region",
    "tests/cluster/test_cluster_processes.py": "region",
    "tests/cluster/test_run_cluster.py": "region",
    "tests/guest/": "guest",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `--dist loadgroup`: the XDIST_GROUPS' tests by group, every other test alone."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PathGroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """LoadScope's scheduling (largest work units first), grouped by XDIST_GROUPS."""

        def _split_scope(self, nodeid: str) -> str:
            for prefix, group in XDIST_GROUPS.items():
                if nodeid.startswith(prefix):
                    return group
            return nodeid

    return PathGroupScheduling(config, log)


ISSUER = "https://login.test/tenant"
AUDIENCE = "relayd"
TIMEOUT = 10.0


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """One test CA for the whole run."""
    return trustme.CA()


@pytest.fixture(scope="session")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Server certificate, CA file and HS256 secret on disk."""
    d = tmp_path_factory.mktemp("pki")
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    (d / "hs256.key").write_text(secrets.token_hex(32))
    return {
        "cert": d / "server.crt",
        "key": d / "server.key",
        "ca": d / "ca.crt",
        "secret": d / "hs256.key",
    }


@pytest.fixture
def client_ssl(pki: dict[str, Path]) -> ssl.SSLContext:
    """A client context trusting the test CA."""
    return ssl.create_default_context(cafile=str(pki["ca"]))


def toml_value(value: Any) -> str:
    """Just enough TOML encoding for the configs tests write."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


@pytest.fixture
def write_config(tmp_path: Path, pki: dict[str, Path]) -> Callable[..., Config]:
    """Write and load a config: `write_config(vms=[{...}], limits={...}, roles=[...])`.

    `subscriptions` defaults to one, `sub-1`; each VM is in `sub-1` unless it says otherwise.
    """

    def write(
        *,
        vms: list[dict[str, Any]],
        limits: dict[str, Any] | None = None,
        gateway: dict[str, Any] | None = None,
        roles: list[tuple[str, str, str]] | None = None,
        tls: dict[str, Any] | None = None,
        subscriptions: Sequence[str | dict[str, Any]] = ("sub-1",),
    ) -> Config:
        gw = {
            "region": "test",
            "listen": "127.0.0.1:0",
            "health_listen": "127.0.0.1:0",
            "state_dir": str(tmp_path / "state"),
            **(gateway or {}),
        }
        tls_section = {"cert": pki["cert"], "key": pki["key"], **(tls or {})}
        lines = ["[gateway]"] + [f"{k} = {toml_value(v)}" for k, v in gw.items()]
        lines += ["[tls]"] + [f"{k} = {toml_value(v)}" for k, v in tls_section.items()]
        lines += [
            "[auth]",
            f"issuer = {toml_value(ISSUER)}",
            f"audience = {toml_value(AUDIENCE)}",
            f"hs256_secret_file = {toml_value(pki['secret'])}",
        ]
        lines += ["[limits]"] + [f"{k} = {toml_value(v)}" for k, v in (limits or {}).items()]
        for sub in subscriptions:
            entry = {"id": sub} if isinstance(sub, str) else sub
            lines.append("[[subscriptions]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        for vm in vms:
            lines.append("[[vms]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in {"subscription": "sub-1", **vm}.items()]
        for principal, role, scope in roles or [
            ("user:alice", "contributor", "/subscriptions/sub-1"),
            ("user:bob", "contributor", "/subscriptions/sub-1"),
            ("user:rita", "reader", "/subscriptions/sub-1"),
        ]:
            lines += [
                "[[role_assignments]]",
                f"principal = {toml_value(principal)}",
                f"role = {toml_value(role)}",
                f"scope = {toml_value(scope)}",
            ]
        path = tmp_path / "relayd.toml"
        path.write_text("\n".join(lines) + "\n")
        return load_config(path)

    return write


@pytest.fixture
def token(pki: dict[str, Path]) -> Callable[..., str]:
    """Mint a token: `token("alice")`, `token("alice", ttl=-10)`."""
    secret = pki["secret"].read_bytes().strip()

    def mint(sub: str, **kwargs: Any) -> str:
        kwargs.setdefault("issuer", ISSUER)
        kwargs.setdefault("audience", AUDIENCE)
        return issue_token(secret, sub=sub, **kwargs)

    return mint


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Gateway]:
    """A gateway serving until the block ends, then shut down cleanly."""
    gateway = Gateway(config)
    task = asyncio.create_task(gateway.serve())
    ready = asyncio.create_task(gateway.ready.wait())
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise the start-up error
        yield gateway
    finally:
        ready.cancel()
        gateway.stop()
        async with asyncio.timeout(TIMEOUT):
            await task


async def wait_hub(gateway: Gateway, vm: str, predicate: Callable[[ConsoleHub], bool]) -> None:
    """Wait until the VM's hub satisfies `predicate` (woken by the hub's own changes)."""
    hub = gateway.hubs[vm]
    async with asyncio.timeout(TIMEOUT):
        await wait_until(hub, lambda: predicate(hub))


async def wait_port_up(gateway: Gateway, vm: str) -> None:
    """Wait until the hub has its serial port open."""
    await wait_hub(gateway, vm, lambda hub: hub.port_up)


def http_request(method: str, path: str, *, bearer: str | None = None, body: bytes = b"") -> bytes:
    """The bytes of one HTTP/1.1 request that closes the connection after the answer."""
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if bearer:
        head += f"Authorization: Bearer {bearer}\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def https_exchange(
    port: int, ctx: ssl.SSLContext, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 exchange over TLS; returns status, lower-cased headers, body."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(request)
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def raw_console(
    gateway: Gateway | int,
    ctx: ssl.SSLContext,
    bearer: str,
    vm: str = "vm-a",
    query: str = "",
    *,
    sock: socket.socket | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A console upgraded by hand, for tests that speak (or withhold) frames themselves.

    `gateway` is an in-process gateway or the TLS port of one in a subprocess; `sock`
    an already connected socket to use (to set its buffer sizes first).
    """
    port = gateway if isinstance(gateway, int) else gateway.tls_port
    if sock is None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
    else:
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="localhost"
        )
    writer.write(
        (
            f"GET /v1/vms/{vm}/console{'?' + query if query else ''} HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: Bearer {bearer}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relayd.console.v1\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def console_url(gateway: Gateway, vm: str, query: str = "") -> str:
    """The WebSocket console route of a VM on a test gateway."""
    return f"wss://localhost:{gateway.tls_port}/v1/vms/{vm}/console" + (
        f"?{query}" if query else ""
    )


async def refused_upgrade(url: str, ctx: ssl.SSLContext, **kwargs: Any) -> tuple[int, str]:
    """Open a console that must be refused before the upgrade; (status, JSON error code)."""
    with pytest.raises(InvalidStatus) as info:
        async with connect(
            url,
            ssl=ctx,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            **kwargs,
        ):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)["error"]


class Console:
    """A test client: the real websockets client plus bookkeeping of what arrived."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.output = bytearray()
        self.controls: list[dict[str, Any]] = []
        self.hello: dict[str, Any] = {}

    async def _recv(self) -> None:
        message = await self.ws.recv()
        if isinstance(message, bytes):
            self.output += message
        else:
            self.controls.append(json.loads(message))

    async def expect(self, marker: bytes) -> bytes:
        """Read until `marker` is in the output; returns all output so far."""
        async with asyncio.timeout(TIMEOUT):
            while marker not in self.output:
                await self._recv()
        return bytes(self.output)

    async def read_at_least(self, n: int) -> bytes:
        """Read until `n` bytes of console output have arrived."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.output) < n:
                await self._recv()
        return bytes(self.output)

    async def control(self, **match: Any) -> dict[str, Any]:
        """Read until a control message with these fields arrives (consuming it)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for i, msg in enumerate(self.controls):
                    if all(msg.get(k) == v for k, v in match.items()):
                        del self.controls[i]
                        return msg
                await self._recv()

    async def send(self, data: bytes | str | dict[str, Any]) -> None:
        """Keystrokes (bytes) or a control message (dict or JSON text)."""
        await self.ws.send(json.dumps(data) if isinstance(data, dict) else data)

    async def closed(self) -> tuple[int | None, str | None]:
        """Read until the server closes; returns (code, reason)."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    await self._recv()
                except ConnectionClosed:
                    break
        rcvd = self.ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd else (None, None)


@pytest.fixture
def open_console(client_ssl: ssl.SSLContext, token: Callable[..., str]) -> Callable[..., Any]:
    """`async with open_console(gw, "vm", user="alice", mode="spectate") as c:`.

    `bearer=` uses that token instead of a fresh one for `user`.
    """

    @asynccontextmanager
    async def opener(
        gateway: Gateway,
        vm: str,
        *,
        user: str = "alice",
        mode: str | None = None,
        resume_from: int | None = None,
        headers: dict[str, str] | None = None,
        bearer: str | None = None,
    ) -> AsyncIterator[Console]:
        query = []
        if mode:
            query.append(f"mode={mode}")
        if resume_from is not None:
            query.append(f"from={resume_from}")
        url = f"wss://localhost:{gateway.tls_port}/v1/vms/{vm}/console"
        if query:
            url += "?" + "&".join(query)
        hdrs = {"Authorization": f"Bearer {bearer or token(user)}", **(headers or {})}
        async with connect(
            url,
            ssl=client_ssl,
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers=hdrs,
            open_timeout=TIMEOUT,
            max_size=None,
        ) as ws:
            console = Console(ws)
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["type"] == "hello"
            console.hello = hello
            yield console

    return opener


@pytest.fixture
def stalled_spectator(client_ssl: ssl.SSLContext, token: Callable[..., str]) -> Callable[..., Any]:
    """`async with stalled_spectator(gw, "vm") as ws:` a reader (rita) that stops reading.

    A tiny receive buffer and a one-message queue make its TCP window close at
    once, so relayd sees a client that has stopped reading; `ws.recv()` later
    reads what did reach it.
    """

    @asynccontextmanager
    async def opener(gateway: Gateway, vm: str) -> AsyncIterator[ClientConnection]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.tls_port))
        async with connect(
            console_url(gateway, vm, "mode=spectate"),
            sock=sock,
            server_hostname="localhost",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {token('rita')}"},
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            max_queue=1,
            max_size=None,
        ) as ws:
            yield ws

    return opener


class FarEnd:
    """A hypervisor-side TCP serial endpoint (like QEMU `-serial tcp::PORT,server`)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        """Listen (again, on the same port after `stop`)."""
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._connected.set()
        try:
            while data := await reader.read(65536):
                self.received += data
                self._changed.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def connected(self) -> None:
        """Wait for relayd to connect."""
        async with asyncio.timeout(TIMEOUT):
            await self._connected.wait()

    async def send(self, data: bytes) -> None:
        """Console output from the 'VM'."""
        await self.connected()
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def wait_received(self, predicate: Callable[[bytes], bool]) -> bytes:
        """Wait until what relayd wrote satisfies `predicate`."""
        async with asyncio.timeout(TIMEOUT):
            while not predicate(bytes(self.received)):
                self._changed.clear()
                await self._changed.wait()
        return bytes(self.received)

    async def stop(self) -> None:
        """The VM goes away: close the listener and the connection."""
        self._connected.clear()
        if self._server is not None:
            self._server.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._server is not None:
            await self._server.wait_closed()


@pytest.fixture
async def far_end() -> AsyncIterator[FarEnd]:
    """A started TCP serial endpoint."""
    end = FarEnd()
    await end.start()
    yield end
    await end.stop()


@pytest.fixture
def hung_far_end() -> Iterator[int]:
    """The port of a serial far end that accepts and never reads: a hung guest's line."""
    hung = socket.socket()
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hung.bind(("127.0.0.1", 0))
    hung.listen(1)  # the connection completes in the backlog; nothing ever reads it
    try:
        yield hung.getsockname()[1]
    finally:
        hung.close()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Callable[[], tuple[int, Path]]:
    """Make a pty; the slave is reachable at a stable symlink (like /dev/serial/by-id)."""
    link = tmp_path / "ttyVM"
    masters: list[int] = []

    def make() -> tuple[int, Path]:
        master, slave = os.openpty()
        name = os.ttyname(slave)
        os.close(slave)
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        os.set_blocking(master, False)
        masters.append(master)
        return master, link

    yield make  # type: ignore[misc]
    for fd in masters:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class GatewayProcess:
    """A `relayd serve` subprocess: its process, TLS port and every log event it printed."""

    proc: asyncio.subprocess.Process
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)

    def peak_rss(self) -> int:
        """The process's peak resident set so far, in bytes (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")


@asynccontextmanager
async def gateway_process(config: Config) -> AsyncIterator[GatewayProcess]:
    """`relayd serve` in a subprocess until the block ends (SIGTERM, or SIGKILL if it hangs).

    The block may kill it itself (`proc.send_signal(signal.SIGKILL)`) to test a crash.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd.cli",
        "serve",
        "--config",
        str(config.path),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    stdout = proc.stdout
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    events: list[dict[str, Any]] = []

    async def read_log() -> None:
        # Read to the end, so a chatty gateway never blocks on a full pipe.
        while line := await stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                events.append(event)
                if event.get("event") == "gateway_ready" and not ready.done():
                    ready.set_result(int(event["port"]))
        if not ready.done():
            ready.set_exception(AssertionError("relayd exited before it was ready"))

    reading = asyncio.create_task(read_log())
    try:
        async with asyncio.timeout(TIMEOUT):
            port = await ready
        yield GatewayProcess(proc, port, events)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        async with asyncio.timeout(TIMEOUT):
            await reading
