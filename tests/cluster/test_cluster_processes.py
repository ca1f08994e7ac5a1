"""Issue 16 from outside: three `relayd serve` processes, redis-server and HAProxy, for real.

One region serves the whole module (starting it costs seconds); the tests
use different VMs where they change state, and a test that kills a gateway
or Redis brings it back before it ends. The hypervisor side is six
`SerialEnd`s that behave like QEMU's socket chardev (one client at a time)
and count connections, so "one port owner per VM" is checked where it
matters: at the port. Nothing here asserts a duration; bench/cluster.py
measures takeover and failover times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relayd.cluster.store import DEFAULT_RESERVE_AHEAD

from ..conftest import TIMEOUT, Console
from .harness import LB, VM_IDS, Region, region
from .processes import (
    START_TIMEOUT,
    GatewayProcess,
    Haproxy,
    free_port,
    hashed_haproxy_config,
    http_get,
    poll_until,
)

__all__ = ["region"]  # the fixture, imported so pytest finds it

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAILOVER_TIMEOUT = 30.0
"""Generous bound for a VM to move after its owner dies (the target is 5 s; see the bench)."""

PAUSE_MS = 60_000
"""A Redis write pause that the test lifts itself (CLIENT UNPAUSE): never the clock."""


def single_holder(region: Region) -> dict[str, int]:
    """VM -> the most connections its port ever had at once (1 means: one gateway at a time)."""
    return {vm: end.max_connections for vm, end in region.ends.items()}


async def typed(console: Console, marker: bytes) -> None:
    """Type `marker` and a return; wait for the guest's echo of it."""
    await console.send(marker + b"\r")
    await console.expect(marker)


async def wait_logged(region: Region, gateway: GatewayProcess, vm: str, offset: int) -> None:
    """Wait until the shared console log, read through `gateway`, reaches `offset`."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            status, headers, body = await region.request(
                gateway, "GET", f"/v1/vms/{vm}/console-log", user="rita"
            )
            assert status == 200, body
            if int(headers["relayd-log-end"]) >= offset:
                return
            await asyncio.sleep(0.05)  # polling another process's state: no event to wait on


async def wait_health(gateway: GatewayProcess, **expected: str) -> None:
    """Wait until the gateway's /healthz (200 always) reports `expected` (after its next round)."""
    seen: dict[str, object] = {}
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                status, body = await http_get(gateway.host, gateway.health_port, "/healthz")
                assert status == 200, body
                seen = json.loads(body)
                if all(seen.get(k) == v for k, v in expected.items()):
                    return
                await asyncio.sleep(0.05)  # polling another process's state: no event to wait on
    except TimeoutError:
        raise AssertionError(f"{gateway.gateway_id} /healthz says {seen}, not {expected}") from None


async def closed_with(console: Console) -> int | None:
    """The close code the server sent (None: the connection just ended)."""
    code, _ = await console.closed()
    return code


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def every_gateway_back(region: Region) -> AsyncIterator[None]:
    """After each test: every gateway and Redis run and answer; logs on failure in stdout."""
    yield
    if not region.cluster.redis.running():
        await region.cluster.redis.start()
    for gateway in region.gateways:
        if gateway.running():
            gateway.thaw()
        else:
            await gateway.start(region.cluster.python)
        print(f"--- {gateway.gateway_id} ---\n{gateway.log_tail(60)}")


async def test_region_every_vm_port_held_by_exactly_one_gateway(region: Region) -> None:
    """Each VM's port is open on one gateway, attached or not, spread by rendezvous hashing."""
    owners = await region.wait_settled()
    assert set(owners) == set(VM_IDS)
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)
    # Held although nobody is attached: the hub keeps capturing output.
    assert all(end.connections == 1 for end in region.ends.values())
    # And the gateways count the same: every VM owned once across the region.
    owned = 0.0
    for gateway in region.gateways:
        lines = (await gateway.metrics()).splitlines()
        owned += float(
            next(v for v in lines if v.startswith("relayd_cluster_owned_vms ")).split()[1]
        )
    assert owned == len(VM_IDS)
    # Each claim is logged with its fencing token: the number an operator follows a
    # VM's owners by (not a credential, so not redacted).
    claims = {e["vm"]: e for g in region.gateways for e in g.events("cluster_vm_claimed")}
    assert set(claims) == set(VM_IDS)
    assert all(isinstance(e["fence"], int) and e["fence"] > 0 for e in claims.values())


async def test_session_through_any_gateway_or_the_balancer_gets_hello_and_echo(
    region: Region,
) -> None:
    """Direct to each gateway (owner or forwarded) and three times through HAProxy: it works."""
    owner = (await region.wait_settled())["vm-0"]
    targets: list[GatewayProcess | str] = [*region.gateways, LB, LB, LB]
    for i, target in enumerate(targets):
        async with region.console(target, "vm-0") as console:
            assert console.hello["vm"] == "vm-0"
            assert console.hello["role"] == "writer"
            assert isinstance(console.hello["offset"], int)
            marker = f"hello-{i}".encode()
            await typed(console, marker)
            assert marker in region.ends["vm-0"].received
    assert region.owner("vm-0") is owner  # sessions never move the port
    assert single_holder(region)["vm-0"] == 1


async def test_audits_name_the_real_client_direct_relayed_or_through_the_balancer(
    region: Region,
) -> None:
    """The owner audits each session of its VM with the client's own address, whether the
    client came to it, to another gateway (relayed) or through HAProxy (its PROXY header):
    never a gateway's or the balancer's address."""
    owner = (await region.wait_settled())["vm-0"]
    targets: list[GatewayProcess | str] = [owner, *region.others(owner), LB, LB, LB]
    for i, target in enumerate(targets):
        source = f"127.0.3.{i + 1}"
        async with region.console(target, "vm-0", source=source) as console:
            session = console.hello["session"]

        def audited(session: str = session) -> list[tuple[str, str]]:
            events = owner.events("session_started") + owner.events("session_ended")
            return [(e["event"], e["peer"]) for e in events if e.get("session_id") == session]

        async def ended(audited: Callable[[], list[tuple[str, str]]] = audited) -> bool:
            return len(audited()) == 2

        await poll_until(ended, f"session_ended of {session}", TIMEOUT, owner.running)
        assert audited() == [("session_started", source), ("session_ended", source)], target


@contextlib.asynccontextmanager
async def hashed_balancer(
    region: Region,
    ca: trustme.CA,
    pki: dict[str, Path],
    directory: Path,
    *,
    client_pem: Path | None = None,
) -> AsyncIterator[tuple[str, int]]:
    """An HAProxy in HTTP mode (TLS ended there, hashing by path) in front of the region's
    gateways, with a certificate from `ca`; `client_pem`: the certificate it presents to
    them. Yields its frontend address; stopped at the end."""
    await region.wait_settled()
    pem = directory / "lb.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    front = ("127.0.0.1", free_port("127.0.0.1"))
    hashed = Haproxy(
        directory / "hashed",
        hashed_haproxy_config(
            frontend=f"{front[0]}:{front[1]}",
            pem=pem,
            ca=pki["ca"],
            servers={g.gateway_id: (g.host, g.tls_port, g.health_port) for g in region.gateways},
            client_pem=client_pem,
        ),
    )
    await hashed.start()
    try:
        yield front
    finally:
        await hashed.stop()


async def test_hashed_balancer_in_http_mode_serves_every_vm(
    region: Region, ca: trustme.CA, pki: dict[str, Path], tmp_path: Path
) -> None:
    """HAProxy hashing by path (TLS ended at HAProxy): every VM answers, hashed or forwarded."""
    async with hashed_balancer(region, ca, pki, tmp_path) as front:
        for vm in VM_IDS:
            async with region.console(front, vm, user="rita") as console:
                assert console.hello["vm"] == vm
                region.ends[vm].emit(f"\r\nhashed-{vm}\r\n".encode())
                await console.expect(f"hashed-{vm}".encode())


async def test_forwarded_headers_through_a_balancer_with_a_gateway_certificate_are_refused(
    region: Region, ca: trustme.CA, pki: dict[str, Path], tmp_path: Path
) -> None:
    """HAProxy in HTTP mode re-encrypting to the gateways with a client certificate from
    the gateways' CA (its own server certificate, serverAuth and clientAuth) passes every
    client's headers on. A client without any credential sends the headers a gateway sends
    for a session it admitted, naming an owner: each gateway refuses it 403, as it would
    from the client directly. Before, the balancer's certificate made it a peer link and
    the client had the console as that owner."""
    backend = ca.issue_cert("localhost", common_name="balancer")
    client_pem = tmp_path / "lb-client.pem"
    backend.private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    forged = {
        "Relayd-Forwarded-Version": "1",
        "Relayd-Forwarded-Principal": "user%3Aolga",
        "Relayd-Forwarded-Role": "owner",
        "Relayd-Forwarded-Mode": "interactive",
        "Relayd-Forwarded-For": "203.0.113.7",
        "Relayd-Forwarded-Session": "f0f0f0f0f0f0f0f0",
    }

    async def status(front: tuple[str, int], vm: str) -> int:
        try:
            async with connect(
                f"wss://{front[0]}:{front[1]}/v1/vms/{vm}/console",
                ssl=region.ctx,
                server_hostname="localhost",
                subprotocols=["relayd.console.v1"],  # type: ignore[list-item]
                additional_headers=forged,
                open_timeout=TIMEOUT,
            ):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    async with hashed_balancer(region, ca, pki, tmp_path, client_pem=client_pem) as front:
        assert {vm: await status(front, vm) for vm in VM_IDS} == dict.fromkeys(VM_IDS, 403)
        async with region.console(front, "vm-0") as console:  # a client's own session
            assert console.hello["role"] == "writer"


async def test_no_gateway_logs_a_token_a_ticket_or_a_keystroke(region: Region) -> None:
    """Tokens, tickets and typed text cross gateways (a ticket issued on one, redeemed
    through another and relayed to the owner; a password typed through the relay, and
    directly on the owner): none of it appears in any gateway's log, nor does anything
    shaped like a JWT."""
    owner = (await region.wait_settled())["vm-2"]
    relay = region.others(owner)[0]
    status, _, body = await region.request(
        relay, "POST", "/v1/vms/vm-2/console/tickets", user="alice"
    )
    assert status == 201, body
    ticket = json.loads(body)["ticket"]
    secrets_typed = [f"hunter2-{ticket[:6]}-relayed", f"hunter2-{ticket[:6]}-direct"]
    sessions = []
    for target, secret in zip((relay, owner), secrets_typed, strict=True):
        query = f"ticket={ticket}" if target is relay else ""
        async with region.console(
            target, "vm-2", user=None if query else "alice", query=query
        ) as c:
            await typed(c, secret.encode())
            sessions.append(c.hello["session"])

    async def both_ended() -> bool:
        ended = {e.get("session_id") for e in owner.events("session_ended")}
        return all(s in ended for s in sessions)

    await poll_until(both_ended, "session_ended of both sessions", TIMEOUT, owner.running)
    jwt_shaped = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ")
    for gateway in region.gateways:
        text = gateway.log_path.read_text(errors="replace")
        for secret in (ticket, *secrets_typed):
            assert secret not in text, (gateway.gateway_id, secret)
        assert not jwt_shaped.search(text), gateway.gateway_id


async def test_takeover_from_another_gateway_closes_old_writer_4001(region: Region) -> None:
    """A writer on one gateway is evicted by a newcomer on another: 4001, new input lands."""
    owner = (await region.wait_settled())["vm-1"]
    forwarded_a, forwarded_b = region.others(owner)[:2]
    async with region.console(forwarded_a, "vm-1", user="alice") as alice:
        await typed(alice, b"alice-was-here")
        async with region.console(forwarded_b, "vm-1", user="bob") as bob:
            assert bob.hello["role"] == "writer"
            assert await closed_with(alice) == 4001
            await typed(bob, b"bob-took-over")
            # And back across to the owner itself.
            async with region.console(owner, "vm-1", user="carol") as carol:
                assert await closed_with(bob) == 4001
                await typed(carol, b"carol-on-the-owner")
    assert b"bob-took-over" in region.ends["vm-1"].received
    assert b"carol-on-the-owner" in region.ends["vm-1"].received


async def test_takeovers_from_three_gateways_at_once_leave_one_writer(region: Region) -> None:
    """Three writers arrive together through three gateways: two get 4001, the last one writes."""
    await region.wait_settled()
    users = ("alice", "bob", "carol")
    async with AsyncExitStack() as stack:
        consoles = await asyncio.gather(
            *(
                stack.enter_async_context(region.console(gateway, "vm-1", user=user))
                for gateway, user in zip(region.gateways, users, strict=True)
            )
        )
        ends = [asyncio.create_task(closed_with(console)) for console in consoles]
        try:
            async with asyncio.timeout(TIMEOUT):
                while sum(task.done() for task in ends) < 2:
                    await asyncio.wait(
                        [task for task in ends if not task.done()],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
        finally:
            survivors = [c for c, task in zip(consoles, ends, strict=True) if not task.done()]
            for task in ends:
                task.cancel()
            await asyncio.wait(ends)
        assert sorted(t.result() for t in ends if not t.cancelled()) == [4001, 4001]
        assert len(survivors) == 1
        await typed(survivors[0], b"the-last-one-writes")


async def test_ticket_issued_on_one_gateway_is_redeemed_on_another(region: Region) -> None:
    """POST a ticket to gw-1, open the console with it on gw-2."""
    await region.wait_settled()  # also run first, on a region still starting
    gw1, gw2, _ = region.gateways
    status, _, body = await region.request(
        gw1, "POST", "/v1/vms/vm-2/console/tickets", user="alice", body={"mode": "spectate"}
    )
    assert status == 201, body
    ticket = json.loads(body)["ticket"]
    async with region.console(gw2, "vm-2", user=None, query=f"ticket={ticket}") as console:
        assert console.hello["role"] == "spectator"


async def test_ticket_redeemed_twice_at_once_on_two_gateways_exactly_one_wins(
    region: Region,
) -> None:
    """The same ticket at gw-2 and gw-3 at the same moment: one 101, one 401."""
    gw1, gw2, gw3 = region.gateways
    for _ in range(3):
        status, _, body = await region.request(
            gw1, "POST", "/v1/vms/vm-2/console/tickets", user="rita"
        )
        assert status == 201, body
        ticket = json.loads(body)["ticket"]

        async def redeem(gateway: GatewayProcess, ticket: str = ticket) -> int:
            try:
                async with region.console(gateway, "vm-2", user=None, query=f"ticket={ticket}"):
                    return 101
            except InvalidStatus as exc:
                return exc.response.status_code

        assert sorted(await asyncio.gather(redeem(gw2), redeem(gw3))) == [101, 401]


async def test_console_disabled_on_one_gateway_closes_sessions_on_all_with_4009(
    region: Region,
) -> None:
    """PUT enabled=false on gw-2: sessions on all three gateways close with 4009; new ones 403."""
    gw1, gw2, gw3 = region.gateways
    try:
        async with (
            region.console(gw1, "vm-3", user="rita") as on_gw1,
            region.console(gw2, "vm-3", user="rita") as on_gw2,
            region.console(gw3, "vm-3", user="alice") as on_gw3,
        ):
            status, _, body = await region.request(
                gw2, "PUT", "/v1/vms/vm-3/serial-console", user="olga", body={"enabled": False}
            )
            assert status == 200, body
            codes = await asyncio.gather(*(closed_with(c) for c in (on_gw1, on_gw2, on_gw3)))
            assert codes == [4009, 4009, 4009]
        for gateway in region.gateways:
            with pytest.raises(InvalidStatus) as refused:
                async with region.console(gateway, "vm-3"):
                    pass
            assert refused.value.response.status_code == 403
    finally:
        status, _, body = await region.request(
            gw3, "PUT", "/v1/vms/vm-3/serial-console", user="olga", body={"enabled": True}
        )
        assert status == 200, body
    async with region.console(LB, "vm-3") as console:
        await typed(console, b"enabled-again")


async def test_owner_killed_vm_moves_and_client_resumes_from_offset_through_balancer(
    region: Region,
) -> None:
    """kill -9 the owner: a survivor holds the port, a client resumes with ?from= and types."""
    end = region.ends["vm-4"]
    owner = (await region.wait_settled())["vm-4"]
    survivor = region.others(owner)[0]
    async with region.console(owner, "vm-4", user="alice") as local:
        await typed(local, b"before-the-kill")
        end.emit(b"\r\nprinted-before-the-kill\r\n")
        await local.expect(b"printed-before-the-kill")
        last = local.hello["offset"] - local.hello["replay"] + len(local.output)
        # Once the output is in the shared log (any gateway reads it there), kill.
        await wait_logged(region, survivor, "vm-4", last)
        owner.kill()
        await owner.wait_exit()
        # The dead gateway's own clients see the TCP connection end, no close frame.
        assert await closed_with(local) is None
    await region.wait_owner("vm-4", not_on=owner)
    await region.wait_settled()
    async with region.console(LB, "vm-4", query=f"from={last}") as resumed:
        # No duplicate: it goes on where the client was or, since a crashed owner may have
        # handed out offsets it never stored, past its reservation (at most
        # store.DEFAULT_RESERVE_AHEAD offsets on), which the client is told is a gap.
        start = resumed.hello["offset"] - resumed.hello["replay"]
        assert last <= start <= last + DEFAULT_RESERVE_AHEAD
        assert resumed.hello["replay"] == 0
        await typed(resumed, b"typing-again")
    assert single_holder(region)["vm-4"] == 1


async def test_owner_killed_before_its_output_reached_redis_offsets_are_not_reused(
    region: Region,
) -> None:
    """Output seen by a client but never logged: after failover its offsets are not reused."""
    end = region.ends["vm-4"]
    owner = (await region.wait_settled())["vm-4"]
    redis = region.cluster.redis
    async with region.console(owner, "vm-4", user="alice") as local:
        # Redis down (not frozen: a frozen one would still run the append the owner
        # already sent once it thaws): the output reaches the client only.
        await redis.stop(keep_data=True)
        try:
            end.emit(b"\r\nnever-logged\r\n")
            await local.expect(b"never-logged")
            last = local.hello["offset"] - local.hello["replay"] + len(local.output)
            owner.kill()
            await owner.wait_exit()
        finally:
            await redis.start()
    await region.wait_owner("vm-4", not_on=owner)
    await region.wait_settled()
    async with region.console(LB, "vm-4", query=f"from={last}") as resumed:
        await typed(resumed, b"after-the-loss")
        # The new bytes must not take offsets the client already holds: the log
        # goes on past `last` (a gap is allowed, and announced), never below it.
        assert resumed.hello["offset"] >= last


async def test_owner_printing_faster_than_its_reservation_killed_offsets_are_not_reused(
    region: Region,
) -> None:
    """A VM printing fast while Redis is slow: its owner hands out offsets well past the
    last stored byte. Killed then, its successor must still start past every one of them.

    The load is counted in bytes, not paced by the clock: 400 kB in one burst set the
    owner's measured rate (its reservation reaches that rate times a few call deadlines
    ahead, far more than the fixed 64 KiB least), and once that is stored, 200 kB more
    (three times the least) reach the client while Redis holds every write. The pause is
    lifted only after the owner is dead, so none of the 200 kB is ever stored, however
    long the printing takes on this host."""
    end = region.ends["vm-4"]
    owner = (await region.wait_settled())["vm-4"]
    redis = region.cluster.redis
    piece = b"f" * 4000 + b"\r\n"
    async with region.console(owner, "vm-4", user="alice") as local:

        def position() -> int:
            return local.hello["offset"] - local.hello["replay"] + len(local.output)

        async def burst(pieces: int, marker: bytes) -> None:
            for _ in range(pieces):
                end.emit(piece)
            end.emit(marker)
            await local.expect(marker)

        await burst(100, b"fast-output-seen")
        await wait_logged(region, owner, "vm-4", position())  # its mark is stored too
        stored = position()
        # Redis holds writes (not down: the owner's appends wait, they do not fail at once)
        # while the VM goes on printing; the client sees what the log does not have yet.
        assert await redis.command("CLIENT", "PAUSE", str(PAUSE_MS), "WRITE") == b"+OK\r\n"
        try:
            await burst(50, b"seen-but-not-logged")
            last = position()
            assert last - stored > 3 * DEFAULT_RESERVE_AHEAD  # past any fixed reservation
            owner.kill()
            await owner.wait_exit()
        finally:
            assert await redis.command("CLIENT", "UNPAUSE") == b"+OK\r\n"
        assert not [c for c in local.controls if c.get("type") == "output_gap"]
    await region.wait_owner("vm-4", not_on=owner)
    await region.wait_settled()
    async with region.console(LB, "vm-4", query=f"from={last}") as resumed:
        await typed(resumed, b"after-the-fast-loss")
        assert resumed.hello["offset"] >= last, (resumed.hello, last)


async def test_owner_drained_while_redis_stays_down_says_what_it_did_not_store(
    region: Region,
) -> None:
    """SIGTERM the owner while Redis is down past its leave deadline: the output it holds
    cannot be stored, and it says so (which VM, how many bytes, never the bytes). The
    successor, once Redis is back, starts past the owner's reservation: a client resuming
    at its last offset is told of the gap, never shown other bytes at offsets it holds."""
    end = region.ends["vm-1"]
    owner = (await region.wait_settled())["vm-1"]
    survivor = region.others(owner)[0]
    redis = region.cluster.redis
    printed = b"\r\nprinted-while-redis-is-down\r\n"
    async with region.console(owner, "vm-1", user="rita") as local:
        await redis.stop(keep_data=True)
        try:
            end.emit(printed)
            await local.expect(printed)
            last = local.hello["offset"] - local.hello["replay"] + len(local.output)
            await owner.stop()  # the drain, then a leave that Redis never answers
        finally:
            await redis.start()
    (lost,) = owner.events("cluster_output_not_stored")
    assert (lost["vm"], lost["bytes"], lost["level"]) == ("vm-1", len(printed), "error")
    assert lost["offsets"] == [last - len(printed), last]
    assert b"printed-while-redis-is-down" not in owner.log_path.read_bytes()
    await region.wait_owner("vm-1", not_on=owner)
    async with region.console(survivor, "vm-1", user="rita", query=f"from={last}") as resumed:
        gap = await resumed.control(type="notice", event="output_gap")
        assert gap["first"] == last
        assert last < resumed.hello["offset"] <= last + DEFAULT_RESERVE_AHEAD
        assert gap["last"] == resumed.hello["offset"] - 1
        assert resumed.output == b""


async def test_owner_killed_clients_through_other_gateways_get_port_down_up_and_stay(
    region: Region,
) -> None:
    """kill -9 the owner: a client attached through another gateway is told, and stays."""
    owner = (await region.wait_settled())["vm-4"]
    survivor = region.others(owner)[0]
    async with region.console(survivor, "vm-4", user="alice") as remote:
        await typed(remote, b"before-the-kill")
        owner.kill()
        await owner.wait_exit()
        await remote.control(type="notice", event="port_down")
        await region.wait_owner("vm-4", not_on=owner)
        await remote.control(type="notice", event="port_up")
        await typed(remote, b"still-here")


async def test_client_of_a_frozen_gateway_follows_its_vm_back_to_the_owner_it_lost(
    region: Region,
) -> None:
    """Found by the chaos checker: the gateway relaying a client is frozen while the VM's
    owner dies and, restarted, takes the VM back under a new lease. Thawed, the relay sees
    the link gone and the region naming the same gateway: it must go back to it, not wait
    for another owner that never comes (the client sat at port_down until 1001)."""
    vm = "vm-4"
    before = await region.wait_settled()
    owner = before[vm]
    relaying = region.others(owner)[0]
    async with region.console(relaying, vm, user="alice") as remote:
        await typed(remote, b"before-the-freeze")
        relaying.freeze()
        try:
            owner.kill()
            await owner.wait_exit()
            await owner.start(region.cluster.python)
            # Its own share: it claims after its grace, the other live gateway only after
            # `patience` (and the frozen one is not live).
            assert await region.wait_owner(vm) is owner
        finally:
            relaying.thaw()
        await remote.control(type="notice", event="port_down")
        await remote.control(type="notice", event="port_up")
        await typed(remote, b"after-the-thaw")
    # The frozen gateway's own VMs were claimed while it still held their ports (two
    # connections at once, as it must be): at rest again, count from here.
    await region.wait_settled()
    for held, gateway in before.items():
        if gateway is relaying:
            region.ends[held].reset_max_connections()


async def test_killed_gateway_rejoins_and_takes_back_only_its_share(region: Region) -> None:
    """A gateway killed and started again: its VMs move away and back, never two holders."""
    before = await region.wait_settled()
    victim = before["vm-5"]
    victim.kill()
    await victim.wait_exit()
    during = await region.wait_settled()
    assert victim not in during.values()
    # Only the victim's VMs moved.
    assert {vm for vm in VM_IDS if during[vm] is not before[vm]} == {
        vm for vm in VM_IDS if before[vm] is victim
    }
    await victim.start(region.cluster.python)
    assert await region.wait_settled() == before
    async with region.console(victim, "vm-5") as console:
        await typed(console, b"after-the-rejoin")
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)


async def test_redis_stop_and_start_keeps_sessions_ports_and_owners(region: Region) -> None:
    """Redis down: sessions go on, output flows, no VM moves; Redis back: all as before."""
    owners = await region.wait_settled()
    serves = {vm: end.serves for vm, end in region.ends.items()}
    owner = owners["vm-0"]
    forwarder = region.others(owner)[0]
    redis = region.cluster.redis
    async with (
        region.console(forwarder, "vm-0", user="alice") as writer,
        region.console(owner, "vm-0", user="rita") as spectator,
    ):
        await redis.stop(keep_data=True)
        try:
            await typed(writer, b"typed-while-redis-is-down")
            region.ends["vm-0"].emit(b"\r\nprinted-while-redis-is-down\r\n")
            await spectator.expect(b"printed-while-redis-is-down")
            await writer.expect(b"printed-while-redis-is-down")
            for gateway in region.gateways:
                # Ready still (all gateways share the outage), but live says degraded.
                assert await gateway.ready(), f"{gateway.gateway_id} not ready without Redis"
                await wait_health(gateway, redis="down")
                assert "relayd_cluster_redis_up 0.0" in await gateway.metrics()
            # A new session to a VM the gateway holds itself needs no Redis.
            async with region.console(owner, "vm-0", user="rita") as fresh:
                await fresh.expect(b"printed-while-redis-is-down")
            # Nor does one relayed to the owner: the route is known from before.
            async with region.console(forwarder, "vm-0", user="rita") as relayed:
                await relayed.expect(b"printed-while-redis-is-down")
        finally:
            await redis.start()
        await typed(writer, b"typed-after-redis-is-back")
        for gateway in region.gateways:
            await wait_health(gateway, redis="up")
    assert {vm: region.owner(vm) for vm in VM_IDS} == owners
    assert {vm: end.serves for vm, end in region.ends.items()} == serves


async def test_redis_restart_with_empty_dataset_is_survived(region: Region) -> None:
    """Redis loses everything: sessions go on, and then everything works on every gateway."""
    owners = await region.wait_settled()
    owner = owners["vm-2"]
    noticed = {g.gateway_id: len(g.events("cluster_redis_data_lost")) for g in region.gateways}
    status, _, body = await region.request(
        owner, "PUT", "/v1/vms/vm-5/serial-console", user="olga", body={"enabled": False}
    )
    assert status == 200, body
    async with region.console(region.others(owner)[0], "vm-2") as writer:
        await region.cluster.redis.restart_empty()
        await typed(writer, b"typed-after-redis-lost-everything")
    # Each gateway notices the new dataset in its next round (until then its routes
    # are the old ones, right by luck); holders re-create their leases, no VM moves.
    for gateway in region.gateways:
        await gateway.wait_event("cluster_redis_data_lost", noticed[gateway.gateway_id] + 1)
    assert await region.wait_settled() == owners
    for i, gateway in enumerate(region.gateways):
        async with region.console(gateway, "vm-2") as console:
            await typed(console, f"after-empty-{i}".encode())
        status, _, body = await region.request(
            gateway, "POST", "/v1/vms/vm-2/console/tickets", user="alice"
        )
        assert status == 201, body
        # A console disabled before the loss stays disabled everywhere.
        with pytest.raises(InvalidStatus) as refused:
            async with region.console(gateway, "vm-5"):
                pass
        assert refused.value.response.status_code == 403
    status, _, body = await region.request(
        owner, "PUT", "/v1/vms/vm-5/serial-console", user="olga", body={"enabled": True}
    )
    assert status == 200, body
    assert {vm: region.owner(vm) for vm in VM_IDS} == owners
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)


async def test_frozen_owner_is_fenced_and_lets_go_when_it_wakes(region: Region) -> None:
    """SIGSTOP the owner: a survivor claims, the frozen one's late output is refused, it lets go.

    A client relayed to the frozen owner through another gateway leaves it as soon as
    the region names the new owner (port_down while it is still frozen), waits for the
    port, and types on: it never hears from the deposed owner again.
    """
    before = await region.wait_settled()
    owner = before["vm-3"]
    end = region.ends["vm-3"]
    served_before = len(end.holders)
    async with contextlib.AsyncExitStack() as stack:
        remote = await stack.enter_async_context(
            region.console(region.others(owner)[0], "vm-3", user="alice")
        )
        await typed(remote, b"before-the-freeze")
        owner.freeze()
        try:
            # The survivor's claim shows at the port: a second connection, waiting its
            # turn (as QEMU makes it wait) while the frozen process still holds the port.
            await end.wait_for(lambda e: e.connections == 2, FAILOVER_TIMEOUT)
            # Printed now, it waits in the frozen owner's socket: a deposed owner's output.
            assert end.emit(b"\r\nprinted-to-the-frozen-owner\r\n")
            async with asyncio.timeout(FAILOVER_TIMEOUT):
                await remote.control(type="notice", event="port_down")
        finally:
            owner.thaw()
        # Awake, it sees its lease gone, closes the port; the survivor gets it.
        await end.wait_for(
            lambda e: any(h != owner.gateway_id for h in e.holders[served_before:]),
            START_TIMEOUT,
        )
        await remote.control(type="notice", event="port_up")
        await typed(remote, b"after-the-thaw")
        assert b"printed-to-the-frozen-owner" not in remote.output
    # Then ownership comes back to rest: the thawed gateway takes back its share.
    assert await region.wait_settled() == before
    status, _, log = await region.request(owner, "GET", "/v1/vms/vm-3/console-log", user="rita")
    assert status == 200, log
    assert b"printed-to-the-frozen-owner" not in log  # its late append was refused
    async with region.console(LB, "vm-3") as console:
        await typed(console, b"after-the-freeze")
    for vm, owned in before.items():
        if owned is owner:
            # Two at once was the frozen process holding on, as it must: reset the count.
            region.ends[vm].reset_max_connections()
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)


async def test_frozen_owner_that_wakes_while_redis_is_down_lets_go_of_its_port(
    region: Region,
) -> None:
    """SIGSTOP the owner until a survivor claims its VM, then Redis goes away, then SIGCONT.

    Awake, the owner cannot ask Redis, but it knows it did not run for longer than a
    lease: its lease lapsed and may be another's (it is). It lets go at once instead of
    holding the single-client port, and typing into the VM, for the whole outage.
    """
    before = await region.wait_settled()
    owner = before["vm-3"]
    end = region.ends["vm-3"]
    served_before = len(end.holders)
    redis = region.cluster.redis
    owner.freeze()
    try:
        # A survivor's claim: its connection waits behind the frozen owner's.
        await end.wait_for(lambda e: e.connections == 2, FAILOVER_TIMEOUT)
        await redis.stop(keep_data=True)
    finally:
        owner.thaw()
    try:
        await end.wait_for(
            lambda e: any(h != owner.gateway_id for h in e.holders[served_before:]),
            START_TIMEOUT,
        )
    finally:
        await redis.start()
    assert await region.wait_settled() == before
    for vm, owned in before.items():
        if owned is owner:
            region.ends[vm].reset_max_connections()  # the frozen process held on, as it must
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)


async def test_a_thawed_owner_never_types_into_a_port_another_gateway_took(
    region: Region,
) -> None:
    """SIGSTOP the owner past its lease while its client types, a survivor claims, SIGCONT.

    The keys typed while it was frozen wait in its socket, and more come right after the
    thaw: all of them arrive before its first round can tell it the lease is gone. It must
    hold them, since its lease lapsed (another gateway owns the VM now), and never write
    them to the port: the port receives nothing more from it.
    """
    before = await region.wait_settled()
    owner = before["vm-2"]
    end = region.ends["vm-2"]
    async with region.console(owner, "vm-2", user="alice") as local:
        await typed(local, b"before-the-freeze")
        serve = len(end.holders) - 1
        assert end.holders[serve] == owner.gateway_id
        sent = len(end.received_by[serve])
        owner.freeze()
        try:
            await local.send(b"typed-while-frozen\r")
            # The survivor's claim: its connection waits behind the frozen owner's.
            await end.wait_for(lambda e: e.connections == 2, FAILOVER_TIMEOUT)
            await local.send(b"typed-after-the-takeover\r")
        finally:
            owner.thaw()
        with contextlib.suppress(ConnectionClosed):  # its session may be moved or ended
            await local.send(b"typed-right-after-the-thaw\r")
        # The next client served means the thawed owner's connection is gone, read to its end.
        await end.wait_for(lambda e: len(e.holders) > serve + 1, START_TIMEOUT)
    assert end.holders[serve + 1] != owner.gateway_id
    assert bytes(end.received_by[serve][sent:]) == b""
    assert await region.wait_settled() == before
    for vm, owned in before.items():
        if owned is owner:
            region.ends[vm].reset_max_connections()  # the frozen process held on, as it must
    assert single_holder(region) == dict.fromkeys(VM_IDS, 1)


async def test_last_offsets_and_console_log_agree_on_every_gateway(region: Region) -> None:
    """/console-log of a VM reads the same bytes, with the same offsets, on every gateway."""
    await region.wait_settled()
    region_end = region.ends["vm-1"]
    async with region.console(LB, "vm-1") as console:
        region_end.emit(b"\r\nfor-the-log\r\n")
        await console.expect(b"for-the-log")
        last = console.hello["offset"] - console.hello["replay"] + len(console.output)
    # The owner ships output to Redis within 100 ms (it gathers for 25 ms first).
    await wait_logged(region, region.gateways[0], "vm-1", last)
    # From this session's first byte: an earlier test may have left a hole before it, and
    # a read from the log's start ends at the hole.
    first = console.hello["offset"] - console.hello["replay"]
    logs = []
    for gateway in region.gateways:
        status, headers, body = await region.request(
            gateway, "GET", f"/v1/vms/vm-1/console-log?from={first}", user="rita"
        )
        assert status == 200, body
        logs.append((headers["relayd-log-start"], headers["relayd-log-end"], body))
    assert logs[0] == logs[1] == logs[2]
    assert body.count(b"for-the-log") == 1
