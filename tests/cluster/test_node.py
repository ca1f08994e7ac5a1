"""The node's console-output shipping on a real redis-server: bounded round trips, every VM
served in turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relayd.cluster.node import APPEND_ROUND_TRIP_BYTES, ClusterNode, NodeOwner, Outbox
from relayd.cluster.ownership import Lease
from relayd.cluster.store import ClusterStore, SwitchChange
from relayd.config import LimitsConfig, VmConfig
from relayd.hub import ConsoleHub
from relayd.switches import ConsoleSwitches

from ..conftest import TIMEOUT
from .conftest import RedisServer, StoreFactory
from .test_store import expire_lease

pytestmark = pytest.mark.asyncio

MIB = 1 << 20


class _PortlessGateway:
    """The node's view of its gateway (`NodeOwner`), for a node that only ships output."""

    def configured_vms(self) -> Mapping[str, VmConfig]:
        return {}

    def open_hub(self, vm: VmConfig, history: tuple[int, bytes], sink: Outbox) -> ConsoleHub:
        raise AssertionError("no VM is claimed here")

    def close_hub(self, vm_id: str, reason: str) -> None:
        raise AssertionError(f"{vm_id} was dropped: {reason}")

    def switches_changed(self, change: SwitchChange | None = None) -> None:
        pass

    def owners_changed(self, vms: Collection[str]) -> None:
        pass


def _node(
    owner: NodeOwner, store: ClusterStore, *, lease_ttl: float = 3.0, log_bytes: int = MIB
) -> ClusterNode:
    """Gateway gw-1's node on `store` (a ring of a MiB)."""
    return ClusterNode(
        owner,
        store,
        gateway_id="gw-1",
        advertise="127.0.0.1:1",
        lease_ttl=lease_ttl,
        ring_bytes=MIB,
        log_bytes=log_bytes,
    )


async def _cut_hand_over(store: ClusterStore, node: ClusterNode) -> int:
    """Claim vm-a and leave it as `_hand_over` does when cut short between closing the port
    and Redis (a stop, or Redis failing): dropped, recorded, 1000 bytes of output unstored,
    the lease still ours. Returns the token."""
    token = await store.claim("vm-a")
    assert token is not None
    box = Outbox("vm-a", token, MIB, lambda: None)
    box.append(0, b"x" * 1000)
    node._releasing["vm-a"] = (token, box)
    return token


async def test_outbox_mark_covers_a_burst_from_an_idle_vm_and_shrinks_slowly() -> None:
    """A VM quiet since its outbox began prints a MiB at once: the first mark already
    reaches past what it may print in the horizon at that rate (the quiet time does not
    dilute it), never less than the least reservation; with no output after, the mark
    shrinks by halves, not at once."""
    least, horizon = 65536, 2.0
    box = Outbox("vm-a", 1, 4 * MIB, lambda: None, start=100)
    assert box.mark(horizon, least) == 100 + least  # nothing printed: the least
    box._measured = (time.monotonic() - 60.0, 100)  # as if that mark was a minute ago
    box.append(100, b"x" * MIB)
    first = box.mark(horizon, least) - box.end
    assert first >= MIB  # a MiB in well under the horizon: more than a MiB ahead
    assert box.mark(horizon, least) - box.end == first // 2
    for _ in range(64):
        box.mark(horizon, least)
    assert box.mark(horizon, least) - box.end == least


async def test_many_vms_printing_at_once_go_to_redis_in_bounded_round_trips(
    make_store: StoreFactory,
) -> None:
    """Ten VMs with a MiB each waiting: no round trip carries more than the cap, each VM's
    output goes exactly once, and all of it is stored."""
    store = make_store("gw-1")
    node = _node(_PortlessGateway(), store, log_bytes=2 * MIB)
    vms = [f"vm-{i}" for i in range(10)]
    for vm in vms:
        token = await store.claim(vm)
        assert token is not None
        box = Outbox(vm, token, 2 * MIB, lambda: None)
        box.append(0, bytes([65 + len(node.outboxes)]) * MIB)
        node.outboxes[vm] = box
    trips: list[list[str]] = []
    while any(box.chunks for box in node.outboxes.values()):
        shipped = await node._ship(list(node.outboxes.values()))
        assert shipped
        assert all(result.ok for _, result in shipped)
        trips.append([box.vm for box, _ in shipped])
    assert max(map(len, trips)) * MIB <= APPEND_ROUND_TRIP_BYTES
    assert sorted(vm for trip in trips for vm in trip) == vms
    for vm in vms:
        assert await store.bounds(vm) == (0, MIB)


class _SubscribedGateway(_PortlessGateway):
    """Knows when the node has subscribed to the region's channel (it then re-reads the
    switches and says they changed)."""

    def __init__(self) -> None:
        self.subscribed = asyncio.Event()

    def switches_changed(self, change: SwitchChange | None = None) -> None:
        self.subscribed.set()


async def test_news_of_a_claim_or_release_elsewhere_runs_a_round_at_once(
    make_store: StoreFactory,
) -> None:
    """Another gateway announces that leases changed hands: this node runs its ownership
    round now, not when its schedule says (a lease period of 60 s: 20 s from now)."""
    gateway = _SubscribedGateway()
    node = _node(gateway, make_store("gw-1", lease_ttl=60.0), lease_ttl=60.0)
    other = make_store("gw-2", lease_ttl=60.0)
    async with asyncio.TaskGroup() as tg:
        running = tg.create_task(node.run())
        async with asyncio.timeout(TIMEOUT):
            await node.first_round.wait()
            await gateway.subscribed.wait()  # the news can reach it
        assert node.stats.rounds == 1
        news_round = asyncio.ensure_future(node.next_round())
        await asyncio.sleep(0)  # waiting on the round before the news is out
        await other.announce_owners()
        async with asyncio.timeout(TIMEOUT):
            await news_round
        assert node.stats.rounds == 2
        assert node.stats.news_rounds == 1
        node.stop()
        await running


async def test_a_stop_that_cuts_a_hand_over_short_still_ships_and_releases(
    make_store: StoreFactory,
) -> None:
    """The gateway stops while a round hands a VM over (its port already closed, its lease
    and output not yet in Redis): leaving finishes the hand-over instead of letting the
    lease lapse and the output go."""
    store = make_store("gw-1")
    node = _node(_PortlessGateway(), store)
    token = await _cut_hand_over(store, node)  # by a stop
    assert await store.holder("vm-a") == Lease("gw-1", token)
    await node._leave()
    assert await store.holder("vm-a") is None
    assert await store.bounds("vm-a") == (0, 1000)


async def test_a_hand_over_whose_output_is_refused_says_what_it_did_not_store(
    make_store: StoreFactory,
) -> None:
    """A hand-over cut short, and meanwhile another gateway took the VM (its lease lapsed):
    the output it kept is refused as fenced and cannot be stored. It must not vanish
    silently: an error naming the VM and the byte count (never the bytes), and counted."""
    store, other = make_store("gw-1"), make_store("gw-2")
    node = _node(_PortlessGateway(), store)
    await _cut_hand_over(store, node)
    await expire_lease(store, "vm-a")
    assert await other.claim("vm-a") is not None
    with capture_logs() as events:
        await node._leave()
    lost = [e for e in events if e["event"] == "cluster_output_not_stored"]
    assert [(e["vm"], e["bytes"], e["reason"]) for e in lost] == [("vm-a", 1000, "fenced")]
    assert "xxxx" not in repr(events)
    assert node.stats.unstored_bytes == 1000
    assert not node._releasing


class _SwitchCounter(_PortlessGateway):
    """Counts the switch changes the node passes on."""

    def __init__(self) -> None:
        self.changes = 0

    def switches_changed(self, change: SwitchChange | None = None) -> None:
        self.changes += 1


async def test_a_switch_message_that_changes_nothing_writes_nothing(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    """Anyone allowed to PUBLISH on the switches channel could repeat a message in a loop:
    one that sets a switch to the value it has costs no file write (an fsync) and no walk
    over the sessions; a change still does both."""
    backup = ConsoleSwitches(tmp_path)
    gateway = _SwitchCounter()
    node = ClusterNode(
        gateway,
        make_store("gw-1"),
        gateway_id="gw-1",
        advertise="127.0.0.1:1",
        lease_ttl=3.0,
        ring_bytes=MIB,
        log_bytes=MIB,
        backup=backup,
    )
    node._on_switch(SwitchChange("vms", "vm-a", False))
    written = backup.path.stat().st_ino
    assert gateway.changes == 1
    for _ in range(3):
        node._on_switch(SwitchChange("vms", "vm-a", False))
    assert backup.path.stat().st_ino == written
    assert gateway.changes == 1
    node._on_switch(SwitchChange("vms", "vm-a", True))
    assert backup.path.stat().st_ino != written
    assert gateway.changes == 2
    assert backup.get("vms", "vm-a") is True


def _switch_node(store: ClusterStore, gateway_id: str, backup: ConsoleSwitches) -> ClusterNode:
    return ClusterNode(
        _PortlessGateway(),
        store,
        gateway_id=gateway_id,
        advertise="127.0.0.1:1",
        lease_ttl=3.0,
        ring_bytes=MIB,
        log_bytes=MIB,
        backup=backup,
    )


async def _switch_region(
    make_store: StoreFactory, tmp_path: Path
) -> tuple[dict[str, ClusterStore], dict[str, ClusterNode]]:
    """Two gateways of one region that have read its switches (no watcher runs)."""
    stores = {gw: make_store(gw) for gw in ("gw-1", "gw-2")}
    nodes = {
        gw: _switch_node(store, gw, ConsoleSwitches(tmp_path / gw)) for gw, store in stores.items()
    }
    for gw, store in stores.items():
        await store.heartbeat("127.0.0.1:1")
        await nodes[gw].load_switches()
    return stores, nodes


async def test_after_redis_loses_its_data_every_gateway_puts_back_what_it_knew(
    make_store: StoreFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """gw-1 missed changes (its watcher was down) when Redis restarted empty, and put its
    overrides back first: what gw-2 knew must not be lost with the first writer's view.
    Missing overrides come back from whoever knew them, and where the two disagree the
    console stays disabled. A plain re-read that finds the region changed (same dataset)
    takes the region's word: a gateway's stale view never undoes a newer change."""
    stores, nodes = await _switch_region(make_store, tmp_path)
    # What each knew when Redis lost its data (gw-1 missed vm-5 and vm-7's disabling).
    nodes["gw-1"].switches = {"vms": {"vm-3": False, "vm-7": True, "vm-8": True}}
    nodes["gw-2"].switches = {"vms": {"vm-3": False, "vm-5": False, "vm-7": False}}
    await redis_server.restart_empty()
    await nodes["gw-1"].load_switches()
    await stores["gw-1"].heartbeat("127.0.0.1:1")  # a new dataset id, before gw-2 reads
    await nodes["gw-2"].load_switches()
    want = {"vm-3": False, "vm-5": False, "vm-7": False, "vm-8": True}
    assert (await stores["gw-1"].all_switches())["vms"] == want
    assert nodes["gw-2"].switches["vms"] == want
    # No loss: vm-5 enabled by an operator while gw-1 was away; gw-1's old view yields.
    await stores["gw-2"].set_switch("vms", "vm-5", True)
    await nodes["gw-1"].load_switches()
    await nodes["gw-1"].load_switches()
    assert (await stores["gw-1"].all_switches())["vms"]["vm-5"] is True
    assert nodes["gw-1"].switches["vms"]["vm-5"] is True


@pytest.mark.parametrize("first", ["gw-1", "gw-2"])
async def test_after_redis_loses_its_data_the_last_change_of_a_switch_wins(
    make_store: StoreFactory, redis_server: RedisServer, tmp_path: Path, first: str
) -> None:
    """gw-2 disabled vm-7, then gw-1 enabled it again while gw-2 was not listening. When
    Redis comes back empty both put back what they knew, in either order: the later
    change is the one that stays, not whichever is the disabled one."""
    stores, nodes = await _switch_region(make_store, tmp_path)
    await nodes["gw-2"].set_switch("vms", "vm-7", False)
    await nodes["gw-2"].set_switch("vms", "vm-8", True)
    await nodes["gw-1"].load_switches()  # gw-1 hears both
    await nodes["gw-1"].set_switch("vms", "vm-7", True)  # gw-2 does not hear this one
    await nodes["gw-2"].set_switch("vms", "vm-8", False)  # nor gw-1 this one
    await redis_server.restart_empty()
    second = "gw-2" if first == "gw-1" else "gw-1"
    await nodes[first].load_switches()
    await stores[first].heartbeat("127.0.0.1:1")  # a new dataset id, before the other reads
    await nodes[second].load_switches()
    await nodes[first].load_switches()  # a plain re-read: Redis's word
    want = {"vm-7": True, "vm-8": False}
    assert (await stores["gw-1"].all_switches())["vms"] == want
    assert nodes["gw-1"].switches["vms"] == want
    assert nodes["gw-2"].switches["vms"] == want


async def test_a_region_started_on_an_empty_redis_keeps_the_last_change_each_backup_knew(
    make_store: StoreFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Every gateway and Redis restarted, Redis empty: the overrides come back from the
    gateways' state files, and where two files disagree the later change wins there too."""
    stores, nodes = await _switch_region(make_store, tmp_path)
    await nodes["gw-2"].set_switch("vms", "vm-7", False)
    await nodes["gw-1"].load_switches()
    await nodes["gw-1"].set_switch("vms", "vm-7", True)  # gw-2 stops before it hears this
    await redis_server.restart_empty()
    backups = {gw: ConsoleSwitches(tmp_path / gw) for gw in nodes}
    for gw, backup in backups.items():
        backup.load()
        await stores[gw].heartbeat("127.0.0.1:1")
    restarted = {gw: _switch_node(stores[gw], gw, backups[gw]) for gw in ("gw-2", "gw-1")}
    for node in restarted.values():
        await node.load_switches()
    assert (await stores["gw-1"].all_switches())["vms"] == {"vm-7": True}


async def test_a_switch_change_a_redis_failover_lost_is_put_back_at_the_next_read(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    """Replication is asynchronous: a new primary may lack a change the old one took, with
    the same dataset. The gateways that knew it put it back when they read the region
    again (every watcher subscribes again after a failover); an older one stays as it is."""
    store = make_store("gw-1")
    node = _switch_node(store, "gw-1", ConsoleSwitches(tmp_path))
    await store.heartbeat("127.0.0.1:1")
    await node.load_switches()
    await node.set_switch("vms", "vm-7", False)
    for table in ("switches", "switch-times"):  # what the new primary never got
        await store._command("HDEL", store._key(table, "vms"), "vm-7")
    await node.load_switches()
    assert (await store.all_switches())["vms"] == {"vm-7": False}


class _OneVmGateway(_PortlessGateway):
    """Configures one VM (its hub was closed before the test begins)."""

    def __init__(self, vm: VmConfig) -> None:
        self.vm = vm

    def configured_vms(self) -> Mapping[str, VmConfig]:
        return {self.vm.id: self.vm}


async def test_a_round_that_releases_a_lease_left_by_a_cut_hand_over_still_ships_its_output(
    make_store: StoreFactory,
) -> None:
    """A hand-over closed the port, then Redis failed before the output and the release
    went: the lease is still ours in Redis, the port is not. The next round releases that
    lease (the "not held, lease mine" row): it must ship the output the hand-over kept,
    not forget it because no outbox is open for the VM any more."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    store = make_store("gw-1")
    node = _node(_OneVmGateway(vm), store)
    await _cut_hand_over(store, node)  # by Redis failing in `_finish_releases`
    await node.round()
    assert node.stats.rounds == 1
    assert await store.holder("vm-a") is None
    assert await store.bounds("vm-a") == (0, 1000)
    assert not node._releasing


async def test_a_vm_handed_over_before_redis_lost_its_data_is_not_claimed_at_offset_0(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """A gateway hands a VM over (its clients hold offsets up to 1000), and Redis restarts
    empty before any gateway claims it: only the gateway that handed it over knows where
    its offsets stood, and it puts that back in its first round after the loss, so the
    next owner starts past them instead of at 0 (seen by the chaos soak: two different
    bytes at one offset)."""
    store = make_store("gw-1")
    node = _node(_PortlessGateway(), store)
    await node.round()  # the dataset as it was
    await _cut_hand_over(store, node)
    await node._finish_releases()
    assert await store.holder("vm-a") is None
    await redis_server.restart_empty()
    assert await make_store("gw-2").resume_point("vm-a") == 0
    await node.round()  # notices the new dataset
    assert await make_store("gw-2").resume_point("vm-a") >= 1000


class _ClosingGateway(_PortlessGateway):
    """Records why the node closed each hub."""

    def __init__(self) -> None:
        self.closed: dict[str, str] = {}

    def close_hub(self, vm_id: str, reason: str) -> None:
        self.closed[vm_id] = reason


async def test_a_vm_removed_from_the_configuration_is_released_saying_so(
    make_store: StoreFactory,
) -> None:
    """A held VM the configuration no longer names is handed over (lease released) and its
    sessions are told it was removed, not that it moved to another gateway."""
    gateway = _ClosingGateway()
    store = make_store("gw-1")
    node = _node(gateway, store)
    token = await store.claim("vm-gone")
    assert token is not None
    node.held["vm-gone"] = token
    node.outboxes["vm-gone"] = Outbox("vm-gone", token, MIB, lambda: None)
    await node.round()
    assert gateway.closed == {"vm-gone": "the console was removed from the configuration"}
    assert await store.holder("vm-gone") is None


async def test_output_refused_for_a_lapsed_lease_goes_once_the_round_re_creates_the_lease(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """Redis restarted empty between two rounds: an append that came first found no lease
    ("lapsed") and the output waits. The next round re-creates the lease; the output must
    then go, not wait until the VM prints again (it may print nothing for hours)."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    store = make_store("gw-1")
    node = _node(_OneVmGateway(vm), store)
    token = await store.claim("vm-a")
    assert token is not None
    node.held["vm-a"] = token
    node.policy.claimed("vm-a", token)
    box = Outbox("vm-a", token, MIB, node._wake.set)
    node.outboxes["vm-a"] = box
    await node.round()  # renewed: the node has seen Redis's dataset
    await redis_server.restart_empty()
    box.append(0, b"printed as Redis came back")
    node._wake.clear()  # the appender's own trip, as it makes it:
    await node._append_once()
    assert box.chunks  # refused: no lease (yet)
    await node.round()  # the loss noticed, the lease re-created
    tasks = [asyncio.create_task(node._appender()), asyncio.create_task(node._rounds())]
    try:
        async with asyncio.timeout(TIMEOUT):
            while box.chunks:
                await node.next_round()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    assert await store.bounds("vm-a") == (0, 26)


class _SlowClosingGateway(_OneVmGateway):
    """A port that takes a moment to close, and prints its last output meanwhile (read
    by the hub before the port is gone)."""

    def __init__(self, vm: VmConfig) -> None:
        super().__init__(vm)
        self.box: Outbox | None = None

    def close_hub(self, vm_id: str, reason: str) -> asyncio.Future[None]:
        closed = asyncio.get_running_loop().create_future()

        def last_output() -> None:
            assert self.box is not None
            self.box.append(self.box.end, b"last words\n")
            closed.set_result(None)

        asyncio.get_running_loop().call_later(0.05, last_output)
        return closed


async def test_a_hand_over_waits_for_the_port_to_close_and_ships_its_last_output(
    make_store: StoreFactory,
) -> None:
    """Handing a VM over, the node closes its port, then ships, settles and releases. The
    port's last output, read as it closed, belongs in the log, and the lease may go only
    once the port is closed (the next owner opens it next). Shipping without waiting lost
    that output, and settling before it arrived left the mark a reservation ahead."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    store = make_store("gw-1")
    gateway = _SlowClosingGateway(vm)
    node = _node(gateway, store)
    token = await store.claim("vm-a")
    assert token is not None
    node.held["vm-a"] = token
    box = gateway.box = node.outboxes["vm-a"] = Outbox("vm-a", token, MIB, lambda: None)
    box.append(0, b"printed\n")
    await node._hand_over({"vm-a": token}, "the console moved to another gateway")
    assert (await store.read("vm-a", 0, 100)).data == b"printed\nlast words\n"
    assert await store.resume_point("vm-a") == 19
    assert await store.holder("vm-a") is None


async def test_malformed_leases_and_heartbeats_in_redis_are_skipped_and_rounds_go_on(
    make_store: StoreFactory,
) -> None:
    """Redis holds what any client of it wrote: a lease or a heartbeat that no gateway of
    this version wrote (not UTF-8, no token, a token that is no decimal number, an address
    without a port) is logged once and skipped. The round goes on with the rest: the node
    keeps the VM it holds, never claims a VM whose lease key is taken, and routes only to
    gateways whose address it can dial. Before, one such value raised out of every round
    and ended the node's task group, and so the gateway."""
    vm_a = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    vm_b = VmConfig(id="vm-b", subscription="sub-1", serial="tcp://127.0.0.1:1")

    class TwoVms(_PortlessGateway):
        def configured_vms(self) -> Mapping[str, VmConfig]:
            return {"vm-a": vm_a, "vm-b": vm_b}

    store = make_store("gw-1")
    node = _node(TwoVms(), store)
    token = await store.claim("vm-a")
    assert token is not None
    node.held["vm-a"] = token
    node.policy.claimed("vm-a", token)
    node.outboxes["vm-a"] = Outbox("vm-a", token, MIB, node._wake.set)
    lease_b = store._key("lease", "vm-b")
    bad_gateways = {"gw-x": b"\xff\xfe:1", "gw-y": b"no-port", "gw-z": b"host:99999"}
    for gw, advertise in bad_gateways.items():
        await store._command("SET", store._key("gw", gw), advertise)
        await store._command("SADD", store._key("gateways"), gw)
    for value in (b"\xff\xfe:12", b"gw-2", b"gw-2:", b"gw-2:1_2", b"gw-2: 12", b"gw-2:1e3"):
        await store._command("SET", lease_b, value)
        with capture_logs() as logs:
            await node.round()
            await node.round()
        assert node.held == {"vm-a": token}
        assert await store._command("GET", lease_b) == value  # never claimed over
        warned = [e for e in logs if e["event"] == "cluster_malformed_state"]
        assert [e["key"] for e in warned if "lease" in e["key"]] == [lease_b]
    assert node.stats.rounds == 12
    assert set(node._live) == {"gw-1"}  # none of the undialable ones
    assert await store.holder("vm-a") == Lease("gw-1", token)


async def test_a_vm_whose_log_marks_in_redis_are_unreadable_is_let_go_and_rounds_go_on(
    make_store: StoreFactory,
) -> None:
    """A claimed VM's hub starts where the shared log says (`logmeta`): marks that are not
    numbers leave no safe offset to start at. The node lets that VM go (its lease released,
    its port never opened, the error logged) and goes on; before, the ValueError raised out
    of the round and ended the node."""
    vm = VmConfig(id="vm-a", subscription="sub-1", serial="tcp://127.0.0.1:1")
    store = make_store("gw-1")
    node = _node(_OneVmGateway(vm), store)
    node.policy.grace = 0  # claim at the first round
    await store._command("HSET", store._key("logmeta", "vm-a"), "start", "0", "end", "x1")
    with capture_logs() as logs:
        await node.round()
        await node.round()
    assert node.stats.rounds == 2
    assert not node.held
    assert await store.holder("vm-a") is None
    assert "cluster_vm_log_unreadable" in [e["event"] for e in logs]


class _FreezingGateway(_PortlessGateway):
    """Configures two VMs; Redis stops answering as the first hub the node opens opens."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis_server = redis_server
        self.vms = {
            vm: VmConfig(id=vm, subscription="sub-1", serial="tcp://127.0.0.1:1")
            for vm in ("vm-a", "vm-b")
        }
        self.opened: list[str] = []
        self.moved: list[str] = []

    def configured_vms(self) -> Mapping[str, VmConfig]:
        return self.vms

    def open_hub(self, vm: VmConfig, history: tuple[int, bytes], sink: Outbox) -> ConsoleHub:
        if not self.opened:
            self.redis_server.freeze()
        self.opened.append(vm.id)
        return ConsoleHub(vm, LimitsConfig(), sink=sink, history=history)

    def owners_changed(self, vms: Collection[str]) -> None:
        self.moved += vms


async def test_a_claim_round_that_fails_after_opening_a_hub_routes_by_it_at_once(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """A round claims two VMs another gateway held, opens the first one's hub, and Redis
    stops answering before the second one's (the round fails). The node routes by what it
    holds from then on: the first VM is its own (sessions relayed to the old owner move
    here, and a relay waiting for the next owner finds it), not the old owner's until a
    round succeeds (minutes, while Redis is away); the second, whose port it does not hold,
    is nobody's."""
    gateway = _FreezingGateway(redis_server)
    store = make_store("gw-1")
    node = _node(gateway, store)
    node.policy.grace = 0  # claim as soon as the VMs are free
    old = make_store("gw-2")
    await old.heartbeat("127.0.0.2:2")
    tokens = {vm: await old.claim(vm) for vm in gateway.vms}
    await node.round()
    assert {vm: node.owner_of(vm) for vm in gateway.vms} == dict.fromkeys(
        gateway.vms, ("gw-2", "127.0.0.2:2")
    )
    for vm, token in tokens.items():
        assert token is not None
        assert await old.release(vm, token)
    await old.leave()
    try:
        with capture_logs() as logs:
            await node.round()
    finally:
        redis_server.thaw()
    assert "cluster_redis_unavailable" in [e["event"] for e in logs]
    assert node.stats.rounds == 1  # the second round failed
    (opened,) = gateway.opened
    (other,) = set(gateway.vms) - {opened}
    assert node.held.keys() == {opened}
    assert node.owner_of(opened) == ("gw-1", "127.0.0.1:1")
    assert node.fence_of(opened) == node.held[opened]
    assert node.owner_of(other) is None
    assert opened in gateway.moved
