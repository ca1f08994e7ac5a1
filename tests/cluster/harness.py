"""Cluster test fixtures: one region per test module and a client's view of it.

The processes are processes.py's; this adds the test configuration (six VMs,
the test CA and tokens, a role per kind of user) and `Region`, which opens
consoles and makes requests through any gateway or HAProxy and tells who
holds each VM's port. Kept out of conftest.py so the cluster's other test
modules keep their own fixtures.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from relayd.auth import issue_token
from relayd.cluster.ownership import preferred_owner

from ..conftest import AUDIENCE, ISSUER, TIMEOUT, Console, http_request
from .processes import (
    LB_SOURCE,
    START_TIMEOUT,
    Cluster,
    GatewayProcess,
    SerialEnd,
    poll_until,
    toml_document,
)

__all__ = [
    "LB",
    "LEASE_TTL",
    "VM_IDS",
    "Region",
    "gateway_certificates",
    "gateway_config",
    "region",
]


# Fixtures: one region per test module, driven from outside.

LB = "lb"
"""The `target` that means: through HAProxy (the operators' config)."""
Target = GatewayProcess | str | tuple[str, int]


class Region:
    """A running cluster plus a client's view of it: tokens, consoles, HTTP, owners."""

    def __init__(
        self, cluster: Cluster, ends: Mapping[str, SerialEnd], ctx: ssl.SSLContext, secret: bytes
    ) -> None:
        self.cluster = cluster
        self.ends = dict(ends)
        self.ctx = ctx
        self._secret = secret

    @property
    def gateways(self) -> list[GatewayProcess]:
        """All gateways, running or not."""
        return self.cluster.gateways

    def token(self, user: str) -> str:
        """A bearer token for `user:<user>`."""
        return issue_token(self._secret, issuer=ISSUER, audience=AUDIENCE, sub=user)

    def address(self, target: Target) -> tuple[str, int]:
        """Where a client connects for `target` (a gateway, or LB for HAProxy)."""
        if isinstance(target, GatewayProcess):
            return target.host, target.tls_port
        if isinstance(target, tuple):
            return target
        return self.cluster.frontend

    @asynccontextmanager
    async def console(
        self,
        target: Target,
        vm: str,
        *,
        user: str | None = "alice",
        query: str = "",
        source: str = "",
    ) -> AsyncIterator[Console]:
        """A console session through `target`, its hello already read; `source`: the
        client's own address (default: the kernel's choice)."""
        host, port = self.address(target)
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        opening = connect(
            f"wss://{host}:{port}/v1/vms/{vm}/console" + (f"?{query}" if query else ""),
            ssl=self.ctx,
            server_hostname="localhost",
            subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
            additional_headers=headers,
            open_timeout=TIMEOUT,
            max_size=None,
            local_addr=(source, 0) if source else None,
        )
        try:
            ws = await opening.__aenter__()
        except InvalidStatus as exc:
            name = target.gateway_id if isinstance(target, GatewayProcess) else target
            exc.add_note(f"{vm} through {name}: {exc.response.body!r}")
            raise
        async with ws:
            console = Console(ws)
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["type"] == "hello", hello
            console.hello = hello
            yield console

    async def request(
        self,
        target: Target,
        method: str,
        path: str,
        *,
        user: str | None = None,
        body: object | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request; returns status, lower-cased headers and the raw body."""
        host, port = self.address(target)
        raw = json.dumps(body).encode() if body is not None else b""
        request = http_request(method, path, bearer=self.token(user) if user else None, body=raw)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=self.ctx, server_hostname="localhost"
        )
        try:
            writer.write(request)
            async with asyncio.timeout(TIMEOUT):
                data = await reader.read()
        finally:
            writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, payload

    def owner(self, vm: str) -> GatewayProcess | None:
        """The gateway holding the VM's port right now (seen from the hypervisor side)."""
        return self.cluster.owner_of(self.ends[vm])

    async def wait_owner(self, vm: str, *, not_on: GatewayProcess | None = None) -> GatewayProcess:
        """Wait until some gateway (not `not_on`) holds and is served the VM's port."""
        return await self.cluster.wait_owner(self.ends[vm], START_TIMEOUT, not_on=not_on)

    async def routes(self, gateway: GatewayProcess) -> dict[str, str | None]:
        """VM -> the gateway `gateway` would serve it from (`Cluster.routes`)."""
        return await self.cluster.routes(gateway, self.ctx, self.token("rita"))

    async def wait_settled(self) -> dict[str, GatewayProcess]:
        """Wait until ownership is at rest, seen from the ports and from every gateway.

        At rest: every VM is held by its preferred live gateway (rendezvous
        hashing, relayd/cluster/ownership.py), and every running gateway routes
        each VM there (each learns the owners in its own round, a third of a
        lease after a change). Returns VM -> owner.
        """
        for vm, end in self.ends.items():

            def preferred(e: SerialEnd, vm: str = vm) -> bool:
                live = [g.gateway_id for g in self.gateways if g.running()]
                owner = self.cluster.owner_of(e)
                return owner is not None and owner.gateway_id == preferred_owner(vm, live)

            await end.wait_for(preferred, START_TIMEOUT)
        owners: dict[str, GatewayProcess] = {}
        for vm in self.ends:
            owner = self.owner(vm)
            assert owner is not None, vm
            owners[vm] = owner
        expected = {vm: owner.gateway_id for vm, owner in owners.items()}
        seen: dict[str, str | None] = {}
        for gateway in self.gateways:
            if not gateway.running():
                continue

            async def agrees(gateway: GatewayProcess = gateway) -> bool:
                seen.clear()
                seen.update(await self.routes(gateway))
                return seen == expected

            try:
                await poll_until(agrees, gateway.gateway_id, START_TIMEOUT, gateway.running)
            except TimeoutError:
                raise AssertionError(
                    f"{gateway.gateway_id} routes {seen}, the ports say {expected}"
                ) from None
        return owners

    def others(self, *excluded: GatewayProcess) -> list[GatewayProcess]:
        """The running gateways except `excluded`."""
        return [g for g in self.gateways if g not in excluded and g.running()]


VM_IDS = tuple(f"vm-{i}" for i in range(6))
ROLES = (
    ("user:alice", "contributor", "/subscriptions/sub-1"),
    ("user:bob", "contributor", "/subscriptions/sub-1"),
    ("user:carol", "contributor", "/subscriptions/sub-1"),
    ("user:rita", "reader", "/subscriptions/sub-1"),
    ("user:olga", "owner", "/subscriptions/sub-1"),
)
LEASE_TTL = "3s"


def gateway_config(
    gateway: GatewayProcess,
    *,
    cluster: Cluster,
    ends: Mapping[str, SerialEnd],
    cert: Path,
    key: Path,
    ca: Path,
    secret: Path,
) -> str:
    """One test gateway's TOML: the shared VM list and roles, its own addresses and id."""
    sections: list[tuple[str, Mapping[str, object]]] = [
        (
            "gateway",
            {
                "region": "test",
                "listen": gateway.advertise,
                "health_listen": f"{gateway.host}:{gateway.health_port}",
                "state_dir": cluster.state_dir(gateway),
                "trusted_proxies": [f"{LB_SOURCE}/32"],
                "drain_seconds": "500ms",
            },
        ),
        ("tls", {"cert": cert, "key": key}),
        ("auth", {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret_file": secret}),
        # Every client here is 127.0.0.1 (directly, or named so by HAProxy's PROXY
        # header), and the harness polls /v1/vms; per-address connection limits
        # (tests/test_limits.py's subject) would only make these tests flaky.
        ("limits", {"connections_per_second_per_ip": 0}),
        (
            "cluster",
            {
                "redis": cluster.redis.url,
                "gateway_id": gateway.gateway_id,
                "advertise": gateway.advertise,
                "peer_ca": ca,
                "lease_ttl": LEASE_TTL,
            },
        ),
        ("[[subscriptions]]", {"id": "sub-1"}),
    ]
    sections += [
        ("[[vms]]", {"id": vm, "subscription": "sub-1", "serial": end.url})
        for vm, end in ends.items()
    ]
    sections += [
        ("[[role_assignments]]", {"principal": p, "role": r, "scope": s}) for p, r, s in ROLES
    ]
    return toml_document(sections)


def gateway_certificates(
    ca: trustme.CA, cluster: Cluster, directory: Path
) -> dict[str, tuple[Path, Path]]:
    """Gateway id -> (certificate, key) files: serverAuth and clientAuth, CN = the gateway id.

    A peer link accepts a certificate as a gateway's only with a subject CN
    (its name) and serverAuth, issued directly by `peer_ca` (relayd/cluster/peerlink.py);
    trustme's leaf certificates carry serverAuth and clientAuth.
    """
    certs = {}
    for gateway in cluster.gateways:
        issued = ca.issue_cert(
            "localhost", "127.0.0.1", gateway.host, common_name=gateway.gateway_id
        )
        where = directory / gateway.gateway_id
        where.mkdir(parents=True)
        issued.private_key_pem.write_to_path(str(where / "server.key"))
        issued.cert_chain_pems[0].write_to_path(str(where / "server.crt"))
        certs[gateway.gateway_id] = (where / "server.crt", where / "server.key")
    return certs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def region(
    ca: trustme.CA, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Region]:
    """Redis, three gateways (gw-1..3 on 127.0.0.2..4) and HAProxy, over six serial ends."""
    directory = tmp_path_factory.mktemp("region")
    ends = {vm: SerialEnd(vm) for vm in VM_IDS}
    cluster = Cluster(directory, python=sys.executable)
    for end in ends.values():
        cluster.track(end)
        await end.start()
    try:
        certs = gateway_certificates(ca, cluster, directory / "pki")
        cluster.write_configs(
            lambda g: gateway_config(
                g,
                cluster=cluster,
                ends=ends,
                cert=certs[g.gateway_id][0],
                key=certs[g.gateway_id][1],
                ca=pki["ca"],
                secret=pki["secret"],
            )
        )
        await cluster.start()
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        yield Region(cluster, ends, ctx, pki["secret"].read_bytes().strip())
    finally:
        await cluster.close()
        for end in ends.values():
            await end.close()
