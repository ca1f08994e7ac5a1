"""A region whose Redis takes the gateways only: TLS with the region's own CA and client
certificates, the ACL user docs/operations.md ("Redis access") gives, its password in a file.

Whoever can write the region's keys decides who owns each console, so the documented
ACL line is the tested one: it is read from the docs, and Redis must deny nothing a
region does (claims, a relayed session, the shared log, a switch, a ticket).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from websockets.exceptions import InvalidStatus

from relayd.cluster.store import ClusterStore, RedisTarget, key_prefix
from relayd.config import Config

from ..conftest import TIMEOUT, FarEnd
from .conftest import RedisServer
from .processes import free_port
from .test_gateways import _mint, api, console, owner_and_relay, serving, until

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"


def documented_acl(region: str) -> list[str]:
    """The ACL rules docs/operations.md gives a region's user, for `region`."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    found = re.search(r"^\s*user relayd on >PASSWORD (.+)$", text, re.MULTILINE)
    assert found is not None, "docs/operations.md lost its ACL line"
    return found.group(1).replace("{eu-west-1}", "{" + region + "}").split()


@pytest.fixture
def redis_pki(tmp_path: Path) -> dict[str, Path]:
    """The region's Redis CA, Redis's certificate, and a client certificate it issued."""
    ca = trustme.CA()
    d = tmp_path / "redis-pki"
    d.mkdir()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("relayd-gateway")
    files = {
        "ca": d / "ca.crt",
        "server_cert": d / "redis.crt",
        "server_key": d / "redis.key",
        "client_cert": d / "client.crt",
        "client_key": d / "client.key",
        "password": d / "password",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["password"].write_text(PASSWORD + "\n")
    return files


async def tls_redis(redis_server: RedisServer, pki: dict[str, Path]) -> int:
    """Restart the test Redis with a TLS port that asks for client certificates and the
    documented ACL user; returns the port. (Its unix socket stays, for the test's reads.)"""
    port = free_port("127.0.0.1")
    await redis_server.restart_empty(
        "--tls-port", str(port),
        "--tls-cert-file", str(pki["server_cert"]),
        "--tls-key-file", str(pki["server_key"]),
        "--tls-ca-cert-file", str(pki["ca"]),
        "--tls-auth-clients", "yes",
        "--user", "relayd", "on", f">{PASSWORD}", *documented_acl("test"),
    )  # fmt: skip
    return port


def access(port: int, pki: dict[str, Path], **changes: object) -> dict[str, object]:
    """The [cluster] keys that reach that Redis as the region's user."""
    return {
        "redis": f"rediss://relayd@localhost:{port}/0",
        "redis_ca": pki["ca"],
        "redis_cert": pki["client_cert"],
        "redis_key": pki["client_key"],
        "redis_password_file": pki["password"],
        **changes,
    }


async def test_a_region_runs_on_tls_redis_under_the_documented_acl_user(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
    redis_pki: dict[str, Path],
) -> None:
    """Everything a region does goes through TLS (a private CA both ways) as a user kept
    to the region's keys and channel, and Redis denies none of it."""
    port = await tls_redis(redis_server, redis_pki)
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    cluster = access(port, redis_pki)
    async with owner_and_relay(cluster_config, far_end, cluster=cluster) as (owner, other):
        async with console(other, ctx, mint("alice")) as c:
            await c.send(b"ping\r")
            await far_end.wait_received(lambda got: b"ping\r" in got)
            await far_end.send(b"pong over tls redis\r\n")
            await c.expect(b"pong over tls redis")
        node = owner.cluster.node if owner.cluster is not None else None
        assert node is not None
        await until(lambda: not node.outboxes["vm-a"].chunks, owner)  # appended
        status, body = await api(other, "GET", "/v1/vms/vm-a/console-log", ctx, mint("alice"))
        assert status == 200
        assert b"pong over tls redis" in body
        status, body = await api(owner, "POST", "/v1/vms/vm-a/console/tickets", ctx, mint("bob"))
        assert status == 201
        async with console(other, ctx, "", f"ticket={json.loads(body)['ticket']}") as c:
            assert c.hello["vm"] == "vm-a"
        status, _ = await api(
            other, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), b'{"enabled": false}'
        )
        assert status == 200
        await until(lambda: node.get("vms", "vm-a") is False, owner)
        with pytest.raises(InvalidStatus) as refused:
            async with console(owner, ctx, mint("alice")):
                pass
        assert refused.value.response.status_code == 403
    assert await redis_server.command("ACL", "LOG") == []


async def test_a_reload_reads_a_rotated_redis_password_and_reconnects_with_it(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
    redis_pki: dict[str, Path],
) -> None:
    """The rotation docs/operations.md gives: the user gets the new password, the file is
    rewritten, the gateway reloads, the old password goes (and with it every connection
    made with it). The gateway goes on with the new one: it is not cut off from Redis, and
    its switch watcher hears the region; no connection tried the old password after the
    reload (the watcher's used to, until its next message or ping)."""
    port = await tls_redis(redis_server, redis_pki)
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    config = cluster_config("gw-1", far_end.port, cluster=access(port, redis_pki))
    async with serving(config) as gateway:
        assert gateway.cluster is not None
        node = gateway.cluster.node
        await until(lambda: "vm-a" in gateway.hubs, gateway)
        await redis_server.command("ACL", "SETUSER", "relayd", ">rotated password")
        redis_pki["password"].write_text("rotated password\n")
        assert await gateway.reload()
        await redis_server.command("ACL", "SETUSER", "relayd", f"<{PASSWORD}")
        await redis_server.command("CLIENT", "KILL", "USER", "relayd")
        await node.next_round()
        await node.next_round()
        assert node.redis_up
        status, _ = await api(
            gateway, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), b'{"enabled": false}'
        )
        assert status == 200
        assert node.get("vms", "vm-a") is False
        target = RedisTarget(
            f"rediss://relayd@localhost:{port}/0",
            redis_pki["ca"],
            redis_pki["client_cert"],
            redis_pki["client_key"],
            "rotated password",
        )
        other = ClusterStore(target, gateway_id="gw-x", prefix=key_prefix("test"))
        try:
            await other.set_switch("vms", "vm-a", True)  # heard only through the watcher
        finally:
            await other.close()
        await until(lambda: node.get("vms", "vm-a") is True, gateway)
    assert await redis_server.command("ACL", "LOG") == []


async def test_a_reload_that_moves_redis_takes_the_switch_watcher_along(
    cluster_config: Callable[..., Config],
    far_end: FarEnd,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`redis` changed and the gateway reloaded (Redis moved, the old one still up): its
    subscription moves too. It stayed on the old server, reconnecting there as the old
    client, so a console disabled on the new one stayed open on this gateway."""
    moved = RedisServer(tmp_path_factory.mktemp("redis-moved"))
    await moved.start()
    other = ClusterStore(moved.url, gateway_id="gw-x", prefix=key_prefix("test"))
    channel = key_prefix("test") + "switches"
    try:
        config = cluster_config("gw-1", far_end.port)
        async with serving(config) as gateway:
            assert gateway.cluster is not None
            node = gateway.cluster.node
            await until(lambda: "vm-a" in gateway.hubs, gateway)
            config.path.write_text(config.path.read_text().replace(redis_server.url, moved.url))
            assert await gateway.reload()
            async with asyncio.timeout(TIMEOUT):
                while (await other._command("PUBSUB", "NUMSUB", channel))[1] < 1:
                    await node.next_round()
            await other.set_switch("vms", "vm-a", False)
            await until(lambda: node.get("vms", "vm-a") is False, gateway)
    finally:
        await other.close()
        await moved.stop()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("wrong_ca", "certificate does not verify (against redis_ca"),
        ("no_client_cert", "wants a client certificate it trusts (redis_cert"),
        ("wrong_password", "Redis refused the user or password"),
    ],
)
async def test_check_config_says_why_the_tls_redis_refuses_the_gateway(
    cluster_config: Callable[..., Config],
    far_end: FarEnd,
    redis_server: RedisServer,
    redis_pki: dict[str, Path],
    tmp_path: Path,
    change: str,
    words: str,
) -> None:
    """A Redis the gateway cannot prove itself to, or that it cannot trust, is named in
    `check-config`'s answer with what to fix; the password is never printed."""
    port = await tls_redis(redis_server, redis_pki)
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    wrong_password = tmp_path / "wrong-password"
    wrong_password.write_text("hunter2\n")
    changes: dict[str, object] = {
        "wrong_ca": {"redis_ca": other_ca},
        "no_client_cert": {},
        "wrong_password": {"redis_password_file": wrong_password},
    }[change]  # type: ignore[assignment]
    cluster = access(port, redis_pki, **changes)
    if change == "no_client_cert":
        del cluster["redis_cert"], cluster["redis_key"]
    config = cluster_config("gw-1", far_end.port, cluster=cluster)
    code, out = await check_config(config)
    assert code != 0, out
    assert "cluster.redis" in out
    assert words in out, out
    assert PASSWORD not in out
    assert "hunter2" not in out


async def check_config(config: Config) -> tuple[int, str]:
    """`relayd check-config` of this tree (not whichever one the venv's script names)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd.cli", "check-config", str(config.path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return proc.returncode or 0, out.decode()
