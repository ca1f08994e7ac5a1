"""Two gateways in one region, in this process, on a real redis-server and real TLS.

The same VM list on both: exactly one owns each VM's port; a console opened on
the other gateway is relayed to the owner and behaves the same; a ticket from
one is redeemed once on the other; a switch set on one closes sessions on both;
the console log reads the same everywhere; and when the owner stops, the other
takes the VM over and a client resumes by offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import generate_latest
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relayd import control
from relayd.app import PORTS_TRIED_TIMEOUT, Gateway
from relayd.auth import issue_token
from relayd.cluster.forwarding import ForwardedSession, encode_forwarded_request
from relayd.cluster.ownership import Lease, preferred_owner, ranking
from relayd.cluster.store import ClusterStore, ClusterUnavailableError, key_prefix
from relayd.config import Config, load_config
from relayd.errors import ConfigError
from relayd.health import make_registry

from ..conftest import (
    AUDIENCE,
    ISSUER,
    TIMEOUT,
    Console,
    FarEnd,
    GatewayProcess,
    gateway_process,
    http_request,
    https_exchange,
    refused_upgrade,
    toml_value,
)
from ..crl import crl_pem
from ..logevents import LogWaiter
from .conftest import RedisServer
from .processes import SerialEnd, free_port

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Gateway]:
    gateway = Gateway(config)
    task = asyncio.create_task(gateway.serve())
    ready = asyncio.create_task(gateway.ready.wait())
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield gateway
    finally:
        ready.cancel()
        gateway.stop()
        await task


async def until(predicate: Callable[[], bool], *gateways: Gateway) -> None:
    """Wait (bounded) for a state the gateways reach in their ownership rounds."""
    nodes = [g.cluster.node for g in gateways if g.cluster is not None]
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            rounds = [asyncio.ensure_future(node.next_round()) for node in nodes]
            try:
                await asyncio.wait(rounds, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for r in rounds:
                    r.cancel()


def _owner(*gateways: Gateway) -> tuple[Gateway, Gateway]:
    owners = [g for g in gateways if "vm-a" in g.hubs]
    assert len(owners) == 1, [g.hubs for g in gateways]
    others = [g for g in gateways if g is not owners[0]]
    return owners[0], others[0]


@contextlib.asynccontextmanager
async def owner_and_relay(
    cluster_config: Callable[..., Config], far_end: FarEnd, **config: Any
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateways of a region: (vm-a's owner, the other), once the other routes to it."""
    async with (
        serving(cluster_config("gw-1", far_end.port, **config)) as g1,
        serving(cluster_config("gw-2", far_end.port, **config)) as g2,
    ):
        await until(lambda: ("vm-a" in g1.hubs) != ("vm-a" in g2.hubs), g1, g2)
        owner, other = _owner(g1, g2)
        await until(
            lambda: other.cluster is not None and other.cluster.owner_of("vm-a") is not None, other
        )
        yield owner, other


@contextlib.asynccontextmanager
async def killable_owner_and_relay(
    cluster_config: Callable[..., Config], far_end: FarEnd
) -> AsyncIterator[tuple[GatewayProcess, Gateway]]:
    """vm-a's owner as a process the test may kill, and the other gateway in this one, once
    it routes to the owner."""
    owner_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
    relay_id = "gw-2" if owner_id == "gw-1" else "gw-1"
    async with (
        gateway_process(cluster_config(owner_id, far_end.port)) as proc,
        serving(cluster_config(relay_id, far_end.port)) as relaying,
    ):
        cluster = relaying.cluster
        assert cluster is not None
        await until(lambda: (cluster.owner_of("vm-a") or ("",))[0] == owner_id, relaying)
        yield proc, relaying


@contextlib.asynccontextmanager
async def relaying_pair(
    cluster_config: Callable[..., Config], far_end: FarEnd, **config: Any
) -> AsyncIterator[Gateway]:
    """Two gateways of a region; yields the one that does NOT own vm-a, once it routes there."""
    async with owner_and_relay(cluster_config, far_end, **config) as (_, other):
        yield other


@contextlib.asynccontextmanager
async def console(
    gateway: Gateway,
    ctx: ssl.SSLContext,
    token: str,
    query: str = "",
    *,
    source: str = "",
    vm: str = "vm-a",
) -> AsyncIterator[Console]:
    """`vm`'s console on `gateway`, its hello read; `source`: the client's own address."""
    url = f"wss://localhost:{gateway.tls_port}/v1/vms/{vm}/console" + (f"?{query}" if query else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(
        url,
        ssl=ctx,
        subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
        additional_headers=headers,
        open_timeout=TIMEOUT,
        max_size=None,
        local_addr=(source, 0) if source else None,
    ) as ws:
        c = Console(ws)
        c.hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert c.hello["type"] == "hello"
        yield c


async def api(
    gateway: Gateway, method: str, path: str, ctx: ssl.SSLContext, bearer: str, body: bytes = b""
) -> tuple[int, bytes]:
    status, _, data = await https_exchange(
        gateway.tls_port, ctx, http_request(method, path, bearer=bearer, body=body)
    )
    return status, data


def _mint(gateway_pki: dict[str, Path]) -> Callable[..., str]:
    secret = gateway_pki["secret"].read_bytes().strip()
    return lambda sub, **kw: issue_token(secret, sub=sub, issuer=ISSUER, audience=AUDIENCE, **kw)


async def test_two_gateways_one_owner_and_a_relayed_session_types_and_reads(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """One gateway holds the port; a console on the other is relayed to it, both ways."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with relaying_pair(cluster_config, far_end) as other:
        async with console(other, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            await c.send(b"ping\r")
            await far_end.wait_received(lambda got: b"ping\r" in got)
            await far_end.send(b"pong from the vm\r\n")
            await c.expect(b"pong from the vm")
        assert "vm-a" not in other.hubs  # the relay never opened the port


async def test_a_relayed_session_whose_peer_link_is_reset_is_linked_again(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The peer link under a relayed session is reset (between the gateways; both live and
    the owner keeps the VM): the client gets port_down, then, once the region still names
    the same owner a lease period later, port_up from a new link to it, and types on. It
    was closed with 1001 after waiting for a new owner that never came."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        relaying_pair(cluster_config, far_end) as other,
        console(other, ctx, mint("alice")) as c,
    ):
        (relayed,) = [conn for conn in other.connections if conn.relaying]
        link = relayed._relay._owner if relayed._relay is not None else None
        assert link is not None
        link.transport.abort()  # a reset between the gateways
        await c.control(type="notice", event="port_down")
        await c.control(type="notice", event="port_up")
        await c.send(b"after the reset\r")
        await far_end.wait_received(lambda got: b"after the reset\r" in got)
        await far_end.send(b"still here\r\n")
        await c.expect(b"still here")


async def test_ticket_from_one_gateway_is_redeemed_once_on_the_other(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """Tickets are the region's: issued on one gateway, the first redemption anywhere wins."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        serving(cluster_config("gw-1", far_end.port)) as g1,
        serving(cluster_config("gw-2", far_end.port)) as g2,
    ):
        await until(lambda: all(g.cluster and g.cluster.owner_of("vm-a") for g in (g1, g2)), g1, g2)
        status, body = await api(g1, "POST", "/v1/vms/vm-a/console/tickets", ctx, mint("alice"))
        assert status == 201
        ticket = json.loads(body)["ticket"]
        async with console(g2, ctx, "", f"ticket={ticket}") as c:
            assert c.hello["vm"] == "vm-a"
        with pytest.raises(InvalidStatus) as refused:
            async with console(g1, ctx, "", f"ticket={ticket}"):
                pass
        assert refused.value.response.status_code == 401


async def test_a_switch_set_on_one_gateway_closes_sessions_on_every_gateway(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """Disabling a console anywhere ends its sessions everywhere with 4009."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        serving(cluster_config("gw-1", far_end.port)) as g1,
        serving(cluster_config("gw-2", far_end.port)) as g2,
    ):
        await until(lambda: all(g.cluster and g.cluster.owner_of("vm-a") for g in (g1, g2)), g1, g2)
        async with (
            console(g1, ctx, mint("alice"), "mode=spectate") as a,
            console(g2, ctx, mint("bob"), "mode=spectate") as b,
        ):
            status, _ = await api(
                g2, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), b'{"enabled": false}'
            )
            assert status == 200
            assert (await a.closed())[0] == 4009
            assert (await b.closed())[0] == 4009


async def test_owner_stops_the_other_takes_over_and_a_client_resumes_by_offset(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """Failover: the survivor owns the VM, the log continues, `?from=` finds the bytes."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with contextlib.AsyncExitStack() as stack:
        g1 = await stack.enter_async_context(serving(cluster_config("gw-1", far_end.port)))
        g2 = await stack.enter_async_context(serving(cluster_config("gw-2", far_end.port)))
        await until(lambda: all(g.cluster and g.cluster.owner_of("vm-a") for g in (g1, g2)), g1, g2)
        owner, survivor = _owner(g1, g2)
        async with console(owner, ctx, mint("alice")) as c:
            await far_end.send(b"before failover\r\n")
            await c.expect(b"before failover")
            offset = c.hello["offset"] + len(c.output)
        owner.stop()
        await until(lambda: "vm-a" in survivor.hubs, survivor)
        status, body = await api(
            survivor, "GET", "/v1/vms/vm-a/console-log?from=0", ctx, mint("alice")
        )
        assert status == 200
        assert b"before failover" in body
        async with console(survivor, ctx, mint("alice"), f"from={offset}") as c:
            assert c.hello["offset"] >= offset
            await far_end.send(b"after failover\r\n")
            await c.expect(b"after failover")


async def test_switches_survive_a_redis_restart_with_an_empty_dataset(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """A console turned off stays off when Redis comes back empty: the gateways write it back."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        serving(cluster_config("gw-1", far_end.port)) as g1,
        serving(cluster_config("gw-2", far_end.port)) as g2,
    ):
        await until(lambda: all(g.cluster and g.cluster.owner_of("vm-a") for g in (g1, g2)), g1, g2)
        status, _ = await api(
            g1, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), b'{"enabled": false}'
        )
        assert status == 200
        await redis_server.restart_empty()
        assert g1.cluster is not None
        store = g1.cluster.store

        async def restored() -> bool:
            try:
                return (await store.all_switches())["vms"].get("vm-a") is False
            except ClusterUnavailableError:  # Redis may still be coming back
                return False

        async with asyncio.timeout(TIMEOUT):
            while not await restored():
                await g1.cluster.node.next_round()
        with pytest.raises(InvalidStatus) as refused:
            async with console(g2, ctx, mint("alice")):
                pass
        assert refused.value.response.status_code == 403


async def test_after_redis_loses_its_data_a_successor_never_reuses_offsets_clients_hold(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """Redis comes back empty: the owner puts back its reservation past what its clients
    saw, so a successor (should the owner die) starts there, not at offset 0."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        async with console(owner, ctx, mint("alice")) as c:
            await far_end.send(b"seen by a client\r\n")
            await c.expect(b"seen by a client\r\n")
            held = c.hello["offset"] - c.hello["replay"] + len(c.output)
        await redis_server.restart_empty()
        assert other.cluster is not None
        store = other.cluster.store

        async def resume_point() -> int:
            try:
                return await store.resume_point("vm-a")
            except ClusterUnavailableError:  # Redis may still be coming back
                return -1

        async with asyncio.timeout(TIMEOUT):
            while await resume_point() < held:
                await other.cluster.node.next_round()


async def test_offsets_are_reserved_again_when_the_round_that_noticed_the_loss_failed(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """Redis comes back empty and the round that notices it fails before the owner's
    reservation is back (here Redis refuses writes to the log's marks): a later round
    puts it back, so a successor still never starts below what the clients hold."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        assert owner.cluster is not None
        assert other.cluster is not None
        node = owner.cluster.node
        async with console(owner, ctx, mint("alice")) as c:
            await far_end.send(b"seen by a client\r\n")
            await c.expect(b"seen by a client\r\n")
            held = c.hello["offset"] - c.hello["replay"] + len(c.output)
        # Stored before Redis goes: an append after it would move the marks by itself.
        await until(lambda: not node.outboxes["vm-a"].chunks, owner)
        before = node._dataset
        # Every key may be read and written but the log's marks (`logmeta`): read only.
        prefix = "relayd:{test}:"
        await redis_server.restart_empty(
            "--user", "default", "on", "nopass", "&*", "+@all", "%R~*",
            f"~{prefix}[^l]*", f"~{prefix}lease:*", f"~{prefix}log:*",
        )  # fmt: skip
        # The round that noticed the loss has ended (failed on the marks) before they are
        # writable again.
        await until(lambda: node._dataset not in (None, before), owner)
        await node.next_round()
        assert "vm-a" in owner.hubs
        denied = await redis_server.command("ACL", "LOG")
        assert isinstance(denied, list)
        assert f"{prefix}logmeta:vm-a".encode() in {entry[b"object"] for entry in denied}
        await redis_server.command("ACL", "SETUSER", "default", "allkeys")
        store = other.cluster.store
        async with asyncio.timeout(TIMEOUT):
            while await store.resume_point("vm-a") < held:
                await node.next_round()


async def test_a_draining_gateway_alone_notices_redis_losing_its_data(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """The last gateway drains (no heartbeat any more) while a client lingers, and Redis
    comes back empty: it still notices, and puts back its reservation past what the client
    saw, so whoever owns the VM next never starts at offset 0."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    config = cluster_config("gw-1", far_end.port, gateway={"drain_seconds": 30})
    async with serving(config) as gateway:
        await until(lambda: "vm-a" in gateway.hubs, gateway)
        async with console(gateway, ctx, mint("alice")) as c:
            await _drain_alone_through_data_loss(gateway, c, far_end, redis_server)


async def _drain_alone_through_data_loss(
    gateway: Gateway, c: Console, far_end: FarEnd, redis_server: RedisServer
) -> None:
    assert gateway.cluster is not None
    node, store = gateway.cluster.node, gateway.cluster.store
    await far_end.send(b"seen by a client\r\n")
    await c.expect(b"seen by a client\r\n")
    held = c.hello["offset"] - c.hello["replay"] + len(c.output)
    await until(lambda: not node.outboxes["vm-a"].chunks, gateway)
    gateway.stop()
    await c.control(type="notice", event="shutting_down")
    await until(lambda: node.leaving, gateway)
    await node.next_round()  # a round without the heartbeat
    await redis_server.restart_empty()

    async def resume_point() -> int:
        try:
            return await store.resume_point("vm-a")
        except ClusterUnavailableError:  # Redis may still be coming back
            return -1

    async with asyncio.timeout(TIMEOUT):
        while await resume_point() < held:
            await node.next_round()
    assert "vm-a" in gateway.hubs  # alone, it holds on while it drains


async def test_only_gateways_may_ask_who_owns_the_vms(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The owners question is the region's: a user's connection gets 403, whatever it
    sends; a gateway gets the last round's reading, or 400 for a malformed question."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    question = b'{"vms": ["vm-a", "vm-x"]}'
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        assert other.cluster is not None
        assert owner.cluster is not None
        status, body = await api(owner, "POST", "/v1/cluster/owners", ctx, mint("olga"), question)
        assert status == 403, body
        assert (await api(owner, "GET", "/v1/cluster/owners", ctx, mint("olga")))[0] == 405
        peer_ctx = other.cluster.peer_ssl
        request = http_request("POST", "/v1/cluster/owners", bearer="", body=question)
        status, _, body = await https_exchange(owner.tls_port, peer_ctx, request)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["gateway"] == owner.cluster.gateway_id
        assert answer["owners"] == {"vm-a": owner.cluster.gateway_id, "vm-x": None}
        assert 0 <= answer["seen_ago"] < 5
        assert set(answer["live"]) == {"gw-1", "gw-2"}
        bad = http_request("POST", "/v1/cluster/owners", bearer="", body=b'{"vms": 1}')
        assert (await https_exchange(owner.tls_port, peer_ctx, bad))[0] == 400


async def test_a_client_sending_while_its_owner_is_reached_is_read_up_to_a_cap(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """The gateway waits (seconds, at worst) for the owner's answer to a forwarded upgrade;
    a client that keeps sending meanwhile is read only up to a cap: the rest stays in the
    client's socket, not in the gateway's memory. Here the owner never answers TLS."""
    given_up = asyncio.Event()
    stalled: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the gateway gives up on the handshake
        given_up.set()

    hole = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    address = f"127.0.0.1:{hole.sockets[0].getsockname()[1]}"
    owner = ClusterStore(redis_server.url, gateway_id="gw-9", prefix="relayd:{test}:", lease_ttl=60)
    sent = 64 << 20
    try:
        await owner.heartbeat(address)
        assert await owner.claim("vm-a") is not None
        config = cluster_config("gw-1", far_end.port, gateway={"handshake_timeout": "2s"})
        async with serving(config) as gateway:
            cluster = gateway.cluster
            assert cluster is not None
            await until(lambda: cluster.owner_of("vm-a") == ("gw-9", address), gateway)
            ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
            _, writer = await asyncio.open_connection(
                "127.0.0.1", gateway.tls_port, ssl=ctx, server_hostname="localhost"
            )
            upgrade = http_request(
                "GET", "/v1/vms/vm-a/console", bearer=_mint(gateway_pki)("alice")
            )
            writer.write(
                upgrade.replace(
                    b"\r\n\r\n",
                    b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Protocol: relayd.console.v1\r\n\r\n",
                )
                + bytes(sent)
            )
            # 2 s into the wait (the first link's deadline; the gateway waits on for
            # another owner), everything the client sent would long be read, were it read.
            await asyncio.wait_for(given_up.wait(), TIMEOUT)
            (conn,) = gateway.connections
            unread, _ = conn._h11.trailing_data
            assert len(unread) < 1 << 20, f"{len(unread)} bytes read and held while waiting"
            writer.transport.abort()
    finally:
        await owner.close()
        for w in stalled:
            w.transport.abort()
        hole.close()


@pytest.fixture
async def serial_end() -> AsyncIterator[SerialEnd]:
    """vm-a's port as QEMU serves it: one gateway at a time, the next one waiting."""
    end = SerialEnd("vm-a")
    await end.start()
    try:
        yield end
    finally:
        await end.close()


async def test_an_owner_cut_off_from_redis_alone_lets_go_when_a_peer_says_it_was_deposed(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    serial_end: SerialEnd,
    redis_server: RedisServer,
) -> None:
    """Only the owner loses Redis (its ACL user is switched off): the other gateway sees its
    lease lapse and claims vm-a, and its connection waits behind the owner's at the port.
    The owner asks the other gateway, learns it was deposed, and closes its port: the new
    owner gets the port, and the owner's own client follows the console there."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    owner_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
    other_id = "gw-2" if owner_id == "gw-1" else "gw-1"
    await redis_server.command("ACL", "SETUSER", "cut", "on", ">pw", "~*", "&*", "+@all")
    cut_url = redis_server.url.replace("unix://", "unix://cut:pw@")
    async with (
        serving(cluster_config(owner_id, serial_end.port, cluster={"redis": cut_url})) as owner,
        serving(cluster_config(other_id, serial_end.port)) as other,
    ):
        await until(lambda: "vm-a" in owner.hubs, owner, other)
        assert other.cluster is not None
        assert owner.cluster is not None
        cluster = other.cluster
        await until(lambda: cluster.owner_of("vm-a") is not None, other)
        async with console(owner, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            await c.send(b"before\r")
            await serial_end.wait_received(b"before\r", TIMEOUT)
            try:
                await redis_server.command("ACL", "SETUSER", "cut", "off")
                await redis_server.command("CLIENT", "KILL", "USER", "cut")
                await until(lambda: "vm-a" in other.hubs, other)
                await c.control(type="notice", event="port_down")
                await c.control(type="notice", event="port_up")
                await c.send(b"after\r")
                await serial_end.wait_received(b"after\r", TIMEOUT)
                assert "vm-a" not in owner.hubs
                assert owner.cluster.node.stats.deposed_by_peers == 1
                _, metrics = await _health(owner, "/metrics")
                assert b"relayd_cluster_deposed_by_peers_total 1.0" in metrics
                assert serial_end.serves == 2
                assert serial_end.connections == 1
            finally:
                await redis_server.command("ACL", "SETUSER", "cut", "on")


async def _health(gateway: Gateway, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.health_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_and_metrics_say_redis_is_down_and_readyz_stays_up(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """A Redis outage shows in /healthz and /metrics; /readyz stays 200; the port stays open."""
    async with serving(cluster_config("gw-1", far_end.port)) as g1:
        await until(lambda: "vm-a" in g1.hubs, g1)
        _, metrics = await _health(g1, "/metrics")
        assert b"relayd_cluster_owned_vms 1.0" in metrics
        assert b"relayd_cluster_redis_up 1.0" in metrics
        assert b"relayd_cluster_news_rounds_total 0.0" in metrics  # alone: nobody announced
        assert json.loads((await _health(g1, "/healthz"))[1])["redis"] == "up"
        await redis_server.stop()
        assert g1.cluster is not None
        await until(lambda: g1.cluster is not None and not g1.cluster.node.redis_up, g1)
        status, body = await _health(g1, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "degraded", "redis": "down"})
        assert (await _health(g1, "/readyz"))[0] == 200
        _, metrics = await _health(g1, "/metrics")
        assert b"relayd_cluster_redis_up 0.0" in metrics
        assert b'relayd_cluster_redis_errors_total{call="round"}' in metrics
        assert "vm-a" in g1.hubs  # no VM changes owner during an outage
        assert g1.hubs["vm-a"].port_up


async def test_a_gateway_started_without_redis_is_not_ready_until_it_read_the_region(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """Started while Redis is down, a gateway knows no switch, owns no VM and knows no owner:
    it refuses every console, so /readyz is 503 (the balancer sends nobody there). Once it
    has read the region it is ready, and a later outage (shared by every gateway) keeps it so.
    """
    await redis_server.stop()
    gateway = Gateway(cluster_config("gw-1", far_end.port))
    task = asyncio.create_task(gateway.serve())
    try:
        # It serves after waiting for Redis (app.PORTS_TRIED_TIMEOUT), with Redis still away.
        ready = asyncio.ensure_future(gateway.ready.wait())
        async with asyncio.timeout(PORTS_TRIED_TIMEOUT + TIMEOUT):
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        status, body = await _health(gateway, "/readyz")
        assert status == 503, body
        assert "cluster state not read from Redis yet" in json.loads(body)["reasons"]
        assert json.loads((await _health(gateway, "/healthz"))[1])["redis"] == "down"
        await redis_server.start()
        node = gateway.cluster.node if gateway.cluster is not None else None
        assert node is not None
        await until(lambda: node.redis_up and node.switches_loaded, gateway)
        status, body = await _health(gateway, "/readyz")
        assert (status, json.loads(body)["reasons"]) == (200, []), body
        await redis_server.stop()
        await until(lambda: not node.redis_up, gateway)
        status, body = await _health(gateway, "/readyz")
        assert (status, json.loads(body)["reasons"]) == (200, []), body
    finally:
        gateway.stop()
        await task


async def test_a_gateway_waiting_for_redis_at_start_answers_its_health_checks(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """While a starting gateway waits for Redis (up to app.PORTS_TRIED_TIMEOUT), its health
    listener answers: /healthz says Redis is down, /readyz says why it is not ready. A
    monitor that finds the port closed would report the gateway dead instead."""
    await redis_server.stop()
    waiter = LogWaiter()
    with capture_logs(processors=[waiter]):
        gateway = Gateway(cluster_config("gw-1", far_end.port))
        task = asyncio.create_task(gateway.serve())
        try:
            await waiter.wait_for(lambda: bool(waiter.named("cluster_waiting_for_redis")))
            assert not task.done()
            status, body = await _health(gateway, "/healthz")
            assert (status, json.loads(body)["redis"]) == (200, "down"), body
            status, body = await _health(gateway, "/readyz")
            assert status == 503, body
            assert "listener not bound" in json.loads(body)["reasons"]
            await redis_server.start()
            async with asyncio.timeout(TIMEOUT):
                await gateway.ready.wait()
        finally:
            gateway.stop()
            await task


async def test_output_a_drain_could_not_store_is_logged_and_counted(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """The gateway stops while Redis stays down past its leave deadline: the console output
    it held is lost, and says so: an error per VM with the byte count, and a counter."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    printed = b"never stored\r\n"
    with capture_logs() as events:
        async with serving(cluster_config("gw-1", far_end.port)) as gateway:
            await until(lambda: "vm-a" in gateway.hubs, gateway)
            async with console(gateway, ctx, _mint(gateway_pki)("alice")) as c:
                await redis_server.stop()
                await far_end.send(printed)
                await c.expect(printed)
    lost = [e for e in events if e["event"] == "cluster_output_not_stored"]
    assert [(e["vm"], e["bytes"], e["log_level"]) for e in lost] == [
        ("vm-a", len(printed), "error")
    ]
    assert "never stored" not in repr(events)
    metrics = generate_latest(make_registry(gateway))
    assert b"relayd_cluster_log_unstored_bytes_total %d.0" % len(printed) in metrics


async def test_output_an_outbox_lets_go_of_during_an_outage_is_counted(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """While Redis is away an owner buffers at most console_log_bytes per VM; what a VM
    prints beyond it is let go of (the log records a gap). That is counted, so an operator
    sees output was lost to an outage and how much."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    config = cluster_config(
        "gw-1", far_end.port, limits={"console_log_bytes": 4096, "replay_bytes": 1024}
    )
    async with serving(config) as gateway:
        await until(lambda: "vm-a" in gateway.hubs, gateway)
        async with console(gateway, ctx, _mint(gateway_pki)("alice")) as c:
            await redis_server.stop()
            for i in range(10):  # ten reads of the port, ten chunks buffered
                await far_end.send(b"x" * 1000 + b"<%d>" % i)
                await c.expect(b"<%d>" % i)
            metrics = generate_latest(make_registry(gateway)).decode()
            await redis_server.start()
    (line,) = [m for m in metrics.splitlines() if m.startswith("relayd_cluster_log_dropped_bytes")]
    assert float(line.split()[1]) >= 10 * 1003 - 4096


async def test_check_config_reaches_redis_or_names_the_key(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """`relayd check-config` validates [cluster] and says when Redis does not answer."""
    config = cluster_config("gw-1", far_end.port)
    relayd = Path(sys.executable).parent / "relayd"

    async def check(*options: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(relayd), "check-config", *options, str(config.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        return proc.returncode or 0, out.decode()

    code, out = await check()
    assert code == 0, out
    assert "cluster: gateway gw-1" in out
    assert "answers" in out
    await redis_server.stop()
    code, out = await check()
    assert code != 0
    assert "cluster.redis" in out
    assert "cannot reach Redis" in out
    assert ": ok" not in out  # no "ok" above the error
    # The unit's pre-start check: a Redis outage must not keep a gateway from (re)starting.
    code, out = await check("--offline")
    assert code == 0, out
    assert "Redis not contacted (--offline)" in out
    # Reached, but refusing the credentials: not "cannot reach".
    await redis_server.start()
    url = redis_server.url.replace("unix://", "unix://nobody:wrong@")
    config = cluster_config("gw-1", far_end.port, cluster={"redis": url})
    code, out = await check()
    assert code != 0
    assert "Redis refused the user or password in the URL" in out
    assert "wrong" not in out  # the password is never printed


async def test_a_second_gateway_with_a_live_gateway_id_is_refused(
    cluster_config: Callable[..., Config], far_end: FarEnd
) -> None:
    """Two gateways with one gateway_id would share leases (the one leaving takes the
    other's VMs): check-config and serve refuse the second, naming the key and the first's
    address; the running gateway keeps its console."""
    first = cluster_config("gw-1", far_end.port)
    text = cluster_config("gw-copy", far_end.port).path.read_text()
    copy = text.replace('gateway_id = "gw-copy"', 'gateway_id = "gw-1"')
    assert copy != text
    path = first.path.parent.parent / "copy.toml"
    path.write_text(copy)
    relayd = Path(sys.executable).parent / "relayd"
    async with serving(first) as g1:
        await until(lambda: "vm-a" in g1.hubs, g1)
        proc = await asyncio.create_subprocess_exec(
            str(relayd), "check-config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode == 2, (out, err)
        assert b"cluster.gateway_id" in err
        assert first.cluster is not None
        assert f"already live in this region at {first.cluster.advertise}".encode() in err
        taken = r"cluster\.gateway_id: gateway 'gw-1' is already live"
        with pytest.raises(ConfigError, match=taken):
            async with serving(load_config(path)):
                pass
        # The same id at the same address is the gateway itself: check-config beside it.
        proc = await asyncio.create_subprocess_exec(
            str(relayd), "check-config", str(first.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        assert proc.returncode == 0, (out, err)
        assert g1.cluster is not None
        await g1.cluster.node.next_round()
        assert "vm-a" in g1.hubs


async def test_reload_moves_peer_links_to_the_new_certificate_and_peer_ca(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A region moving to a new CA: every gateway's certificate, key and peer_ca replaced,
    then a reload of each. A console relayed between them still opens: peer links present
    and check what the reload read, as the listener does. A [cluster] key changed in the same
    reload is logged as needing a restart, not taken silently. (Peer links once kept the
    certificate and CA read at start, so they failed once the old ones were replaced.)"""
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        new_ca = trustme.CA()
        cert = new_ca.issue_cert("localhost", "127.0.0.1", common_name="gw.rotated")
        cert.private_key_pem.write_to_path(str(gateway_pki["key"]))
        cert.cert_chain_pems[0].write_to_path(str(gateway_pki["cert"]))
        new_ca.cert_pem.write_to_path(str(gateway_pki["ca"]))
        text = other.config.path.read_text()
        other.config.path.write_text(text.replace('lease_ttl = "1s"', 'lease_ttl = "2s"'))
        waiter = LogWaiter()
        with capture_logs(processors=[waiter]):
            assert await owner.reload()
            assert await other.reload()
        restart = waiter.named("reload_needs_restart")
        assert [e["key"] for e in restart] == ["cluster.lease_ttl"]
        ctx = ssl.create_default_context()
        new_ca.configure_trust(ctx)
        async with console(other, ctx, _mint(gateway_pki)("alice")) as c:
            assert c.hello["role"] == "writer"
            await c.send(b"after-rotation\r")
            await far_end.wait_received(lambda got: b"after-rotation\r" in got)


async def test_reload_keeps_a_cluster_gateways_region_until_it_restarts(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The region names the Redis keys a gateway shares: a reload cannot move it to another
    region, so it keeps the old one everywhere (audit events included) and says a restart
    is needed, instead of auditing under one region while serving another's state."""
    async with owner_and_relay(cluster_config, far_end) as (owner, _):
        text = owner.config.path.read_text()
        owner.config.path.write_text(text.replace('region = "test"', 'region = "elsewhere"'))
        waiter = LogWaiter()
        with capture_logs(processors=[waiter]):
            assert await owner.reload()
            ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
            async with console(owner, ctx, _mint(gateway_pki)("alice")) as c:
                assert c.hello["role"] == "writer"
        restart = waiter.named("reload_needs_restart")
        assert [e["key"] for e in restart] == ["gateway.region"]
        started = waiter.named("session_started")
        assert started
        assert {e["region"] for e in started} == {"test"}
        assert owner.config.gateway.region == "test"


async def test_vm_kept_from_its_preferred_gateway_goes_back_once_a_reload_adds_it_there(
    cluster_config: Callable[..., Config], far_end: FarEnd
) -> None:
    """A config rolled out to one gateway first: the other gateway keeps vm-a while its
    preferred gateway does not have it, and hands it back as soon as a reload there adds
    it (no restart), so the region's balance comes back by itself."""
    preferred_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
    other_id = "gw-2" if preferred_id == "gw-1" else "gw-1"
    full = cluster_config(preferred_id, far_end.port)
    text = full.path.read_text()
    assert f'serial = "tcp://127.0.0.1:{far_end.port}"' in text
    without = text.replace('id = "vm-a"', 'id = "vm-z"').replace(
        f"tcp://127.0.0.1:{far_end.port}", f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    )
    full.path.write_text(without)
    waiter = LogWaiter()
    with capture_logs(processors=[waiter]):
        async with (
            serving(load_config(full.path)) as preferred,
            serving(cluster_config(other_id, far_end.port)) as other,
        ):
            await waiter.wait_for(lambda: bool(waiter.named("cluster_vm_not_taken")))
            await until(lambda: "vm-a" in other.hubs, other)
            full.path.write_text(text)
            assert await preferred.reload()
            await until(lambda: "vm-a" in preferred.hubs and "vm-a" not in other.hubs, other)


async def test_ready_requires_port_counts_ports_other_gateways_own(
    cluster_config: Callable[..., Config], far_end: FarEnd
) -> None:
    """With ready_requires_port, a gateway that owns no VM but relays to the owner is ready
    (the balancer keeps it); it is not while no gateway owns one."""
    unowned = cluster_config("gw-1", 1, gateway={"ready_requires_port": True})
    async with serving(unowned) as alone:  # a port nobody listens on: never up
        assert alone.unready_reasons() == ["no serial port is reachable"]
    async with owner_and_relay(cluster_config, far_end, gateway={"ready_requires_port": True}) as (
        owner,
        other,
    ):
        assert "vm-a" not in other.hubs
        assert other.unready_reasons() == []
        assert owner.unready_reasons() == []


async def test_a_relay_that_reaches_no_owner_logs_why_the_last_link_failed(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    tmp_path: Path,
) -> None:
    """A gateway whose peer_ca did not issue the owner's certificate answers 503 after its
    wait, and its peer_link_failed says what failed (the certificate), not only that no
    gateway took the console; /metrics counts the failed links by the gateway they were to,
    what an operator alerts on when gateways cannot reach each other."""
    other_ca = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    owner_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
    relay_id = "gw-2" if owner_id == "gw-1" else "gw-1"
    waiter = LogWaiter()
    with capture_logs(processors=[waiter]):
        async with (
            serving(cluster_config(owner_id, far_end.port)) as owner,
            serving(cluster_config(relay_id, far_end.port, cluster={"peer_ca": other_ca})) as relay,
        ):
            cluster = relay.cluster
            assert cluster is not None
            await until(lambda: (cluster.owner_of("vm-a") or ("",))[0] == owner_id, owner, relay)
            url = f"wss://localhost:{relay.tls_port}/v1/vms/vm-a/console"
            token = _mint(gateway_pki)("alice")
            status, code = await refused_upgrade(
                url, ctx, additional_headers={"Authorization": f"Bearer {token}"}
            )
            metrics = generate_latest(make_registry(relay)).decode()
    assert (status, code) == (503, "owner_unavailable")
    counted = f'relayd_cluster_peer_link_failures_total{{peer="{owner_id}"}} '
    (line,) = [m for m in metrics.splitlines() if m.startswith(counted)]
    assert float(line.split()[1]) >= 1
    (failed,) = waiter.named("peer_link_failed")
    assert "no gateway took the console" in failed["error"]
    assert "certificate verify failed" in failed["error"], failed


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ("peer_ca", "cluster.peer_ca", "does not verify against peer_ca"),
        ("advertise", "cluster.advertise", "does not name 127.0.0.2"),
    ],
)
async def test_check_config_refuses_a_certificate_the_other_gateways_would_refuse(
    cluster_config: Callable[..., Config],
    far_end: FarEnd,
    tmp_path: Path,
    change: str,
    key: str,
    words: str,
) -> None:
    """A peer_ca that did not issue this gateway's certificate, or an advertise host the
    certificate does not name, makes every peer link fail at run time: check-config says
    so, naming the key, instead of passing."""
    config = cluster_config("gw-1", far_end.port)
    text = config.path.read_text()
    if change == "peer_ca":
        other = tmp_path / "other-ca.crt"
        trustme.CA().cert_pem.write_to_path(str(other))
        changed = text.replace(f"peer_ca = {toml_value(str(config.cluster.peer_ca))}", "")
        changed = changed.replace("[cluster]\n", f"[cluster]\npeer_ca = {toml_value(str(other))}\n")
    else:
        advertise = str(config.cluster.advertise)
        changed = text.replace(f'"{advertise}"', f'"127.0.0.2:{config.cluster.advertise.port}"')
    assert changed != text
    config.path.write_text(changed)
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "relayd"), "check-config", str(config.path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 2, err
    assert f"{key}: this gateway's certificate (tls.cert) {words}".encode() in err, err


async def test_relayed_session_ends_when_its_token_expires_with_disconnect_expired(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The owner learns the token's expiry from the relaying gateway and ends the session (4003)."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    strict = {"disconnect_expired": True, "leeway": "1s"}
    async with relaying_pair(cluster_config, far_end, auth=strict) as other:
        async with console(other, ctx, mint("alice", ttl=2.0)) as c:
            code, _ = await c.closed()
        assert code == 4003


async def test_relayed_client_stays_attached_when_the_owner_is_killed(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """kill -9 of the owner: a client relayed through the other gateway gets port_down, then
    port_up, types on (keys it sent in between too), and resumes with no byte twice or lost;
    the new owner's close frames still reach it unchanged."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with killable_owner_and_relay(cluster_config, far_end) as (victim, relaying):
        assert relaying.cluster is not None
        cluster = relaying.cluster
        await far_end.connected()
        async with console(relaying, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            await c.send(b"before\r")
            await far_end.wait_received(lambda got: b"before\r" in got)
            await far_end.send(b"output before\r\n")
            await c.expect(b"output before\r\n")
            # The new owner resumes from the shared log: wait until the line is in it.
            async with asyncio.timeout(TIMEOUT):
                while (
                    b"output before"
                    not in (
                        await api(relaying, "GET", "/v1/vms/vm-a/console-log", ctx, mint("alice"))
                    )[1]
                ):
                    await cluster.next_round()
            position = c.hello["offset"] - c.hello["replay"] + len(c.output)

            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
            assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
            await c.send(b"during\r")  # held until the new owner's port is up
            assert (await c.control(type="notice", event="port_up"))["vm"] == "vm-a"
            await far_end.wait_received(lambda got: b"during\r" in got)
            await c.send(b"after\r")
            await far_end.wait_received(lambda got: b"after\r" in got)
            await far_end.send(b"output after\r\n")
            await c.expect(b"output after\r\n")
            assert bytes(c.output[position - c.hello["offset"] + c.hello["replay"] :]) == (
                b"output after\r\n"
            )
            assert c.output.count(b"output before") == 1
            assert not [m for m in c.controls if m.get("type") in ("hello", "error")]
            assert "vm-a" in relaying.hubs  # the survivor owns the VM now

            status, _ = await api(
                relaying, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"),
                b'{"enabled": false}',
            )  # fmt: skip
            assert status == 200
            assert (await c.closed())[0] == 4009


async def test_a_relayed_client_whose_console_comes_here_with_its_log_lost_goes_on_here(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """The owner is killed and Redis restarts empty before anyone put its marks back: the
    console comes to the relaying gateway with its offsets starting again, behind what the
    client holds. The client goes on there, told with `offsets_reused` (as a reconnect with
    `?from=` would be told), instead of being closed with 1001 to reconnect and get it."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with killable_owner_and_relay(cluster_config, far_end) as (victim, relaying):
        await far_end.connected()
        async with console(relaying, ctx, mint("alice")) as c:
            await far_end.send(b"output before the loss\r\n")
            await c.expect(b"output before the loss\r\n")
            position = c.hello["offset"] - c.hello["replay"] + len(c.output)
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
            await c.control(type="notice", event="port_down")
            await redis_server.restart_empty()
            await c.control(type="notice", event="port_up")
            reused = await c.control(type="notice", event="offsets_reused")
            assert reused["last"] == position - 1
            assert reused["first"] < position
            assert "vm-a" in relaying.hubs
            assert c.hello["session"] in relaying.sessions  # a session here, not a relay
            await c.send(b"after\r")
            await far_end.wait_received(lambda got: b"after\r" in got)
            await far_end.send(b"output after\r\n")
            await c.expect(b"output after\r\n")
            assert c.output.count(b"output before the loss") == 1
            assert not [m for m in c.controls if m.get("type") in ("hello", "error")]


async def test_relayed_client_moves_with_the_console_when_the_owner_stops(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A clean stop of the owner (a deploy) does not close a client relayed through the other
    gateway: no shutting_down notice, port_down, then port_up from the new owner, and it
    types on, its output continuing with no byte twice."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        owner_and_relay(cluster_config, far_end) as (owner, other),
        console(other, ctx, mint("alice")) as c,
    ):
        await c.send(b"before\r")
        await far_end.wait_received(lambda got: b"before\r" in got)
        await far_end.send(b"output before\r\n")
        await c.expect(b"output before\r\n")
        owner.stop()
        assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
        assert (await c.control(type="notice", event="port_up"))["vm"] == "vm-a"
        assert "vm-a" in other.hubs
        # The console came to the gateway the client is on: a session there, not a relay
        # through a peer link to itself; the same session, still the writer.
        assert not any(conn.relaying for conn in other.connections)
        (session,) = other.sessions.values()
        assert session.session_id == c.hello["session"]
        assert session.role == "writer"
        assert not session.relayed
        await c.send(b"after\r")
        await far_end.wait_received(lambda got: b"after\r" in got)
        await far_end.send(b"output after\r\n")
        await c.expect(b"output after\r\n")
        assert c.output.count(b"output before") == 1
        assert not [m for m in c.controls if m.get("event") == "shutting_down"]
        assert not [m for m in c.controls if m.get("type") in ("hello", "error")]


async def test_a_direct_client_stays_connected_when_its_vm_moves_to_a_gateway_that_joins(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A gateway joins and takes back its share: a client attached directly to the VM's
    old owner is not closed; that gateway relays it to the new owner (port_down, then
    port_up), where it is the writer again, resuming with no byte twice."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    ids = ["gw-1", "gw-2", "gw-3"]
    joiner = preferred_owner("vm-a", ids)
    first, second = (g for g in ids if g != joiner)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(serving(cluster_config(first, far_end.port)))
        b = await stack.enter_async_context(serving(cluster_config(second, far_end.port)))
        await until(lambda: ("vm-a" in a.hubs) != ("vm-a" in b.hubs), a, b)
        old, _ = _owner(a, b)
        async with console(old, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            await c.send(b"before\r")
            await far_end.wait_received(lambda got: b"before\r" in got)
            await far_end.send(b"output before\r\n")
            await c.expect(b"output before\r\n")
            new = await stack.enter_async_context(serving(cluster_config(joiner, far_end.port)))
            assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
            assert (await c.control(type="notice", event="port_up"))["vm"] == "vm-a"
            assert "vm-a" in new.hubs
            assert "vm-a" not in old.hubs
            assert any(conn.relaying for conn in old.connections)
            await c.send(b"after\r")
            await far_end.wait_received(lambda got: b"after\r" in got)
            await far_end.send(b"output after\r\n")
            await c.expect(b"output after\r\n")
            assert c.output.count(b"output before") == 1
            assert not [m for m in c.controls if m.get("type") in ("hello", "error")]
            assert not [m for m in c.controls if m.get("event") == "demoted"]

            # The joiner leaves again (a deploy): the console comes back to the old owner,
            # and the client, relayed by it until now, is its own session there again.
            new.stop()
            assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
            assert (await c.control(type="notice", event="port_up"))["vm"] == "vm-a"
            assert "vm-a" in old.hubs
            assert not any(conn.relaying for conn in old.connections)
            (session,) = old.sessions.values()
            assert (session.session_id, session.role) == (c.hello["session"], "writer")
            await c.send(b"back\r")
            await far_end.wait_received(lambda got: b"back\r" in got)
            await far_end.send(b"output back\r\n")
            await c.expect(b"output back\r\n")
            assert c.output.count(b"output after") == 1
            assert not [m for m in c.controls if m.get("type") in ("hello", "error")]


async def test_a_draining_owner_hands_its_consoles_over_before_its_clients_leave(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A deploy: the owner drains (30 s) while its own client stays. The console moves at
    once, not when the drain ends: a new session through the other gateway gets it, and the
    lingering client, told `shutting_down`, follows it (port_down, port_up) and still writes,
    with no byte twice, until it leaves on its own."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        owner_and_relay(cluster_config, far_end, gateway={"drain_seconds": 30}) as (
            owner,
            other,
        ),
        console(owner, ctx, mint("alice")) as lingering,
    ):
        assert lingering.hello["role"] == "writer"
        await far_end.send(b"output before\r\n")
        await lingering.expect(b"output before\r\n")
        owner.stop()
        await lingering.control(type="notice", event="shutting_down")
        await until(lambda: "vm-a" in other.hubs, other)
        node = other.cluster.node if other.cluster is not None else None
        assert node is not None
        await until(lambda: node.stats.news_rounds >= 1, other)  # it heard the owner's news
        assert owner.draining
        assert "vm-a" not in owner.hubs
        async with console(other, ctx, mint("bob"), "mode=spectate") as newcomer:
            assert newcomer.hello["role"] == "spectator"
            assert (await lingering.control(type="notice", event="port_up"))["vm"] == "vm-a"
            await lingering.send(b"after\r")
            await far_end.wait_received(lambda got: b"after\r" in got)
            await far_end.send(b"output after\r\n")
            await lingering.expect(b"output after\r\n")
            await newcomer.expect(b"output after\r\n")
        assert lingering.output.count(b"output before") == 1
        # (consumed above: shutting_down, port_up)
        assert [m["event"] for m in lingering.controls if m.get("type") == "notice"] == [
            "port_down"
        ]
        assert not [m for m in lingering.controls if m.get("type") in ("hello", "error")]


async def test_relayed_client_moves_when_the_owner_stops_while_a_direct_client_is_frozen(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A direct client of the stopping owner that never answers its 1001 (frozen) holds the
    owner's drain until it is reset: the relayed client still moves, within its wait for a
    new owner (3 x lease_ttl + 2 s, here 5 s)."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        owner_and_relay(cluster_config, far_end) as (owner, other),
        console(other, ctx, mint("alice")) as relayed,
        console(owner, ctx, mint("bob"), "mode=spectate") as frozen,
    ):
        frozen.ws.transport.pause_reading()  # it reads nothing more: no answer to a Close
        owner.stop()
        assert (await relayed.control(type="notice", event="port_down"))["vm"] == "vm-a"
        assert (await relayed.control(type="notice", event="port_up"))["vm"] == "vm-a"
        assert "vm-a" in other.hubs
        await relayed.send(b"after\r")
        await far_end.wait_received(lambda got: b"after\r" in got)
        frozen.ws.transport.abort()


async def test_demoted_relayed_client_moves_as_a_spectator(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A relayed writer demoted by a takeover stays a spectator when its console moves: it
    never takes the console back by moving."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end, takeover="demote") as (owner, other):
        async with console(other, ctx, mint("alice")) as a:
            assert a.hello["role"] == "writer"
            async with console(owner, ctx, mint("bob")) as b:
                assert b.hello["role"] == "writer"
                assert (await a.control(type="notice", event="demoted"))["by"] == "user:bob"
                owner.stop()
                assert (await b.closed())[0] == 1001
            await a.control(type="notice", event="port_down")
            await a.control(type="notice", event="port_up")
            await a.send(b"typed-by-a-spectator\r")
            assert (await a.control(type="error"))["code"] == "read_only"
            await a.send({"type": "break"})
            await a.control(type="error", code="read_only")
        assert b"typed-by-a-spectator" not in far_end.received


async def test_a_session_opened_while_the_owner_is_dead_waits_for_the_next_owner(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """kill -9 of the owner, then a new session through the other gateway, whose view
    still names the dead one: instead of a 503 it waits for the next owner and opens."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with killable_owner_and_relay(cluster_config, far_end) as (victim, relaying):
        assert relaying.cluster is not None
        cluster = relaying.cluster
        owner_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        assert (cluster.owner_of("vm-a") or ("",))[0] == owner_id  # its lease has not lapsed
        async with console(relaying, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            assert "vm-a" in relaying.hubs
            await c.send(b"typed-after-the-failover\r")
            await far_end.wait_received(lambda got: b"typed-after-the-failover\r" in got)


async def test_relayed_client_is_closed_with_1001_when_no_gateway_takes_over(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """The owner dies while Redis is away (no VM changes owner): port_down, then 1001."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        killable_owner_and_relay(cluster_config, far_end) as (victim, relaying),
        console(relaying, ctx, mint("alice")) as c,
    ):
        await redis_server.stop()
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
        code, reason = await c.closed()
        assert code == 1001
        assert reason is not None
        assert "no gateway took over within 5 s" in reason


async def test_relaying_gateway_that_stops_closes_its_relayed_clients_with_1001(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A draining gateway treats the sessions it relays as its own: `shutting_down`, the
    console working until the drain ends, then 1001."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with relaying_pair(cluster_config, far_end, gateway={"drain_seconds": 1}) as other:
        async with console(other, ctx, mint("alice")) as c:
            other.stop()
            assert (await c.control(type="notice", event="shutting_down"))["closes_in"] == 1
            await far_end.send(b"still here\r\n")
            await c.expect(b"still here\r\n")
            code, reason = await c.closed()
        assert code == 1001
        assert reason == "gateway shutting down"


async def test_a_relayed_client_whose_console_comes_here_with_its_port_down_stays(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The VM's serial endpoint is gone when its owner stops, and the console comes to the
    gateway the client is on. As at any owner, the client stays connected and becomes a
    session there, whose port_up comes when the port does; it is not closed with 1001 for
    want of a port once the move's wait (3 x lease_ttl + 2 s) runs out."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        owner_and_relay(cluster_config, far_end) as (owner, other),
        console(other, ctx, mint("alice")) as c,
    ):
        assert c.hello["role"] == "writer"
        await far_end.send(b"output before\r\n")
        await c.expect(b"output before\r\n")
        await far_end.stop()
        assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
        owner.stop()
        assert (await c.control(type="notice", event="port_down"))["vm"] == "vm-a"
        await until(lambda: c.hello["session"] in other.sessions, other)
        assert not any(conn.relaying for conn in other.connections)
        assert other.sessions[c.hello["session"]].role == "writer"
        await far_end.start()
        assert (await c.control(type="notice", event="port_up"))["vm"] == "vm-a"
        await c.send(b"after\r")
        await far_end.wait_received(lambda got: b"after\r" in got)
        await far_end.send(b"output after\r\n")
        await c.expect(b"output after\r\n")
        assert c.output.count(b"output before") == 1
        assert not [m for m in c.controls if m.get("type") in ("hello", "error")]


async def test_a_resume_offset_past_any_log_resumes_at_the_end_on_every_gateway(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """`?from=` far in the future (past 2**63) is the end of the output, as on one gateway:
    the offset a forwarded session carries is capped, never a 500."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        await far_end.send(b"some output\r\n")
        async with console(owner, ctx, mint("alice"), "mode=spectate") as c:
            await c.expect(b"some output")
            end = c.hello["offset"]
        for gateway in (owner, other):
            async with console(gateway, ctx, mint("alice"), f"from={10**20}") as c:
                assert (c.hello["offset"], c.hello["replay"]) == (end, 0)


async def test_console_log_reads_are_audited_on_every_gateway(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """`console_log_read` (docs/audit.md) on the owner and on the other gateway alike."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        await far_end.send(b"boot log\r\n")
        for gateway in (owner, other):
            request = http_request("GET", "/v1/vms/vm-a/console-log?from=5", bearer=mint("alice"))
            with capture_logs() as events:
                status, headers, body = await https_exchange(gateway.tls_port, ctx, request)
            assert status == 200
            reads = [e for e in events if e["event"] == "console_log_read"]
            assert reads == [
                {
                    "event": "console_log_read",
                    "audit": True,
                    "log_level": "info",
                    "principal": "user:alice",
                    "peer": "127.0.0.1",
                    "region": "test",
                    "vm": "vm-a",
                    "offset": int(headers["relayd-data-offset"]),
                    "bytes": len(body),
                }
            ]


async def test_a_ticket_session_ends_when_the_issuing_token_does_on_every_gateway(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """With `disconnect_expired`, a session opened with a ticket ends (4003) when the token
    that asked for the ticket expires, as on a single gateway: the region's ticket keeps
    the expiry, on the owner and through the other gateway alike."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    strict = {"disconnect_expired": True, "leeway": "1s"}
    async with owner_and_relay(cluster_config, far_end, auth=strict) as (owner, other):
        bearer = mint("alice", ttl=2.0)
        tickets = []
        for _ in (owner, other):
            status, body = await api(
                owner, "POST", "/v1/vms/vm-a/console/tickets", ctx, bearer, b'{"mode": "spectate"}'
            )
            assert status == 201
            tickets.append(json.loads(body)["ticket"])
        async with (
            console(owner, ctx, "", f"ticket={tickets[0]}") as local,
            console(other, ctx, "", f"ticket={tickets[1]}") as relayed,
        ):
            for c in (local, relayed):
                assert await c.closed() == (4003, "credentials expired")


async def test_a_switch_set_on_another_gateway_closes_with_the_same_reason(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The 4009 a switch sends names the switch whichever gateway it was set on: vm-a's
    clients (on its owning gateway, direct and relayed) hear what a single gateway says."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    disable = b'{"enabled": false}'
    async with (
        owner_and_relay(cluster_config, far_end) as (owner, other),
        console(owner, ctx, mint("alice")) as local,
        console(other, ctx, mint("bob"), "mode=spectate") as relayed,
    ):
        status, _ = await api(
            other, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), disable
        )
        assert status == 200
        for c in (local, relayed):
            assert await c.closed() == (4009, "serial console disabled for vm vm-a")


async def test_allow_clients_is_the_clients_address_not_the_relaying_gateways(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """`allow_clients` admits a client through either gateway: the owner checks the address
    of the client a gateway relays, never the relaying gateway's own (it is no client)."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    clients = {"allow_clients": ["127.0.1.0/24"]}
    async with owner_and_relay(cluster_config, far_end, gateway=clients) as (owner, other):
        for gateway in (owner, other):
            async with console(gateway, ctx, mint("alice"), source="127.0.1.5") as c:
                assert c.hello["role"] == "writer"
        with pytest.raises(InvalidStatus) as refused:
            async with console(other, ctx, mint("alice"), source="127.0.2.5"):
                pass
        assert refused.value.response.status_code == 403
        # Nor is a gateway's own question (from 127.0.0.1) a client's.
        assert other.cluster is not None
        question = http_request("POST", "/v1/cluster/owners", body=b'{"vms": ["vm-a"]}')
        status, _, body = await https_exchange(owner.tls_port, other.cluster.peer_ssl, question)
        assert status == 200, body


async def test_peer_links_are_not_one_clients_connections_to_the_owner(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """Per-address connection limits count clients, not the gateway that relays them: six
    clients from six addresses open vm-a through the other gateway at once, as they could
    on the owner, although their six peer links all come from one gateway's address. A
    client that shares the gateways' address (one NAT) gets no such pass: without a
    gateway's certificate its connections are counted once their handshake shows it."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    tight = {"connections_per_second_per_ip": 1, "max_handshakes_per_ip": 2}
    async with owner_and_relay(cluster_config, far_end, limits=tight) as (owner, other):

        async def spectate(source: str) -> str:
            async with console(other, ctx, mint("alice"), "mode=spectate", source=source) as c:
                return str(c.hello["role"])

        roles = await asyncio.gather(*(spectate(f"127.0.1.{i}") for i in range(1, 7)))
        assert roles == ["spectator"] * 6

        async def listed_on_owner() -> bool:
            try:
                status, _, _ = await https_exchange(
                    owner.tls_port, ctx, http_request("GET", "/v1/vms", bearer=mint("alice"))
                )
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                return False
            return status == 200

        # From 127.0.0.1, the address both gateways advertise: 2 a burst, then 1 a second.
        served = await asyncio.gather(*(listed_on_owner() for _ in range(8)))
        assert 2 <= served.count(True) < 8
        assert owner.listener is not None
        assert owner.listener.handshake_failures["rate_limited"] == served.count(False)


async def test_a_handshake_header_given_twice_is_forwarded_whole(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """RFC 6455 lets a client split `Sec-WebSocket-Protocol` over several lines (11.3.4):
    the owner hears every line, as it does from a client of its own, and accepts it."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        for gateway in (owner, other):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gateway.tls_port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(
                (
                    "GET /v1/vms/vm-a/console?mode=spectate HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: Bearer {mint('alice')}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relayd.console.v1\r\n"
                    "Sec-WebSocket-Protocol: x-later.v1\r\n\r\n"
                ).encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            writer.close()
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert b"Sec-WebSocket-Protocol: relayd.console.v1\r\n" in head


async def test_a_switch_closes_a_relayed_client_with_4009_while_its_console_moves(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A console disabled while its owner is gone and its relayed client waits for the next
    one: the client is closed with 4009 naming the switch, as it would be at an owner, not
    with 1001 when the next owner refuses it."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        killable_owner_and_relay(cluster_config, far_end) as (victim, relaying),
        console(relaying, ctx, mint("alice"), "mode=spectate") as c,
    ):
        victim.proc.send_signal(signal.SIGKILL)
        await victim.proc.wait()
        await c.control(type="notice", event="port_down")
        status, _ = await api(
            relaying, "PUT", "/v1/vms/vm-a/serial-console", ctx, mint("olga"), b'{"enabled": false}'
        )
        assert status == 200
        assert await c.closed() == (4009, "serial console disabled for vm vm-a")


async def test_a_refused_upgrade_reads_and_keeps_its_connection_as_on_the_owner(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """`deny` with a writer attached: the 409 is the same bytes through either gateway, and
    the connection stays open for the client's next request on both (keep-alive), as after
    any refusal: the client is never left with a connection closed under it."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    upgrade = (
        "GET /v1/vms/vm-a/console HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {mint('bob')}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: relayd.console.v1\r\n\r\n"
    ).encode()
    listing = http_request("GET", "/v1/vms", bearer=mint("bob"))
    refusals = []
    async with (
        owner_and_relay(cluster_config, far_end, takeover="deny") as (owner, other),
        console(owner, ctx, mint("alice")),
    ):
        for gateway in (owner, other):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gateway.tls_port, ssl=ctx, server_hostname="localhost"
            )
            try:
                writer.write(upgrade)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                refusals.append(head + await reader.readexactly(length))
                writer.write(listing)
                second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
                assert second.startswith(b"HTTP/1.1 200 "), second
            finally:
                writer.close()
    assert refusals[0].startswith(b"HTTP/1.1 409 ")
    assert refusals[0] == refusals[1]


async def _events_until_closed(ws: ClientConnection) -> list[str]:
    """The events of the notices a client reads until its connection ends."""
    events = []
    async with asyncio.timeout(TIMEOUT):
        try:
            while True:
                message = await ws.recv()
                if isinstance(message, str):
                    events.append(str(json.loads(message).get("event")))
        except ConnectionClosed:
            return events


async def test_a_client_that_stops_reading_is_dropped_alike_direct_or_relayed(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A spectator that stops reading while the console prints misses its pongs and the
    owner drops it (a reset, no Close). Relayed, it is dropped the same way: the relay
    takes the owner's hang-up for what it is, not for an owner that died (no port_down,
    no 1001 'console moved' seconds later)."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    limits = {"keepalive_interval": "1s", "output_queue_bytes": 8192}
    waiter = LogWaiter()
    async with owner_and_relay(cluster_config, far_end, limits=limits) as (owner, other):
        for gateway in (owner, other):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gateway.tls_port))
            with capture_logs(processors=[waiter]):
                async with connect(
                    f"wss://localhost:{gateway.tls_port}/v1/vms/vm-a/console?mode=spectate",
                    sock=sock,
                    server_hostname="localhost",
                    ssl=ctx,
                    additional_headers={"Authorization": f"Bearer {mint('bob')}"},
                    subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
                    max_queue=1,
                    max_size=None,
                    ping_interval=None,
                ) as ws:
                    session = json.loads(await ws.recv())["session"]
                    await far_end.send(b"y" * 262144)  # more than it takes in unread

                    def dropped(session: str = session) -> bool:
                        return any(
                            e["event"] == "session_ended" and e["session_id"] == session
                            for e in waiter.events
                        )

                    await waiter.wait_for(dropped)
                    assert "port_down" not in await _events_until_closed(ws)
                    assert ws.protocol.close_rcvd is None  # dropped: no Close frame


async def test_redis_moved_to_another_address_is_followed_at_a_reload(
    cluster_config: Callable[..., Config],
    far_end: FarEnd,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The old Redis is gone and the config names its replacement: a reload (SIGHUP) must
    take it up, or the gateway stays cut off from the region until it is restarted. The
    new Redis is empty: the owner re-creates its lease there and keeps its port."""
    moved = RedisServer(tmp_path_factory.mktemp("redis-moved"))
    await moved.start()
    try:
        config = cluster_config("gw-1", far_end.port)
        async with serving(config) as g1:
            assert g1.cluster is not None
            node = g1.cluster.node
            await until(lambda: "vm-a" in g1.hubs, g1)
            token = node.held["vm-a"]
            await redis_server.stop()
            await until(lambda: not node.redis_up, g1)
            config.path.write_text(config.path.read_text().replace(redis_server.url, moved.url))
            assert await g1.reload()
            await until(lambda: node.redis_up and node.first_round.is_set(), g1)
            probe = ClusterStore(moved.url, gateway_id="probe", prefix=key_prefix("test"))
            try:
                async with asyncio.timeout(TIMEOUT):
                    while await probe.holder("vm-a") != Lease("gw-1", token):
                        await node.next_round()
            finally:
                await probe.close()
            assert "vm-a" in g1.hubs
    finally:
        await moved.stop()


async def test_switches_are_read_again_when_the_watcher_resubscribes_after_an_outage(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """A switch change the watcher may have missed is picked up when it subscribes again,
    after a Redis outage too: a console disabled meanwhile must not stay open here."""
    async with serving(cluster_config("gw-1", far_end.port)) as g1:
        assert g1.cluster is not None
        node = g1.cluster.node
        await until(lambda: "vm-a" in g1.hubs, g1)
        await redis_server.stop()
        await until(lambda: not node.redis_up, g1)
        await redis_server.start()
        await until(lambda: node.redis_up, g1)
        # Changed without a message (as one sent while the watcher was away), then the
        # watcher's connection drops and it subscribes again: it must read the switches.
        await redis_server.command("HSET", key_prefix("test") + "switches:vms", "vm-a", "0")
        await redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: node.get("vms", "vm-a") is False, g1)


@pytest.mark.parametrize(
    ("reloaded", "closed"),
    [
        ("owner", (4003, "client certificate revoked")),
        ("relay", (1001, "the console's owner is no longer trusted")),
    ],
)
async def test_a_reload_whose_crl_revokes_a_gateway_ends_the_sessions_it_links(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    reloaded: str,
    closed: tuple[int, str],
) -> None:
    """A gateway's certificate revoked (`[tls] crl`) and a gateway reloaded: a verified peer
    may name any principal, and an owner holds the console, so every session linked through
    the revoked certificate ends at once instead of living on until it expires: on the owner
    the sessions a revoked gateway relays (4003), on a relaying gateway the sessions it
    relays to a revoked owner (1001: the client did nothing wrong). New links are refused."""
    peers = trustme.CA()
    shared = peers.issue_cert("localhost", "127.0.0.1", common_name="gw.test")
    shared.private_key_pem.write_to_path(str(gateway_pki["key"]))
    shared.cert_chain_pems[0].write_to_path(str(gateway_pki["cert"]))
    peers.cert_pem.write_to_path(str(gateway_pki["ca"]))
    crl = gateway_pki["ca"].with_name("crl.pem")
    crl.write_bytes(crl_pem(peers))
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        gateway = owner if reloaded == "owner" else other
        async with console(other, ctx, _mint(gateway_pki)("alice")) as c:
            assert c.hello["role"] == "writer"
            text = gateway.config.path.read_text()
            gateway.config.path.write_text(text.replace("[tls]\n", f'[tls]\ncrl = "{crl}"\n'))
            crl.write_bytes(crl_pem(peers, [shared]))
            assert await gateway.reload()
            assert await c.closed() == closed
        with pytest.raises(InvalidStatus) as refused:
            async with console(other, ctx, _mint(gateway_pki)("alice")):
                pass
        assert refused.value.response.status_code in (502, 503)


async def test_a_drain_as_redis_comes_back_still_ships_the_output_held_for_it(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """Redis goes away, the owner holds the VM's output for it, and a deploy stops the
    owner. Redis is back while the owner leaves: the output goes to the log (the lease,
    lapsed meanwhile, re-created first) instead of going with the port."""
    async with serving(cluster_config("gw-1", far_end.port)) as g1:
        assert g1.cluster is not None
        node = g1.cluster.node
        await until(lambda: "vm-a" in g1.hubs, g1)
        hub = g1.hubs["vm-a"]
        await far_end.connected()
        await redis_server.stop()
        await until(lambda: not node.redis_up, g1)
        await far_end.send(b"printed while Redis was away\r\n")
        async with asyncio.timeout(TIMEOUT):
            while hub.end < 30:
                await hub.next_change()
        g1.stop()
        async with asyncio.timeout(TIMEOUT):
            while hub.port_up:  # leaving: the port is closed, the first try to ship failed
                await hub.next_change()
        await redis_server.start()
    probe = ClusterStore(redis_server.url, gateway_id="probe", prefix=key_prefix("test"))
    try:
        assert (await probe.read("vm-a", 0, 1000)).data == b"printed while Redis was away\r\n"
        assert await probe.holder("vm-a") is None  # released, not left to lapse
    finally:
        await probe.close()


async def test_a_drain_while_redis_stalls_past_the_lease_still_settles_the_log(
    cluster_config: Callable[..., Config], far_end: FarEnd, redis_server: RedisServer
) -> None:
    """Redis stalls (a slow disk, DEBUG SLEEP) for longer than a lease as the owner leaves:
    its lease lapses before the owner can settle the log's mark. Settling anyway (the lease
    put back, nobody having taken the VM) lets the next owner continue at the exact end,
    not past the reservation with a gap of offsets no output was ever printed at."""
    await redis_server.restart_empty("--enable-debug-command", "yes")
    async with serving(cluster_config("gw-1", far_end.port)) as g1:
        assert g1.cluster is not None
        await until(lambda: "vm-a" in g1.hubs, g1)
        await far_end.send(b"stored before the stall\r\n")
        store = g1.cluster.store
        async with asyncio.timeout(TIMEOUT):
            while (await store.bounds("vm-a"))[1] < 25:
                await g1.cluster.node.next_round()
        stall = asyncio.create_task(redis_server.command("DEBUG", "SLEEP", "1.2"))
        await redis_server.command("PING")  # queued behind it: the stall has begun
        g1.stop()
        await stall
    probe = ClusterStore(redis_server.url, gateway_id="probe", prefix=key_prefix("test"))
    try:
        assert await probe.resume_point("vm-a") == 25  # settled: no reservation left
        assert await probe.holder("vm-a") is None
    finally:
        await probe.close()


@pytest.mark.parametrize("via", ["relaying", "owning"])
@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (
            {"max_session_seconds": "6s", "idle_timeout": "8s", "idle_warning": "5s"},
            "maximum session length 6s reached",
        ),
        ({"idle_timeout": "6s", "idle_warning": "3s"}, "idle for 6s"),
    ],
    ids=["max_session_seconds", "idle_timeout"],
)
async def test_a_moved_session_is_closed_at_its_original_deadline(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    via: str,
    limits: dict[str, str],
    reason: str,
) -> None:
    """A session's clocks survive a move: a client that never types, moved mid-way (at its
    idle warning, 3 s in) from the owner to the other gateway, is closed there with 4008
    by its original deadline, not one restarted by the move, and is not warned a second
    time. Through the relaying gateway the session moves from a peer link to a session
    there (the console came to it); on the owner, from a session there to a relay to the
    new owner (it drains, its client follows the console).

    No wall-clock window: the yardstick is a session on another VM of the new owner,
    opened after the moving one's warning and before the move, under the same limits
    and swept by the same sweeper. Its deadline falls at least three seconds (three
    sweeps) after the moving session's original one and before any deadline restarted
    by the move, so the moved session must end first, however slow the host."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    ids = ["gw-1", "gw-2"]
    yardstick_vm = next(
        vm
        for vm in ("vm-b", "vm-c", "vm-d")
        if preferred_owner(vm, ids) != preferred_owner("vm-a", ids)
    )
    waiter = LogWaiter()
    with capture_logs(processors=[waiter]):
        async with owner_and_relay(
            cluster_config,
            far_end,
            limits=limits,
            gateway={"drain_seconds": 30},
            more_vms=[yardstick_vm],
        ) as (owner, other):
            await until(
                lambda: yardstick_vm in other.hubs and yardstick_vm not in owner.hubs, other
            )
            async with console(other if via == "relaying" else owner, ctx, mint("alice")) as c:
                await c.control(type="notice", event="idle_warning")
                async with console(other, ctx, mint("bob"), vm=yardstick_vm) as yardstick:
                    owner.stop()
                    await c.control(type="notice", event="port_up")  # moved before its deadline
                    assert "vm-a" in other.hubs
                    assert await c.closed() == (4008, reason)
                    assert await yardstick.closed() == (4008, reason)
    assert [m for m in c.controls if m.get("event") == "idle_warning"] == []  # one per period
    ended = [e["vm"] for e in waiter.named("session_ended") if e["reason"] == reason]
    assert ended == ["vm-a", yardstick_vm]


async def test_keys_sent_as_the_console_moves_here_wait_for_its_port(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """The console of a relayed writer comes to the relaying gateway while its port is down
    (it stays down past the second that gateway waits for it before taking the session):
    the keys typed meanwhile wait for the port and then reach it, as a relay holds them for
    a new owner elsewhere, instead of being refused with `port_down` errors and lost."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    async with (
        owner_and_relay(cluster_config, far_end) as (owner, other),
        console(other, ctx, mint("alice")) as c,
    ):
        assert c.hello["role"] == "writer"
        await far_end.stop()  # down for whoever owns the port next, too
        await c.control(type="notice", event="port_down")
        owner.stop()
        await c.control(type="notice", event="port_down")  # the console moves
        await c.send(b"typed while it moved\r")
        await until(
            lambda: len(other.sessions) == 1 and not any(x.relaying for x in other.connections),
            other,
        )
        assert not other.hubs["vm-a"].port_up  # a session here now, its port still down
        await far_end.start()
        await c.control(type="notice", event="port_up")
        await far_end.wait_received(lambda got: b"typed while it moved\r" in got)
        await c.send(b"and after\r")
        await far_end.wait_received(lambda got: b"and after\r" in got)
        assert [m for m in c.controls if m.get("type") == "error"] == []


async def test_keys_held_for_a_console_that_came_here_follow_it_when_it_moves_on(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The console of a relayed writer comes to the relaying gateway while its port is
    down, and its session there holds the keys typed meanwhile for the port; then the
    console moves on (a gateway joins and takes its share) before the port is up. The
    client follows it, relayed to the new owner with the keys still held, and they reach
    the port when it comes up there; before, the client was closed with 1001."""
    # The hold outlasts both moves here whatever the host's speed: its end is not the point.
    monkeypatch.setattr(control, "MOVED_INPUT_WAIT", 60.0)
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    # The client's gateway ranks last for vm-a: the first owner, then the one that joins,
    # each take the console from it.
    first, joining, here = ranking("vm-a", ["gw-1", "gw-2", "gw-3"])
    async with (
        serving(cluster_config(first, far_end.port)) as owner,
        serving(cluster_config(here, far_end.port)) as other,
    ):
        assert other.cluster is not None
        cluster = other.cluster
        await until(lambda: (cluster.owner_of("vm-a") or ("",))[0] == first, owner, other)
        async with console(other, ctx, mint("alice")) as c:
            assert c.hello["role"] == "writer"
            await far_end.stop()  # down for whoever owns the port next, too
            await c.control(type="notice", event="port_down")
            owner.stop()
            await c.control(type="notice", event="port_down")  # the console moves here
            await c.send(b"typed while it moved\r")
            await until(
                lambda: len(other.sessions) == 1 and not any(x.relaying for x in other.connections),
                other,
            )
            assert not other.hubs["vm-a"].port_up  # a session here, holding the keys
            async with serving(cluster_config(joining, far_end.port)) as new_owner:
                await c.control(type="notice", event="port_down")  # and moves on
                await until(lambda: "vm-a" in new_owner.hubs, new_owner)
                await c.send(b"typed as it moved on\r")
                await far_end.start()
                await c.control(type="notice", event="port_up")
                await far_end.wait_received(lambda got: b"typed as it moved on\r" in got)
                assert far_end.received.count(b"typed while it moved\r") == 1
                assert far_end.received.index(b"typed while it moved\r") < (
                    far_end.received.index(b"typed as it moved on\r")
                )
                await c.send(b"and after\r")
                await far_end.wait_received(lambda got: b"and after\r" in got)
            assert [m for m in c.controls if m.get("type") == "error"] == []


@pytest.mark.parametrize(
    ("limits", "users"),
    [
        ({"max_sessions": 2}, ("alice", "bob", "olga")),
        ({"max_sessions_per_principal": 2}, ("alice",) * 3),
    ],
    ids=["max_sessions", "max_sessions_per_principal"],
)
async def test_a_relaying_gateway_counts_the_sessions_it_relays_in_its_caps(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    limits: dict[str, int],
    users: tuple[str, str, str],
) -> None:
    """The caps of the gateway a client reaches count the sessions it relays to another
    gateway's consoles: with a cap of 2 there (none on the owner) a third session is refused
    with 429 `session_limit`, and closing one frees its slot. When the console then comes to
    that gateway, its relayed sessions become its own without being counted twice (they stay),
    and the cap still holds."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    mint = _mint(gateway_pki)
    owner_id = preferred_owner("vm-a", ["gw-1", "gw-2"])
    relay_id = "gw-2" if owner_id == "gw-1" else "gw-1"
    url = "wss://localhost:{port}/v1/vms/vm-a/console?mode=spectate"
    async with (
        serving(cluster_config(owner_id, far_end.port)) as owner,
        serving(cluster_config(relay_id, far_end.port, limits=limits)) as relaying,
        contextlib.AsyncExitStack() as stack,
    ):
        cluster = relaying.cluster
        assert cluster is not None
        await until(lambda: (cluster.owner_of("vm-a") or ("",))[0] == owner_id, relaying)
        await until(lambda: "vm-a" in owner.hubs, owner)

        def relayed() -> int:
            return sum(conn.relaying for conn in relaying.connections)

        async def refused(user: str) -> tuple[int, str]:
            return await refused_upgrade(
                url.format(port=relaying.tls_port),
                ctx,
                additional_headers={"Authorization": f"Bearer {mint(user)}"},
                open_timeout=TIMEOUT,
            )

        first = await stack.enter_async_context(
            console(relaying, ctx, mint(users[0]), "mode=spectate")
        )
        second = await stack.enter_async_context(
            console(relaying, ctx, mint(users[1]), "mode=spectate")
        )
        assert relayed() == 2
        assert await refused(users[2]) == (429, "session_limit")

        await first.ws.close()
        await until(lambda: relayed() == 1, relaying)
        third = await stack.enter_async_context(
            console(relaying, ctx, mint(users[2]), "mode=spectate")
        )
        assert relayed() == 2
        assert await refused(users[0]) == (429, "session_limit")

        owner.stop()
        for c in (second, third):  # both came here, neither refused for counting itself
            await c.control(type="notice", event="port_up")
        assert "vm-a" in relaying.hubs
        assert relayed() == 0
        assert len(relaying.sessions) == 2
        assert await refused(users[0]) == (429, "session_limit")


async def test_a_ticket_payload_no_gateway_wrote_is_refused_as_a_bad_ticket(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    redis_server: RedisServer,
) -> None:
    """A ticket's payload comes from Redis, where anything may have written it: one that is
    not the JSON object a gateway writes (not UTF-8, not JSON, fields missing or of the
    wrong type, an `expires` that is no finite number) is refused 401 `invalid_ticket`,
    logged without the ticket, never a 500; a real ticket is served after them."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    good = {
        "principal": "user:alice",
        "groups": [],
        "amr": [],
        "expires": None,
        "vm": "vm-a",
        "mode": "interactive",
    }
    payloads: list[str | bytes] = [
        b"\xff\xfe",
        "not json",
        "[" * 100_000,
        "[]",
        json.dumps({"vm": "vm-a"}),
        *(
            json.dumps(good | change)
            for change in (
                {"principal": 7},
                {"principal": ""},
                {"groups": "group:ops"},
                {"amr": [1]},
                {"expires": "soon"},
                {"expires": True},
                {"mode": "write"},
            )
        ),
        json.dumps(good).replace("null", "Infinity"),
        json.dumps(good).replace("null", "NaN"),
    ]
    store = ClusterStore(redis_server.url, gateway_id="intruder", prefix=key_prefix("test"))
    limits = {"auth_failures_per_minute": 100}  # each refusal is one
    async with serving(cluster_config("gw-1", far_end.port, limits=limits)) as gateway:
        await until(lambda: "vm-a" in gateway.hubs, gateway)
        url = f"wss://localhost:{gateway.tls_port}/v1/vms/vm-a/console"
        try:
            for i, payload in enumerate(payloads):
                ticket = f"forged-ticket-{i}"
                assert await store.put_ticket(ticket, payload, 30)  # type: ignore[arg-type]
                with capture_logs() as logs:
                    got = await refused_upgrade(f"{url}?ticket={ticket}", ctx)
                assert got == (401, "invalid_ticket"), payload
                assert ticket not in repr(logs)
            assert await store.put_ticket("real-one", json.dumps(good), 30)
        finally:
            await store.close()
        async with console(gateway, ctx, "", "ticket=real-one") as c:
            assert c.hello["role"] == "writer"


async def test_a_token_that_expires_past_2_63_seconds_is_relayed_like_any(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A valid token whose `exp` is past what `Relayd-Forwarded-Expires` carries (19
    digits) opens a relayed console as it opens a direct one: the relaying gateway caps the
    expiry it forwards (no earlier end: it is billions of years away). Before, it sent 20
    digits and the owner refused the forwarded upgrade with 400."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    token = _mint(gateway_pki)("alice", ttl=2**64)
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        for gateway in (owner, other):
            async with console(gateway, ctx, token) as c:
                assert c.hello["role"] == "writer"


async def _status_through(
    port: int, ctx: ssl.SSLContext, request: bytes, *, balancer: str | None = None
) -> int:
    """The status of one request over TLS with `ctx`'s certificate; `balancer`: sent from
    that address with a PROXY header first, as a balancer in HTTP mode that re-encrypts to
    the gateways with a client certificate sends every client's request."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(balancer, 0) if balancer else None
    )
    try:
        if balancer:
            writer.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n")
        await writer.start_tls(ctx, server_hostname="localhost")
        writer.write(request)
        async with asyncio.timeout(TIMEOUT):
            line = await reader.readline()
        return int(line.split()[1])
    finally:
        writer.close()


async def test_a_gateway_certificate_through_the_balancer_is_a_clients_connection(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A balancer that ends TLS (HTTP mode, to hash paths) and re-encrypts to the gateways
    with a client certificate passes every client's headers on. Were that certificate one
    peer_ca vouches for with serverAuth (its own server certificate, from the gateways'
    private CA), any client could send Relayd-Forwarded-* headers through it and open any
    console as anyone, token or not. A genuine peer link never comes through the balancer
    (it dials the owner's advertise address, and a PROXY header marks the balancer's
    connections), so one that does is a client's: its forwarded upgrade and its owners
    question are refused 403. The same certificate straight from a gateway is honoured."""
    lb = "127.0.0.9"
    proxies = {"trusted_proxies": [f"{lb}/32"]}
    async with owner_and_relay(cluster_config, far_end, gateway=proxies) as (owner, other):
        assert other.cluster is not None
        gateway_ctx = other.cluster.peer_ssl  # the gateway certificate, as a client's
        forged = ForwardedSession(
            principal="user:olga",
            role="owner",
            mode="interactive",
            client_peer="203.0.113.7",
            session_id="f0f0f0f0f0f0f0f0",
        )
        handshake = [
            ("Host", "localhost"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "relayd.console.v1"),
        ]
        upgrade = encode_forwarded_request("/v1/vms/vm-a/console", handshake, forged)
        question = http_request("POST", "/v1/cluster/owners", body=b'{"vms": ["vm-a"]}')
        assert await _status_through(owner.tls_port, gateway_ctx, question) == 200
        for request in (upgrade, question):
            status = await _status_through(owner.tls_port, gateway_ctx, request, balancer=lb)
            assert status == 403, request[:60]
        assert await _status_through(owner.tls_port, gateway_ctx, upgrade) == 101


async def test_a_forwarded_session_id_the_owner_cannot_use_is_refused_before_the_upgrade(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A session id is 16 hex digits (the receiving gateway's `secrets.token_hex(8)`), and
    a session reads its keepalive spread from them. One the forwarded format let through
    but the session cannot read (`forged-1`) is a 400 before the 101; before, the owner
    wrote the 101, failed to start the session, logged `request_failed` and wrote an HTTP
    500 onto what was then a WebSocket stream."""
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        assert other.cluster is not None
        head = _forwarded_upgrade("0123456789abcdef")
        forged = head.replace(b"0123456789abcdef", b"forged-1")
        with capture_logs() as logs:
            status = await _status_through(owner.tls_port, other.cluster.peer_ssl, forged)
        assert status == 400
        assert "request_failed" not in [e["event"] for e in logs]


@pytest.mark.parametrize(
    "forged",
    [
        {"Relayd-Forwarded-Principal": "user%3Aolga", "Relayd-Forwarded-Role": "owner"},
        {"Relayd-Forwarded-For": "10.9.9.9"},
        {"Relayd-Forwarded-Age": "0", "Relayd-Forwarded-Idle": "0"},
        {"relayd-forwarded-expires": "99999999999"},
        {"Relayd-Forwarded-Unknown": "x"},
    ],
)
async def test_a_client_sending_forwarded_headers_is_refused_on_every_gateway(
    cluster_config: Callable[..., Config],
    gateway_pki: dict[str, Path],
    far_end: FarEnd,
    forged: dict[str, str],
) -> None:
    """A client with a valid token (no gateway certificate) that adds any Relayd-Forwarded-*
    header (another principal or role, the audited client address, a moved session's
    clocks, an expiry, a name no version knows) is refused 403 by the owner and by the
    gateway that would relay it: its own credentials are not enough to be believed."""
    ctx = ssl.create_default_context(cafile=str(gateway_pki["ca"]))
    headers = {"Authorization": f"Bearer {_mint(gateway_pki)('alice')}", **forged}
    async with owner_and_relay(cluster_config, far_end) as (owner, other):
        for gateway in (owner, other):
            url = f"wss://localhost:{gateway.tls_port}/v1/vms/vm-a/console"
            got = await refused_upgrade(url, ctx, additional_headers=headers)
            assert got == (403, "forbidden")


def _forwarded_upgrade(session_id: str) -> bytes:
    """A forwarded upgrade for vm-a as a gateway sends it, spectating."""
    handshake = [
        ("Host", "localhost"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "relayd.console.v1"),
    ]
    fwd = ForwardedSession(
        principal="user:alice",
        role="contributor",
        mode="spectate",
        client_peer="203.0.113.7",
        session_id=session_id,
    )
    return encode_forwarded_request("/v1/vms/vm-a/console", handshake, fwd)


async def test_a_peer_link_dribbling_its_forwarded_upgrade_is_reset_at_the_deadline(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """A gateway's connection is exempt from per-address limits, not from deadlines: one
    that sends its forwarded upgrade a byte at a time (slowloris) is reset once
    `handshake_timeout` has passed since it connected, bytes still arriving or not."""
    slow = {"handshake_timeout": 0.5}
    async with owner_and_relay(cluster_config, far_end, gateway=slow) as (owner, other):
        assert other.cluster is not None
        head = _forwarded_upgrade("d1d1d1d1d1d1d1d1")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", owner.tls_port, ssl=other.cluster.peer_ssl, server_hostname="localhost"
        )
        sent, dropped = 0, False
        try:
            async with asyncio.timeout(TIMEOUT):
                while not dropped and sent < len(head):
                    writer.write(head[sent : sent + 1])
                    sent += 1
                    try:
                        await writer.drain()
                        # The attacker's pace (a byte per 50 ms): the input, not a wait.
                        async with asyncio.timeout(0.05):
                            dropped = await reader.read(1) == b""
                    except TimeoutError:
                        continue
                    except (ConnectionError, ssl.SSLError):
                        dropped = True
        finally:
            writer.close()
        assert dropped
        assert sent < len(head)  # dropped mid-head, at the deadline


async def test_many_forwarded_upgrades_at_once_from_one_peer_stop_at_the_owners_cap(
    cluster_config: Callable[..., Config], gateway_pki: dict[str, Path], far_end: FarEnd
) -> None:
    """Upgrades a gateway forwards count against the owner's own session caps, however
    many arrive at once: with `max_sessions = 3`, eight from one peer, together, open
    three sessions and get 429 for the rest."""
    caps = {"max_sessions": 3}
    async with owner_and_relay(cluster_config, far_end, limits=caps) as (owner, other):
        assert other.cluster is not None
        ctx = other.cluster.peer_ssl
        links: list[asyncio.StreamWriter] = []

        async def upgrade(i: int) -> int:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", owner.tls_port, ssl=ctx, server_hostname="localhost"
            )
            links.append(writer)
            writer.write(_forwarded_upgrade(f"{i:016x}"))
            async with asyncio.timeout(TIMEOUT):
                return int((await reader.readline()).split()[1])

        try:
            statuses = await asyncio.gather(*(upgrade(i) for i in range(8)))
        finally:
            for writer in links:
                writer.close()
        assert sorted(statuses) == [101] * 3 + [429] * 5
