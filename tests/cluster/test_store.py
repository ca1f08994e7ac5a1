"""Tests for relayd.cluster.store against a real redis-server: leases and fencing, tickets,
console switches, the console-log stream, and Redis being down, frozen or restarted empty."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.cluster.ownership import Lease
from relayd.cluster.store import (
    LEVELS,
    SCRIPT_BYTES,
    SCRIPT_VMS,
    AppendResult,
    ClusterStore,
    ClusterUnavailableError,
    LogSlice,
    Outgoing,
    Override,
    OwnershipNews,
    SwitchChange,
    SwitchesLost,
    SwitchesResync,
    SwitchEvent,
    _channel_event,
    _lease,
    key_prefix,
    vms_digest,
)

from ..conftest import TIMEOUT
from .conftest import RedisServer, StoreFactory


async def expire_lease(store: ClusterStore, vm: str) -> None:
    """What the lease's PX expiry does after lease_ttl, without waiting for it."""
    await store._command("DEL", store._key("lease", vm))


# --- membership ---------------------------------------------------------------------------


async def test_store_heartbeat_gateways_listed_with_advertise(make_store: StoreFactory) -> None:
    """Heartbeating gateways are live with their advertise address; one that leaves is not."""
    a, b = make_store("gw-a"), make_store("gw-b")
    await a.heartbeat("10.0.0.1:8443")
    await b.heartbeat("10.0.0.2:8443")
    assert await a.live_gateways() == {"gw-a": "10.0.0.1:8443", "gw-b": "10.0.0.2:8443"}
    await b.leave()
    assert await a.live_gateways() == {"gw-a": "10.0.0.1:8443"}


async def test_store_observe_one_round_trip_reads_everything(make_store: StoreFactory) -> None:
    """observe heartbeats and returns live gateways and every VM's lease together."""
    a, b = make_store("gw-a"), make_store("gw-b")
    await b.heartbeat("b:1")
    token = await b.claim("vm-1")
    assert token is not None
    state = await a.observe("a:1", ["vm-1", "vm-2"], vms_digest=vms_digest(["vm-2", "vm-1"]))
    assert state.live == {"gw-a": "a:1", "gw-b": "b:1"}
    assert state.holders == {"vm-1": Lease("gw-b", token), "vm-2": None}
    # Each gateway's VM list, as a digest (b set none): the others see when it changes.
    assert state.vm_lists == {"gw-a": vms_digest(["vm-1", "vm-2"]), "gw-b": ""}
    assert vms_digest(["vm-1"]) != vms_digest(["vm-1", "vm-2"])
    assert state.dataset == await b.heartbeat("b:1")


async def test_store_dataset_id_changes_when_redis_restarts_empty(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """The dataset id is stable while Redis keeps its data and new after it lost it."""
    a = make_store("gw-a")
    first = await a.heartbeat("a:1")
    assert await a.heartbeat("a:1") == first
    await redis_server.restart_empty()
    assert await a.heartbeat("a:1") != first


async def test_store_observe_without_heartbeat_still_sees_the_data_lost(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """A leaving gateway observes without heartbeating, and still reads the dataset id: the
    same as the others see, and a new one once Redis restarted empty."""
    a, b = make_store("gw-a"), make_store("gw-b")
    first = await b.heartbeat("b:1")
    state = await a.observe("a:1", ["vm-1"], heartbeat=False)
    assert state.dataset == first
    assert state.live == {"gw-b": "b:1"}
    await redis_server.restart_empty()
    after = (await a.observe("a:1", ["vm-1"], heartbeat=False)).dataset
    assert after != first
    assert await b.heartbeat("b:1") == after


def test_key_prefix_region_is_a_hash_tag() -> None:
    """A region's keys share one Redis Cluster hash slot, and regions differ."""
    assert key_prefix("japaneast") == "relayd:{japaneast}:"


# --- leases and fencing -------------------------------------------------------------------


async def test_store_claim_three_gateways_at_once_exactly_one_wins(
    make_store: StoreFactory,
) -> None:
    """Three gateways claiming the same VM concurrently: one token, the others get None."""
    stores = [make_store(f"gw-{i}") for i in range(3)]
    for _ in range(20):
        vm = f"vm-{random.randrange(1 << 30)}"  # noqa: S311 - test data, not secrets
        results = await asyncio.gather(*(s.claim(vm) for s in stores))
        winners = [s.gateway_id for s, r in zip(stores, results, strict=True) if r is not None]
        assert len(winners) == 1
        token = next(r for r in results if r is not None)
        assert await stores[0].holder(vm) == Lease(winners[0], token)


async def test_store_claim_tokens_rise_across_owners_and_respect_floor(
    make_store: StoreFactory,
) -> None:
    """Each change of owner issues a higher token; a floor above the counter is honoured."""
    a, b = make_store("gw-a"), make_store("gw-b")
    t1 = await a.claim("vm-1")
    assert t1 is not None
    assert await a.release("vm-1", t1)
    t2 = await b.claim("vm-1")
    assert t2 is not None
    assert t2 > t1
    await expire_lease(b, "vm-1")
    t3 = await a.claim("vm-1", floor=t2 + 1000)
    assert t3 == t2 + 1001


async def test_store_deposed_owner_renew_fails_and_append_is_fenced(
    make_store: StoreFactory,
) -> None:
    """After its lease lapsed and another gateway claimed, the old owner can do nothing."""
    a, b = make_store("gw-a"), make_store("gw-b")
    old = await a.claim("vm-1")
    assert old is not None
    assert (await a.append("vm-1", old, 0, [b"boot\n"])).ok
    await expire_lease(a, "vm-1")
    new = await b.claim("vm-1")
    assert new is not None
    assert await a.renew("vm-1", old) is False
    assert await a.release("vm-1", old) is False
    assert (await a.append("vm-1", old, 5, [b"late"])).status == "fenced"
    assert await b.holder("vm-1") == Lease("gw-b", new)
    assert (await b.read("vm-1", 0, 100)).data == b"boot\n"


async def test_store_frozen_owner_late_append_with_old_token_refused(
    make_store: StoreFactory,
) -> None:
    """A SIGSTOPped owner waking up after a takeover: its buffered append is refused, even
    after the new owner released the VM again (the counter moved on)."""
    a, b = make_store("gw-a"), make_store("gw-b")
    old = await a.claim("vm-1")
    assert old is not None
    await expire_lease(a, "vm-1")
    new = await b.claim("vm-1")
    assert new is not None
    assert (await b.append("vm-1", new, 0, [b"from b"])).ok
    assert await b.release("vm-1", new)
    result = await a.append("vm-1", old, 0, [b"from a, late"])
    assert result == AppendResult("fenced")
    assert await a.renew("vm-1", old) is False
    assert (await a.read("vm-1", 0, 100)).data == b"from b"


async def test_store_renew_lapsed_lease_nobody_took_is_recreated(
    make_store: StoreFactory,
) -> None:
    """A lease that lapsed (a Redis hiccup) comes back with the same token on renew."""
    a = make_store("gw-a")
    token = await a.claim("vm-1")
    assert token is not None
    await expire_lease(a, "vm-1")
    assert (await a.append("vm-1", token, 0, [b"x"])).status == "lapsed"
    assert await a.renew("vm-1", token) is True
    assert await a.holder("vm-1") == Lease("gw-a", token)
    assert (await a.append("vm-1", token, 0, [b"x"])).ok


async def test_store_bulk_lease_calls_cover_every_vm(make_store: StoreFactory) -> None:
    """claim_many, renew_many, release_many and holders act per VM, past one script's share."""
    a, b = make_store("gw-a"), make_store("gw-b")
    vms = [f"vm-{i}" for i in range(SCRIPT_VMS + 44)]
    assert (await b.claim_many({"vm-7": 0}))["vm-7"] is not None
    claimed = await a.claim_many(dict.fromkeys(vms, 0))
    assert claimed["vm-7"] is None
    mine = {vm: t for vm, t in claimed.items() if t is not None}
    assert len(mine) == len(vms) - 1
    assert set((await a.renew_many(mine)).values()) == {True}
    await expire_lease(a, "vm-3")  # lapsed, nobody took it: re-created
    await b._command("SET", b._key("lease", "vm-290"), "gw-b:999")  # somebody else's: lost
    renewed = await a.renew_many(mine)
    assert [vm for vm, ok in renewed.items() if not ok] == ["vm-290"]
    assert list(renewed) == list(mine)
    await b._command("DEL", b._key("lease", "vm-290"))
    await a.renew("vm-290", mine["vm-290"])
    holders = await a.holders(vms)
    assert holders["vm-7"] is not None
    assert holders["vm-7"].gateway == "gw-b"
    assert all(holders[vm] == Lease("gw-a", t) for vm, t in mine.items())
    assert set((await a.release_many(mine)).values()) == {True}
    assert [vm for vm, h in (await a.holders(vms)).items() if h is not None] == ["vm-7"]


# --- tickets ------------------------------------------------------------------------------


async def test_store_ticket_redeemed_twice_at_once_exactly_one_wins(
    make_store: StoreFactory,
) -> None:
    """The same ticket redeemed concurrently on two gateways: one payload, one None."""
    a, b = make_store("gw-a"), make_store("gw-b")
    for i in range(20):
        assert await a.put_ticket(f"ticket-{i}", '{"vm": "vm-1"}', ttl=30)
        results = await asyncio.gather(b.take_ticket(f"ticket-{i}"), a.take_ticket(f"ticket-{i}"))
        assert sorted(results, key=lambda r: r is None) == ['{"vm": "vm-1"}', None]


async def test_store_ticket_only_hash_is_stored_and_id_is_unique(
    make_store: StoreFactory,
) -> None:
    """Redis never holds the ticket itself, and an id cannot be issued twice."""
    a = make_store("gw-a")
    assert await a.put_ticket("s3cret-ticket", "{}", ttl=30)
    assert await a.put_ticket("s3cret-ticket", "{}", ttl=30) is False
    keys = await a._command("KEYS", "*")
    assert not any(b"s3cret" in k for k in keys)
    assert await a.take_ticket("unknown") is None


# --- console switches ---------------------------------------------------------------------


async def test_store_switch_set_is_persisted_and_published(make_store: StoreFactory) -> None:
    """A switch set on one gateway is stored and reaches another gateway's watcher."""
    a, b = make_store("gw-a"), make_store("gw-b")
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait))
        async with asyncio.timeout(5):
            assert await events.get() == SwitchesResync()
            await a.set_switch("scale_sets", "sub-1/rg-1/ss-1", False)
            assert await events.get() == SwitchChange("scale_sets", "sub-1/rg-1/ss-1", False)
        watcher.cancel()
    assert await b.all_switches() == {
        "subscriptions": {},
        "scale_sets": {"sub-1/rg-1/ss-1": False},
        "vms": {},
    }


async def test_store_switch_changes_are_timed_and_a_restore_writes_only_a_later_change(
    make_store: StoreFactory,
) -> None:
    """Each change of an override gets a time past the key's last one, carried in its
    message; putting an override back writes it only where it is the later change (a tie:
    disabled stays), so gateways putting back what they knew, in any order, agree."""
    a, b = make_store("gw-a"), make_store("gw-b")
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait))
        async with asyncio.timeout(5):
            assert await events.get() == SwitchesResync()
            first = await a.set_switch("vms", "vm-1", False)
            heard = await events.get()
            assert isinstance(heard, SwitchChange)
            assert heard.at == first
            # The key's time ahead of the clock (a Redis whose clock went back): still later.
            await a._command("HSET", a._key("switch-times", "vms"), "vm-1", first + 10**9)
            second = await a.set_switch("vms", "vm-1", True)
            assert second == first + 10**9 + 1
            assert (await events.get()).at == second  # type: ignore[union-attr]
            older = Override("vms", "vm-1", False, second - 1)
            tie = Override("vms", "vm-1", False, second)
            assert await b.restore_switches([older]) == 0
            assert await b.restore_switches([tie]) == 1  # enabled then disabled at one time
            assert await events.get() == SwitchChange("vms", "vm-1", False)
            assert await b.restore_switches([Override("vms", "vm-1", True, second)]) == 0
            missing = Override("subscriptions", "sub-1", True, 0)  # untimed: only if unset
            assert await b.restore_switches([missing, missing]) == 1
            assert await events.get() == SwitchChange("subscriptions", "sub-1", True)
        watcher.cancel()
    read = await a.read_switches()
    assert read.switches == {
        "subscriptions": {"sub-1": True},
        "scale_sets": {},
        "vms": {"vm-1": False},
    }
    assert read.times["vms"] == {"vm-1": second}
    assert read.times["subscriptions"] == {"sub-1": 0}
    await a._command("HSET", a._key("switch-times", "vms"), "vm-1", "soon")
    assert (await a.read_switches()).times["vms"] == {}  # not a number: untimed


async def test_store_ownership_news_reaches_watchers_and_unknown_messages_are_ignored(
    make_store: StoreFactory,
) -> None:
    """A gateway's announcement that leases changed hands reaches the others' watchers as
    `OwnershipNews`; a message on the channel this version does not know is skipped."""
    a, b = make_store("gw-a"), make_store("gw-b")
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait))
        async with asyncio.timeout(5):
            assert await events.get() == SwitchesResync()
            await a._command("PUBLISH", a._key("switches"), '{"ownership": 7}')
            await a._command("PUBLISH", a._key("switches"), "not json")
            await a.announce_owners()
            assert await events.get() == OwnershipNews("gw-a")
        watcher.cancel()
    assert events.empty()


async def test_store_switch_watcher_redis_restart_resubscribes(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """After Redis restarts, the watcher subscribes again, says so, and gets new changes."""
    a, b = make_store("gw-a"), make_store("gw-b", timeout=0.5)
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait, ping_interval=0.2))
        async with asyncio.timeout(10):
            assert await events.get() == SwitchesResync()
            await redis_server.restart_empty()
            assert isinstance(await events.get(), SwitchesLost)
            assert await events.get() == SwitchesResync()
            await a.set_switch("vms", "vm-1", True)
            assert await events.get() == SwitchChange("vms", "vm-1", True)
        watcher.cancel()


async def test_store_switch_watcher_frozen_redis_is_noticed_and_recovered(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """A hung Redis (no answer, no close) is noticed by the watcher's pings; it resubscribes."""
    a, b = make_store("gw-a"), make_store("gw-b", timeout=0.3)
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait, ping_interval=0.2))
        async with asyncio.timeout(10):
            assert await events.get() == SwitchesResync()
            redis_server.freeze()
            try:
                lost = await events.get()
            finally:
                redis_server.thaw()
            assert isinstance(lost, SwitchesLost)
            assert "silent" in lost.reason
            assert await events.get() == SwitchesResync()
            await a.set_switch("subscriptions", "sub-1", False)
            assert await events.get() == SwitchChange("subscriptions", "sub-1", False)
        watcher.cancel()


# --- the console log ----------------------------------------------------------------------


async def test_store_log_offsets_continue_across_owners_no_gap_no_duplicate(
    make_store: StoreFactory,
) -> None:
    """Owner A writes, fails over to B which continues from the log's end, and any gateway
    reads one contiguous history."""
    a, b, c = make_store("gw-a"), make_store("gw-b"), make_store("gw-c")
    ta = await a.claim("vm-1")
    assert ta is not None
    r1 = await a.append("vm-1", ta, 0, [b"Linux version 6.1\n", b"login: "])
    assert (r1.start, r1.end, r1.written, r1.gap) == (0, 25, 25, None)
    await expire_lease(a, "vm-1")
    tb = await b.claim("vm-1")
    assert tb is not None
    start, end = await b.bounds("vm-1")
    assert (start, end) == (0, 25)
    r2 = await b.append("vm-1", tb, end, [b"root\n", b"# "])
    assert (r2.end, r2.written, r2.skipped, r2.gap) == (32, 7, 0, None)
    assert (await a.append("vm-1", ta, 25, [b"stale"])).status == "fenced"
    assert await c.read("vm-1", 0, 1000) == LogSlice(
        0, 32, 0, b"Linux version 6.1\nlogin: root\n# "
    )
    assert await c.read("vm-1", 20, 7) == LogSlice(0, 32, 20, b"gin: ro")


async def test_store_log_resend_after_timeout_writes_no_byte_twice(
    make_store: StoreFactory,
) -> None:
    """An append re-sent with an overlapping start stores (and counts) only the new suffix."""
    a = make_store("gw-a")
    token = await a.claim("vm-1")
    assert token is not None
    await a.append("vm-1", token, 0, [b"abcdef"])
    again = await a.append("vm-1", token, 3, [b"def", b"ghi"])
    assert (again.written, again.skipped, again.end) == (3, 3, 9)
    whole = await a.append("vm-1", token, 0, [b"abc"])
    assert (whole.written, whole.skipped, whole.end) == (0, 3, 9)
    assert (await a.read("vm-1", 0, 100)).data == b"abcdefghi"
    assert int(await a._command("HGET", a._key("logmeta", "vm-1"), "appended")) == 9


async def test_store_log_output_after_end_is_reported_as_gap(make_store: StoreFactory) -> None:
    """Output that starts past the log's end records a gap; reads skip over it."""
    a = make_store("gw-a")
    token = await a.claim("vm-1")
    assert token is not None
    await a.append("vm-1", token, 0, [b"0123456789"])
    result = await a.append("vm-1", token, 15, [b"FGHIJ"])
    assert result.gap == (10, 15)
    assert (result.start, result.end) == (0, 20)
    assert await a.read("vm-1", 0, 100) == LogSlice(0, 20, 0, b"0123456789")
    assert await a.read("vm-1", 12, 100) == LogSlice(0, 20, 15, b"FGHIJ")
    assert await a.read("vm-1", 17, 100) == LogSlice(0, 20, 17, b"HIJ")


async def test_store_log_trimming_keeps_at_most_console_log_bytes(
    make_store: StoreFactory,
) -> None:
    """However much is appended, the stored log stays within console_log_bytes and holds
    exactly the newest bytes."""
    a = make_store("gw-a", console_log_bytes=4096, entry_bytes=512)
    token = await a.claim("vm-1")
    assert token is not None
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    model = bytearray()
    for _ in range(60):
        chunks = [rng.randbytes(rng.randrange(1, 400)) for _ in range(rng.randrange(1, 5))]
        result = await a.append("vm-1", token, len(model), chunks)
        model += b"".join(chunks)
        assert result.ok
        assert result.end == len(model)
        assert min(result.end, 4096 - 512) <= result.end - result.start <= 4096
    start, end = await a.bounds("vm-1")
    got = await a.read("vm-1", 0, 10_000)
    assert got.offset == start
    assert got.data == bytes(model[start:end])
    stored = await a._command("HGET", a._key("logmeta", "vm-1"), "bytes")
    assert int(stored) == end - start
    ever = await a._command("HGET", a._key("logmeta", "vm-1"), "appended")
    assert int(ever) == len(model)  # trimmed bytes were stored too


async def test_store_log_one_append_larger_than_the_log_keeps_its_tail(
    make_store: StoreFactory,
) -> None:
    """A batch bigger than console_log_bytes keeps its newest bytes at their offsets."""
    a = make_store("gw-a", console_log_bytes=4096)
    token = await a.claim("vm-1")
    assert token is not None
    data = bytes(range(256)) * 40  # 10240 bytes
    result = await a.append("vm-1", token, 100, [data[:5000], data[5000:]])
    assert (result.start, result.end) == (100 + 10240 - 4096, 100 + 10240)
    got = await a.read("vm-1", 0, 10_000)
    assert (got.offset, got.data) == (result.start, data[-4096:])


async def test_store_log_random_appends_match_a_model(make_store: StoreFactory) -> None:
    """Overlapping re-sends, exact continuations and gaps, then reads from any offset,
    agree with a byte-for-byte model of the log."""
    a = make_store("gw-a", console_log_bytes=8192, entry_bytes=300)
    token = await a.claim("vm-1")
    assert token is not None
    rng = random.Random(11)  # noqa: S311 - test data, not secrets
    stored: dict[int, int] = {}  # offset -> byte
    end = 0
    for _ in range(80):
        kind = rng.choice(["continue", "continue", "resend", "gap"])
        at = {"continue": end, "resend": max(0, end - rng.randrange(1, 200))}.get(
            kind, end + rng.randrange(1, 100)
        )
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 500)))
        result = await a.append("vm-1", token, at, [data])
        for i, byte in enumerate(data):
            if at + i >= end:  # below the end: a re-send, already stored (or a gap)
                stored[at + i] = byte
        end = max(end, at + len(data))
        assert result.end == end
    start, log_end = await a.bounds("vm-1")
    assert log_end == end
    for _ in range(40):
        frm = rng.randrange(0, end + 10)
        got = await a.read("vm-1", frm, rng.randrange(1, 3000))
        assert got.offset >= max(frm, start)
        expect = bytes(stored[o] for o in range(got.offset, got.offset + len(got.data)))
        assert got.data == expect
        assert all(o not in stored for o in range(max(frm, start), got.offset))


async def test_store_log_many_tiny_entries_read_whole_and_trim_whole(
    make_store: StoreFactory,
) -> None:
    """Hundreds of tiny entries (a VM echoing keystrokes) read back in one piece, and one
    large append later trims them all."""
    a = make_store("gw-a", console_log_bytes=4096, entry_bytes=1024)
    token = await a.claim("vm-1")
    assert token is not None
    batches = [Outgoing("vm-1", token, 3 * i, [b"%03d" % i]) for i in range(700)]
    results = await a.append_many(batches)
    assert all(r.ok for r in results)
    whole = b"".join(b"%03d" % i for i in range(700))
    assert await a.read("vm-1", 0, 10_000) == LogSlice(0, 2100, 0, whole)
    big = bytes(range(256)) * 16
    result = await a.append("vm-1", token, 2100, [big])
    assert (result.start, result.end) == (2100, 2100 + 4096)
    assert await a.read("vm-1", 0, 10_000) == LogSlice(2100, 6196, 2100, big)


async def test_store_append_many_is_one_call_for_several_vms(make_store: StoreFactory) -> None:
    """append_many stores each VM's batch and reports each result in order."""
    a, b = make_store("gw-a"), make_store("gw-b")
    t1 = await a.claim("vm-1")
    t2 = await b.claim("vm-2")
    assert t1 is not None
    assert t2 is not None
    results = await a.append_many(
        [Outgoing("vm-1", t1, 0, [b"one"]), Outgoing("vm-2", t1, 0, [b"two"])]
    )
    assert [r.status for r in results] == ["ok", "fenced"]
    assert (await b.read("vm-1", 0, 10)).data == b"one"
    assert await b.bounds("vm-2") == (0, 0)


async def test_store_append_many_splits_calls_and_keeps_each_vms_result(
    make_store: StoreFactory,
) -> None:
    """More VMs than one script takes, and more bytes: every VM's result, in order."""
    a, b = make_store("gw-a"), make_store("gw-b")
    vms = [f"vm-{i}" for i in range(SCRIPT_VMS * 2 + 10)]
    tokens = {vm: t for vm, t in (await a.claim_many(dict.fromkeys(vms, 0))).items() if t}
    assert len(tokens) == len(vms)
    await expire_lease(a, "vm-5")
    await b._command("SET", b._key("fence", "vm-300"), str(tokens["vm-300"] + 1))
    big = bytes(range(256)) * (SCRIPT_BYTES // 256 + 1)
    batches = [Outgoing(vm, tokens[vm], 0, [vm.encode(), b"|"]) for vm in vms]
    batches[7] = Outgoing("vm-7", tokens["vm-7"], 0, [big])
    results = await a.append_many(batches)
    assert len(results) == len(vms)
    statuses = {vm: r.status for vm, r in zip(vms, results, strict=True)}
    assert statuses.pop("vm-5") == "lapsed"
    assert statuses.pop("vm-300") == "fenced"
    assert set(statuses.values()) == {"ok"}
    assert results[7].end == len(big)
    assert (await b.read("vm-400", 0, 100)).data == b"vm-400|"
    assert await b.bounds("vm-5") == (0, 0)


# --- Redis down, frozen, restarted empty --------------------------------------------------


async def test_store_redis_restarts_empty_holders_reclaim_and_reappend(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """After Redis lost everything, the holder re-asserts its token, re-appends its buffer,
    and a newcomer's claim of another VM gets a token above any issued before."""
    a, b = make_store("gw-a"), make_store("gw-b")
    ta = await a.claim("vm-1")
    tb = await b.claim("vm-2")
    assert ta is not None
    assert tb is not None
    await a.append("vm-1", ta, 0, [b"before restart\n"])
    await redis_server.restart_empty()
    assert await a.holder("vm-1") is None
    assert (await a.append("vm-1", ta, 15, [b"after\n"])).status == "lapsed"
    assert await a.renew("vm-1", ta) is True
    result = await a.append("vm-1", ta, 0, [b"before restart\n", b"after\n"])
    assert (result.start, result.end, result.gap) == (0, 21, None)
    assert (await b.read("vm-1", 0, 100)).data == b"before restart\nafter\n"
    assert await b.renew("vm-2", tb) is True
    t3 = await a.claim("vm-3")
    assert t3 is not None
    assert t3 > max(ta, tb)


async def test_store_redis_down_raises_cluster_unavailable_without_waiting_for_the_deadline(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """With Redis stopped every call fails fast with ClusterUnavailableError; after a start,
    the same store works again. Fast: the calls' deadline is an hour, far past the test's
    own bound on each call, so a call that waited for it fails the test; none is timed."""
    a = make_store("gw-a", timeout=3600.0)
    assert await a.claim("vm-1") is not None
    await redis_server.stop()
    calls = [
        lambda: a.claim("vm-2"),
        lambda: a.heartbeat("a:1"),
        lambda: a.read("vm-1", 0, 10),
        lambda: a.bounds("vm-1"),
        lambda: a.take_ticket("t"),
    ]
    for call in calls:
        with pytest.raises(ClusterUnavailableError, match="redis"):
            async with asyncio.timeout(TIMEOUT):  # a TimeoutError here is not the error above
                await call()
    await redis_server.start()
    assert await a.claim("vm-2") is not None


async def test_store_redis_frozen_times_out_at_deadline_then_recovers(
    make_store: StoreFactory, redis_server: RedisServer
) -> None:
    """A hung Redis makes calls fail at the deadline (its error says so, and it never comes
    early), not hang; once it answers again, the store's connections work (a cancelled read
    does not poison the pool)."""
    a = make_store("gw-a", timeout=0.3)
    token = await a.claim("vm-1")
    assert token is not None
    redis_server.freeze()
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        with pytest.raises(ClusterUnavailableError, match=r"within 0\.3 s"):
            async with asyncio.timeout(TIMEOUT):  # a hang fails with TimeoutError instead
                await a.renew("vm-1", token)
        assert loop.time() - began > 0.25  # not early: a lower bound no slow host breaks
        with pytest.raises(ClusterUnavailableError):
            await a.append("vm-1", token, 0, [b"xyz"])
    finally:
        redis_server.thaw()
    assert await a.renew("vm-1", token) is True
    # The timed-out append may or may not have run: sending it again is always safe.
    again = await a.append("vm-1", token, 0, [b"xyz"])
    assert (again.ok, again.end, again.written + again.skipped) == (True, 3, 3)
    assert (await a.read("vm-1", 0, 10)).data == b"xyz"


async def test_store_offsets_reserved_ahead_so_a_successor_never_reuses_them(
    make_store: StoreFactory,
) -> None:
    """A crashed owner's unstored offsets are skipped by its successor; a settled one's are not."""
    a, b = make_store("gw-a"), make_store("gw-b")
    token = await a.claim("vm-1")
    assert token is not None
    assert (await a.append("vm-1", token, 0, [b"stored\n"])).ok
    # The owner may have handed out more than it stored: its successor starts past the mark.
    assert await b.resume_point("vm-1") == 7 + a.reserve_ahead
    assert await a.settle("vm-1", token, 7)  # everything handed out is stored
    assert await b.resume_point("vm-1") == 7
    assert await a.reserve("vm-1", token, 100)
    assert await a.release("vm-1", token)
    new = await b.claim("vm-1")
    assert new is not None
    assert not await a.reserve("vm-1", token, 10_000)  # fenced: the lease is b's
    assert await b.resume_point("vm-1") == 100


async def test_store_append_reserves_up_to_the_owners_mark_when_it_stores(
    make_store: StoreFactory,
) -> None:
    """An owner that handed out more than a reservation's worth past what it stores says
    so with the append: the successor starts past that mark. A re-send that stores
    nothing moves no mark."""
    a, b = make_store("gw-a"), make_store("gw-b")
    token = await a.claim("vm-1")
    assert token is not None
    far = 5_000_000
    assert (await a.append("vm-1", token, 0, [b"stored\n"], mark=far)).ok
    assert await b.resume_point("vm-1") == far
    # A mark below the usual reservation never lowers it.
    assert (await a.append("vm-1", token, 7, [b"more\n"], mark=1)).ok
    assert await b.resume_point("vm-1") == far
    assert await a.settle("vm-1", token, 12)
    assert (await a.append("vm-1", token, 0, [b"stored\nmore\n"], mark=far * 2)).written == 0
    assert await b.resume_point("vm-1") == 12


async def test_store_settle_never_lets_a_successor_reuse_offsets_an_owner_skipped_to(
    make_store: StoreFactory,
) -> None:
    """An owner that started past a predecessor's reservation and printed nothing hands
    over at its own start: its clients were told that offset, so it is never reused."""
    a, b = make_store("gw-a"), make_store("gw-b")
    token = await a.claim("vm-1")
    assert token is not None
    assert (await a.append("vm-1", token, 0, [b"stored\n"])).ok
    start = await b.resume_point("vm-1")  # a died: b starts past a's reservation
    assert start > 7
    assert await a.release("vm-1", token)
    new = await b.claim("vm-1")
    assert new is not None
    assert await b.reserve("vm-1", new, start + b.reserve_ahead)
    assert await b.settle("vm-1", new, start)  # nothing printed while b owned it
    assert await a.resume_point("vm-1") == start


async def test_store_a_late_resend_after_a_settle_leaves_the_mark_settled(
    make_store: StoreFactory,
) -> None:
    """A hand-over ships the output and settles; an append of the same output, sent earlier
    by the appender on another connection, arrives after the settle. It stores nothing and
    must not move the mark a reservation ahead again: the next owner would start there, a
    gap of offsets where nothing was printed (seen in rolling restarts)."""
    a, b = make_store("gw-a"), make_store("gw-b")
    token = await a.claim("vm-1")
    assert token is not None
    assert (await a.append("vm-1", token, 0, [b"stored\n"])).ok
    assert await a.settle("vm-1", token, 7)
    late = await a.append("vm-1", token, 0, [b"stored\n"])
    assert (late.ok, late.written, late.skipped) == (True, 0, 7)
    assert await b.resume_point("vm-1") == 7


async def test_store_switch_watcher_skips_any_message_and_switches_it_cannot_read(
    make_store: StoreFactory,
) -> None:
    """Anyone who may PUBLISH on the region's channel, or write its switch hashes, is not a
    gateway: a message nested too deep for the JSON parser (it raised RecursionError, which
    ended the watcher and so the node and the gateway), not UTF-8, or of the wrong shape is
    skipped, and the next change still arrives; a switch key that is not UTF-8 is left out."""
    a, b = make_store("gw-a"), make_store("gw-b")
    events: asyncio.Queue[SwitchEvent] = asyncio.Queue()
    hostile = [
        "[" * 100_000,
        '{"level": "vms", "key": ' + "[" * 100_000 + "}",
        b"\xff\xfe",
        '{"level": ["vms"], "key": "vm-1", "enabled": false}',
        '{"level": "vms", "key": "vm-1", "enabled": 0}',
        "9" * 5000,
        "[]",
    ]
    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(b.watch_switches(events.put_nowait))
        async with asyncio.timeout(5):
            assert await events.get() == SwitchesResync()
            for message in hostile:
                await a._command("PUBLISH", a._key("switches"), message)
            await a.set_switch("vms", "vm-1", False)
            assert await events.get() == SwitchChange("vms", "vm-1", False)
        assert not watcher.done()
        watcher.cancel()
    assert events.empty()
    await a._command("HSET", a._key("switches", "vms"), b"\xff", b"0")
    assert await b.all_switches() == {"subscriptions": {}, "scale_sets": {}, "vms": {"vm-1": False}}


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    st.binary(max_size=200)
    | _JSONISH.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {"level": _JSONISH | st.sampled_from(LEVELS), "key": _JSONISH, "enabled": _JSONISH},
        optional={"at": _JSONISH},
    ).map(lambda v: json.dumps(v).encode())
    | st.integers(1, 100_000).map(lambda n: b'{"ownership": ' + b"[" * n)
)
def test_channel_message_of_any_bytes_is_an_event_or_skipped(data: bytes) -> None:
    """Whatever arrives on the switches channel is a well-typed event or None (skipped):
    never an exception, which would end the watcher."""
    event = _channel_event(data)
    if isinstance(event, SwitchChange):
        assert event.level in LEVELS
        assert isinstance(event.key, str)
        assert isinstance(event.enabled, bool)
        assert isinstance(event.at, int)
        assert event.at >= 0
    else:
        assert event is None or isinstance(event.gateway, str)


@given(
    st.binary(max_size=40)
    | st.tuples(st.text(max_size=10), st.integers()).map(lambda t: f"{t[0]}:{t[1]}".encode())
)
def test_lease_of_any_bytes_is_a_lease_as_the_scripts_write_it_or_value_error(raw: bytes) -> None:
    """A lease value is `<gateway>:<decimal token>` exactly, or a ValueError the store turns
    into "no lease" (logged), never another exception."""
    try:
        lease = _lease(raw)
    except ValueError:
        return
    assert f"{lease.gateway}:{lease.token}".encode() == raw
    assert lease.gateway
    assert lease.token >= 0
