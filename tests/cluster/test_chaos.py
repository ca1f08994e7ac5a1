"""Console offsets hold under chaos: a bounded, seeded run of bench/chaos.py on real processes.

Redis, three gateways, HAProxy and one-client serial ends (harness.py); two VMs
print fast and four slowly; spectators through HAProxy and straight to the
gateways reconnect with ``?from=`` after every disconnect; `/console-log` is read
on every gateway. The seeded schedule inflicts each kind of fault at least once
(kill -9, SIGSTOP past the lease, SIGTERM, Redis stop/start, CLIENT PAUSE, Redis
restarted empty). bench/chaos.py's module docstring says what the checker holds
the region to; `python -m bench.chaos` is the long soak (docs/operations.md).
"""

from __future__ import annotations

import asyncio

import pytest

from bench.chaos import (
    FAULTS,
    Checker,
    StreamState,
    VmSpec,
    follow,
    print_steadily,
    read_log_once,
    run,
)

from ..conftest import TIMEOUT
from .harness import Region, region
from .processes import START_TIMEOUT, poll_until

__all__ = ["region"]  # the fixture, imported so pytest finds it

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEED = 20261207
CHAOS_SECONDS = 35.0
"""Long enough for the six kinds of fault once each (with recovery between), short
enough for the suite's budget on two cores."""
FROZEN_AFTER_CLAIM = 2.0
"""Seconds a frozen owner stays frozen after another gateway claimed its VM."""


async def test_console_offsets_and_log_hold_under_a_seeded_fault_schedule(region: Region) -> None:
    """No offset carries two bytes, no client sees a record twice or out of order, and
    nothing is missing but what the server announced or no gateway read."""
    outcome = await run(region, seconds=CHAOS_SECONDS, seed=SEED, fast_rate=200_000)
    assert outcome.violation_count == 0, outcome.summary()
    assert not outcome.stalls, outcome.summary()
    assert {f["fault"] for f in outcome.faults} == set(FAULTS), outcome.summary()
    assert outcome.stats["records"] > 0, outcome.summary()
    assert outcome.stats["reconnects"] > 0, outcome.summary()


async def test_owner_thawed_after_its_lease_was_taken_hands_out_no_offset_twice(
    region: Region,
) -> None:
    """A fast VM's owner frozen past its lease: while it sleeps, the VM's output piles
    up in its port's socket and another gateway claims the VM (offsets from the old
    owner's mark on). When it runs again it must not hand that pile to its clients
    before it learns it lost the lease: those offsets are the new owner's."""
    vm = "vm-0"
    owner = (await region.wait_settled())[vm]
    other = region.others(owner)[0]
    spec = VmSpec(vm, fast=True, rate=400_000)
    checker = Checker({vm: spec})
    stats = {"connects": 0, "disconnects": 0, "log_reads": 0}
    stop_printing, stop_clients = asyncio.Event(), asyncio.Event()
    direct, relayed = StreamState("direct", vm), StreamState("relayed", vm)
    tasks = [
        asyncio.create_task(print_steadily(spec, region.ends[vm], stop_printing)),
        asyncio.create_task(follow(region, checker, direct, lambda: owner, stop_clients, stats)),
        asyncio.create_task(follow(region, checker, relayed, lambda: other, stop_clients, stats)),
    ]
    try:
        async with asyncio.timeout(TIMEOUT):
            while min(direct.records, relayed.records) < 50:
                checker.progress.clear()
                await checker.progress.wait()
        owner.freeze()
        try:

            async def taken() -> bool:
                return (await region.routes(other))[vm] != owner.gateway_id

            await poll_until(taken, f"{vm} claimed elsewhere", START_TIMEOUT, other.running)
            await asyncio.sleep(FROZEN_AFTER_CLAIM)  # the fault's shape: output piles up
        finally:
            owner.thaw()
        await region.wait_owner(vm, not_on=owner)
        seen = direct.records
        async with asyncio.timeout(TIMEOUT):
            while direct.records < seen + 200:  # the new owner's output, through the old one
                checker.progress.clear()
                await checker.progress.wait()
        stop_printing.set()
        final = spec.next_seq - 1
        async with asyncio.timeout(TIMEOUT):
            while min(direct.last_seq, relayed.last_seq) < final:
                checker.progress.clear()
                await checker.progress.wait()
        for gateway in region.gateways:
            await read_log_once(region, checker, gateway, vm, None, stats, whole=True)
    finally:
        stop_printing.set()
        stop_clients.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert checker.violation_count == 0, (checker.violations[:10], direct, relayed)
