"""A real redis-server per test, on a unix socket, that tests can stop, freeze and restart empty;
and the region's gateway configs (`gateway_pki`, `cluster_config`).

Start-up waits for the server's own "ready to accept connections" line, with a
deadline; nothing sleeps. Persistence is off (`--save ''`, `--appendonly no`), so
every restart is a restart with an empty dataset, as after a crash of a cache-only Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
from redis.asyncio import Redis

from relayd.cluster.store import ClusterStore
from relayd.config import Config, load_config

from ..conftest import AUDIENCE, ISSUER, toml_value
from .processes import free_port

START_TIMEOUT = 10.0


class RedisServer:
    """One redis-server process; `url` stays the same across restarts."""

    def __init__(self, directory: Path) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(self.binary).exists():
            pytest.fail("redis-server is not installed; `make test` installs it")
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}?db=0"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.log: list[str] = []

    async def start(self, *options: str) -> None:
        """Start the server (`options`: more redis-server arguments) once it accepts connections."""
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--loglevel", "notice",
            *options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    line = (await self.proc.stdout.readline()).decode(errors="replace")
                    if not line:
                        pytest.fail("redis-server exited at start:\n" + "".join(self.log))
                    self.log.append(line)
                    if "ready to accept connections" in line.lower():
                        break
        except BaseException:
            await self.stop()  # never leave a half-started server behind
            raise
        self._drain = asyncio.create_task(self._drain_output(self.proc.stdout))

    async def _drain_output(self, stream: asyncio.StreamReader) -> None:
        """Keep reading the log so a full pipe never blocks the server."""
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self) -> None:
        """Kill the server (SIGKILL: its data is gone) and wait for it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        await self.proc.wait()
        if self._drain is not None:
            await self._drain
        self.proc = None
        self.socket.unlink(missing_ok=True)

    async def restart_empty(self, *options: str) -> None:
        """Kill and start again: same socket, empty dataset, empty script cache."""
        await self.stop()
        await self.start(*options)

    async def command(self, *args: str) -> object:
        """One command on a connection of its own (ACL SETUSER, ...)."""
        client = Redis.from_url(self.url)
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()

    def freeze(self) -> None:
        """SIGSTOP: the socket accepts but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RedisServer]:
    """A running redis-server, killed at the end of the test.

    The directory comes from tmp_path_factory, so the socket path stays short
    (unix socket paths are limited to 107 bytes) whatever the test is called.
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


StoreFactory = Callable[..., ClusterStore]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[StoreFactory]:
    """Build stores ("gateways") on the test server; all are closed at the end."""
    stores: list[ClusterStore] = []

    def make(gateway_id: str = "gw-1", **kwargs: object) -> ClusterStore:
        options: dict[str, object] = {"prefix": "relayd:{test}:", "lease_ttl": 3.0}
        options.update(kwargs)
        store = ClusterStore(redis_server.url, gateway_id=gateway_id, **options)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
def gateway_pki(tmp_path: Path) -> dict[str, Path]:
    """A CA whose server certificates carry a CN and both EKUs (gateways present them)."""
    ca = trustme.CA()
    d = tmp_path / "pki"
    d.mkdir()
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="gw.test")
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    ca.cert_pem.write_to_path(str(d / "ca.crt"))
    (d / "hs256.key").write_text("x" * 64)
    return {
        "cert": d / "server.crt",
        "key": d / "server.key",
        "ca": d / "ca.crt",
        "secret": d / "hs256.key",
    }


@pytest.fixture
def cluster_config(
    tmp_path: Path, gateway_pki: dict[str, Path], redis_server: RedisServer
) -> Callable[..., Config]:
    """`cluster_config("gw-1", far_end_port)`: a gateway of the test region, with vm-a
    (`**vm`: more of its keys) and the VMs named in `more_vms`, all on that far end."""

    def write(
        gateway_id: str,
        serial_port: int,
        auth: dict[str, Any] | None = None,
        gateway: dict[str, Any] | None = None,
        cluster: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        more_vms: Sequence[str] = (),
        **vm: Any,
    ) -> Config:
        port = free_port("127.0.0.1")
        d = tmp_path / gateway_id
        d.mkdir(exist_ok=True)
        values = {
            "[gateway]": {
                "region": "test",
                "listen": f"127.0.0.1:{port}",
                "health_listen": "127.0.0.1:0",
                "state_dir": str(d / "state"),
                "drain_seconds": 0.2,
                **(gateway or {}),
            },
            "[tls]": {"cert": gateway_pki["cert"], "key": gateway_pki["key"]},
            "[auth]": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "hs256_secret_file": gateway_pki["secret"],
                **(auth or {}),
            },
            "[cluster]": {
                "redis": redis_server.url,
                "gateway_id": gateway_id,
                "advertise": f"127.0.0.1:{port}",
                "peer_ca": gateway_pki["ca"],
                "lease_ttl": "1s",
                **(cluster or {}),
            },
            "[limits]": limits or {},
        }
        lines: list[str] = []
        for section, items in values.items():
            lines.append(section)
            lines += [f"{k} = {toml_value(v)}" for k, v in items.items()]
        lines += [
            "[[subscriptions]]",
            'id = "sub-1"',
            "[[vms]]",
            'id = "vm-a"',
            'subscription = "sub-1"',
            f'serial = "tcp://127.0.0.1:{serial_port}"',
        ]
        lines += [f"{k} = {toml_value(v)}" for k, v in vm.items()]
        for more in more_vms:  # more VMs on the same far end, with the defaults
            lines += [
                "[[vms]]",
                f'id = "{more}"',
                'subscription = "sub-1"',
                f'serial = "tcp://127.0.0.1:{serial_port}"',
            ]
        for principal, role in (
            ("user:alice", "contributor"),
            ("user:bob", "contributor"),
            ("user:olga", "owner"),
        ):
            lines += [
                "[[role_assignments]]",
                f'principal = "{principal}"',
                f'role = "{role}"',
                'scope = "/subscriptions/sub-1"',
            ]
        path = d / "relayd.toml"
        path.write_text("\n".join(lines) + "\n")
        return load_config(path)

    return write
